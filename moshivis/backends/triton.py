"""The `triton` backend: the torch backend's frame with every op of the model on `moshivis_kernels`.

Temporal step: the 17-token embedding sum; per layer norm1 fused into the QKV projection, RoPE + KV
append + decode attention, the output projection with its residual, the whole gated cross-attention
block over the image KV pool, norm2 fused into linear_in with the SiLU gate, linear_out with its
residual; then out_norm and the text head. Depformer: one persistent launch per codebook step plus
its sampler. Sampling: on the device. What remains PyTorch is bookkeeping (gathers of per-stream
positions and sampling parameters, the token buffer in the engine).

Kernels take some weights stacked (the 16 audio tables, the depformer's per-step and per-layer
weights); the backend stacks them once and rebinds the engine's weight dict to views of the stacked
tensors, so no weight is held twice. With INT8 weights (`checkpoint.load(..., weights="int8")`) the
temporal projections, the text head and the gated cross-attention (its shared projections and each
layer's gate) run on int8 kernels; the depformer kernel takes dense weights only so far, so its
weights are dequantized once at start-up.
"""
from __future__ import annotations

import torch

from moshivis_kernels import (DepformerWeights, depformer_frame, depformer_workspace, embed_tokens,
                              gated_cross_attention, linear, rms_norm, sample_tokens, self_attention_decode)

from ..checkpoint import XA, scale_key
from .torch import TorchBackend


def restack(w: dict, keys: list[str]) -> torch.Tensor:
    """torch.stack of w[keys]; the dict's entries become views of the result (no weight held twice)."""
    stacked = torch.stack([w[k] for k in keys])
    w.update(zip(keys, stacked.unbind(0)))
    return stacked


def dequantize(w: dict, keys: list[str], dtype: torch.dtype) -> None:
    """In place: INT8 weights among `keys` become dense CB * SCB / 127 in `dtype` (their scales go)."""
    for key in keys:
        scb = w.pop(scale_key(key), None)
        if scb is not None:
            w[key] = (w[key].float() * (scb[:, None] / 127)).to(dtype)


def depformer_weights(w: dict, cfg) -> DepformerWeights:
    """Kyutai's depformer keys (SPEC.md §8) in the layout of `moshivis_kernels.depformer`."""
    L, S = cfg.depformer_num_layers, cfg.dep_q
    layers = [f"depformer.layers.{l}" for l in range(L)]
    gating = lambda name: restack(w, [f"{p}.gating.{s}.{name}.weight" for p in layers for s in range(S)])  # noqa: E731
    return DepformerWeights(
        depformer_in=restack(w, [f"depformer_in.{s}.weight" for s in range(S)]),          # [S, dd, dim]
        text_emb=w["depformer_text_emb.weight"],                                          # [text_card+1, dd]
        audio_emb=restack(w, [f"depformer_emb.{s}.weight" for s in range(S - 1)]),        # [S-1, card+1, dd]
        norm1=restack(w, [f"{p}.norm1.alpha" for p in layers]).reshape(L, -1),           # [L, dd]
        norm2=restack(w, [f"{p}.norm2.alpha" for p in layers]).reshape(L, -1),
        in_proj=restack(w, [f"{p}.self_attn.in_proj_weight" for p in layers]),            # [L, S*3*dd, dd]
        out_proj=restack(w, [f"{p}.self_attn.out_proj.weight" for p in layers]),          # [L, S*dd, dd]
        linear_in=gating("linear_in").unflatten(0, (L, S)),                               # [L, S, 2*hidden, dd]
        linear_out=gating("linear_out").unflatten(0, (L, S)),                             # [L, S, dd, hidden]
        audio_linears=restack(w, [f"audio_linears.{s}.weight" for s in range(S)]),        # [S, card, dd]
        num_heads=cfg.depformer_num_heads)


class TritonBackend(TorchBackend):
    name = "triton"

    def __init__(self, cfg, weights, state, pool):
        super().__init__(cfg, weights, state, pool)
        w, dtype = weights, weights["llm.text_emb.weight"].dtype
        dense_only = [k for k in w if k.startswith(("depformer", "audio_linears"))]
        dequantize(w, dense_only, dtype)
        self.audio_emb = restack(w, [f"audio_emb.{j}.weight" for j in range(cfg.n_q)])  # [n_q, card+1, dim]
        self.xa_wq = w[f"{XA}.in_proj_weight"][: cfg.dim]  # a view: rows [0, dim) of the shared in_proj
        in_proj_scb = w.get(scale_key(f"{XA}.in_proj_weight"))
        self.xa_wq_scale = None if in_proj_scb is None else in_proj_scb[: cfg.dim]
        self.depformer_w = depformer_weights(w, cfg)
        self._depformer_ws = {}  # batch size -> workspace (its cache and scratch)

    def linear(self, key, x, **kwargs):
        """x @ W^T for weight `key`, dense or INT8 (its scales at `scale_key(key)`)."""
        return linear(x, self.w[key], self.w.get(scale_key(key)), **kwargs)

    def embed(self, inputs):
        return embed_tokens(inputs, self.w["llm.text_emb.weight"], self.audio_emb)

    def self_attention(self, i, x, rows, positions):
        p = f"llm.transformer.layers.{i}"
        qkv = self.linear(f"{p}.self_attn.in_proj_weight", x, norm="rms", norm_alpha=self.w[f"{p}.norm1.alpha"])
        attn = self_attention_decode(qkv, self.state.kv[i], rows, positions, max_period=float(self.cfg.max_period))
        return self.linear(f"{p}.self_attn.out_proj.weight", attn, residual=x, out=x)

    def cross_attention(self, i, x, image_slots):
        p, w = f"llm.transformer.layers.{i}", self.w
        wo, w0, w2 = (f"{XA}.out_proj.weight", f"{p}.cross_attention.gate.alpha.0.weight",
                      f"{p}.cross_attention.gate.alpha.2.weight")
        return gated_cross_attention(x, w[f"{p}.norm_cross.alpha"].reshape(-1), self.xa_wq, self.pool.kv, image_slots,
                                     w[wo], w[w0], w[w2], out=x, wq_scale=self.xa_wq_scale,
                                     wo_scale=w.get(scale_key(wo)), gate_w0_scale=w.get(scale_key(w0)),
                                     gate_w2_scale=w.get(scale_key(w2)))

    def ffn(self, i, x):
        p = f"llm.transformer.layers.{i}"
        g = self.linear(f"{p}.gating.linear_in.weight", x, norm="rms", norm_alpha=self.w[f"{p}.norm2.alpha"],
                        epilogue="silu_gate")
        return self.linear(f"{p}.gating.linear_out.weight", g, residual=x, out=x)

    def text_head(self, x):
        h = rms_norm(x, self.w["llm.out_norm.alpha"])
        return h, self.linear("llm.text_linear.weight", h).float()

    def depformer(self, h, text, rows, positions, forced):
        B, st = h.shape[0], self.state
        if B not in self._depformer_ws:
            self._depformer_ws[B] = depformer_workspace(self.depformer_w, B)
        tokens, logits = depformer_frame(self.depformer_w, h, text, self._depformer_ws[B],
                                         temperature=st.temperature[rows, 1], top_k=st.top_k[rows, 1],
                                         seed=st.seed[rows], frame=positions, forced=forced)
        return logits, tokens

    def sample(self, logits, rows, positions, codebook):
        kind = min(codebook, 1)
        st = self.state
        return sample_tokens(logits, st.temperature[rows, kind], st.top_k[rows, kind], st.seed[rows], positions,
                             codebook)
