"""Kyutai's own wire protocol on `/api/chat`, so Kyutai's clients (the MoshiVis and Moshi web clients,
`moshi.client`, `moshi-cli`) talk to our engine.

Every message is binary, its first byte the kind (Kyutai's `rust/protocol.md`):
  0x00 handshake   S->C  sent once the stream is open (after the image is encoded): 00 + u32 protocol
                         version 0 + u32 model version 0, as Kyutai's Rust servers send it
  0x01 audio       both  Ogg pages of 24 kHz mono Opus; page boundaries need not match messages
  0x02 text        S->C  a UTF-8 piece of the transcript (sessions without an image: Moshi's clients)
  0x05 error       S->C  UTF-8 reason (a bad request, a full server: then the connection closes)
  0x06 ping        both  answered with 0x06 (a page measures its round trip with it)
  0x07 coloured    S->C  colour byte 0..10 + UTF-8 piece (sessions with an image: MoshiVis' clients);
                         colour = round(clamp((g - 0.005) / 0.016, 0, 1) * 10), g the cross-attention
                         gate averaged over the last 10 layers in the frame that produced the token
  0x08 image       C->S  the bytes of an image file (PNG, JPEG, WebP, GIF, BMP)
  0x03 control, 0x0A rating (C->S) are accepted and ignored (logged); any other kind is answered 0x05.
Nothing else is ever sent (a Kyutai client's decoder throws on kinds it does not know).

Session start, as MoshiVis does it: the client may send 0x08 + image as its first message without
waiting; the server answers 0x00 once the image is encoded and the stream is open. A first message of
audio (Moshi's clients send no image) opens a stream without an image, and so does silence for
NO_IMAGE_AFTER_S when the query does not ask for an image (Moshi's web client sends nothing before the
handshake; MoshiVis' sends `xa_start` with its picture, and such a client is waited for up to the open
timeout). A later 0x08 replaces the image (our extension; Kyutai's clients never send one). A refused
open (full server) is answered 0x05 with the reason, then the connection closes. There is no close message: either side closes the socket.

Query parameters (those Kyutai's web clients send), each range-checked (a bad value: 0x05 naming it):
  text_temperature, audio_temperature (>= 0), text_topk, audio_topk (>= 1; at or above the vocabulary
      keeps every token):
      the stream's sampling (absent: our defaults, Kyutai's PyTorch ones: 0.7/25 text, 0.8/250 audio)
  text_seed, audio_seed (integers >= 0): together key the stream's random draws (the engine draws
      text and audio from one counter-based generator keyed by one seed); absent: a random seed
  repetition_penalty (> 0, 1 = none), repetition_penalty_context (0..256 text tokens): on the text
      token, as Kyutai's Rust server applies it (`SamplingParams`)
  image_resolution (pixels): the square side the image is resized to, rounded to the patch and clamped
      to [10 x patch, the encoder's own size] as Kyutai's Rust server does; center_crop (true/false):
      the central square is cut out first
  xa_start (frames >= 0): the stream looks at its image only from that frame on; absent: 16, what
      Kyutai's MoshiVis web client always sends (their servers fall back to 0; send xa_start=0 for that)
  max_steps (frames >= 1): the session ends after that many frames (Kyutai's Rust server: 4500 cap)
  pad_mult (range-checked), text_temperature_gating_influence, worker_auth_id, email and unknown
      names: ignored, as Kyutai's MoshiVis PyTorch server ignores them (its web client sends pad_mult 0
      and gating influence 0, which change nothing)
"""
from __future__ import annotations

import asyncio
import logging
import math
import secrets

import numpy as np
import torch

from .. import protocol as P
from ..engine import SamplingParams
from ..state import TEXT_HISTORY
from .scheduler import OpenRequest
from .session import Session

log = logging.getLogger("moshivis.server")

