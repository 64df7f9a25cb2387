"""The `torch` backend: one frame computed with the reference ops on the shared state."""
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
        cfg, w = self.cfg, self.w
        positions = self.state.t[rows]
        with phase("temporal"):
            x = R.embed_inputs(w, cfg, inputs)
            xa = self.prepare_cross_attention(image_slots)
            for i in range(cfg.num_layers):
                x = R.self_attention(w, cfg, i, x, self.state.kv[i], rows, positions)
                with phase("cross_attention"):
                    x = self.cross_attention(i, x, xa)
                x = R.ffn(w, i, x)
            h, text_logits = R.text_logits(w, x)
        with phase("sampling"):
            text = self.choose(text_logits, rows, positions, forced, 0)
        with phase("depformer"):
            audio_logits, audio = self.depformer(h, text, rows, positions, forced)
        return torch.cat([text[:, None], audio], dim=1), text_logits, audio_logits

    # -- cross-attention: the part the `triton` backend replaces first --
    def prepare_cross_attention(self, image_slots):
        """Once per frame: each row's image K/V [B, N, 2, H, D] and which rows have one."""
        has_image = image_slots >= 0
        return self.pool.kv[image_slots.clamp(min=0)], has_image

    def cross_attention(self, i, x, xa):
        kv_rows, has_image = xa
        return R.cross_attention(self.w, self.cfg, i, x, kv_rows, has_image)

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
        kind = min(codebook, 1)
        st = self.state
        return sample_tokens_reference(logits, st.temperature[rows, kind], st.top_k[rows, kind], st.seed[rows],
                                       positions, codebook)
