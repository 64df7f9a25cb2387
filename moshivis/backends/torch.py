"""The `torch` backend: one frame computed with the reference ops on the shared state.

The frame reads like the model (SPEC.md §4-§7); each op is a method, so the `triton` backend swaps
ops for kernels one at a time by overriding them.
"""
from __future__ import annotations

import torch

from moshivis_kernels.sampling import sample_tokens_reference

from .. import reference as R
from ..config import MoshiVisConfig
from ..image_pool import ImagePool
from ..profiling import phase
from ..state import StreamState


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: MoshiVisConfig, weights: dict, state: StreamState, pool: ImagePool):
        self.cfg, self.w, self.state, self.pool = cfg, weights, state, pool

    def frame(self, inputs, rows, image_slots, forced=None):
        """One frame for B streams.

        inputs [B, 1 + n_q] this frame's input tokens; rows [B] the streams' state slots (their
        positions, seeds and sampling parameters live there); image_slots [B] their image pool slots
        (-1 = none); forced [B, 1 + dep_q] tokens to use instead of sampling (teacher forcing) or None.
        Returns (tokens [B, 1 + dep_q], text_logits [B, text_card], audio_logits [B, dep_q, audio_card]).
        """
        positions = self.state.t[rows]
        with phase("temporal"):
            x = self.embed(inputs)
            for i in range(self.cfg.num_layers):
                x = self.self_attention(i, x, rows, positions)
                with phase("cross_attention"):
                    x = self.cross_attention(i, x, image_slots)
                x = self.ffn(i, x)
            h, text_logits = self.text_head(x)
        with phase("sampling"):
            text = self.choose(text_logits, rows, positions, forced, 0)
        with phase("depformer"):
            audio_logits, audio = self.depformer(h, text, rows, positions, forced)
        return torch.cat([text[:, None], audio], dim=1), text_logits, audio_logits

    # -- the temporal transformer --
    def embed(self, inputs):
        return R.embed_inputs(self.w, self.cfg, inputs)

    def self_attention(self, i, x, rows, positions):
        return R.self_attention(self.w, self.cfg, i, x, self.state.kv[i], rows, positions)

    def cross_attention(self, i, x, image_slots):
        kv_rows = self.pool.kv[image_slots.clamp(min=0)]  # [B, N, 2, H, D]: each row's image K/V
        return R.cross_attention(self.w, self.cfg, i, x, kv_rows, image_slots >= 0)

    def ffn(self, i, x):
        return R.ffn(self.w, i, x)

    def text_head(self, x):
        return R.text_logits(self.w, x)

    # -- depformer and sampling --
    def depformer(self, h, text, rows, positions, forced):
        cfg = self.cfg
        B = h.shape[0]
        cache = torch.zeros(cfg.depformer_num_layers, B, 2, cfg.dep_q, cfg.depformer_num_heads,
                            cfg.depformer_head_dim, dtype=h.dtype, device=h.device)
        logits, tokens, prev = [], [], text
        for k in range(cfg.dep_q):
            lk = R.depformer_step(self.w, cfg, k, h, prev, cache)
            with phase("sampling"):
                prev = self.choose(lk, rows, positions, forced, 1 + k)
            logits.append(lk)
            tokens.append(prev)
        return torch.stack(logits, dim=1), torch.stack(tokens, dim=1)

    def choose(self, logits, rows, positions, forced, codebook):
        """Each row's token for `codebook` (0 = text, 1 + k = audio k): forced, or drawn with the
        stream's own sampling parameters and counter-based random numbers (greedy at temperature 0)."""
        if forced is not None:
            return forced[:, codebook]
        return self.sample(logits, rows, positions, codebook)

    def sample(self, logits, rows, positions, codebook):
        kind = min(codebook, 1)
        st = self.state
        return sample_tokens_reference(logits, st.temperature[rows, kind], st.top_k[rows, kind], st.seed[rows],
                                       positions, codebook)