HANDSHAKE, AUDIO, TEXT, CONTROL, METADATA, ERROR, PING, COLORED_TEXT, IMAGE, RATING = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x0A)
PATH = "/api/chat"
MAX_AUDIO_MESSAGE = 1 << 16  # an Ogg page is at most 65307 bytes
OGG_SLICE = 4096
MAX_OGG_HEADER = 27 + 255
MAX_TOPK = 1 << 31  # a top-k at or above the vocabulary keeps every token (as Kyutai's samplers do)
IGNORED = ("text_temperature_gating_influence", "worker_auth_id", "email")
NO_IMAGE_AFTER_S = 1.0  # a client silent this long, its query not asking for an image: opened without one
DEFAULT_XA_START = 16  # frames: Kyutai's MoshiVis web client's value, which it always sends
IMAGE_QUERY = ("xa_start", "image_resolution", "center_crop")  # what MoshiVis' web client sends with a picture


def _number(query: dict, name: str, kind, lo, hi, default):
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise P.ProtocolError("bad_query", f"query parameter {name}={raw!r} is not {'an integer' if kind is int else 'a number'}") from None
    if isinstance(value, float) and not math.isfinite(value) or not lo <= value <= hi:
        raise P.ProtocolError("bad_query", f"query parameter {name}={raw!r} is out of range [{lo}, {hi}]")
    return value


def parse_query(query: dict[str, str]) -> tuple[OpenRequest, int | None]:
    """The open request a Kyutai client asks for, and its max_steps; ProtocolError bad_query names a bad
    parameter."""
    d = SamplingParams()
    sampling = dict(
        temperature_text=_number(query, "text_temperature", float, 0.0, 100.0, d.temperature_text),
        top_k_text=_number(query, "text_topk", int, 1, MAX_TOPK, d.top_k_text),
        temperature_audio=_number(query, "audio_temperature", float, 0.0, 100.0, d.temperature_audio),
        top_k_audio=_number(query, "audio_topk", int, 1, MAX_TOPK, d.top_k_audio),
        repetition_penalty=_number(query, "repetition_penalty", float, 1e-3, 100.0, d.repetition_penalty),
        repetition_penalty_context=_number(query, "repetition_penalty_context", int, 0, TEXT_HISTORY,
                                           d.repetition_penalty_context),
    )
    _number(query, "pad_mult", float, -100.0, 100.0, 0.0)  # checked, then ignored (module docstring)
    text_seed = _number(query, "text_seed", int, 0, 2 ** 63 - 1, None)
    audio_seed = _number(query, "audio_seed", int, 0, 2 ** 63 - 1, None)
    if text_seed is None and audio_seed is None:
        seed = secrets.randbits(63)
    else:
        seed = ((text_seed or 0) * 1_000_003 + (audio_seed or 0)) % 2 ** 63
    options = {}
    resolution = _number(query, "image_resolution", int, 1, 1 << 16, None)
    if resolution is not None:
        options["resolution"] = resolution  # the encoder rounds and clamps it as Kyutai's Rust server does
    crop = query.get("center_crop")
    if crop not in (None, ""):
        if crop.lower() not in ("true", "false", "1", "0"):
            raise P.ProtocolError("bad_query", f"query parameter center_crop={crop!r} is not true or false")
        options["center_crop"] = crop.lower() in ("true", "1")
    xa_start = _number(query, "xa_start", int, 0, P.MAX_XA_START, DEFAULT_XA_START)
    max_steps = _number(query, "max_steps", int, 1, 1 << 30, None)
    try:
        params = SamplingParams(**sampling)
    except ValueError as e:
        raise P.ProtocolError("bad_query", f"query: {e}") from None
    return OpenRequest(seed=seed, sampling=params, image_options=options, audio="pcm", xa_start=xa_start), max_steps


