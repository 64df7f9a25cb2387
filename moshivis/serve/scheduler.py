"""The frame scheduler: one engine, many streams, whatever protocol or deployment carries them.

Protocol adapters (`native`, `kyutai`) turn messages into calls here (`open`, `push_audio`,
`set_image`, `close`) and get events back through their sink (`opened`, `frame`, `image_set`,
`closed`, `ended`, ...), always on the event loop. The scheduler knows nothing of wire formats.

Threads. Every engine call (open, set_image, close, step) runs on ONE engine thread, in order, with
the Mimi encoder of the speech streams just before the step. The Mimi decoder, the transcript and the
protocol's own output work (e.g. Opus) run on an output thread, so frame t's decode overlaps frame
t+1's step (on a GPU the decoder runs on its own CUDA stream). Images are decoded and encoded on the
image worker's thread. Streams join and leave only between frames: opens, image changes and closes are
applied just before the next frame.

Real time (mode "realtime"): the wall clock leads; tick n is due at t0 + n * tick_ms. Policy:
  * A stream is stepped at a tick when it has queued input, consuming its oldest input. A stream
    whose input has not arrived yet is simply not in that tick's frame (counted as a late input):
    the model is never fed invented silence, so its time follows the client's audio, as in Kyutai's
    servers, and a late client never holds the others back.
  * Catch-up: after the tick's frame, streams still holding input that arrived before the tick (a
    stall, then a burst) get extra frames, batched together, at most `max_catchup_per_tick` per tick
    and only while one fits before the next tick (predicted from the measured step time), so streams
    on time are never delayed by them. A stream's delay thus returns to normal within a few ticks.
  * Bound: a stream's queue holds at most `max_queued_frames`; inputs beyond are refused (error
    queue_full to that client) and counted (moshivis_dropped_inputs_total). Nothing is dropped
    silently; catch-up frames are counted too.
  * A frame that overruns makes the next ticks start at once until the schedule is met again; behind
    by more than `max_lag_ms`, the schedule is reset and the ticks lost are counted.
  * An open stream that sends nothing for `input_timeout_s` is closed (reason input_timeout); the
    time counts from its last input or, if later, the frame that consumed its last queued input (a
    stream whose input waits on a slow server is not silent).
Mode "lockstep" (tests, throughput): a frame starts as soon as every stream that has sent audio has
input queued, or `tick_ms` after the previous frame; streams without input wait, as above.

Admission follows the memory the engine preallocated: beyond `max_streams` streams, or with a new
image when every image slot holds another, an open is refused (server_full, image_pool_full).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from .. import protocol as P
from ..config import UNGENERATED
from ..engine import Engine, SamplingParams, StreamError
from ..image_pool import ImageError
from .config import ServerConfig
from .media import ImageWorker, Media
from .metrics import Metrics

log = logging.getLogger("moshivis.server")
IMAGE_BURST = 3  # images a stream may send at once (its open's included) before the rate limit applies


@dataclass
class OpenRequest:
    """What a stream is opened with, whatever the protocol. `image`: features; `image_file`: the bytes of
    an image file, encoded by the image worker with `image_options` (the encoder's keyword arguments)."""
    seed: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    image: torch.Tensor | None = None
    image_file: bytes | None = None
    image_options: dict = field(default_factory=dict)
    audio: str = "tokens"  # tokens | pcm
    xa_start: int = 0
    ref: object = None


@dataclass
class FrameOut:
    """One stream's output of one frame, as handed to its sink."""
    frame: int  # this stream's frame number
    tick: int  # the server's frame counter
    seq: int  # which of the stream's inputs it consumed
    ref: object  # that input's ref
    tokens: torch.Tensor  # [1 + dep_q] int32, -2 during warm-up
    frame_ms: float
    step_ms: float
    warm: bool  # a warm-up frame (no tokens yet)
    pcm: torch.Tensor | None = None  # [1920] float32 for speech streams (zeros during warm-up)
    text: str | None = None  # the transcript piece (with a tokenizer)
    colour: int = 0  # Kyutai's text colour 0..10: how much the frame looked at the image (`moshivis.gates`)
    arrived: float = 0.0  # when the input arrived (loop time)
    extra: object = None  # the sink's own per-frame output (`prepare`)


@dataclass(eq=False)
class Stream:
    sink: object
    request: OpenRequest
    state: str = "opening"  # opening -> open -> closing -> gone
    engine_id: int | None = None  # written on the engine thread
    slot: int | None = None  # speech codec slot (pcm streams)
    transcript: object = None  # TranscriptStream; output thread
    inbox: collections.deque = field(default_factory=collections.deque)  # (seq, ref, payload, arrived)
    seq: int = 0  # inputs accepted so far
    frames: int = 0  # frames computed
    started: bool = False  # has sent audio (lockstep waits only for these)
    image_busy: bool = False  # an image change is being encoded or applied
    image_tokens: float = IMAGE_BURST  # the image rate limit's bucket
    last_image: float = 0.0
    last_input: float = 0.0  # loop time of the last input (or the open), or when its queue last ran dry

    @property
    def audio(self) -> str:
        return self.request.audio


@dataclass(eq=False)
class _Command:
    kind: str  # open | image | close
    stream: Stream
    image: torch.Tensor | None = None
    ref: object = None
    reply: bool = True


class Scheduler:
    """Owns the engine. `await start()`, then the adapters' calls; `await shutdown(reason)` ends it."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None, media: Media | None = None):
        self.engine, self.config, self.cfg = engine, config or ServerConfig(), engine.cfg
        self.media = media or Media()
        self.media.check(self.cfg)
        self.metrics = Metrics()
        # torch's CPU thread count is per OS thread under OpenMP: the worker threads take this one's.
        threads = dict(initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
        self._engine_ex = concurrent.futures.ThreadPoolExecutor(1, "moshivis-engine", **threads)
        self._output_ex = concurrent.futures.ThreadPoolExecutor(1, "moshivis-output", **threads)
        self.images = ImageWorker(self.media.vision, self.config.max_pending_images, self.config.max_upload_bytes,
                                  self.metrics.stages["image"].observe) if self.media.vision is not None else None
        self.speech = None  # the speech streams' batched streaming Mimi: one slot per stream
        if self.media.codec is not None:
            from ..codec import MimiStreams
            self.speech = MimiStreams(self.media.codec, engine.max_streams)
        self._free_slots = list(range(engine.max_streams))
        self._decode_stream = None
        self.streams: set[Stream] = set()
        self._commands: list[_Command] = []
        # The admission count: streams opened or being opened. A closing stream no longer counts: its close
        # is applied before any later open, so its engine slot is free by then.
        self._reserved = 0
        self._encoding = 0  # opens waiting for their image's features
        self._pool_used = 0
        self._tick = 0
        self._recent_steps: collections.deque[float] = collections.deque([0.0], maxlen=16)  # seconds
        self._outputs: set[asyncio.Future] = set()
        self.stopping = False
        self.replica: str | None = None  # set by a deployment of several engines (ray_app): named in `opened`
        self._wake: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._silence = None

    @property
    def admitted(self) -> int:
        """Streams counted by admission (open or being opened), against the engine's `max_streams`."""
        return self._reserved

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> "Scheduler":
        if self.speech is not None and self.speech.device.type == "cuda":
            self.speech.warmup()  # every batch size captured before the first stream, as the engine's
        self._wake, self._closed = asyncio.Event(), asyncio.Event()
        self._loop_task = asyncio.create_task(self._run(), name="moshivis-scheduler")
        return self

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def shutdown(self, reason: str = "server shutting down") -> None:
        """Refuse new opens, finish the frame in flight and its output, end every stream."""
        if self.stopping:
            await self._closed.wait()
            return
        log.info("shutting down: %s", reason)
        self.stopping = True
        self._wake.set()
        await self._loop_task  # returns after the frame in flight
        if self._outputs:
            await asyncio.wait(list(self._outputs))
        for c in self._commands:  # never applied: opens are refused, the rest is moot
            if c.kind == "open" and c.stream.state == "opening":
                self._fail_open(c.stream, "shutting_down", "the server is shutting down", refused=True)
        self._commands.clear()
        streams = [s for s in self.streams if s.engine_id is not None]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._engine_ex, self._close_all, streams)
        for s in list(self.streams):
            self._gone(s)
            s.sink.ended(s, "shutdown", reason)
        if self.images is not None:
            self.images.shutdown()
        self._engine_ex.shutdown(wait=True)
        self._output_ex.shutdown(wait=True)
        self._closed.set()

    def _close_all(self, streams: list[Stream]) -> None:
        for s in streams:
            self.engine.close_stream(s.engine_id)
            s.engine_id = None
        self._pool_used = self.engine.pool.used

    # ---- requests from protocol adapters (event loop) ---------------------------------------------
    def open(self, sink, request: OpenRequest) -> Stream:
        """A new stream for `sink`; its answer comes as `sink.opened(stream)` or `sink.open_failed(...)`.
        Raises ProtocolError for what the server cannot serve (unsupported)."""
        why = self.media.missing(pcm=request.audio == "pcm", image_file=request.image_file is not None)
        if why is not None:
            raise P.ProtocolError("unsupported", f"open: {why}")
        now = asyncio.get_running_loop().time()
        s = Stream(sink, request, last_input=now, last_image=now)
        if request.image is not None or request.image_file is not None:
            s.image_tokens -= 1
        if self.stopping:
            self._fail_open(s, "shutting_down", "the server is shutting down", refused=True)
        elif self._reserved >= self.engine.max_streams:
            self._fail_open(s, "server_full", f"server full: all {self.engine.max_streams} streams are in use; try "
                                              "again later", refused=True)
        else:
            self._reserved += 1
            self.streams.add(s)
            if request.image_file is None:
                self._command(_Command("open", s, request.image, request.ref))
            else:
                self._encoding += 1
                asyncio.get_running_loop().create_task(self._encode_then(s, request.image_file,
                                                                         request.image_options, "open"))
        return s

    def push_audio(self, s: Stream, payload: torch.Tensor, ref=None, arrived: float | None = None) -> None:
        """Queue one frame of input (tokens [num_audio_in] or pcm [1920]); ProtocolError queue_full beyond
        the bound. `arrived`: when it came in (default now)."""
        if s.state != "open":
            raise P.ProtocolError("out_of_order", f"audio: {_when(s)}")
        if len(s.inbox) >= self.config.max_queued_frames:
            self.metrics.dropped_inputs += 1
            raise P.ProtocolError("queue_full", f"audio: {len(s.inbox)} frames already queued (the limit); this "
                                                "frame is dropped: send at most one frame per tick")
        now = asyncio.get_running_loop().time()
        s.inbox.append((s.seq, ref, payload, now if arrived is None else arrived))
        s.seq += 1
        s.last_input = now
        if not s.started or self.config.mode == "lockstep":
            s.started = True
            self._wake.set()

    def set_image(self, s: Stream, image: torch.Tensor | None = None, image_file: bytes | None = None,
                  options: dict | None = None, ref=None) -> None:
        """Attach, replace or remove (neither given) the stream's image from a coming frame; answered by
        `sink.image_set(stream, from_frame, ref)` or `sink.image_failed(...)`."""
        if s.state != "open":
            raise P.ProtocolError("out_of_order", f"image: {_when(s)}")
        why = self.media.missing(image_file=image_file is not None)
        if why is not None:
            raise P.ProtocolError("unsupported", f"image: {why}")
        if s.image_busy:
            raise P.ProtocolError("out_of_order", "image: the previous image change is not applied yet; wait for "
                                                  "its answer")
        if image is not None or image_file is not None:
            self._take_image_token(s, asyncio.get_running_loop().time())
        s.image_busy = True
        if image_file is None:
            self._command(_Command("image", s, image, ref))
        else:
            asyncio.get_running_loop().create_task(self._encode_then(s, image_file, options or {}, "image", ref))

    def close(self, s: Stream, ref=None, reply: bool = True) -> None:
        """End the stream (queued input is discarded); `sink.closed(stream, ref)` when done if `reply`.
        Safe to call in any state and more than once."""
        if s.state in ("opening", "open"):
            s.state = "closing"
            self._reserved -= 1
            s.inbox.clear()
            self._command(_Command("close", s, ref=ref, reply=reply))
        elif s.state == "gone" and reply:
            s.sink.closed(s, ref)

    # ---- internals --------------------------------------------------------------------------------
    async def _encode_then(self, s: Stream, data: bytes, options: dict, kind: str, ref=None) -> None:
        """Image file -> features on the image worker, then the open or image change on the engine."""
        error = None  # (code, message): never the exception, whose traceback would hold the image's bytes
        try:
            features = await self.images.encode(data, **options)
        except Exception as e:  # noqa: BLE001 - the request fails alone
            features, error = None, (getattr(e, "code", "bad_image"), str(e))
            if not isinstance(e, P.ProtocolError):
                log.exception("image encoding failed")
        del data
        s.request.image_file = None  # encoded: its bytes need not live on with the stream
        if kind == "open":
            self._encoding -= 1
            if s.state != "opening":  # the client left (or the server stopped) while its image was encoded
                self._gone(s)
                return
            if error is not None:
                self._fail_open(s, error[0], f"open: {error[1]}", refused=False)
                return
            self._command(_Command("open", s, features, s.request.ref))
        else:
            if s.state != "open":
                return
            if error is not None:
                s.image_busy = False
                s.sink.image_failed(s, error[0], f"image: {error[1]}", ref)
                return
            self._command(_Command("image", s, features, ref))

    def _take_image_token(self, s: Stream, now: float) -> None:
        """A token bucket per stream: IMAGE_BURST images at once, then one per `image_interval_s`."""
        interval = self.config.image_interval_s
        s.image_tokens = min(IMAGE_BURST, s.image_tokens + (now - s.last_image) / interval)
        s.last_image = now
        if s.image_tokens < 1:
            wait = (1 - s.image_tokens) * interval
            raise P.ProtocolError("rate_limited", f"image: at most {IMAGE_BURST} images at once, then one per "
                                                  f"{interval:g} s per stream; try again in {wait:.2f} s")
        s.image_tokens -= 1

    def _command(self, c: _Command) -> None:
        self._commands.append(c)
        self._wake.set()

    def _gone(self, s: Stream) -> None:
        if s.state != "gone":
            if s in self.streams:  # admitted: it held a reservation until it began closing
                self._reserved -= s.state != "closing"
                self.streams.discard(s)
            s.state = "gone"
            s.inbox.clear()
            if s.slot is not None:  # reusable at once: its codec halves are reset in order on their threads
                self._free_slots.append(s.slot)
                s.slot = None

    def _fail_open(self, s: Stream, code: str, message: str, refused: bool) -> None:
        if refused:  # errors are counted by the session that reports them
            self.metrics.refusals[code] += 1
        s.request.image = s.request.image_file = None
        self._gone(s)
        s.sink.open_failed(s, code, message, refused)

    def _end(self, s: Stream, reason: str, message: str) -> None:
        """A server-side end (input timeout, internal error): close the stream, tell its sink."""
        self.metrics.closes[reason] += 1
        log.info("stream %s closed: %s", s.engine_id, message)
        self.close(s, reply=False)
        s.sink.ended(s, reason, message)

    async def _apply_commands(self) -> None:
        commands, self._commands = self._commands, []
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._engine_ex, self._apply, commands)
        for c, error in zip(commands, results):
            s = c.stream
            if c.kind == "open":
                if s.state != "opening":  # closed before its open was applied: the close follows
                    continue
                if error is None:
                    s.state, s.last_input = "open", loop.time()
                    if s.audio == "pcm":
                        s.slot = self._free_slots.pop()
                        self._output_ex.submit(self.speech.decoder.reset, s.slot)  # each half on its thread,
                        self._engine_ex.submit(self.speech.encoder.reset, s.slot)  # before the slot's next frame
                    if self.media.tokenizer is not None:
                        s.transcript = self.media.tokenizer.stream()
                    s.sink.opened(s)
                elif isinstance(error, ImageError) and "full" in str(error):
                    self._fail_open(s, "image_pool_full", f"image pool full: {error}", refused=True)
                elif isinstance(error, StreamError) and "slots" in str(error):
                    self._fail_open(s, "server_full", f"server full: {error}", refused=True)
                else:
                    self._fail_open(s, "bad_open", f"open failed: {error}", refused=True)
            elif c.kind == "image":
                s.image_busy = False
                if s.state != "open":
                    continue
                if error is None:
                    s.sink.image_set(s, s.frames, c.ref)
                else:
                    s.sink.image_failed(s, "image_pool_full" if "full" in str(error) else "bad_image",
                                        f"image: {error}", c.ref)
            else:
                if error is not None:
                    log.error("closing stream %s failed: %s", s.engine_id, error)
                self._gone(s)
                if c.reply:
                    s.sink.closed(s, c.ref)

    def _apply(self, commands: list[_Command]) -> list[Exception | None]:
        """Engine thread."""
        results = []
        for c in commands:
            s, r = c.stream, c.stream.request
            try:
                if c.kind == "open":
                    if s.state == "opening":
                        s.engine_id = self.engine.open_stream(seed=r.seed, image=c.image, sampling=r.sampling,
                                                              xa_start=r.xa_start)
                elif c.kind == "image":
                    if s.engine_id is not None:
                        self.engine.set_image(s.engine_id, c.image)
                elif s.engine_id is not None:
                    self.engine.close_stream(s.engine_id)
                    s.engine_id = None
                results.append(None)
            except Exception as e:  # noqa: BLE001 - the request fails alone
                if not isinstance(e, (StreamError, ImageError, P.ProtocolError)):
                    log.exception("engine call %s failed", c.kind)
                results.append(e)
        self._pool_used = self.engine.pool.used
        return results

    # ---- the frame loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        c = self.config
        tick = c.tick_ms / 1e3
        next_tick = None
        try:
            while not self.stopping:
                self._wake.clear()
                if self._commands:
                    await self._apply_commands()
                    continue
                now = loop.time()
                self._expire(now)
                live = [s for s in self.streams if s.state == "open" and s.started]
                if not any(s.inbox for s in live) and (c.mode == "lockstep" or not live):
                    next_tick = None if not live else next_tick
                    await self._sleep(1.0 if not live else tick)  # input timeouts are checked meanwhile
                    continue
                if next_tick is None:
                    next_tick = now
                ready = c.mode == "lockstep" and all(s.inbox for s in live)
                if now < next_tick and not ready:
                    await self._sleep(next_tick - now)
                    continue
                due = next_tick if c.mode == "realtime" else now
                batch = [s for s in live if s.inbox]
                self.metrics.late_inputs += len(live) - len(batch)
                if batch:
                    await self._frame(batch, due, catchup=False)
                del live, batch  # not held while the loop waits: a stream that closes meanwhile is freed at once
                if c.mode == "lockstep":
                    next_tick = loop.time() + tick
                    continue
                next_tick += tick
                await self._catch_up(due, next_tick)
                now = loop.time()
                if now - next_tick > c.max_lag_ms / 1e3:
                    skipped = math.ceil((now - next_tick) / tick)
                    next_tick += skipped * tick
                    self.metrics.skipped_ticks += skipped
        except Exception:
            log.exception("scheduler failed; shutting down")
            asyncio.ensure_future(self.shutdown("internal error in the scheduler"))

    async def _sleep(self, seconds: float) -> None:
        """Until `seconds` pass or something wakes the loop (commands, input, stop)."""
        woken = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait([woken], timeout=seconds)
        woken.cancel()

    async def _catch_up(self, due: float, next_tick: float) -> None:
        """Extra frames for streams holding input that arrived before this tick's due time, while one
        fits before the next tick."""
        loop = asyncio.get_running_loop()
        margin = 0.1 * self.config.tick_ms / 1e3
        for _ in range(self.config.max_catchup_per_tick):
            if self._commands or self.stopping:
                return
            behind = [s for s in self.streams if s.state == "open" and s.inbox and s.inbox[0][3] <= due]
            if not behind or loop.time() + statistics.median(self._recent_steps) > next_tick - margin:
                return
            await self._frame(behind, loop.time(), catchup=True)

    def _expire(self, now: float) -> None:
        limit = self.config.input_timeout_s
        for s in [s for s in self.streams if s.state == "open" and not s.inbox and now - s.last_input > limit]:
            self._end(s, "input_timeout", f"no input for {limit:g} s: the stream is closed")

    async def _frame(self, batch: list[Stream], due: float, catchup: bool) -> None:
        loop = asyncio.get_running_loop()
        inputs = [s.inbox.popleft() for s in batch]
        slots = [s.slot for s in batch]
        tick, self._tick = self._tick, self._tick + 1
        try:
            out, colours, encode_s, step_s = await loop.run_in_executor(self._engine_ex, self._step, batch,
                                                                        inputs, slots)
        except Exception as e:  # noqa: BLE001
            log.exception("frame %d failed", tick)
            for s in batch:
                self._end(s, "internal", f"frame {tick} failed: {e}")
            return
        done = loop.time()
        self._recent_steps.append(step_s + encode_s)  # their median predicts whether a catch-up frame fits
        seconds = done - due
        self.metrics.observe_frame(seconds, len(batch), catchup, seconds * 1e3 > self.config.budget_ms)
        self.metrics.stages["step"].observe(step_s)
        if any(s.audio == "pcm" for s in batch):
            self.metrics.stages["encode"].observe(encode_s)
        outs = []
        for i, (s, (seq, ref, _, arrived)) in enumerate(zip(batch, inputs)):
            tokens = out[i]
            outs.append(FrameOut(frame=s.frames, tick=tick, seq=seq, ref=ref, tokens=tokens,
                                 frame_ms=round(seconds * 1e3, 3), step_ms=round(step_s * 1e3, 3),
                                 warm=int(tokens[0]) == UNGENERATED, colour=colours[i], arrived=arrived))
            s.frames += 1
            if not s.inbox:  # its queue ran dry: the input timeout counts from now
                s.last_input = done
        future = loop.run_in_executor(self._output_ex, self._finish, batch, outs, slots)
        self._outputs.add(future)
        future.add_done_callback(lambda f: self._deliver(f, batch))

    def _step(self, batch: list[Stream], inputs: list, slots: list[int | None]) -> tuple:
        """Engine thread: Mimi encode of the speech streams, then the engine step. Returns the tokens
        [B, 1 + dep_q] int32, each stream's text colour (Kyutai's, from this frame's gates), and the encode
        and step seconds."""
        t0 = time.perf_counter()
        user = torch.empty(len(batch), self.cfg.num_audio_in, dtype=torch.long)
        speech = [i for i, s in enumerate(batch) if s.audio == "pcm"]
        for i, s in enumerate(batch):
            if s.audio != "pcm":
                user[i] = inputs[i][2]
        if speech:
            pcm = torch.stack([inputs[i][2] for i in speech])
            user[speech] = self.speech.encode(pcm, [slots[i] for i in speech])
        t1 = time.perf_counter()
        ids = [s.engine_id for s in batch]
        out = self.engine.step(user, ids).to(torch.int32)
        colours = self.engine.text_colors(ids)  # read with the tokens: no extra synchronisation
        return out, colours, t1 - t0, time.perf_counter() - t1

    def _finish(self, batch: list[Stream], outs: list[FrameOut], slots: list[int | None]) -> list[FrameOut]:
        """Output thread: Mimi decode of the speech streams past warm-up, transcript pieces, and each
        sink's own output work (`prepare`)."""
        t0 = time.perf_counter()
        speech = [i for i, s in enumerate(batch) if s.audio == "pcm"]
        talking = [i for i in speech if not outs[i].warm]
        if talking:
            if self._decode_stream is None and self.speech.codec.device.type == "cuda":
                self._decode_stream = torch.cuda.Stream(self.speech.codec.device)
            codes = torch.stack([outs[i].tokens[1:] for i in talking]).to(torch.long)
            if self._decode_stream is None:
                pcm = self.speech.decode(codes, [slots[i] for i in talking])
            else:
                with torch.cuda.stream(self._decode_stream):
                    pcm = self.speech.decode(codes, [slots[i] for i in talking])
            for i, p in zip(talking, pcm):
                outs[i].pcm = p
        for i in speech:
            if outs[i].pcm is None:
                outs[i].pcm = torch.zeros(P.PCM_FRAME)
        for s, o in zip(batch, outs):
            if s.transcript is not None:
                o.text = "" if o.warm else s.transcript.push(int(o.tokens[0]))
        if speech:
            self.metrics.stages["decode"].observe(time.perf_counter() - t0)
        for s, o in zip(batch, outs):
            o.extra = s.sink.prepare(s, o)
        return outs

    def _deliver(self, future: asyncio.Future, batch: list[Stream]) -> None:
        self._outputs.discard(future)
        if future.cancelled():
            return
        if future.exception() is not None:
            log.error("frame output failed", exc_info=future.exception())
            for s in batch:
                if s.state == "open":
                    self._end(s, "internal", f"frame output failed: {future.exception()}")
            return
        now = asyncio.get_running_loop().time()
        for s, o in zip(batch, future.result()):
            if s.state == "open":
                self.metrics.input_delay.observe(now - o.arrived)
                s.sink.frame(s, o)

    # ---- figures ----------------------------------------------------------------------------------
    def gauges(self) -> dict[str, tuple[str, float]]:
        from .options import memory_model
        e = self.engine
        mem = memory_model(self.cfg, e.dtype, e.max_streams, e.pool.capacity, e.kv_dtype)
        return {
            "moshivis_active_streams": ("Streams open in the engine.", sum(s.state in ("open", "closing")
                                                                          for s in self.streams)),
            "moshivis_stepped_streams": ("Open streams that have sent audio.",
                                         sum(s.state == "open" and s.started for s in self.streams)),
            "moshivis_max_streams": ("Engine stream slots (the admission limit).", e.max_streams),
            "moshivis_images_encoding": ("Opens waiting for their image's features.", self._encoding),
            "moshivis_image_pool_used": ("Image K/V slots holding an image.", self._pool_used),
            "moshivis_image_pool_capacity": ("Image K/V slots.", e.pool.capacity),
            "moshivis_kv_bytes": ("Preallocated self-attention K/V bytes.", mem["kv_bytes"]),
            "moshivis_image_kv_bytes": ("Preallocated image K/V bytes.", mem["image_bytes"]),
            "moshivis_frame_budget_seconds": ("Frame budget for deadline misses.", self.config.budget_ms / 1e3),
            "moshivis_tick_seconds": ("Frame tick.", self.config.tick_ms / 1e3),
        }

    def stats(self) -> dict:
        """Recent figures for a page (`GET /api/stats`)."""
        p50, p99 = (self.metrics.recent_percentile(q) for q in (0.5, 0.99))
        return {"frame_ms_p50": None if p50 is None else round(p50 * 1e3, 2),
                "frame_ms_p99": None if p99 is None else round(p99 * 1e3, 2),
                "active_streams": sum(s.state in ("open", "closing") for s in self.streams),
                "max_streams": self.engine.max_streams}


def _when(s: Stream) -> str:
    return {"opening": "before the open is answered"}.get(s.state, "after close")
