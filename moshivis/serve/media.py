"""Media around the engine: image files -> SigLIP features off the frame path, PCM <-> Mimi codes.

`Media` holds what the server was started with (each part optional; a feature whose part is missing
is refused, naming the option). `ImageWorker` decodes and encodes images on its own thread (its own
CUDA stream on a GPU), several pending images in one SigLIP batch, so no stream's frame waits for an
image. The speech streams share one batched streaming Mimi (`moshivis.codec.MimiStreams`).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import io
import logging
import threading
import time
from dataclasses import dataclass

import torch

from .. import protocol as P
from ..config import MoshiVisConfig

log = logging.getLogger("moshivis.server")
MAX_IMAGE_PIXELS = 1 << 24  # decoded image files beyond 16 Mpixels are refused
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what browsers hand out for pictures and photos


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

    def missing(self, pcm: bool = False, image_file: bool = False) -> str | None:
        """Why this server cannot serve PCM audio or image files (naming the missing option), or None."""
        if pcm and self.codec is None:
            return "audio 'pcm' needs the Mimi codec; this server was started without --mimi"
        if image_file and self.vision is None:
            return ("image files need the SigLIP image encoder; this server was started without --siglip (or a "
                    "--checkpoint holding image_prefix.enc.model.*): send features instead")
        return None


def decode_image_file(data: bytes):
    """An RGB Pillow image from the bytes of an image file; ProtocolError bad_image otherwise.

    The size is checked from the file's header, before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as im:
            pixels = im.width * im.height
            if pixels > MAX_IMAGE_PIXELS:
                raise P.ProtocolError("bad_image", f"image file is {im.width}x{im.height} pixels, over the limit of "
                                                   f"{MAX_IMAGE_PIXELS} pixels: send a smaller picture")
            im.load()
            return im.convert("RGB")
    except P.ProtocolError:
        raise
    except UnidentifiedImageError:
        raise P.ProtocolError("bad_image", f"image file is not an image Pillow can read (accepted: "
                                           f"{', '.join(IMAGE_FORMATS)})") from None
    except Image.DecompressionBombError as e:
        raise P.ProtocolError("bad_image", f"image file is too large to decode safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise P.ProtocolError("bad_image", f"image file is corrupt or truncated: {e}") from None


class ImageWorker:
    """Image files -> SigLIP features on a thread of its own; images pending together are encoded as one
    batch per (resolution, crop). `await encode(data, ...)`; at most `max_pending` images and
    `max_pending_bytes` of files wait (beyond: error busy)."""

    def __init__(self, vision, max_pending: int, max_pending_bytes: int, on_batch=None):
        self.vision, self.max_pending, self.max_pending_bytes = vision, max_pending, max_pending_bytes
        self.on_batch = on_batch
        self._ex = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="moshivis-images")
        self._lock = threading.Lock()
        self._pending: list[tuple[bytes, dict, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._stream = None

    async def encode(self, data: bytes, **options) -> torch.Tensor:
        """Features [tokens, hidden] of the image file `data`; options: the encoder's (resolution, center
        crop). Raises ProtocolError bad_image for a bad file, busy when too many images wait."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            waiting = sum(len(d) for d, _, _, _ in self._pending)
            if len(self._pending) >= self.max_pending or waiting + len(data) > self.max_pending_bytes:
                raise P.ProtocolError("busy", f"{len(self._pending)} images ({waiting} bytes) are waiting for the "
                                              "image encoder; try again in a moment")
            self._pending.append((data, options, future, loop))
            first = len(self._pending) == 1
        del data  # the worker holds it; this frame must not, while it waits
        if first:
            self._ex.submit(self._drain)
        features, error = await future  # never an exception through the future: its traceback would form a
        if error is not None:           # cycle with this frame and keep image files alive until a GC
            raise P.ProtocolError(*error)
        return features

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        start = time.perf_counter()
        groups: dict[tuple, list] = {}
        while batch:
            data, options, future, loop = batch.pop(0)
            try:
                groups.setdefault(tuple(sorted(options.items())), []).append((decode_image_file(data), future, loop))
            except Exception as e:  # noqa: BLE001 - the request fails alone
                _resolve(loop, future, error=e)
            del data
        for options, items in groups.items():
            try:
                features = self._encode([im for im, _, _ in items], dict(options))
                for (_, future, loop), f in zip(items, features):
                    _resolve(loop, future, result=f)
            except Exception as e:  # noqa: BLE001
                for _, future, loop in items:
                    _resolve(loop, future, error=e)
        if self.on_batch is not None and groups:
            self.on_batch(time.perf_counter() - start)

    def _encode(self, images: list, options: dict) -> torch.Tensor:
        device = next(self.vision.model.parameters()).device
        if device.type != "cuda":
            return self.vision.encode_batch(images, **options)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._stream):  # beside the engine's frames, not between them
            out = self.vision.encode_batch(images, **options)
        self._stream.synchronize()
        return out

    def shutdown(self) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)


def _resolve(loop, future: asyncio.Future, result=None, error: Exception | None = None) -> None:
    """Hands (features, None) or (None, (code, message)) to the waiting coroutine."""
    if error is not None and not isinstance(error, P.ProtocolError):
        log.error("image encoding failed: %s", error, exc_info=error)  # formatted now, not kept
    value = (result, None) if error is None else (None, (getattr(error, "code", "bad_image"), str(error)))

    def done():
        if not future.done():
            future.set_result(value)
    loop.call_soon_threadsafe(done)