class OggFraming:
    """Checks that a byte stream is made of Ogg pages (RFC 3533: "OggS", version 0, a segment table), page
    boundaries anywhere in the messages; sphn's reader would take some garbage silently."""

    def __init__(self):
        self._need = 0  # bytes of the current page still to skip
        self._head = b""  # the start of a page header not complete yet

    def feed(self, data) -> None:
        data, i = bytes(data), 0
        while i < len(data):
            if self._need:  # inside a page's body
                step = min(self._need, len(data) - i)
                self._need -= step
                i += step
                continue
            n = min(MAX_OGG_HEADER - len(self._head), len(data) - i)
            head, i = self._head + data[i:i + n], i + n
            if head[:4] != b"OggS"[:len(head)] or len(head) > 4 and head[4] != 0:
                raise P.ProtocolError("bad_audio", "audio is not an Ogg stream (no OggS page header where one "
                                                   "must start): send Ogg pages of Opus")
            if len(head) < 27 or len(head) < 27 + head[26]:
                self._head = head  # the header continues in the next message
                continue
            page = 27 + head[26] + sum(head[27:27 + head[26]])
            self._head, self._need = b"", max(0, page - len(head))
            i -= max(0, len(head) - page)  # bytes taken past this page start the next one


class KyutaiSession(Session):
    """One client of Kyutai's protocol: Opus in (decoded and cut into 1920-sample frames for Mimi), the
    stream's Opus and transcript out."""

    def __init__(self, conn, scheduler, max_image_bytes: int, on_done=None):
        super().__init__(conn, scheduler, on_done)
        self.max_image_bytes = max_image_bytes
        import sphn  # the Ogg/Opus codec Kyutai's Python tools use
        self._opus_in = sphn.OpusStreamReader(P.PCM_SAMPLE_RATE)
        self._opus_out = sphn.OpusStreamWriter(P.PCM_SAMPLE_RATE)  # output thread only
        self._pcm = np.zeros(0, np.float32)
        self._ogg = OggFraming()
        self._dropped = 0
        self._image = False
        self._heard = False  # a message has come
        self.max_steps = None
        try:
            self.request, self.max_steps = parse_query(conn.query)
        except P.ProtocolError as e:
            self.request = None
            self.metrics.errors[e.code] += 1
            self.end(bytes([ERROR]) + str(e).encode(), 1008, "bad query")
            return
        if not any(conn.query.get(name) for name in IMAGE_QUERY):
            asyncio.get_running_loop().call_later(NO_IMAGE_AFTER_S, self._open_if_silent)

    def _open_if_silent(self) -> None:
        """Moshi's web client waits for the handshake before it sends anything: a session without an image."""
        if not (self._heard or self.ending or self.stream is not None):
            try:
                self._open(None)
            except P.ProtocolError as e:
                self._error(str(e), e.code, fatal=True)

    def on_message(self, data) -> None:
        self._heard = True
        if isinstance(data, str) or not data:
            return self._error("messages must be binary: a kind byte, then its payload")
        kind, payload = data[0], memoryview(data)[1:]
        try:
            if kind == AUDIO:
                if len(payload) > MAX_AUDIO_MESSAGE:
                    raise P.ProtocolError("too_large", f"audio message of {len(payload)} bytes is over the limit of "
                                                       f"{MAX_AUDIO_MESSAGE}")
                data = bytes(payload)
                self._ogg.feed(data)  # checked before anything is opened or decoded
                if self.stream is None:
                    self._open(None)
                self._audio(data)
            elif kind == IMAGE:
                if not payload:
                    raise P.ProtocolError("bad_image", "image message without the image file's bytes")
                if len(payload) > self.max_image_bytes:
                    raise P.ProtocolError("too_large", f"image file of {len(payload)} bytes is over the limit of "
                                                       f"{self.max_image_bytes}")
                if self.stream is None:
                    self._open(bytes(payload))
                elif self.stream.state == "open":
                    self.scheduler.set_image(self.stream, image_file=bytes(payload),
                                             options=self.request.image_options)
                    self._image = True
            elif kind == PING:
                self.send(bytes([PING]))
            elif kind in (CONTROL, RATING):
                log.info("%s: %s message %s ignored", self.conn.remote, "rating" if kind == RATING else "control",
                         bytes(payload[:4]).hex())
            else:
                raise P.ProtocolError("bad_message", f"unknown message kind 0x{kind:02x}")
        except P.ProtocolError as e:
            self._error(str(e), e.code, fatal=e.code in ("bad_audio", "unsupported"))

    def _open(self, image_file: bytes | None) -> None:
        if image_file is not None:
            self.request.image_file = image_file
            self._image = True
        s = self.scheduler.open(self, self.request)
        self.stream = s if s.state != "gone" else None  # refused at once: `open_failed` has run

    def _audio(self, data: bytes) -> None:
        """Ogg bytes -> PCM, cut into frames, queued for the stream (before it is open: kept until it is)."""
        chunks = []
        try:  # in slices: sphn's reader fails on one call holding more than ~5 s of audio
            for i in range(0, len(data), OGG_SLICE):
                chunks.append(self._opus_in.append_bytes(data[i:i + OGG_SLICE]))
        except ValueError as e:
            raise P.ProtocolError("bad_audio", f"audio is not an Ogg/Opus stream: {e}") from None
        self._pcm = np.concatenate([self._pcm, *chunks])
        self._push()

    def _push(self) -> None:
        s = self.stream
        while s is not None and s.state == "open" and len(self._pcm) >= P.PCM_FRAME:
            frame, self._pcm = self._pcm[:P.PCM_FRAME], self._pcm[P.PCM_FRAME:]
            try:
                self.scheduler.push_audio(s, torch.from_numpy(frame.copy()))
            except P.ProtocolError as e:  # behind real time: counted by the scheduler; said once per 25
                self._dropped += 1
                if self._dropped % 25 == 1:
                    self._error(f"{self._dropped} audio frame(s) dropped so far: {e}", e.code)
        if len(self._pcm) > self.config.max_queued_frames * P.PCM_FRAME:  # not open yet: keep at most the bound
            self._pcm = self._pcm[-self.config.max_queued_frames * P.PCM_FRAME:]

    def _error(self, message: str, code: str = "bad_message", fatal: bool = False) -> None:
        self.metrics.errors[code] += 1
        self.send(bytes([ERROR]) + message.encode())
        if fatal:
            self.end()

    # ---- scheduler events -------------------------------------------------------------------------
    def opened(self, s) -> None:
        self.send(bytes([HANDSHAKE]) + bytes(8))
        self._push()

    def open_failed(self, s, code: str, message: str, refused: bool) -> None:
        self.stream = None
        self.end(bytes([ERROR]) + message.encode(), 1013 if refused else 1008, code)

    def prepare(self, s, out) -> list[bytes]:
        """Output thread: the frame's audio as Ogg/Opus pages and its text piece."""
        msgs = []
        if out.text:  # before the audio of its frame: a client that stops at the end of the audio has it
            msgs.append(bytes([COLORED_TEXT, out.colour]) + out.text.encode() if self._image
                        else bytes([TEXT]) + out.text.encode())
        pages = self._opus_out.append_pcm(out.pcm.numpy())
        if len(pages):
            msgs.append(bytes([AUDIO]) + bytes(pages))
        return msgs

    def frame(self, s, out) -> None:
        for m in out.extra:
            self.send(m)
        if self.max_steps is not None and s.frames >= self.max_steps:
            self.end(code=1000, reason=f"max_steps {self.max_steps} reached")

    def image_set(self, s, from_frame: int, ref) -> None:
        pass

    def image_failed(self, s, code: str, message: str, ref) -> None:
        self._error(message, code)

    def error(self, s, code: str, message: str, ref=None) -> None:
        self._error(message, code)

    def closed(self, s, ref) -> None:
        self.end()

    def farewell(self, code: str, message: str) -> bytes:
        return bytes([ERROR]) + message.encode()
