"""Preallocated per-slot streaming state, shared by the engine and every backend."""
from __future__ import annotations

import numpy as np
import torch

from .config import UNGENERATED, MoshiVisConfig

TEXT_HISTORY = 256  # text tokens kept per stream for the repetition penalty: the longest context it takes

# What `Engine(kv_dtype=...)` accepts: "auto" keeps the self-attention cache in the compute dtype;
# "int8" stores it as int8 with one fp32 scale per token per head (`moshivis_kernels.self_attention`).
KV_DTYPES = ("auto", "int8")


def check_kv_dtype(kv_dtype) -> str:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {list(KV_DTYPES)}, got {kv_dtype!r}")
    return kv_dtype


def add_kv_dtype_arg(ap) -> None:
    """`--kv-dtype`, for every command that builds an engine."""
    ap.add_argument("--kv-dtype", default="auto", choices=KV_DTYPES,
                    help="self-attention KV cache: auto (the compute dtype) or int8 (one fp32 scale per token per "
                         "head: about half the memory per stream)")


class StreamState:
    """State of up to `max_streams` streams, one slot each.

    On the device, updated in place by the frame:
      kv       [layers, slots, 2, context, heads, head_dim]  self-attention ring buffers (K, V after RoPE),
                                                              in the compute dtype, or int8 with
      kv_scale [layers, slots, 2, heads, context] fp32        their per-token per-head scales (kv_dtype
                                                              "int8"; None otherwise)
      tokens   [slots, 1 + n_q, max_delay + 2]                delayed-token buffer (SPEC.md §7), -2 = none
      text_history [slots, TEXT_HISTORY], text_history_len [slots]   int64 ring of the stream's most recent
                                           text tokens other than padding (repetition penalty; entry i at
                                           i % TEXT_HISTORY), appended by the frame's text sampler
    On the host (numpy), staged into each frame's inputs by the engine:
      t [slots]                            frames since the stream started
      temperature [slots, 2], top_k [slots, 2]   sampling of the text (0) and audio (1) tokens
      repetition_penalty [slots], repetition_context [slots]   the text token's repetition penalty
      seed [slots]                         the stream's seed: keys its random numbers
    """

    def __init__(self, cfg: MoshiVisConfig, max_streams: int, dtype: torch.dtype, device: torch.device,
                 kv_dtype: str = "auto"):
        self.cfg, self.max_streams, self.kv_dtype = cfg, max_streams, check_kv_dtype(kv_dtype)
        int8 = kv_dtype == "int8"
        self.kv = torch.zeros(cfg.num_layers, max_streams, 2, cfg.context, cfg.num_heads, cfg.head_dim,
                              dtype=torch.int8 if int8 else dtype, device=device)
        self.kv_scale = torch.zeros(cfg.num_layers, max_streams, 2, cfg.num_heads, cfg.context,
                                    dtype=torch.float32, device=device) if int8 else None
        self.tokens = torch.full((max_streams, 1 + cfg.n_q, cfg.max_delay + 2), UNGENERATED,
                                 dtype=torch.long, device=device)
        self.text_history = torch.zeros(max_streams, TEXT_HISTORY, dtype=torch.long, device=device)
        self.text_history_len = torch.zeros(max_streams, dtype=torch.long, device=device)
        self.t = np.zeros(max_streams, dtype=np.int64)
        self.temperature = np.zeros((max_streams, 2), dtype=np.float32)
        self.top_k = np.zeros((max_streams, 2), dtype=np.int64)
        self.repetition_penalty = np.ones(max_streams, dtype=np.float32)
        self.repetition_context = np.zeros(max_streams, dtype=np.int64)
        self.seed = np.zeros(max_streams, dtype=np.int64)

    def reset(self, slot: int, seed: int, temperature: tuple[float, float], top_k: tuple[int, int],
              repetition: tuple[float, int] = (1.0, 0)) -> None:
        """Make a slot a fresh stream (repetition: penalty, context). Old K/V and text history entries
        need not be cleared: the window mask and the history length hide them."""
        self.tokens[slot] = UNGENERATED
        self.text_history_len[slot] = 0
        self.t[slot] = 0
        self.seed[slot] = seed
        self.temperature[slot] = temperature
        self.top_k[slot] = top_k
        self.repetition_penalty[slot], self.repetition_context[slot] = repetition

    def layer_kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i's cache of every slot: (kv [slots, 2, context, H, D], kv_scale [slots, 2, H, context] or None)."""
        return self.kv[i], None if self.kv_scale is None else self.kv_scale[i]

    def kv_bytes_allocated(self) -> int:
        """Bytes of the self-attention cache tensors as allocated (every slot, scales included)."""
        return self.kv.nbytes + (0 if self.kv_scale is None else self.kv_scale.nbytes)

    @staticmethod
    def kv_bytes_per_token(cfg: MoshiVisConfig, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        """Cache bytes one position of one stream takes: every layer, K and V (with int8, their fp32 scales)."""
        if check_kv_dtype(kv_dtype) == "int8":
            return cfg.num_layers * 2 * (cfg.dim + 4 * cfg.num_heads)
        return cfg.num_layers * 2 * cfg.dim * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def kv_bytes_per_stream(cfg: MoshiVisConfig, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        """The memory model of one slot's cache at full context (`kv_bytes_allocated` / slots, tested)."""
        return cfg.context * StreamState.kv_bytes_per_token(cfg, dtype, kv_dtype)
