"""Wire format of the streaming server (`moshivis.server`) and its client (`moshivis.client`).

Transport: one WebSocket connection per conversation; every message is one *binary* WebSocket
message (text messages are refused), laid out as

    u32 little-endian H | H bytes: UTF-8 JSON header (an object) | payload bytes

The header's `"type"` names the message. Tensors travel in the payload, never in JSON and never
pickled: `header["tensors"]` lists them as `[{"name", "dtype", "shape"}, ...]` and the payload is
their raw little-endian bytes (C order), concatenated in that order with nothing between or after.
dtypes: "int16", "int32", "int64" (tokens), "float16", "bfloat16", "float32" (image features),
"uint8" (the bytes of an image file).

Every message is checked before it is acted on, against `Limits` (`Limits.for_config`): header at
most `max_header_bytes` (4 KiB), payload at most `max_payload_bytes` (one float32 image + 64 KiB),
at most 4 tensors of at most 4 dims, and each tensor's shape against the model config. A server
that decodes image files raises the payload limit to its image file limit (`max_image_file_bytes`,
16 MiB by default) + 64 KiB. A message that breaks a rule gets an `error` reply naming the rule; the
session goes on. A message over the largest valid one is cut by the transport (WebSocket close 1009,
message too big).

Two ways to speak, chosen per session at `open` (`audio`): "tokens" (the default: Mimi codes in,
the model's tokens out) or "pcm" (24 kHz mono audio in and out, `PCM_FRAME` = 1920 samples = one
80 ms frame per message; the server runs one streaming Mimi encoder and decoder per stream, never
shared). Images come either as features (tensor `image`) or as the bytes of a PNG or JPEG file
(tensor `image_file`, uint8 [bytes]), which the server decodes with Pillow and encodes with its
SigLIP tower, exactly as `python -m moshivis.chat` does. PCM sessions and image files need the
server's `--mimi` and `--siglip` (or a `--checkpoint` holding the tower) options; without them they
are answered with error `unsupported`, naming the missing option.

Client -> server (`ref`: optional int or string of at most 64 characters, echoed in the reply):

  open   {seed: int in [0, 2**63), sampling?: {temperature_text, top_k_text, temperature_audio,
          top_k_audio, repetition_penalty, repetition_penalty_context} (missing keys: Kyutai's
          defaults, no repetition penalty), xa_start?: frame from which the stream looks at its image
          (default 0), ref?} + optional tensor `image` [num_image_tokens, image_encoder_dim] float or
          `image_file` uint8 [bytes] (PNG, JPEG, WebP, GIF or BMP, at most `max_image_file_bytes`;
          header fields image_resolution?: the square side it is resized to, center_crop?: bool);
          audio?: "tokens" (default) or "pcm". Once per connection (an open answered with `error`
          may be sent again). Must come within the server's open timeout (5 s by default).
  audio  {ref?} + one tensor for one frame, as the session chose at open:
          tokens: `tokens` [num_audio_in] int, the user's codebooks, each in [0, audio_card) or -1
          (the zero token);
          pcm: `pcm` [1920] float32 (in [-1, 1]) or int16 (full scale 32768), 24 kHz mono samples.
          Queued (at most `max_queued_frames`, else error queue_full); the stream is stepped when its
          input has arrived, one input per frame, in order (late input is waited for, never replaced
          by silence; a stream behind gets catch-up frames). A stream that sends nothing for the
          server's input timeout (10 s by default) is closed (error input_timeout, fatal).
  image  {ref?} + optional tensor `image` [num_image_tokens, image_encoder_dim] or `image_file`
          (as in open, with its image_resolution / center_crop): attach or replace the image; no
          tensor removes it. One at a time: wait for its `image_set` (or error) before sending the
          next; at most 3 images at once (the open's included), then one per image interval (error
          rate_limited).
  close  {ref?}: end the conversation (queued audio not yet consumed is discarded); the server
          answers `closed` and closes the connection.

Server -> client:

  opened    {stream, config: {num_audio_in, num_codebooks_out, text_card, audio_card,
             num_image_tokens, image_encoder_dim, max_delay}, tick_ms, mode, max_queued_frames,
             protocol, ref, audio ("tokens" or "pcm"), text (whether frames carry transcript text),
             sample_rate, frame_size (pcm sessions: 24000, 1920), replica (on a cluster only: the engine
             replica serving the stream)}
  refused   {code, reason, ref}: the open is refused, code "server_full" (every stream slot is
             taken), "image_pool_full" (every image slot holds another image), "shutting_down" or
             "bad_open" (the engine rejected it: the reason says why); then the server closes the
             connection (WebSocket code 1013, try again later).
  frame     {frame, tick, seq, ref, frame_ms, step_ms} + tensor `tokens` [1 + dep_q] int32: this stream's
             output for its frame number `frame` (0, 1, 2, ... for this stream; `tick` counts the
             server's frames): text token then the audio codebooks, -2 during warm-up. `seq` is the
             index (0, 1, ...) among this stream's accepted audio messages of the input consumed in
             this frame, and `ref` that message's ref. `frame_ms`: the server's time from the frame's
             due time to its tokens; `step_ms`: its engine step.
             pcm sessions also get tensor `pcm` [1920] float32: the frame's audio tokens through the
             stream's Mimi decoder; during warm-up (tokens -2) it is 1920 zeros (silence) and the
             decoder is not stepped, so the model's speech starts at frame `max_delay`.
             With a tokenizer on the server (`--tokenizer`), every session's frames carry `text`: the
             transcript piece this frame's text token adds (often ""; SentencePiece's `▁` as a
             space, an unfinished multi-byte character held back until complete).
  image_set {from_frame, ref}: the new image (or its removal) is used from this stream's frame
             `from_frame` on.
  error     {code, message, ref, fatal}: a message of this client was refused (codes below); with
             fatal false the session goes on as if that message had not been sent.
  closed    {frames, ref}: the stream is closed after `frames` frames; the connection closes.
  shutdown  {reason, frames}: the server is stopping after finishing its current frame; the
             connection closes (WebSocket code 1001).

Error codes: bad_message (not binary, bad layout, bad JSON, unknown type or field, bad value, the
other session kind's audio tensor), too_large, out_of_order (audio/image/close before open, open
twice, a second image change before the first is applied), bad_tokens, bad_audio (a PCM frame of
the wrong length, dtype, or with NaN), bad_image (bad features; an image file Pillow cannot decode,
or over 16 Mpixels), unsupported (pcm or image files on a server started without the option they
need), queue_full, image_pool_full, rate_limited, busy (too many images waiting for the encoder),
internal; fatal ones, each followed by the close: open_timeout, input_timeout, evicted (a connection
without a stream made room for a newer one). A client that leaves `max_outbox` replies unread is
disconnected (counted as slow_client). With every connection holding a stream, or while shutting
down, the WebSocket handshake is answered HTTP 503. A message over the connection's limit (the
largest valid one) closes the connection (WebSocket code 1009).
"""
from __future__ import annotations

