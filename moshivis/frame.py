"""A frame's inputs and outputs: fixed device buffers for up to `size` rows, and their host mirrors.

The engine writes a frame's inputs into the host mirror (numpy views, so staging allocates no tensor),
the backend uploads them (two copies) and runs the frame on the device buffers, and the engine reads
the tokens and the gate statistics back in one copy wait: the frame's only synchronisation. Buffers keep
their addresses for their lifetime, so a backend can capture a frame that reads and writes them in a
CUDA graph and replay it.

Rows past the batch are padding (row -1, no image, nothing forced, greedy): kernels skip their state.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from moshivis_kernels.sampling import RepetitionPenalty

from .config import END_OF_PADDING, ZERO_TOKEN, MoshiVisConfig

PAD_ROW = -1
NO_IMAGE = -1  # an image slot < 0: the row skips the cross-attention block
NOT_FORCED = -1  # a forced entry < 0: the token is drawn


def token_constants(cfg: MoshiVisConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(delays [1 + n_q], initial [1 + n_q]) int64 on `device`: each token row's delay and the token its
    input reads while the stream is younger than that delay (SPEC.md §7)."""
    delays = torch.tensor(cfg.delays, dtype=torch.long, device=device)
    initial = torch.tensor([cfg.text_card] + [cfg.audio_card] * cfg.n_q, dtype=torch.long, device=device)
    return delays, initial


class FrameBuffers:
    """One frame of up to `size` rows on `device`.

    Inputs (int64, one packed buffer; fp32, another):
      rows [size]            the streams' state slots (-1: padding)
      image_slots [size]     their image pool slots (-1: no image, or not attended to yet: xa_start)
      positions [size]       frames each stream has seen (its t)
      seed [size]            the stream's seed
      top_k [size, 2]        text, audio (0: no top-k)
      repetition_context [size]   text tokens the repetition penalty looks back over (0: none)
      user [size, num_audio_in]   the user's tokens of this frame (-1: none)
      forced [size, 1 + dep_q]    teacher forcing: tokens >= 0 replace the drawn ones, -1: draw
      temperature [size, 2]  text, audio (0: greedy)
      repetition_penalty [size]   the text token's repetition penalty (1: none)
    Outputs: tokens [size, 1 + dep_q] int64 after delays (-2 during warm-up), text_logits
    [size, text_card] (`logits_dtype`; after the repetition penalty), audio_logits [size, dep_q, audio_card]
    fp32, gate_mean [num_layers, size] fp32 (each layer's mean cross-attention gate per row, 0 without an
    image). `host` holds numpy views of the host mirror of every input, of tokens and of gate_mean.
    """

    _VECTORS = ("rows", "image_slots", "positions", "seed", "repetition_context", "repetition_penalty")

    def __init__(self, cfg: MoshiVisConfig, size: int, device: torch.device, logits_dtype: torch.dtype):
        self.size, self.device = size, torch.device(device)
        ints = {"rows": 1, "image_slots": 1, "positions": 1, "seed": 1, "top_k": 2, "repetition_context": 1,
                "user": cfg.num_audio_in, "forced": 1 + cfg.dep_q}
        floats = {"temperature": 2, "repetition_penalty": 1}
        self._ints = torch.empty(size * sum(ints.values()), dtype=torch.long, device=self.device)
        self._floats = torch.empty(size * sum(floats.values()), dtype=torch.float32, device=self.device)
        self.tokens = torch.empty(size, 1 + cfg.dep_q, dtype=torch.long, device=self.device)
        self.text_logits = torch.empty(size, cfg.text_card, dtype=logits_dtype, device=self.device)
        self.audio_logits = torch.empty(size, cfg.dep_q, cfg.audio_card, dtype=torch.float32, device=self.device)
        self.gate_mean = torch.empty(cfg.num_layers, size, dtype=torch.float32, device=self.device)
        self._split(self, self._ints, ints)
        self._split(self, self._floats, floats)
        self._staged = self.device.type != "cpu"
        if self._staged:  # page-locked mirrors: asynchronous copies
            pinned = dict(device="cpu", pin_memory=True)
            self._host_ints = torch.empty_like(self._ints, **pinned)
            self._host_floats = torch.empty_like(self._floats, **pinned)
            self._host_tokens = torch.empty_like(self.tokens, **pinned)
            self._host_gate_mean = torch.empty_like(self.gate_mean, **pinned)
            self._tokens_ready = torch.cuda.Event()
        else:
            self._host_ints, self._host_floats = self._ints, self._floats
            self._host_tokens, self._host_gate_mean = self.tokens, self.gate_mean
        self.host = SimpleNamespace(tokens=self._host_tokens.numpy(), gate_mean=self._host_gate_mean.numpy())
        host_views = SimpleNamespace()
        self._split(host_views, self._host_ints, ints)
        self._split(host_views, self._host_floats, floats)
        for name in (*ints, *floats):
            setattr(self.host, name, getattr(host_views, name).numpy())

    @staticmethod
    def _split(owner, flat: torch.Tensor, widths: dict) -> None:
        """Contiguous [size] / [size, width] views of `flat`, one per field, set on `owner`."""
        size, start = flat.shape[0] // sum(widths.values()), 0
        for name, width in widths.items():
            view = flat[start: start + size * width]
            setattr(owner, name, view if name in FrameBuffers._VECTORS else view.view(size, width))
            start += size * width

    def pad(self, batch: int) -> None:
        """Rows batch.. become padding (host mirror)."""
        h = self.host
        h.rows[batch:] = h.image_slots[batch:] = PAD_ROW
        h.positions[batch:] = h.seed[batch:] = h.top_k[batch:] = h.repetition_context[batch:] = 0
        h.user[batch:] = ZERO_TOKEN
        h.forced[batch:] = NOT_FORCED
        h.temperature[batch:] = 0.0
        h.repetition_penalty[batch:] = 1.0

    def upload(self) -> None:
        """Host mirror -> device buffers (asynchronous on a GPU; nothing to do on the CPU)."""
        if self._staged:
            self._ints.copy_(self._host_ints, non_blocking=True)
            self._floats.copy_(self._host_floats, non_blocking=True)

    def download_tokens(self) -> None:
        """Device tokens and gate statistics -> host mirrors `host.tokens`, `host.gate_mean`, then waits for
        both copies (one event: the wait is the frame's one synchronisation, and the gate statistics ride
        along with the tokens, so reading them costs no other)."""
        if self._staged:
            self._host_tokens.copy_(self.tokens, non_blocking=True)
            self._host_gate_mean.copy_(self.gate_mean, non_blocking=True)
            self._tokens_ready.record()
            self._tokens_ready.synchronize()


def text_repetition(cfg: MoshiVisConfig, fb: FrameBuffers, text_history: torch.Tensor,
                    text_history_len: torch.Tensor) -> RepetitionPenalty:
    """The repetition penalty of the frame's text token: fb's per-row penalty and context, over the
    streams' text histories (`StreamState.text_history`); padding and end-of-padding are not recorded."""
    return RepetitionPenalty(fb.repetition_penalty, fb.repetition_context, fb.rows, text_history,
                             text_history_len, ignored=(END_OF_PADDING, cfg.padding_token_id))
