"""A streaming server: many conversations over WebSocket, batched through ONE engine.

python -m moshivis.server [--preset small | --config CONFIG.json] [--checkpoint PATH]
       [--backend torch|triton] [--max-streams N] [--max-images N] [--memory-budget-mb MB]
       [--host 127.0.0.1] [--port 8998] [--mode realtime|lockstep] [--tick-ms 80]
       [--mimi FILE|DIR [--mimi-config JSON]] [--siglip FILE [--vision-config JSON]] [--tokenizer FILE]

The wire format is `moshivis.protocol`'s (its docstring is the reference). Without --checkpoint the
weights are seeded random (`random_init`), for load tests. Metrics (Prometheus text format) are
served at http://HOST:PORT/metrics on the same port.

Files and audio, as `python -m moshivis.chat` takes them (all from local files, nothing downloaded):
  * --mimi: the Mimi codec; sessions may then open with `audio: "pcm"` and speak 24 kHz PCM frames.
    Each such stream owns a streaming Mimi encoder and decoder (`Media`); they run on the engine
    thread just before and after each engine step, one stream at a time (not batched).
  * --siglip, else a --checkpoint that holds the tower (`image_prefix.enc.model.*`): the SigLIP
    image encoder; `open` and `image` may then carry a PNG or JPEG file (`image_file`). It is
    decoded (Pillow) and encoded on the engine thread between frames, so a large image delays the
    next frame of every stream by its encoding time.
  * --tokenizer: Kyutai's SentencePiece model; every frame reply then carries its transcript piece.
Without the option a feature needs, its messages are answered with error `unsupported` naming it.

Scheduling. One scheduler task owns the engine; every engine call (open, set_image, close, step)
runs on one worker thread, in order, so the engine is never used from two threads and the event
loop stays responsive while a frame computes. Streams join and leave only between frames: opens,
image changes and closes are queued and applied just before the next frame.
  * A stream is stepped from the first frame after its first audio message. From then on it is in
    every frame until it closes; a frame that finds no queued input feeds it silence (the zero token
    -1 on all user codebooks), so a late client never holds the others back. Each `frame` reply
    says which input (`seq`, null for silence) that frame consumed.
  * mode "realtime" (default): the wall clock leads. Frame n is due at t0 + n * `tick_ms` (80 ms).
    A frame that overruns makes the next ones start back to back until the schedule is met again:
    each consumes the inputs whose time has come, so the clients' queues drain and the streams
    keep pace with real time on average. Behind by more than `max_lag_ms`, the schedule is reset
    and the ticks lost are counted (moshivis_skipped_ticks_total).
  * mode "lockstep" (tests, throughput benchmarks): a frame starts as soon as every stepped
    stream has queued input, or when `tick_ms` has passed since the previous frame, whichever comes
    first; streams without input then get silence as above.
  * A frame's latency runs from its due time (realtime; lockstep: its start) to its tokens on the
    host, so it includes any lag; over `budget_ms` (80 ms) it is a deadline miss. The engine
    step alone is measured too (moshivis_step_seconds, `step_ms` in each `frame` reply).

Admission control follows the memory model: the engine preallocates `max_streams` state slots
(self-attention K/V: `StreamState.kv_bytes_per_stream` each) and `max_images` image K/V slots; an
open beyond `max_streams`, or with a new image when every image slot holds another image, is
answered `refused` (codes `server_full`, `image_pool_full`), never queued and never evicting.
`--memory-budget-mb` picks max_streams from the model instead (K/V + one image slot per stream).

Shutdown (SIGINT/SIGTERM, or `await server.shutdown()`): opens are refused, the frame in flight
finishes and is delivered, every client gets `shutdown` with its frame count, streams are closed
and the connections closed (code 1001).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import io
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field

import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from . import checkpoint
from . import protocol as P
from .config import UNGENERATED, ZERO_TOKEN, MoshiVisConfig, preset
from .engine import Engine, StreamError
from .image_pool import ImageError
from .state import StreamState, add_kv_dtype_arg

log = logging.getLogger("moshivis.server")

MODES = ("realtime", "lockstep")
MAX_IMAGE_PIXELS = 1 << 24  # decoded image files beyond 16 Mpixels are refused
FRAME_BUCKETS_S = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.16, 0.24, 0.32, 0.64, 1.28, 2.56)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8998  # 0: any free port (see `Server.port`)
    mode: str = "realtime"
    tick_ms: float = 80.0
    budget_ms: float = 80.0
    max_lag_ms: float = 1000.0  # realtime: further behind schedule than this, skip ticks
    max_queued_frames: int = 25  # audio frames a client may send ahead (2 s)
    max_outbox: int = 250  # replies waiting for a client that does not read: then it is dropped
    max_connections: int = 256  # WebSocket sessions, opened or not; beyond: HTTP 503 at the handshake
    drain_timeout_s: float = 5.0  # for final messages to reach a client on close/shutdown
    max_image_file_bytes: int = 4 << 20  # PNG/JPEG files in open/image (when the server has SigLIP)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("tick_ms", "budget_ms", "max_lag_ms", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("max_queued_frames", "max_outbox", "max_connections", "max_image_file_bytes"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")


def memory_model(cfg: MoshiVisConfig, dtype: torch.dtype, max_streams: int, max_images: int,
                 kv_dtype: str = "auto") -> dict[str, int]:
    """Bytes the engine preallocates: per-stream self-attention K/V (in `kv_dtype`: "auto" = dtype, or
    "int8" with its scales) and per-image cross-attention K/V."""
    kv = StreamState.kv_bytes_per_stream(cfg, dtype, kv_dtype)
    image = cfg.num_image_tokens * 2 * cfg.dim * torch.empty((), dtype=dtype).element_size()
    return {"kv_bytes_per_stream": kv, "image_bytes_per_slot": image,
            "kv_bytes": kv * max_streams, "image_bytes": image * max_images}


def max_streams_for_budget(cfg: MoshiVisConfig, dtype: torch.dtype, budget_bytes: int, kv_dtype: str = "auto") -> int:
    """Streams whose K/V and one image slot each fit in `budget_bytes`."""
    m = memory_model(cfg, dtype, 1, 1, kv_dtype)
    return budget_bytes // (m["kv_bytes_per_stream"] + m["image_bytes_per_slot"])


# ---- metrics --------------------------------------------------------------------------------------
class Metrics:
    """Counters, gauges and the frame-latency histogram, rendered as Prometheus text (format 0.0.4)."""

    def __init__(self):
        self.buckets = [0] * len(FRAME_BUCKETS_S)
        self.step_buckets = [0] * len(FRAME_BUCKETS_S)
        self.frame_seconds_sum = self.step_seconds_sum = 0.0
        self.frames = 0
        self.skipped_ticks = 0
        self.stream_frames = 0
        self.silence_frames = 0
        self.deadline_misses = 0
        self.sessions = 0
        self.refusals: collections.Counter[str] = collections.Counter(
            {"server_full": 0, "image_pool_full": 0, "shutting_down": 0, "too_many_connections": 0})
        self.errors: collections.Counter[str] = collections.Counter()

    def observe_frame(self, seconds: float, step_seconds: float, streams: int, silent: int, missed: bool) -> None:
        for i, le in enumerate(FRAME_BUCKETS_S):
            self.buckets[i] += seconds <= le
            self.step_buckets[i] += step_seconds <= le
        self.frame_seconds_sum += seconds
        self.step_seconds_sum += step_seconds
        self.frames += 1
        self.stream_frames += streams
        self.silence_frames += silent
        self.deadline_misses += missed

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        lines = []

        def metric(name, kind, help_, samples):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {_num(v)}" for labels, v in samples)

        metric("moshivis_frame_seconds", "histogram", "Time from a frame's due time to its tokens on the host.",
               [(f'_bucket{{le="{le}"}}', n) for le, n in zip(FRAME_BUCKETS_S, self.buckets)]
               + [('_bucket{le="+Inf"}', self.frames), ("_sum", self.frame_seconds_sum), ("_count", self.frames)])
        metric("moshivis_step_seconds", "histogram", "Time of the engine step of a frame (all its streams).",
               [(f'_bucket{{le="{le}"}}', n) for le, n in zip(FRAME_BUCKETS_S, self.step_buckets)]
               + [('_bucket{le="+Inf"}', self.frames), ("_sum", self.step_seconds_sum), ("_count", self.frames)])
        metric("moshivis_frames_total", "counter", "Frames computed (one batched engine step each).",
               [("", self.frames)])
        metric("moshivis_stream_frames_total", "counter", "Stream-frames computed (frames x streams in them).",
               [("", self.stream_frames)])
        metric("moshivis_silence_frames_total", "counter", "Stream-frames fed silence for lack of queued input.",
               [("", self.silence_frames)])
        metric("moshivis_deadline_misses_total", "counter", "Frames whose tokens came later than the budget after "
               "their due time.", [("", self.deadline_misses)])
        metric("moshivis_skipped_ticks_total", "counter", "Realtime ticks given up after falling behind by more than "
               "max_lag_ms.", [("", self.skipped_ticks)])
        metric("moshivis_sessions_total", "counter", "WebSocket sessions accepted.", [("", self.sessions)])
        metric("moshivis_refusals_total", "counter", "Opens refused, by reason.",
               [(f'{{reason="{k}"}}', v) for k, v in sorted(self.refusals.items())])
        metric("moshivis_errors_total", "counter", "Client messages answered with an error, by code.",
               [(f'{{code="{k}"}}', v) for k, v in sorted(self.errors.items())])
        for name, (help_, value) in gauges.items():
            metric(name, "gauge", help_, [("", value)])
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


# ---- files and audio ------------------------------------------------------------------------------
class MediaError(ValueError):
    """Codec, image encoder or tokenizer files that do not load or do not fit the model."""


@dataclass
class Media:
    """What turns PCM and image files into the model's inputs and its tokens into PCM and text, as
    `moshivis.chat` does; each part optional (None: the features that need it are refused).

    codec: `moshivis.audio.MimiCodec` (24 kHz, 1920-sample frames, cfg.dep_q codebooks);
    vision: `moshivis.vision.ImageEncoder`; tokenizer: `moshivis.text.TextTokenizer`.
    """
    codec: object = None
    vision: object = None
    tokenizer: object = None

    def check(self, cfg: MoshiVisConfig) -> None:
        c = self.codec
        if c is not None:
            got = (c.sample_rate, c.frame_size, c.num_codebooks, c.codebook_size)
            want = (P.PCM_SAMPLE_RATE, P.PCM_FRAME, cfg.num_audio_in, cfg.audio_card)
            if got != want or cfg.num_audio_in != cfg.dep_q:
                raise MediaError(f"Mimi (rate, frame, codebooks, codebook size) {got} does not fit the model: "
                                 f"needs {want} and num_audio_in == dep_q ({cfg.num_audio_in}, {cfg.dep_q})")
        v = self.vision
        if v is not None and (v.num_tokens, v.hidden_size) != (cfg.num_image_tokens, cfg.image_encoder_dim):
            raise MediaError(f"SigLIP gives {v.num_tokens} x {v.hidden_size} features; the model expects "
                             f"{cfg.num_image_tokens} x {cfg.image_encoder_dim}: check --vision-config")

    def unsupported(self, req) -> str | None:
        """Why this server cannot serve `req` (naming the missing option), or None."""
        kind = type(req).__name__.lower()
        if isinstance(req, P.Open) and req.audio == "pcm" and self.codec is None:
            return "open: audio 'pcm' needs the Mimi codec; this server was started without --mimi"
        if getattr(req, "image_file", None) is not None and self.vision is None:
            return (f"{kind}: image files need the SigLIP image encoder; this server was started without "
                    "--siglip (or a --checkpoint holding image_prefix.enc.model.*): send features instead")
        return None

    def image_features(self, data: bytes) -> torch.Tensor:
        """PNG/JPEG bytes -> SigLIP features (engine thread); ProtocolError bad_image for a bad file."""
        return self.vision.encode(decode_image_file(data))


def decode_image_file(data: bytes):
    """An RGB Pillow image from the bytes of a PNG or JPEG file; ProtocolError bad_image otherwise."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise P.ProtocolError("bad_image", f"image file is {im.width}x{im.height} pixels, over the limit of "
                                                   f"{MAX_IMAGE_PIXELS} pixels")
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise P.ProtocolError("bad_image", "image file is not a PNG or JPEG image Pillow can read") from None
    except Image.DecompressionBombError as e:
        raise P.ProtocolError("bad_image", f"image file is too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise P.ProtocolError("bad_image", f"image file is corrupt or truncated: {e}") from None


@dataclass
class _Codec:
    """One PCM stream's own Mimi state (engine thread only)."""
    encoder: object
    decoder: object


# ---- sessions -------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Session:
    id: int
    ws: ServerConnection
    state: str = "new"  # new -> opening -> open -> closing -> gone
    stream: int | None = None  # engine stream id; written only on the engine thread
    started: bool = False  # stepped in every frame since its first audio message
    inbox: collections.deque = field(default_factory=collections.deque)  # (seq, ref, tokens [num_audio_in])
    seq: int = 0  # accepted audio messages so far
    frames: int = 0  # frames computed for this stream
    ending: bool = False  # its last message and the close are queued
    image_pending: bool = False  # an image change waits for the next frame boundary
    audio: str = "tokens"  # what the session speaks, chosen at open: tokens | pcm
    codec: _Codec | None = None  # pcm sessions; written only on the engine thread
    transcript: object = None  # TranscriptStream when the server has a tokenizer; engine thread
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    writer: asyncio.Task | None = None
    handler_done: bool = False


@dataclass(eq=False)
class _Command:
    kind: str  # open | image | close
    session: _Session
    request: object = None
    reply: bool = True


_SILENCE = object()


class Server:
    """The server around one engine. `await start()`, then `await wait_closed()` or `await shutdown()`."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None, media: Media | None = None):
        self.engine, self.config, self.cfg = engine, config or ServerConfig(), engine.cfg
        self.media = media or Media()
        self.media.check(self.cfg)
        self.limits = P.Limits.for_config(
            self.cfg, self.config.max_image_file_bytes if self.media.vision is not None else 0)
        self.metrics = Metrics()
        self.port: int | None = None
        # torch's CPU thread count is per OS thread under OpenMP: the engine thread takes this one's.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="moshivis-engine", initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),))
        self._sessions: dict[int, _Session] = {}
        self._next_session = 0
        self._commands: list[_Command] = []
        self._reserved = 0  # streams opened or being opened: the admission count
        self._pool_used = 0
        self._tick = 0
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._ws_server = None
        self._scheduler: asyncio.Task | None = None
        self._silence = torch.full((self.cfg.num_audio_in,), ZERO_TOKEN, dtype=torch.long)
        self._silent_pcm = torch.zeros(P.PCM_FRAME)

    # ---- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> "Server":
        self._wake, self._closed = asyncio.Event(), asyncio.Event()
        c = self.config
        self._ws_server = await serve(
            self._handle, c.host, c.port, process_request=self._http, compression=None,
            max_size=2 * self.limits.max_message_bytes,  # up to 2x: a clear `too_large` reply; beyond: close 1009
            close_timeout=c.drain_timeout_s)
        self.port = self._ws_server.sockets[0].getsockname()[1]
        self._scheduler = asyncio.create_task(self._run(), name="moshivis-scheduler")
        return self

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def shutdown(self, reason: str = "server shutting down") -> None:
        """Refuse new opens, finish the frame in flight, tell every client, close everything."""
        if self._stopping:
            await self._closed.wait()
            return
        log.info("shutting down: %s", reason)
        self._stopping = True
        self._wake.set()
        await self._scheduler  # returns after the frame in flight is delivered
        loop = asyncio.get_running_loop()
        for c in self._commands:  # never applied: opens are refused, the rest is moot
            if c.kind == "open":
                self._refuse(c.session, "shutting_down", "the server is shutting down")
        self._commands.clear()
        sessions = list(self._sessions.values())
        await loop.run_in_executor(self._executor, self._close_streams,
                                   [s.stream for s in sessions if s.stream is not None])
        for s in sessions:
            s.stream, s.state = None, "gone"
            self._end(s, P.encode({"type": "shutdown", "reason": reason, "frames": s.frames}), 1001, reason)
        writers = [s.writer for s in sessions if s.writer is not None]
        if writers:
            await asyncio.wait(writers, timeout=self.config.drain_timeout_s)
        self._ws_server.close()
        await self._ws_server.wait_closed()
        self._executor.shutdown(wait=True)
        self._closed.set()

    def _close_streams(self, streams: list[int]) -> None:
        for sid in streams:
            self.engine.close_stream(sid)
        self._pool_used = self.engine.pool.used

    # ---- connections ------------------------------------------------------------------------------
    def _http(self, connection: ServerConnection, request):
        if request.path == "/metrics":
            response = connection.respond(200, self.metrics_text())
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return response
        if len(self._sessions) >= self.config.max_connections or self._stopping:
            self.metrics.refusals["shutting_down" if self._stopping else "too_many_connections"] += 1
            return connection.respond(503, "shutting down\n" if self._stopping else "too many connections\n")
        return None  # on to the WebSocket handshake

    async def _handle(self, ws: ServerConnection) -> None:
        s = _Session(self._next_session, ws)
        self._next_session += 1
        self._sessions[s.id] = s
        self.metrics.sessions += 1
        s.writer = asyncio.create_task(self._write(s))
        try:
            async for data in ws:
                if not s.ending:
                    self._on_message(s, data)
        except ConnectionClosed:
            pass
        finally:
            self._end(s)  # a vanished client: its stream is closed before the next frame
            try:
                await asyncio.wait_for(asyncio.shield(s.writer), self.config.drain_timeout_s)
            except asyncio.TimeoutError:
                pass
            finally:
                s.writer.cancel()
                s.handler_done = True
                if s.state in ("new", "gone"):
                    self._sessions.pop(s.id, None)

    async def _write(self, s: _Session) -> None:
        """Sends `s.outbox` in order; a (code, reason) tuple closes the connection."""
        try:
            while True:
                item = await s.outbox.get()
                if isinstance(item, tuple):
                    await s.ws.close(*item)
                    return
                await s.ws.send(item)
        except ConnectionClosed:
            pass

    def _send(self, s: _Session, data: bytes) -> None:
        if s.ending:
            return
        if s.outbox.qsize() >= self.config.max_outbox:
            log.warning("session %d: dropped, %d replies unread", s.id, s.outbox.qsize())
            self.metrics.errors["slow_client"] += 1
            self._end(s)
            s.ws.transport.abort()  # it reads nothing: a close handshake would wait on it too
            return
        s.outbox.put_nowait(data)

    def _error(self, s: _Session, code: str, message: str, ref=None, fatal: bool = False) -> None:
        self.metrics.errors[code] += 1
        self._send(s, P.encode({"type": "error", "code": code, "message": message, "ref": ref, "fatal": fatal}))

    def _end(self, s: _Session, final: bytes | None = None, code: int = 1000, reason: str = "") -> None:
        """Queue `final` and the close; give the engine stream back before the next frame."""
        if not s.ending:
            if final is not None:
                s.outbox.put_nowait(final)
            s.ending = True
            s.outbox.put_nowait((code, reason))
        if s.state in ("opening", "open"):
            s.state = "closing"
            self._command(_Command("close", s, reply=False))

    def _refuse(self, s: _Session, code: str, reason: str, ref=None) -> None:
        self.metrics.refusals[code] += 1
        if s.state == "opening":
            self._reserved -= 1
        if s.state in ("new", "opening"):
            s.state = "gone"
        self._end(s, P.encode({"type": "refused", "code": code, "reason": reason, "ref": ref}), 1013, code)

    def _command(self, c: _Command) -> None:
        self._commands.append(c)
        self._wake.set()

    # ---- client messages (event loop) -------------------------------------------------------------
    def _on_message(self, s: _Session, data) -> None:
        ref = None
        try:
            msg = P.decode(data, self.limits)
            r = msg.header.get("ref")
            ref = r if isinstance(r, (int, str)) and not isinstance(r, bool) and len(str(r)) <= 64 else None
            req = P.parse_request(msg, self.cfg, self.limits.max_image_file_bytes or None)
        except P.ProtocolError as e:
            self._error(s, e.code, str(e), ref)
            return
        why = self.media.unsupported(req)
        if why is not None:
            self._error(s, "unsupported", why, ref)
            return
        if isinstance(req, P.Open):
            if s.state != "new":
                self._error(s, "out_of_order", "open: this connection has already opened a stream", ref)
            elif self._stopping:
                self._refuse(s, "shutting_down", "the server is shutting down", ref)
            elif self._reserved >= self.engine.max_streams:
                self._refuse(s, "server_full", f"server full: all {self.engine.max_streams} streams are in use; "
                                               "try again later", ref)
            else:
                s.state, s.audio = "opening", req.audio
                self._reserved += 1
                self._command(_Command("open", s, req))
            return
        if s.state != "open":
            what = {"new": "before open", "opening": "before the open is answered"}.get(s.state, "after close")
            self._error(s, "out_of_order", f"{msg.type}: {what}", ref)
            return
        if isinstance(req, P.Audio):
            if (req.pcm is None) != (s.audio == "tokens"):
                want = "'tokens' [num_audio_in]" if s.audio == "tokens" else f"'pcm' [{P.PCM_FRAME}]"
                self._error(s, "bad_message", f"audio: this session speaks {s.audio} (chosen at open): send tensor "
                                              f"{want}", ref)
                return
            if len(s.inbox) >= self.config.max_queued_frames:
                self._error(s, "queue_full", f"audio: {len(s.inbox)} frames already queued (the limit); this "
                                             "frame is dropped: send at most one frame per tick", ref)
                return
            s.inbox.append((s.seq, req.ref, req.tokens if req.pcm is None else req.pcm))
            s.seq += 1
            if not s.started or self.config.mode == "lockstep":
                s.started = True
                self._wake.set()
        elif isinstance(req, P.Image):
            if s.image_pending:
                self._error(s, "out_of_order", "image: the previous image change is not applied yet; wait for "
                                               "its image_set reply", ref)
                return
            s.image_pending = True
            self._command(_Command("image", s, req))
        else:
            s.state = "closing"
            self._command(_Command("close", s, req))

    # ---- scheduler --------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        c = self.config
        tick = c.tick_ms / 1e3
        next_tick = None
        try:
            while not self._stopping:
                self._wake.clear()
                if self._commands:
                    await self._apply_commands()
                    continue
                batch = [s for s in self._sessions.values() if s.state == "open" and s.started]
                now = loop.time()
                if not batch:
                    next_tick = None
                    await self._wake.wait()
                    continue
                if next_tick is None:
                    next_tick = now
                lockstep_ready = c.mode == "lockstep" and all(s.inbox for s in batch)
                if now < next_tick and not lockstep_ready:
                    woken = asyncio.ensure_future(self._wake.wait())  # commands, stop; audio in lockstep
                    await asyncio.wait([woken], timeout=next_tick - now)
                    woken.cancel()
                    continue
                await self._frame(batch, next_tick if c.mode == "realtime" else now)
                now = loop.time()
                if c.mode == "lockstep":
                    next_tick = now + tick
                    continue
                next_tick += tick  # when late, the next frames start at once until back on schedule
                if now - next_tick > c.max_lag_ms / 1e3:
                    skipped = math.ceil((now - next_tick) / tick)
                    next_tick += skipped * tick
                    self.metrics.skipped_ticks += skipped
        except Exception:
            log.exception("scheduler failed; shutting down")
            asyncio.ensure_future(self.shutdown("internal error in the scheduler"))

    async def _apply_commands(self) -> None:
        """Opens, image changes and closes, applied between frames on the engine thread."""
        commands, self._commands = self._commands, []
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._executor, self._apply, commands)
        for c, error in zip(commands, results):
            s, ref = c.session, getattr(c.request, "ref", None)
            if c.kind == "open":
                if error is None:
                    if s.state == "opening":
                        s.state = "open"
                    cfg = self.cfg
                    pcm = {"sample_rate": P.PCM_SAMPLE_RATE, "frame_size": P.PCM_FRAME} if s.audio == "pcm" else {}
                    self._send(s, P.encode({
                        "type": "opened", "stream": s.stream, "protocol": P.PROTOCOL_VERSION, "ref": ref,
                        "mode": self.config.mode, "tick_ms": self.config.tick_ms,
                        "max_queued_frames": self.config.max_queued_frames,
                        "audio": s.audio, "text": self.media.tokenizer is not None, **pcm,
                        "config": {"num_audio_in": cfg.num_audio_in, "num_codebooks_out": cfg.num_codebooks_out,
                                   "text_card": cfg.text_card, "audio_card": cfg.audio_card,
                                   "num_image_tokens": cfg.num_image_tokens,
                                   "image_encoder_dim": cfg.image_encoder_dim, "max_delay": cfg.max_delay}}))
                elif isinstance(error, P.ProtocolError):  # a bad image file: the client may open again
                    if s.state == "opening":
                        s.state, s.audio = "new", "tokens"
                        self._reserved -= 1
                    self._error(s, error.code, f"open: {error}", ref)
                elif isinstance(error, ImageError) and "full" in str(error):
                    self._refuse(s, "image_pool_full", f"image pool full: {error}", ref)
                elif isinstance(error, StreamError) and "slots" in str(error):
                    self._refuse(s, "server_full", f"server full: {error}", ref)
                else:
                    self._refuse(s, "bad_open", f"open failed: {error}", ref)
            elif c.kind == "image":
                s.image_pending = False
                if error is None:
                    self._send(s, P.encode({"type": "image_set", "from_frame": s.frames, "ref": ref}))
                else:
                    code = error.code if isinstance(error, P.ProtocolError) else \
                        "image_pool_full" if "full" in str(error) else "bad_image"
                    self._error(s, code, f"image: {error}", ref)
            else:
                if error is not None:
                    log.error("session %d: closing its stream failed: %s", s.id, error)
                self._reserved -= 1
                s.state = "gone"
                if c.reply:
                    self._end(s, P.encode({"type": "closed", "frames": s.frames, "ref": ref}))
                if s.handler_done:
                    self._sessions.pop(s.id, None)

    def _apply(self, commands: list[_Command]) -> list[Exception | None]:
        """Engine thread."""
        results = []
        for c in commands:
            try:
                r, s, media = c.request, c.session, self.media
                if c.kind in ("open", "image"):
                    image = r.image if r.image_file is None else media.image_features(r.image_file)
                if c.kind == "open":
                    s.stream = self.engine.open_stream(seed=r.seed, image=image, sampling=r.sampling)
                    if r.audio == "pcm":
                        s.codec = _Codec(media.codec.encoder(), media.codec.decoder())
                    if media.tokenizer is not None:
                        s.transcript = media.tokenizer.stream()
                elif c.kind == "image":
                    self.engine.set_image(s.stream, image)
                elif s.stream is not None:
                    self.engine.close_stream(s.stream)
                    s.stream = s.codec = s.transcript = None
                results.append(None)
            except Exception as e:  # the request fails alone
                if not isinstance(e, (StreamError, ImageError, P.ProtocolError)):
                    log.exception("engine call %s failed", c.kind)
                results.append(e)
        self._pool_used = self.engine.pool.used
        return results

    async def _frame(self, batch: list[_Session], scheduled: float) -> None:
        loop = asyncio.get_running_loop()
        inputs = [s.inbox.popleft() if s.inbox else _SILENCE for s in batch]
        tick, self._tick = self._tick, self._tick + 1
        started = loop.time()
        try:
            out, extras = await loop.run_in_executor(self._executor, self._step, batch, inputs)
        except Exception as e:
            log.exception("frame %d failed", tick)
            for s in batch:
                self._error(s, "internal", f"frame {tick} failed: {e}", fatal=True)
                self._end(s, code=1011, reason="internal error")
            return
        done = loop.time()
        seconds, step_seconds = done - scheduled, done - started
        times = {"frame_ms": round(seconds * 1e3, 3), "step_ms": round(step_seconds * 1e3, 3)}
        for i, (s, x) in enumerate(zip(batch, inputs)):
            seq, ref = (None, None) if x is _SILENCE else x[:2]
            header, tensors = extras[i]
            self._send(s, P.encode({"type": "frame", "frame": s.frames, "tick": tick, "seq": seq, "ref": ref, **times,
                                    **header}, {"tokens": out[i], **tensors}))
            s.frames += 1
        silent = sum(x is _SILENCE for x in inputs)
        self.metrics.observe_frame(seconds, step_seconds, len(batch), silent, seconds * 1e3 > self.config.budget_ms)

    def _step(self, batch: list[_Session], inputs: list) -> tuple[torch.Tensor, list[tuple[dict, dict]]]:
        """Engine thread: PCM -> Mimi codes, the engine step, then per stream its PCM and text.

        Returns the tokens [B, 1 + dep_q] int32 and, per stream, the extra (header, tensors) of its
        frame reply. Warm-up frames (tokens -2) get silence and leave the decoder and transcript alone,
        as in `moshivis.chat.converse`.
        """
        rows = []
        for s, x in zip(batch, inputs):
            if s.codec is None:
                rows.append(self._silence if x is _SILENCE else x[2])
            else:
                pcm = self._silent_pcm if x is _SILENCE else x[2]
                rows.append(s.codec.encoder.step(pcm[None])[0].to("cpu", torch.long))
        out = self.engine.step(torch.stack(rows), [s.stream for s in batch]).to("cpu", torch.int32)
        extras = []
        for s, tokens in zip(batch, out):
            header, tensors = {}, {}
            warm = int(tokens[0]) == UNGENERATED
            if s.transcript is not None:
                header["text"] = "" if warm else s.transcript.push(int(tokens[0]))
            if s.codec is not None:
                tensors["pcm"] = self._silent_pcm if warm else \
                    s.codec.decoder.step(tokens[None, 1:].to(torch.long))[0].to("cpu", torch.float32)
            extras.append((header, tensors))
        return out, extras

    # ---- metrics ----------------------------------------------------------------------------------
    def metrics_text(self) -> str:
        e = self.engine
        mem = memory_model(self.cfg, e.dtype, e.max_streams, e.pool.capacity, e.kv_dtype)
        sessions = list(self._sessions.values())
        return self.metrics.render({
            "moshivis_active_streams": ("Streams open in the engine.",
                                        sum(s.state in ("open", "closing") and s.stream is not None for s in sessions)),
            "moshivis_stepped_streams": ("Streams stepped in every frame (they have sent audio).",
                                         sum(s.state == "open" and s.started for s in sessions)),
            "moshivis_connections": ("Open WebSocket sessions.", len(sessions)),
            "moshivis_max_streams": ("Engine stream slots (the admission limit).", e.max_streams),
            "moshivis_image_pool_used": ("Image K/V slots holding an image.", self._pool_used),
            "moshivis_image_pool_capacity": ("Image K/V slots.", e.pool.capacity),
            "moshivis_kv_bytes": ("Preallocated self-attention K/V bytes.", mem["kv_bytes"]),
            "moshivis_image_kv_bytes": ("Preallocated image K/V bytes.", mem["image_bytes"]),
            "moshivis_frame_budget_seconds": ("Frame budget for deadline misses.", self.config.budget_ms / 1e3),
            "moshivis_tick_seconds": ("Frame tick.", self.config.tick_ms / 1e3),
        })


# ---- command line ---------------------------------------------------------------------------------
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def build_engine(args) -> Engine:
    cfg = MoshiVisConfig.from_json(args.config) if args.config else preset(args.preset)
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    if args.checkpoint:
        weights = checkpoint.load(args.checkpoint, cfg, dtype=dtype, device=args.device)
    else:
        weights = checkpoint.random_init(cfg, seed=args.seed, dtype=dtype, device=args.device)
    max_streams = args.max_streams
    if args.memory_budget_mb is not None:
        max_streams = min(max_streams, max_streams_for_budget(cfg, dtype, int(args.memory_budget_mb * 2 ** 20),
                                                              args.kv_dtype))
        if max_streams < 1:
            raise SystemExit(f"--memory-budget-mb {args.memory_budget_mb}: not enough for one stream")
    engine = Engine(cfg, weights, max_streams=max_streams, backend=args.backend,
                    max_images=args.max_images or max_streams, kv_dtype=args.kv_dtype)
    if engine.device.type == "cuda":
        engine.warmup()  # every batch size compiled and captured before the first client
    return engine


def add_engine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="small", help="model sizes (ignored with --config)")
    ap.add_argument("--config", help="config.json of the checkpoint")
    ap.add_argument("--checkpoint", help=".safetensors file or directory of shards (default: seeded random weights)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--max-streams", type=int, default=8)
    ap.add_argument("--max-images", type=int, help="image pool slots (default: max streams)")
    ap.add_argument("--memory-budget-mb", type=float, help="cap max streams by the K/V + image memory model")
    add_kv_dtype_arg(ap)
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 is best on a busy 2-core machine)")


def build_media(args, cfg: MoshiVisConfig, dtype: torch.dtype, device: str) -> Media:
    """The codec, image encoder and tokenizer named on the command line (local files only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach for the hub
    codec = vision = tokenizer = None
    try:
        if args.mimi:
            from .audio import load_mimi
            codec = load_mimi(args.mimi, args.mimi_config, device=device, num_codebooks=cfg.dep_q)
        tower = args.siglip or args.checkpoint
        if tower:
            from .vision import ImageEncoder, VisionError, load_vision_config
            vision_cfg = load_vision_config(args.vision_config) if args.vision_config else None
            try:
                vision = ImageEncoder.load(tower, vision_cfg, dtype=dtype, device=device)
            except VisionError as e:
                if args.siglip or not str(e).startswith("no SigLIP vision weights"):
                    raise
                log.warning("image files are refused: %s", str(e).split(";")[0])
        if args.tokenizer:
            from .text import TextTokenizer
            tokenizer = TextTokenizer(args.tokenizer, text_card=cfg.text_card, padding_id=cfg.padding_token_id)
    except ImportError as e:
        raise MediaError(f"--mimi, --siglip and --tokenizer need the chat extras: {e}") from e
    except ValueError as e:
        raise MediaError(str(e)) from e
    media = Media(codec, vision, tokenizer)
    media.check(cfg)
    return media


def add_media_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--mimi", help="Mimi weights (a .safetensors file, Kyutai's or Hugging Face's layout, or a "
                                   "kyutai/mimi folder): enables PCM sessions")
    ap.add_argument("--mimi-config", help="Mimi config.json (default: the folder's, else kyutai/mimi's)")
    ap.add_argument("--siglip", help="SigLIP weights (.safetensors; default: the --checkpoint's image tower, if it "
                                     "holds one): enables PNG/JPEG image files")
    ap.add_argument("--vision-config", help="SigLIP vision config JSON (default: PaliGemma2-448's tower)")
    ap.add_argument("--tokenizer", help="SentencePiece text tokenizer (tokenizer_spm_32k_3.model): adds the "
                                        "transcript piece to every frame reply")


def add_server_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--mode", default="realtime", choices=MODES)
    ap.add_argument("--tick-ms", type=float, default=80.0)
    ap.add_argument("--budget-ms", type=float, default=80.0)
    ap.add_argument("--max-lag-ms", type=float, default=1000.0, help="realtime: skip ticks when further behind")
    ap.add_argument("--max-queued-frames", type=int, default=25)
    ap.add_argument("--max-image-file-mb", type=float, default=4.0, help="largest PNG/JPEG file accepted")


def server_config(args, host: str, port: int) -> ServerConfig:
    return ServerConfig(host=host, port=port, mode=args.mode, tick_ms=args.tick_ms, budget_ms=args.budget_ms,
                        max_lag_ms=args.max_lag_ms, max_queued_frames=args.max_queued_frames,
                        max_image_file_bytes=int(args.max_image_file_mb * 2 ** 20))


async def _serve(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args)
    media = build_media(args, engine.cfg, engine.dtype, str(engine.device))
    server = await Server(engine, server_config(args, args.host, args.port), media).start()
    mem = memory_model(engine.cfg, engine.dtype, engine.max_streams, engine.pool.capacity, engine.kv_dtype)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(server.shutdown(f"signal {s.name}")))
    print(f"moshivis server: ws://{args.host}:{server.port}/  metrics: http://{args.host}:{server.port}/metrics\n"
          f"  {engine.max_streams} streams x {mem['kv_bytes_per_stream'] / 2**20:.1f} MiB K/V, "
          f"{engine.pool.capacity} image slots x {mem['image_bytes_per_slot'] / 2**20:.1f} MiB; "
          f"mode {args.mode}, tick {args.tick_ms} ms, backend {args.backend}, {engine.device}\n"
          f"  pcm: {'yes' if media.codec else 'no (--mimi)'}, image files: "
          f"{'yes' if media.vision else 'no (--siglip)'}, text: {'yes' if media.tokenizer else 'no (--tokenizer)'}",
          flush=True)
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(ap)
    add_server_args(ap)
    add_media_args(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8998)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        asyncio.run(_serve(args))
    except MediaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
