"""The `torch` backend: one frame computed with the reference ops on the shared state.

The frame reads like the model (SPEC.md §4-§7), one method per op, on the references of
`moshivis.reference` and the `*_reference` functions of the kernels. It runs exactly the staged batch.
"""
from __future__ import annotations

import torch

from moshivis_kernels.sampling import (append_history_reference, repetition_penalty_reference,
                                       sample_tokens_reference)
from moshivis_kernels.token_delays import frame_input_tokens_reference, frame_output_tokens_reference

from .. import reference as R
from ..config import MoshiVisConfig
from ..frame import FrameBuffers, text_repetition, token_constants
from ..image_pool import ImagePool
from ..profiling import phase
from ..state import StreamState


class TorchBackend:
    name = "torch"

    def __init__(self, cfg: MoshiVisConfig, weights: dict, state: StreamState, pool: ImagePool):
        self.cfg, self.w, self.state, self.pool = cfg, weights, state, pool
        self.device = weights["llm.text_emb.weight"].device
        self.delays, self.initial = token_constants(cfg, self.device)
        self._buffers: dict[int, FrameBuffers] = {}

    def buffers(self, batch: int) -> FrameBuffers:
        """The frame buffers for `batch` streams (this backend runs exactly the batch: no padding)."""
        if batch not in self._buffers:
            self._buffers[batch] = FrameBuffers(self.cfg, batch, self.device, torch.float32)
        return self._buffers[batch]

    def warmup(self) -> None:
        """Nothing to prepare: the reference runs eagerly, on buffers made per batch size."""

    def frame(self, fb: FrameBuffers) -> None:
        """One frame for the streams staged in `fb` (host mirror filled): uploads them, runs the model and
        the delayed-token bookkeeping, and leaves tokens and logits in fb's device buffers."""
        fb.upload()
        rows, positions = fb.rows, fb.positions
        inputs = frame_input_tokens_reference(self.state.tokens, rows, positions, fb.user, self.delays, self.initial)
        with phase("temporal"):
            x = self.embed(inputs)
            image = self.image_rows(fb.image_slots)  # the same for every layer (ONE shared projection)
            for i in range(self.cfg.num_layers):
                x = self.self_attention(i, x, rows, positions)
                with phase("cross_attention"):
                    x = self.cross_attention(i, x, image, fb.gate_mean[i])
                x = self.ffn(i, x)
            h, text_logits = self.text_head(x)
        with phase("sampling"):
            repetition = text_repetition(self.cfg, fb, self.state.text_history, self.state.text_history_len)
            text_logits = repetition_penalty_reference(text_logits, repetition)
            text = self.choose(text_logits, fb, 0)
            append_history_reference(repetition, text)
        with phase("depformer"):
            audio_logits, audio = self.depformer(h, text, fb)
        tokens = torch.cat([text[:, None], audio], dim=1)
        fb.tokens.copy_(frame_output_tokens_reference(self.state.tokens, rows, positions, tokens, self.delays,
                                                      self.cfg.max_delay))
        fb.text_logits.copy_(text_logits)
        fb.audio_logits.copy_(audio_logits)

    # -- the temporal transformer --
    def embed(self, inputs):
        return R.embed_inputs(self.w, self.cfg, inputs)

    def self_attention(self, i, x, rows, positions):
        kv, kv_scale = self.state.layer_kv(i)
        return R.self_attention(self.w, self.cfg, i, x, kv, rows, positions, kv_scale)

    def image_rows(self, image_slots):
        """Each row's image for the frame: (K/V [B, N, 2, H, D], of which its first num_tokens [B] rows
        count; has_image [B])."""
        slots = image_slots.clamp(min=0)
        return self.pool.kv[slots], self.pool.num_tokens[slots], image_slots >= 0

    def cross_attention(self, i, x, image, gate_mean):
        kv_rows, num_tokens, has_image = image
        return R.cross_attention(self.w, self.cfg, i, x, kv_rows, has_image, gate_mean, num_tokens)

    def ffn(self, i, x):
        return R.ffn(self.w, i, x)

    def text_head(self, x):
        return R.text_logits(self.w, x)

    # -- depformer and sampling --
    def depformer(self, h, text, fb):
        cfg = self.cfg
        B = h.shape[0]
        cache = torch.zeros(cfg.depformer_num_layers, B, 2, cfg.dep_q, cfg.depformer_num_heads,
                            cfg.depformer_head_dim, dtype=h.dtype, device=h.device)
        logits, tokens, prev = [], [], text
        for k in range(cfg.dep_q):
            lk = R.depformer_step(self.w, cfg, k, h, prev, cache)
            with phase("sampling"):
                prev = self.choose(lk, fb, 1 + k)
            logits.append(lk)
            tokens.append(prev)
        return torch.stack(logits, dim=1), torch.stack(tokens, dim=1)

    def choose(self, logits, fb, codebook):
        """Each row's token for `codebook` (0 = text, 1 + k = audio k): drawn with the stream's own
        sampling parameters and counter-based random numbers (greedy at temperature 0), or the forced
        token where one is given (>= 0)."""
        kind = min(codebook, 1)
        return sample_tokens_reference(logits, fb.temperature[:, kind], fb.top_k[:, kind], fb.seed, fb.positions,
                                       codebook, forced=fb.forced[:, codebook])
