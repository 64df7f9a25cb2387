"""Preallocated per-slot streaming state, shared by the engine and every backend."""
from __future__ import annotations

import numpy as np
import torch

from .config import UNGENERATED, MoshiVisConfig


class StreamState:
    """State of up to `max_streams` streams, one slot each.

    On the device, updated in place by the frame:
      kv      [layers, slots, 2, context, heads, head_dim]  self-attention ring buffers (K, V after RoPE)
      tokens  [slots, 1 + n_q, max_delay + 2]                delayed-token buffer (SPEC.md §7), -2 = none
    On the host (numpy), staged into each frame's inputs by the engine:
      t [slots]                            frames since the stream started
      temperature [slots, 2], top_k [slots, 2]   sampling of the text (0) and audio (1) tokens
      seed [slots]                         the stream's seed: keys its random numbers
    """

    def __init__(self, cfg: MoshiVisConfig, max_streams: int, dtype: torch.dtype, device: torch.device):
        self.cfg, self.max_streams = cfg, max_streams
        self.kv = torch.zeros(cfg.num_layers, max_streams, 2, cfg.context, cfg.num_heads, cfg.head_dim,
                              dtype=dtype, device=device)
        self.tokens = torch.full((max_streams, 1 + cfg.n_q, cfg.max_delay + 2), UNGENERATED,
                                 dtype=torch.long, device=device)
        self.t = np.zeros(max_streams, dtype=np.int64)
        self.temperature = np.zeros((max_streams, 2), dtype=np.float32)
        self.top_k = np.zeros((max_streams, 2), dtype=np.int64)
        self.seed = np.zeros(max_streams, dtype=np.int64)

    def reset(self, slot: int, seed: int, temperature: tuple[float, float], top_k: tuple[int, int]) -> None:
        """Make a slot a fresh stream. Old K/V need not be cleared: the window mask hides them."""
        self.tokens[slot] = UNGENERATED
        self.t[slot] = 0
        self.seed[slot] = seed
        self.temperature[slot] = temperature
        self.top_k[slot] = top_k

    @staticmethod
    def kv_bytes_per_stream(cfg: MoshiVisConfig, dtype: torch.dtype) -> int:
        return cfg.num_layers * 2 * cfg.context * cfg.dim * torch.empty((), dtype=dtype).element_size()
