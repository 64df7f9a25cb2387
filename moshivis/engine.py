"""The streaming engine: streams API, Kyutai's delays, per-stream sampling (SPEC.md §7).

One `step` computes one 80 ms frame for any subset of the open streams, batched. Every stream has
its own state slot, position, token buffer, image and seed; its random numbers are a function of
(seed, frame, codebook) (counter-based Philox, see `moshivis_kernels.sampling`), so its outputs do not
depend on which other streams share its batch, and both backends draw the same tokens. Every input is
checked before any state changes, so a bad request fails alone.

A frame: the inputs are staged into the backend's fixed frame buffers (`frame.FrameBuffers`, host
mirror then one upload), the backend runs the model and the token bookkeeping on the device (the triton
backend replays a CUDA graph per batch-size bucket on a GPU), and the tokens come back to the host with
the frame's gate statistics: the frame's one synchronisation. The per-stream scalars (position, seed,
sampling, the frame from which it attends to its image) live on the host; a stream's recent text tokens
(its repetition penalty's history) live on the device, appended inside the frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moshivis_kernels import count_launches

from . import gates
from .backends import get_backend
from .config import ZERO_TOKEN, MoshiVisConfig
from .frame import NO_IMAGE, NOT_FORCED
from .image_pool import ImagePool
from .state import TEXT_HISTORY, StreamState


class StreamError(ValueError):
    """A request naming an unknown or closed stream, or carrying bad tokens."""


_FP32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SamplingParams:
    """Temperature 0 means greedy (argmax, first maximum); top-k 0 (or >= the vocabulary) keeps every
    token. Kyutai's defaults, and no repetition penalty.

    repetition_penalty (> 0, 1 = none) and repetition_penalty_context (0..TEXT_HISTORY): Kyutai's penalty
    on the text token (its Rust server's; its web client asks for 1.15 over 64): each distinct token among
    the stream's last `context` text tokens other than padding gets its logit l divided by the penalty
    (l >= 0) or multiplied by it (l < 0) before the draw.
    """
    temperature_text: float = 0.7
    top_k_text: int = 25
    temperature_audio: float = 0.8
    top_k_audio: int = 250
    repetition_penalty: float = 1.0
    repetition_penalty_context: int = 64

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature_text=0.0, temperature_audio=0.0)

    def __post_init__(self):
        def real(name):  # a finite number that survives the cast to fp32 (the kernels' type)
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= _FP32_MAX:
                raise ValueError(f"sampling {name} must be a finite number, got {value!r}")
            return value

        def integer(name, top, meaning):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
                raise ValueError(f"sampling {name} must be an integer >= 0 ({meaning}) and <= {top}, got {value!r}")

        for name in ("temperature_text", "temperature_audio"):
            if real(name) < 0:
                raise ValueError(f"sampling {name} must be a number >= 0 (0 = greedy), got {getattr(self, name)!r}")
        for name in ("top_k_text", "top_k_audio"):
            integer(name, 2**63 - 1, "0 = no top-k")  # >= the vocabulary keeps every token too
        if not np.float32(real("repetition_penalty")) > 0:
            raise ValueError(f"sampling repetition_penalty must be > 0 (1 = none), got {self.repetition_penalty!r}")
        integer("repetition_penalty_context", TEXT_HISTORY, "text tokens looked back over")


@dataclass
class _Stream:
    slot: int
    image_slot: int = NO_IMAGE
    xa_start: int = 0  # the first frame that attends to the image


def _check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Engine:
    """Streams API over one model: `open_stream`, `set_image`, `close_stream`, `step`, and per frame
    `gate_means` / `text_colors` (what the streams' last frame looked at its images).

    weights: the flat dict of `checkpoint.load` / `random_init`; its dtype and device are the compute
    dtype and device. max_images: image pool capacity (default: max_streams). max_image_tokens: the most
    tokens an image may have (default cfg.num_image_tokens, the encoder's own resolution; an image encoded
    at a lower resolution has fewer, `vision.ImageEncoder.encode(..., resolution=)`); the pool reserves
    that many per image. kv_dtype: the self-attention cache, "auto" (the compute dtype, the default) or
    "int8" (K and V quantized when appended, symmetric int8 with one fp32 scale per token per head: about
    half the bytes; both backends apply the same rule, `moshivis_kernels.self_attention.quantize_kv`).
    """

    def __init__(self, cfg: MoshiVisConfig, weights: dict, max_streams: int = 1, backend: str = "torch",
                 max_images: int | None = None, max_image_tokens: int | None = None, kv_dtype: str = "auto"):
        _check_positive("max_streams", max_streams)
        if max_image_tokens is not None:
            _check_positive("max_image_tokens", max_image_tokens)
        ref = weights["llm.text_emb.weight"]
        self.cfg, self.weights, self.max_streams = cfg, weights, max_streams
        self.dtype, self.device = ref.dtype, ref.device
        self.state = StreamState(cfg, max_streams, self.dtype, self.device, kv_dtype)
        self.pool = ImagePool(cfg, weights, max_images or max_streams, self.dtype, self.device, max_image_tokens)
        self.backend = get_backend(backend)(cfg, weights, self.state, self.pool)
        self._streams: dict[int, _Stream] = {}
        self._next_id = 0
        self.last_frame_launches: dict[str, int] = {}
        self._last_frame: tuple | None = None  # (frame buffers, stream id -> row) of the last step

    @property
    def kv_dtype(self) -> str:
        """The self-attention cache's format ("auto" or "int8"), as the stream state holds it."""
        return self.state.kv_dtype

    # ---- streams ---------------------------------------------------------------------------------
    @property
    def streams(self) -> list[int]:
        return list(self._streams)

    def open_stream(self, seed: int = 0, image: torch.Tensor | None = None,
                    sampling: SamplingParams | None = None, xa_start: int = 0) -> int:
        """A new stream id. `image`: image-encoder features [N, image_encoder_dim], 1 <= N <=
        max_image_tokens. `xa_start`: the stream attends to its image from its frame `xa_start` on (0:
        from the start); before it, its frames skip the cross-attention block exactly as without an image
        (gate statistics 0), as Kyutai's server does with its `xa_start` (web client default 16)."""
        used = {s.slot for s in self._streams.values()}
        free = [s for s in range(self.max_streams) if s not in used]
        if not free:
            raise StreamError(f"cannot open a stream: all max_streams={self.max_streams} slots are in use")
        sampling = SamplingParams() if sampling is None else sampling
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise StreamError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        if isinstance(xa_start, bool) or not isinstance(xa_start, int) or not 0 <= xa_start < 2 ** 63:
            raise StreamError(f"xa_start must be an integer in [0, 2**63) (a frame index), got {xa_start!r}")
        image_slot = self.pool.swap(NO_IMAGE, image, "image features of the new stream")
        stream_id, self._next_id = self._next_id, self._next_id + 1
        self._streams[stream_id] = _Stream(free[0], image_slot, xa_start)
        self.state.reset(free[0], seed, (sampling.temperature_text, sampling.temperature_audio),
                         (sampling.top_k_text, sampling.top_k_audio),
                         (sampling.repetition_penalty, sampling.repetition_penalty_context))
        return stream_id

    def set_image(self, stream: int, image: torch.Tensor | None) -> None:
        """Attach, replace (image features) or remove (None) the stream's image, from its next frame."""
        s = self._get(stream)
        s.image_slot = self.pool.swap(s.image_slot, image, f"image features for stream {stream}")

    def close_stream(self, stream: int) -> None:
        self.pool.swap(self._get(stream).image_slot, None)
        del self._streams[stream]

    def _get(self, stream: int) -> _Stream:
        if stream not in self._streams:
            state = "closed" if isinstance(stream, int) and 0 <= stream < self._next_id else "unknown"
            raise StreamError(f"stream id {stream!r} is {state}")
        return self._streams[stream]

    def warmup(self) -> None:
        """Prepare every batch size before the first stream (the triton backend compiles its kernels and
        captures each bucket's CUDA graph, which the first frame of a bucket would otherwise do)."""
        self.backend.warmup()
        self._last_frame = None  # warm-up frames overwrote the buffers the last step's statistics are in

    # ---- one frame ---------------------------------------------------------------------------------
    def step(self, user_audio_tokens: torch.Tensor, streams: list[int], forced_tokens: torch.Tensor | None = None,
             return_logits: bool = False, out: torch.Tensor | None = None):
        """One frame for `streams` (B of them, in this order).

        user_audio_tokens [B, num_audio_in]: the user's codebooks this frame, in [0, audio_card) or -1
        (the zero token: no input). forced_tokens [B, 1 + dep_q] (teacher forcing): the model's own
        text and audio tokens for this frame, used instead of the drawn ones where >= 0 (-1: draw).
        Inputs are read on the host (pass CPU tensors; a device tensor is copied over first).
        Returns tokens [B, 1 + dep_q] after delays (-2 during the warm-up frames), written into `out`
        (int64 [B, 1 + dep_q] on the CPU) when given, and with `return_logits` (tokens, text_logits
        [B, text_card], audio_logits [B, dep_q, audio_card]) as fp32 copies.
        On the triton backend, in steady state (a batch size seen before, no new image), a frame
        allocates no tensor except what it returns, and nothing with `out` and without logits.
        """
        st = self.state
        recs, user, forced = self._check_step(user_audio_tokens, streams, forced_tokens, out)
        B = len(recs)
        fb = self.backend.buffers(B)
        h = fb.host
        slots = [r.slot for r in recs]
        h.rows[:B] = slots
        h.positions[:B] = st.t[slots]
        # a stream younger than its xa_start does not look at its image yet: the host knows its position
        h.image_slots[:B] = [r.image_slot if t >= r.xa_start else NO_IMAGE for r, t in zip(recs, h.positions)]
        h.seed[:B] = st.seed[slots]
        h.top_k[:B] = st.top_k[slots]
        h.temperature[:B] = st.temperature[slots]
        h.repetition_penalty[:B] = st.repetition_penalty[slots]
        h.repetition_context[:B] = st.repetition_context[slots]
        h.user[:B] = user
        h.forced[:B] = NOT_FORCED if forced is None else forced
        fb.pad(B)
        self.pool.flush()  # the images attached since the last frame: K/V projected, batched
        with count_launches() as launches:
            self.backend.frame(fb)
        self.last_frame_launches = launches  # Triton launches by kernel (a replayed graph counts its kernels)
        fb.download_tokens()
        self._last_frame = (fb, {s: b for b, s in enumerate(streams)})
        st.t[slots] += 1
        tokens = torch.from_numpy(h.tokens[:B])
        if out is None:
            out = tokens.clone()
        else:
            out.copy_(tokens)
        if not return_logits:
            return out
        return (out, fb.text_logits[:B].to("cpu", torch.float32, copy=True),
                fb.audio_logits[:B].to("cpu", torch.float32, copy=True))

    def gate_means(self, streams: list[int]) -> torch.Tensor:
        """[len(streams), num_layers] fp32: each layer's mean cross-attention gate (how much the stream
        looked at its image; 0 without one, or before its xa_start) in the last step, for streams that
        were in it. They come back to the host with the frame's tokens (same copy wait): reading them
        costs no synchronisation."""
        if self._last_frame is None:
            raise StreamError("no frame has run yet: gate statistics come from the last step")
        fb, row_of = self._last_frame
        missing = [s for s in streams if s not in row_of]
        if missing:
            raise StreamError(f"stream ids {missing} were not in the last step (its streams: {list(row_of)})")
        return torch.from_numpy(fb.host.gate_mean[:, [row_of[s] for s in streams]].T.copy())

    def text_colors(self, streams: list[int]) -> list[int]:
        """Kyutai's colour byte (0..10) per stream from its last step's gates (`gates.text_colors`): what
        Kyutai's servers send with a text piece (message 0x07). Kyutai's PyTorch server pairs the text token
        handed out by a step with that step's gates, its Rust server with the gates of the step that drew
        the token (here the step before: the text token comes out one frame late)."""
        return gates.text_colors(self.gate_means(streams))

    def _check_step(self, user, streams, forced, out):
        """(streams' records, user tokens, forced tokens or None) as numpy arrays; raises on bad input
        before anything changes."""
        cfg = self.cfg
        if not isinstance(streams, (list, tuple)) or not streams:
            raise StreamError(f"streams must be a non-empty list of stream ids, got {streams!r}")
        if len(set(streams)) != len(streams):
            raise StreamError(f"stream ids repeated in one step: {list(streams)}")
        recs = [self._get(s) for s in streams]
        B = len(streams)
        user = self._check_tokens(user, "user_audio_tokens", streams, (B, cfg.num_audio_in),
                                  [cfg.audio_card] * cfg.num_audio_in)
        if forced is not None:
            forced = self._check_tokens(forced, "forced_tokens", streams, (B, 1 + cfg.dep_q),
                                        [cfg.text_card] + [cfg.audio_card] * cfg.dep_q)
        if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.long
                                or tuple(out.shape) != (B, 1 + cfg.dep_q) or out.device.type != "cpu"):
            raise StreamError(f"out must be an int64 CPU tensor of shape {[B, 1 + cfg.dep_q]}, got "
                              f"{getattr(out, 'dtype', type(out).__name__)} {list(getattr(out, 'shape', []))}")
        return recs, user, forced

    @staticmethod
    def _check_tokens(tokens, what, streams, shape, cards) -> np.ndarray:
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex() \
                or tokens.dtype == torch.bool:
            raise StreamError(f"{what} must be an integer tensor, got "
                              f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tuple(tokens.shape) != shape:
            raise StreamError(f"{what} must have shape {list(shape)}, got {list(tokens.shape)}")
        host = tokens.detach().cpu().numpy()  # a view for CPU tensors
        bad = (host < ZERO_TOKEN) | (host >= np.asarray(cards)[None, :])
        if bad.any():
            b, j = (int(i) for i in np.argwhere(bad)[0])
            raise StreamError(f"{what}: token {int(host[b, j])} of stream {streams[b]} at codebook {j} is out "
                              f"of range [-1, {cards[j]})")
        return host