import dataclasses
import json
import math
import struct
import sys
from dataclasses import dataclass, field

import torch

from .config import ZERO_TOKEN, MoshiVisConfig
from .engine import SamplingParams

PROTOCOL_VERSION = 1
PCM_SAMPLE_RATE = 24000  # Mimi's rate
PCM_FRAME = 1920  # samples per 80 ms frame
AUDIO_KINDS = ("tokens", "pcm")

DTYPES: dict[str, torch.dtype] = {
    "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "uint8": torch.uint8,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_INT_DTYPES = {"int16", "int32", "int64"}
_FLOAT_DTYPES = {"float16", "bfloat16", "float32"}
_SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(SamplingParams))
_MAX_REF_CHARS = 64

if sys.byteorder != "little":  # raw tensor bytes are sent as they lie in memory
    raise ImportError("moshivis.protocol needs a little-endian host")


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is the error code sent to the client."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 4096
    max_payload_bytes: int = 1 << 20
    max_tensors: int = 4
    max_ndim: int = 4
    max_image_file_bytes: int = 0  # 0: the server decodes no image files

    @classmethod
    def for_config(cls, cfg: MoshiVisConfig, max_image_file_bytes: int = 0) -> "Limits":
        """Room for one float32 image (or image file) plus 64 KiB: anything larger is no valid message."""
        largest = max(cfg.num_image_tokens * cfg.image_encoder_dim * 4, max_image_file_bytes)
        return cls(max_payload_bytes=largest + (64 << 10), max_image_file_bytes=max_image_file_bytes)

    @property
    def max_message_bytes(self) -> int:
        return 4 + self.max_header_bytes + self.max_payload_bytes


