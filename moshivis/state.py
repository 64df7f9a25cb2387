"""Preallocated per-slot streaming state, shared by the engine and every backend."""
from __future__ import annotations

import torch

from .config import UNGENERATED, MoshiVisConfig


class StreamState:
    """State of up to `max_streams` streams, one slot each, updated in place by the frame.

    kv      [layers, slots, 2, context, heads, head_dim]  self-attention ring buffers (K, V after RoPE)
    tokens  [slots, 1 + n_q, max_delay + 2]                delayed-token buffer (SPEC.md §7), -2 = none
    t       [slots]                                        frames since the stream started
    """

    def __init__(self, cfg: MoshiVisConfig, max_streams: int, dtype: torch.dtype, device: torch.device):
        self.cfg, self.max_streams = cfg, max_streams
        self.kv = torch.zeros(cfg.num_layers, max_streams, 2, cfg.context, cfg.num_heads, cfg.head_dim,
                              dtype=dtype, device=device)
        self.tokens = torch.full((max_streams, 1 + cfg.n_q, cfg.max_delay + 2), UNGENERATED,
                                 dtype=torch.long, device=device)
        self.t = torch.zeros(max_streams, dtype=torch.long, device=device)

    def reset(self, slot: int) -> None:
        """Make a slot a fresh stream. Old K/V need not be cleared: the window mask hides them."""
        self.tokens[slot] = UNGENERATED
        self.t[slot] = 0

    @staticmethod
    def kv_bytes_per_stream(cfg: MoshiVisConfig, dtype: torch.dtype) -> int:
        return cfg.num_layers * 2 * cfg.context * cfg.dim * torch.empty((), dtype=dtype).element_size()
