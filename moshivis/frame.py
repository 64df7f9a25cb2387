"""A frame's inputs and outputs: fixed device buffers for up to `size` rows, and their host mirrors.

The engine writes a frame's inputs into the host mirror (numpy views, so staging allocates no tensor),
the backend uploads them (two copies) and runs the frame on the device buffers, and the engine reads
the tokens back: the frame's only synchronisation. Buffers keep their addresses for their lifetime, so
a backend can capture a frame that reads and writes them in a CUDA graph and replay it.

Rows past the batch are padding (row -1, no image, nothing forced, greedy): kernels skip their state.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .config import ZERO_TOKEN, MoshiVisConfig

PAD_ROW = -1
NOT_FORCED = -1  # a forced entry < 0: the token is drawn


def token_constants(cfg: MoshiVisConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(delays [1 + n_q], initial [1 + n_q]) int64 on `device`: each token row's delay and the token its
    input reads while the stream is younger than that delay (SPEC.md §7)."""
    delays = torch.tensor(cfg.delays, dtype=torch.long, device=device)
    initial = torch.tensor([cfg.text_card] + [cfg.audio_card] * cfg.n_q, dtype=torch.long, device=device)
    return delays, initial


class FrameBuffers:
    """One frame of up to `size` rows on `device`.

    Inputs (int64, one packed buffer, plus temperature fp32):
      rows [size]            the streams' state slots (-1: padding)
      image_slots [size]     their image pool slots (-1: no image)
      positions [size]       frames each stream has seen (its t)
      seed [size]            the stream's seed
      top_k [size, 2]        text, audio (0: no top-k)
      user [size, num_audio_in]   the user's tokens of this frame (-1: none)
      forced [size, 1 + dep_q]    teacher forcing: tokens >= 0 replace the drawn ones, -1: draw
      temperature [size, 2]  text, audio (0: greedy)
    Outputs: tokens [size, 1 + dep_q] int64 after delays (-2 during warm-up), text_logits
    [size, text_card] (`logits_dtype`), audio_logits [size, dep_q, audio_card] fp32, gate_mean
    [num_layers, size] fp32 (each layer's mean cross-attention gate per row, 0 without an image).
    `host` holds numpy views of the host mirror of every input, and of tokens.
    """

    _INT_FIELDS = ("rows", "image_slots", "positions", "seed", "top_k", "user", "forced")
    _VECTORS = ("rows", "image_slots", "positions", "seed")

    def __init__(self, cfg: MoshiVisConfig, size: int, device: torch.device, logits_dtype: torch.dtype):
        self.size, self.device = size, torch.device(device)
        widths = {"rows": 1, "image_slots": 1, "positions": 1, "seed": 1, "top_k": 2, "user": cfg.num_audio_in,
                  "forced": 1 + cfg.dep_q}
        self._ints = torch.empty(size * sum(widths.values()), dtype=torch.long, device=self.device)
        self.temperature = torch.empty(size, 2, dtype=torch.float32, device=self.device)
        self.tokens = torch.empty(size, 1 + cfg.dep_q, dtype=torch.long, device=self.device)
        self.text_logits = torch.empty(size, cfg.text_card, dtype=logits_dtype, device=self.device)
        self.audio_logits = torch.empty(size, cfg.dep_q, cfg.audio_card, dtype=torch.float32, device=self.device)
        self.gate_mean = torch.empty(cfg.num_layers, size, dtype=torch.float32, device=self.device)
        self._split(self, self._ints, widths)
        self._staged = self.device.type != "cpu"
        if self._staged:  # page-locked mirrors: asynchronous copies
            pinned = dict(device="cpu", pin_memory=True)
            self._host_ints = torch.empty_like(self._ints, **pinned)
            self._host_temperature = torch.empty_like(self.temperature, **pinned)
            self._host_tokens = torch.empty_like(self.tokens, **pinned)
            self._tokens_ready = torch.cuda.Event()
        else:
            self._host_ints, self._host_temperature, self._host_tokens = self._ints, self.temperature, self.tokens
        self.host = SimpleNamespace(temperature=self._host_temperature.numpy(), tokens=self._host_tokens.numpy())
        host_views = SimpleNamespace()
        self._split(host_views, self._host_ints, widths)
        for name in self._INT_FIELDS:
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
        h.positions[batch:] = h.seed[batch:] = h.top_k[batch:] = 0
        h.user[batch:] = ZERO_TOKEN
        h.forced[batch:] = NOT_FORCED
        h.temperature[batch:] = 0.0

    def upload(self) -> None:
        """Host mirror -> device buffers (asynchronous on a GPU; nothing to do on the CPU)."""
        if self._staged:
            self._ints.copy_(self._host_ints, non_blocking=True)
            self.temperature.copy_(self._host_temperature, non_blocking=True)

    def download_tokens(self) -> None:
        """Device tokens -> host mirror `host.tokens`, then waits for that copy (an event, so the wait is
        the frame's one synchronisation and only the handing out of its tokens waits)."""
        if self._staged:
            self._host_tokens.copy_(self.tokens, non_blocking=True)
            self._tokens_ready.record()
            self._tokens_ready.synchronize()