@dataclass
class Message:
    header: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.header["type"]


# ---- layout ---------------------------------------------------------------------------------------
def encode(header: dict, tensors: dict[str, torch.Tensor] | None = None, limits: Limits | None = None) -> bytes:
    """One message: the header (with its `tensors` list filled in) and the tensors' raw bytes."""
    specs, blobs = [], []
    for name, t in (tensors or {}).items():
        if t.dtype not in _DTYPE_NAMES:
            raise ProtocolError("bad_message", f"tensor {name!r}: dtype {t.dtype} cannot be sent "
                                               f"(allowed: {sorted(DTYPES)})")
        t = t.detach().to("cpu").contiguous()
        specs.append({"name": name, "dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape)})
        blobs.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    head = json.dumps({**header, "tensors": specs}, separators=(",", ":"), allow_nan=False).encode()
    data = struct.pack("<I", len(head)) + head + b"".join(blobs)
    if limits is not None:
        _check_sizes(len(head), len(data) - 4 - len(head), limits)
    return data


def decode(data: bytes | bytearray | memoryview | str, limits: Limits) -> Message:
    """Parse and check the layout of one message (not its meaning: see `parse_request`)."""
    if isinstance(data, str):
        raise ProtocolError("bad_message", "text WebSocket messages are not accepted; send binary messages "
                                           "(u32 header length | JSON header | tensor bytes)")
    data = memoryview(data)
    if len(data) < 4:
        raise ProtocolError("bad_message", f"message of {len(data)} bytes is shorter than its 4-byte header length")
    (hlen,) = struct.unpack_from("<I", data)
    if hlen > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header of {hlen} bytes is over the limit of {limits.max_header_bytes}")
    if 4 + hlen > len(data):
        raise ProtocolError("bad_message", f"header length {hlen} runs past the end of the {len(data)}-byte message")
    _check_sizes(hlen, len(data) - 4 - hlen, limits)
    try:
        header = json.loads(bytes(data[4:4 + hlen]).decode("utf-8"),
                            parse_constant=lambda c: _raise(ProtocolError("bad_message", f"header holds {c}")))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError("bad_message", f"header is not UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("bad_message", "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_message", f"header must be a JSON object, got {type(header).__name__}")
    if not isinstance(header.get("type"), str):
        raise ProtocolError("bad_message", "header has no string field 'type'")
    specs = header.pop("tensors", [])
    if not isinstance(specs, list) or len(specs) > limits.max_tensors:
        raise ProtocolError("bad_message", f"header field 'tensors' must be a list of at most "
                                           f"{limits.max_tensors} tensor descriptions")
    tensors, offset, payload = {}, 4 + hlen, data
    for i, spec in enumerate(specs):
        name, dtype, shape = _tensor_spec(spec, i, limits)
        if name in tensors:
            raise ProtocolError("bad_message", f"tensor {name!r} is listed twice")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offset + nbytes > len(payload):
            raise ProtocolError("bad_message", f"tensor {name!r} {dtype} {shape} needs {nbytes} bytes; the "
                                               f"payload ends {len(payload) - offset} bytes after its start")
        raw = bytearray(payload[offset:offset + nbytes])  # a private, writable copy
        tensors[name] = (torch.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape) if nbytes
                         else torch.empty(shape, dtype=DTYPES[dtype]))
        offset += nbytes
    if offset != len(payload):
        raise ProtocolError("bad_message", f"{len(payload) - offset} bytes after the last listed tensor")
    return Message(header, tensors)


def _raise(exc):
    raise exc


def _check_sizes(header_bytes: int, payload_bytes: int, limits: Limits) -> None:
    if header_bytes > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header of {header_bytes} bytes is over the limit of "
                                         f"{limits.max_header_bytes}")
    if payload_bytes > limits.max_payload_bytes:
        raise ProtocolError("too_large", f"payload of {payload_bytes} bytes is over the limit of "
                                         f"{limits.max_payload_bytes}")


def _tensor_spec(spec, i: int, limits: Limits) -> tuple[str, str, list[int]]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise ProtocolError("bad_message", f"tensors[{i}] must be an object with exactly name, dtype, shape")
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str) or not 0 < len(name) <= 32:
        raise ProtocolError("bad_message", f"tensors[{i}].name must be a string of 1 to 32 characters")
    if dtype not in DTYPES:
        raise ProtocolError("bad_message", f"tensor {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if (not isinstance(shape, list) or len(shape) > limits.max_ndim
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
        raise ProtocolError("bad_message", f"tensor {name!r}: shape must be a list of at most {limits.max_ndim} "
                                           f"non-negative integers, got {shape!r}")
    if math.prod(shape) * DTYPES[dtype].itemsize > limits.max_payload_bytes:
        raise ProtocolError("too_large", f"tensor {name!r} {dtype} {shape} is over the payload limit of "
                                         f"{limits.max_payload_bytes} bytes")
    return name, dtype, shape


# ---- meaning of client messages -------------------------------------------------------------------
@dataclass
class Open:
    seed: int
    sampling: SamplingParams
    image: torch.Tensor | None
    ref: int | str | None = None
    image_file: bytes | None = None
    audio: str = "tokens"
    xa_start: int = 0
    image_options: dict = field(default_factory=dict)


@dataclass
class Audio:
    tokens: torch.Tensor | None  # [num_audio_in] int64, or None with pcm
    ref: int | str | None = None
    pcm: torch.Tensor | None = None  # [PCM_FRAME] float32


@dataclass
class Image:
    image: torch.Tensor | None
    ref: int | str | None = None
    image_file: bytes | None = None
    image_options: dict = field(default_factory=dict)


@dataclass
class Close:
    ref: int | str | None = None


_IMAGE_OPTIONS = {"image_resolution", "center_crop"}
_FIELDS = {"open": ({"seed", "sampling", "audio", "xa_start"} | _IMAGE_OPTIONS, {"image", "image_file"}),
           "audio": (set(), {"tokens", "pcm"}), "image": (_IMAGE_OPTIONS, {"image", "image_file"}),
           "close": (set(), set())}
MAX_XA_START = 1 << 20


def parse_request(msg: Message, cfg: MoshiVisConfig, max_image_file_bytes: int | None = None
                  ) -> Open | Audio | Image | Close:
    """Check a decoded client message against its schema and the config; the typed request.

    `max_image_file_bytes`: the size limit of `image_file` tensors (None: only the payload limit).
    Whether the server can use pcm or image files at all is the server's check, not this one.
    """
    kind = msg.type
    if kind not in _FIELDS:
        raise ProtocolError("bad_message", f"unknown message type {kind!r}; known: {sorted(_FIELDS)}")
    fields, tensor_names = _FIELDS[kind]
    extra = set(msg.header) - fields - {"type", "ref"}
    if extra:
        raise ProtocolError("bad_message", f"{kind}: unknown header fields {sorted(extra)}")
    extra = set(msg.tensors) - tensor_names
    if extra:
        raise ProtocolError("bad_message", f"{kind}: unexpected tensors {sorted(extra)}; "
                                           f"allowed: {sorted(tensor_names)}")
    ref = msg.header.get("ref")
    if ref is not None and not (isinstance(ref, str) and len(ref) <= _MAX_REF_CHARS
                                or isinstance(ref, int) and not isinstance(ref, bool)):
        raise ProtocolError("bad_message", f"ref must be an integer or a string of at most {_MAX_REF_CHARS} characters")
    if kind == "open":
        seed = msg.header.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise ProtocolError("bad_message", f"open: seed must be an integer in [0, 2**63), got {seed!r}")
        audio = msg.header.get("audio", "tokens")
        if audio not in AUDIO_KINDS:
            raise ProtocolError("bad_message", f"open: audio must be one of {list(AUDIO_KINDS)}, got {audio!r}")
        xa_start = msg.header.get("xa_start", 0)
        if isinstance(xa_start, bool) or not isinstance(xa_start, int) or not 0 <= xa_start <= MAX_XA_START:
            raise ProtocolError("bad_message", f"open: xa_start must be an integer in [0, {MAX_XA_START}] (the frame "
                                               f"from which the stream looks at its image), got {xa_start!r}")
        image, image_file = _image(msg, cfg, max_image_file_bytes)
        return Open(seed, _sampling(msg.header.get("sampling")), image, ref, image_file, audio, xa_start,
                    _image_options(msg, image_file))
    if kind == "audio":
        if not msg.tensors:
            raise ProtocolError("bad_message", f"audio: tensor 'tokens' is missing (or 'pcm' [{PCM_FRAME}] in a "
                                               "session opened with audio 'pcm')")
        if len(msg.tensors) > 1:
            raise ProtocolError("bad_message", "audio: send one tensor, 'tokens' or 'pcm' (as chosen at open)")
        if "tokens" in msg.tensors:
            return Audio(check_audio(msg.tensors["tokens"], cfg), ref)
        return Audio(None, ref, check_pcm(msg.tensors["pcm"]))
    if kind == "image":
        image, image_file = _image(msg, cfg, max_image_file_bytes)
        return Image(image, ref, image_file, _image_options(msg, image_file))
    return Close(ref)


def _image_options(msg: Message, image_file: bytes | None) -> dict:
    """The image encoder's options of an image file: `image_resolution` (pixels of the square side) and
    `center_crop` (crop the centre square before resizing), as Kyutai's clients ask for them."""
    options = {}
    resolution = msg.header.get("image_resolution")
    crop = msg.header.get("center_crop")
    if (resolution is not None or crop is not None) and image_file is None:
        raise ProtocolError("bad_message", f"{msg.type}: image_resolution and center_crop apply to image files only")
    if resolution is not None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or not 1 <= resolution <= 4096:
            raise ProtocolError("bad_message", f"{msg.type}: image_resolution must be an integer in [1, 4096], got "
                                               f"{resolution!r}")
        options["resolution"] = resolution
    if crop is not None:
        if not isinstance(crop, bool):
            raise ProtocolError("bad_message", f"{msg.type}: center_crop must be true or false, got {crop!r}")
        options["center_crop"] = crop
    return options


def _image(msg: Message, cfg: MoshiVisConfig, max_file_bytes: int | None) -> tuple[torch.Tensor | None, bytes | None]:
    """(features, None), (None, file bytes) or (None, None)."""
    image, data = msg.tensors.get("image"), msg.tensors.get("image_file")
    if image is not None and data is not None:
        raise ProtocolError("bad_message", f"{msg.type}: send either 'image' (features) or 'image_file', not both")
    if image is not None:
        check_image(image, cfg)
        return image, None
    if data is None:
        return None, None
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() == 0:
        raise ProtocolError("bad_image", f"image_file must be the file's bytes, uint8 [bytes > 0], got {data.dtype} "
                                         f"{list(data.shape)}")
    if max_file_bytes is not None and data.numel() > max_file_bytes:
        raise ProtocolError("too_large", f"image file of {data.numel()} bytes is over the limit of {max_file_bytes}")
    return None, data.numpy().tobytes()


def _sampling(value) -> SamplingParams:
    if value is None:
        return SamplingParams()
    if not isinstance(value, dict) or set(value) - set(_SAMPLING_KEYS):
        raise ProtocolError("bad_message", f"open: sampling must be an object with keys among {list(_SAMPLING_KEYS)}")
    try:
        return SamplingParams(**value)
    except ValueError as e:
        raise ProtocolError("bad_message", f"open: {e}") from None


def check_audio(tokens: torch.Tensor, cfg: MoshiVisConfig) -> torch.Tensor:
    """[num_audio_in] integer tokens in [-1, audio_card) -> int64."""
    if _DTYPE_NAMES.get(tokens.dtype) not in _INT_DTYPES:
        raise ProtocolError("bad_tokens", f"audio tokens must be an integer tensor, got {tokens.dtype}")
    if list(tokens.shape) != [cfg.num_audio_in]:
        raise ProtocolError("bad_tokens", f"audio tokens must have shape [{cfg.num_audio_in}] (one frame of "
                                          f"user codebooks), got {list(tokens.shape)}")
    tokens = tokens.to(torch.int64)
    bad = (tokens < ZERO_TOKEN) | (tokens >= cfg.audio_card)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ProtocolError("bad_tokens", f"audio token {int(tokens[j])} at codebook {j} is out of range "
                                          f"[-1, {cfg.audio_card})")
    return tokens


def check_pcm(pcm: torch.Tensor) -> torch.Tensor:
    """One frame of 24 kHz mono samples [PCM_FRAME], float32 or int16 -> float32 (int16 / 32768)."""
    if pcm.dtype not in (torch.float32, torch.int16):
        raise ProtocolError("bad_audio", f"audio pcm must be float32 or int16 samples, got {pcm.dtype}")
    if list(pcm.shape) != [PCM_FRAME]:
        raise ProtocolError("bad_audio", f"audio pcm must have shape [{PCM_FRAME}] (one 80 ms frame of "
                                         f"{PCM_SAMPLE_RATE} Hz mono samples), got {list(pcm.shape)}")
    if pcm.dtype == torch.int16:
        return pcm.float() / 32768
    if not bool(torch.isfinite(pcm).all()):
        raise ProtocolError("bad_audio", "audio pcm contains NaN or infinite samples")
    return pcm


def check_image(image: torch.Tensor, cfg: MoshiVisConfig) -> None:
    if _DTYPE_NAMES.get(image.dtype) not in _FLOAT_DTYPES:
        raise ProtocolError("bad_image", f"image features must be floating point, got {image.dtype}")
    shape = [cfg.num_image_tokens, cfg.image_encoder_dim]
    if list(image.shape) != shape:
        raise ProtocolError("bad_image", f"image features must have shape {shape} (image tokens x encoder dim), "
                                         f"got {list(image.shape)}")
    if not bool(torch.isfinite(image).all()):
        raise ProtocolError("bad_image", "image features contain NaN or infinite values")


# ---- client-side builders -------------------------------------------------------------------------
def _image_tensors(image: torch.Tensor | None, image_file: bytes | None) -> dict[str, torch.Tensor]:
    tensors = {} if image is None else {"image": image}
    if image_file is not None:
        tensors["image_file"] = torch.frombuffer(bytearray(image_file), dtype=torch.uint8)
    return tensors


def open_message(seed: int = 0, sampling: SamplingParams | None = None, image: torch.Tensor | None = None,
                 ref=None, image_file: bytes | None = None, audio: str = "tokens", xa_start: int = 0,
                 image_resolution: int | None = None, center_crop: bool | None = None) -> bytes:
    header: dict = {"type": "open", "seed": seed}
    if sampling is not None:
        header["sampling"] = {k: getattr(sampling, k) for k in _SAMPLING_KEYS}
    if ref is not None:
        header["ref"] = ref
    if audio != "tokens":
        header["audio"] = audio
    if xa_start:
        header["xa_start"] = xa_start
    for key, value in (("image_resolution", image_resolution), ("center_crop", center_crop)):
        if value is not None:
            header[key] = value
    return encode(header, _image_tensors(image, image_file))


def audio_message(tokens: torch.Tensor, ref=None) -> bytes:
    return encode({"type": "audio", **({} if ref is None else {"ref": ref})}, {"tokens": tokens.to(torch.int32)})


def pcm_message(pcm: torch.Tensor, ref=None) -> bytes:
    """One frame [PCM_FRAME] of float32 or int16 samples (other float dtypes are sent as float32)."""
    pcm = pcm if pcm.dtype == torch.int16 else pcm.to(torch.float32)
    return encode({"type": "audio", **({} if ref is None else {"ref": ref})}, {"pcm": pcm})


def image_message(image: torch.Tensor | None, ref=None, image_file: bytes | None = None) -> bytes:
    return encode({"type": "image", **({} if ref is None else {"ref": ref})}, _image_tensors(image, image_file))


def close_message(ref=None) -> bytes:
    return encode({"type": "close", **({} if ref is None else {"ref": ref})})
