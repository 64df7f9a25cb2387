"""The server's counters, gauges and histograms, rendered as Prometheus text (format 0.0.4)."""
from __future__ import annotations

import collections

LATENCY_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.16, 0.24, 0.32, 0.64, 1.28, 2.56)
STAGES = ("image", "encode", "step", "decode")
RECENT_FRAMES = 250  # /api/stats: percentiles over the last 20 s of frames


class Histogram:
    def __init__(self, buckets=LATENCY_BUCKETS_S):
        self.le = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        for i, le in enumerate(self.le):
            self.counts[i] += seconds <= le
        self.sum += seconds
        self.count += 1

    def samples(self, labels: str = "") -> list[tuple[str, float]]:
        """(suffix with labels, value) lines of this histogram; `labels` like 'stage="step"'."""
        sep = "," if labels else ""
        out = [(f'_bucket{{{labels}{sep}le="{le}"}}', n) for le, n in zip(self.le, self.counts)]
        out.append((f'_bucket{{{labels}{sep}le="+Inf"}}', self.count))
        braces = f"{{{labels}}}" if labels else ""
        return out + [(f"_sum{braces}", self.sum), (f"_count{braces}", self.count)]


class Metrics:
    """Everything /metrics reports. Counters only grow; `closes` and `refusals` are labelled by reason."""

    def __init__(self):
        self.frame = Histogram()        # due time -> tokens on the host
        self.input_delay = Histogram()  # an input's arrival -> its frame's reply handed to the connection
        self.stages = {s: Histogram() for s in STAGES}
        self.recent_frame_s: collections.deque[float] = collections.deque(maxlen=RECENT_FRAMES)
        self.frames = 0
        self.catchup_frames = 0
        self.stream_frames = 0
        self.catchup_stream_frames = 0
        self.late_inputs = 0       # stream-ticks at which a stepped stream had no input yet
        self.dropped_inputs = 0    # inputs refused because the stream's queue was full
        self.deadline_misses = 0
        self.skipped_ticks = 0
        self.sessions = 0
        self.refusals: collections.Counter[str] = collections.Counter(
            {"server_full": 0, "image_pool_full": 0, "shutting_down": 0, "too_many_connections": 0})
        self.errors: collections.Counter[str] = collections.Counter()
        self.closes: collections.Counter[str] = collections.Counter()

    def observe_frame(self, seconds: float, streams: int, catchup: bool, missed: bool) -> None:
        self.frame.observe(seconds)
        self.recent_frame_s.append(seconds)
        self.frames += 1
        self.stream_frames += streams
        self.catchup_frames += catchup
        self.catchup_stream_frames += streams if catchup else 0
        self.deadline_misses += missed

    def recent_percentile(self, q: float) -> float | None:
        if not self.recent_frame_s:
            return None
        xs = sorted(self.recent_frame_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        metric("moshivis_frame_seconds", "histogram", "Time from a frame's due time (a catch-up frame's: its start) to "
               "its tokens on the host.",
               self.frame.samples())
        metric("moshivis_input_delay_seconds", "histogram", "Time from an input's arrival to the reply of the "
               "frame that consumed it.", self.input_delay.samples())
        metric("moshivis_stage_seconds", "histogram", "Time of each stage of a frame: image (decode + SigLIP, per "
               "batch of images), encode (Mimi, all speech streams), step (the engine), decode (Mimi + text).",
               [x for s, h in self.stages.items() for x in h.samples(f'stage="{s}"')])
        metric("moshivis_step_seconds", "histogram", "Time of the engine step of a frame (all its streams).",
               self.stages["step"].samples())
        metric("moshivis_frames_total", "counter", "Frames computed (one batched engine step each).",
               [("", self.frames)])
        metric("moshivis_catchup_frames_total", "counter", "Extra frames run within a tick for streams behind "
               "their input.", [("", self.catchup_frames)])
        metric("moshivis_stream_frames_total", "counter", "Stream-frames computed (frames x streams in them).",
               [("", self.stream_frames)])
        metric("moshivis_catchup_stream_frames_total", "counter", "Stream-frames computed in catch-up frames.",
               [("", self.catchup_stream_frames)])
        metric("moshivis_late_inputs_total", "counter", "Ticks at which a stream had no input yet (it is stepped "
               "when its input arrives, never fed invented silence).", [("", self.late_inputs)])
        metric("moshivis_dropped_inputs_total", "counter", "Inputs refused because their stream's queue was full.",
               [("", self.dropped_inputs)])
        metric("moshivis_deadline_misses_total", "counter", "Frames whose tokens came later than the budget after "
               "their due time.", [("", self.deadline_misses)])
        metric("moshivis_skipped_ticks_total", "counter", "Realtime ticks given up after falling behind by more than "
               "max_lag_ms.", [("", self.skipped_ticks)])
        metric("moshivis_sessions_total", "counter", "WebSocket sessions accepted.", [("", self.sessions)])
        metric("moshivis_refusals_total", "counter", "Opens or connections refused, by reason.",
               [(f'{{reason="{k}"}}', v) for k, v in sorted(self.refusals.items())])
        metric("moshivis_errors_total", "counter", "Client messages answered with an error, by code.",
               [(f'{{code="{k}"}}', v) for k, v in sorted(self.errors.items())])
        metric("moshivis_closes_total", "counter", "Connections the server closed, by reason.",
               [(f'{{reason="{k}"}}', v) for k, v in sorted(self.closes.items())])
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
