"""The plain PyTorch MoshiVis: the tolerance anchor for every kernel (SPEC.md §3-§7).

Functions of tensors, batched over streams (one token per stream per frame), clear over clever.
Weights are the flat dict of `checkpoint.load`, keyed as in Kyutai's checkpoint. Linears run in the
activations' dtype; norms, RoPE angles and softmax in float32, as Kyutai's code does. A linear whose
weight is stored as int8 (bitsandbytes row-wise: `KEY` = CB int8, `scale_key(KEY)` = SCB fp32) is
`F.linear(x, CB) * SCB / 127`, the definition the int8 kernel is held to. An int8 self-attention cache
stores `quantize_kv(k)` (int8 plus one fp32 scale per token per head) and attends to `dequantize_kv` of
it (`moshivis_kernels.self_attention` states the rule; its kernel applies it when appending).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moshivis_kernels.sampling import sample_tokens_reference
from moshivis_kernels.self_attention import dequantize_kv, quantize_kv

from .checkpoint import XA, scale_key
from .config import END_OF_PADDING, MoshiVisConfig

TEMPORAL_EPS = 1e-8
DEPFORMER_EPS = 1e-8
NORM_XA_EPS = 1e-5


# ---- norms (SPEC.md §3) -------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float = TEMPORAL_EPS) -> torch.Tensor:
    """Temporal norm: x * alpha * rsqrt(mean(x^2) + eps), computed in float32."""
    xf = x.float()
    y = xf * alpha.float().reshape(-1) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return y.to(x.dtype)


def var_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float, in_fp32: bool = True) -> torch.Tensor:
    """Depformer norm (fp32, eps 1e-8) and `norm_xa` (input dtype, eps 1e-5): the unbiased variance."""
    xc = x.float() if in_fp32 else x
    var = xc.var(-1, unbiased=True, keepdim=True)
    y = xc * alpha.to(xc.dtype).reshape(-1) * torch.rsqrt(var + eps)
    return y.to(x.dtype)


# ---- building blocks ----------------------------------------------------------------------------
def rope(x: torch.Tensor, positions: torch.Tensor, max_period: float) -> torch.Tensor:
    """Interleaved RoPE: pair (2i, 2i+1) of each head rotated by p * max_period^(-2i/head_dim).

    x [B, H, D], positions [B] (frames since the stream started). Angles in float32.
    """
    d = x.shape[-1]
    freqs = torch.exp(torch.arange(d // 2, device=x.device, dtype=torch.float32) * (-math.log(max_period) * 2 / d))
    angle = positions.to(torch.float32)[:, None, None] * freqs  # [B, 1, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    xr, xi = x.float().unflatten(-1, (d // 2, 2)).unbind(-1)
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q.k / sqrt(D)) v for one query per row, in float32.

    q [B, H, D]; k, v [B, T, H, D]; mask [B, T] (True = visible) or None. Returns [B, H, D].
    """
    scores = torch.einsum("bhd,bthd->bht", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bht,bthd->bhd", scores.softmax(-1), v.float()).to(q.dtype)


def linear(w: dict, key: str, x: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """x @ W^T for the weight `key` (only its `rows` if given): dense, or int8 CB * SCB / 127."""
    weight = w[key] if rows is None else w[key][rows]
    scb = w.get(scale_key(key))
    if scb is None:
        return F.linear(x, weight)
    scale = scb if rows is None else scb[rows]
    return F.linear(x, weight.to(x.dtype)) * (scale / 127).to(x.dtype)


def swiglu(w: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """linear_out(silu(u[:hidden]) * u[hidden:]) with u = linear_in(x); prefix names the `gating` module."""
    gate, up = linear(w, f"{prefix}.linear_in.weight", x).chunk(2, dim=-1)
    return linear(w, f"{prefix}.linear_out.weight", F.silu(gate) * up)


def embed(table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Embedding lookup where the zero token (-1) gives exact zeros."""
    out = F.embedding(tokens.clamp(min=0), table)
    return out.masked_fill((tokens < 0)[..., None], 0.0)


# ---- image path (SPEC.md §5) --------------------------------------------------------------------
def image_embeddings(w: dict, features: torch.Tensor) -> torch.Tensor:
    """norm_xa(proj_xa(features)): [..., N, image_encoder_dim] -> [..., N, dim]."""
    e = F.linear(features, w["image_prefix.proj_xa.weight"], w["image_prefix.proj_xa.bias"])
    return var_norm(e, w["image_prefix.norm_xa.alpha"], NORM_XA_EPS, in_fp32=False)


def image_kv(w: dict, cfg: MoshiVisConfig, features: torch.Tensor) -> torch.Tensor:
    """The static image KV cache: [..., N, 2, heads, head_dim] (K then V), shared by all layers."""
    e = image_embeddings(w, features)
    kv = linear(w, f"{XA}.in_proj_weight", e, rows=slice(cfg.dim, None))  # rows [dim, 3*dim): Wk, Wv
    return kv.unflatten(-1, (2, cfg.num_heads, cfg.head_dim))


# ---- temporal transformer (SPEC.md §4) ----------------------------------------------------------
def embed_inputs(w: dict, cfg: MoshiVisConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Sum of the 17 input embeddings: tokens [B, 1 + n_q] -> [B, dim]."""
    x = embed(w["llm.text_emb.weight"], tokens[:, 0])
    for j in range(cfg.n_q):
        x = x + embed(w[f"audio_emb.{j}.weight"], tokens[:, 1 + j])
    return x


def self_attention(w: dict, cfg: MoshiVisConfig, i: int, x: torch.Tensor, kv_cache: torch.Tensor,
                   rows: torch.Tensor, positions: torch.Tensor, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Layer i's self-attention block with its residual, for B streams.

    kv_cache [S, 2, context, H, D] is layer i's ring buffer for all slots (updated in place): the key of
    absolute position p lives at index p % context. rows [B] are the streams' slots, positions [B]
    their absolute positions. The visible window is positions p-context+1 .. p. An int8 kv_cache comes
    with kv_scale [S, 2, H, context] fp32, its per-token per-head scales (updated with it).
    """
    p = f"llm.transformer.layers.{i}"
    B, H, D, ctx = x.shape[0], cfg.num_heads, cfg.head_dim, cfg.context
    qkv = linear(w, f"{p}.self_attn.in_proj_weight", rms_norm(x, w[f"{p}.norm1.alpha"]))
    q, k, v = qkv.view(B, 3, H, D).unbind(1)
    q, k = rope(q, positions, cfg.max_period), rope(k, positions, cfg.max_period)
    idx = positions % ctx
    if kv_scale is None:
        kv_cache[rows, 0, idx], kv_cache[rows, 1, idx] = k, v
        keys, values = kv_cache[rows].unbind(1)  # [B, context, H, D]
    else:
        kv_cache[rows, 0, idx], kv_scale[rows, 0, :, idx] = quantize_kv(k)
        kv_cache[rows, 1, idx], kv_scale[rows, 1, :, idx] = quantize_kv(v)
        keys, values = dequantize_kv(kv_cache[rows], kv_scale[rows].transpose(-1, -2)).unbind(1)
    visible = torch.arange(ctx, device=x.device)[None, :] <= positions[:, None]
    attn = attention(q, keys, values, visible)
    return x + linear(w, f"{p}.self_attn.out_proj.weight", attn.reshape(B, H * D))


def cross_attention(w: dict, cfg: MoshiVisConfig, i: int, x: torch.Tensor,
                    image_kv_rows: torch.Tensor, has_image: torch.Tensor,
                    gate_mean: torch.Tensor | None = None, num_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Layer i's gated cross-attention with its residual (SPEC.md §4.2).

    image_kv_rows [B, N, 2, H, D]: each stream's image K/V (anything where has_image [B] is False:
    those rows are returned unchanged, as Kyutai skips the block without an image). num_tokens [B],
    optional: each row's image has only its first num_tokens of the N tokens (an image encoded at
    another resolution); the rest are not attended to. gate_mean [B] fp32, optional: receives each row's
    mean gate (0 without an image), on the device.
    """
    p = f"llm.transformer.layers.{i}"
    B, H, D = x.shape[0], cfg.num_heads, cfg.head_dim
    y = rms_norm(x, w[f"{p}.norm_cross.alpha"])
    q = linear(w, f"{XA}.in_proj_weight", y, rows=slice(0, cfg.dim)).view(B, H, D)  # Wq: rows [0, dim)
    visible = None
    if num_tokens is not None:  # rows without an image see every key: their result is dropped anyway
        N = image_kv_rows.shape[1]
        visible = (torch.arange(N, device=x.device)[None, :] < num_tokens[:, None]) | ~has_image[:, None]
    attn = attention(q, image_kv_rows[:, :, 0], image_kv_rows[:, :, 1], visible)
    a = linear(w, f"{XA}.out_proj.weight", attn.reshape(B, H * D))
    hidden = F.relu(linear(w, f"{p}.cross_attention.gate.alpha.0.weight", a))
    g = torch.sigmoid(linear(w, f"{p}.cross_attention.gate.alpha.2.weight", hidden) - 4)
    if gate_mean is not None:
        gate_mean.copy_(torch.where(has_image, g.float().mean(-1), 0.0))
    return torch.where(has_image[:, None], x + a * g, x)


def ffn(w: dict, i: int, x: torch.Tensor) -> torch.Tensor:
    p = f"llm.transformer.layers.{i}"
    y = rms_norm(x, w[f"{p}.norm2.alpha"])
    return x + swiglu(w, f"{p}.gating", y)


def text_logits(w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h = out_norm(x) and the text logits [B, text_card] (float32)."""
    h = rms_norm(x, w["llm.out_norm.alpha"])
    return h, linear(w, "llm.text_linear.weight", h).float()


# ---- depformer (SPEC.md §6) ---------------------------------------------------------------------
def depformer_step(w: dict, cfg: MoshiVisConfig, k: int, h: torch.Tensor, prev_token: torch.Tensor,
                   cache: torch.Tensor) -> torch.Tensor:
    """Codebook step k for B streams: returns the audio logits [B, audio_card] (float32).

    h [B, dim] the temporal output; prev_token [B] the text token (k = 0) or audio token k-1;
    cache [L, B, 2, dep_q, H, D] this frame's depformer K/V (entry k written here).
    """
    dd, H, D = cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_head_dim
    B = h.shape[0]
    table = w["depformer_text_emb.weight"] if k == 0 else w[f"depformer_emb.{k - 1}.weight"]
    x = linear(w, f"depformer_in.{k}.weight", h) + embed(table, prev_token)
    visible = torch.arange(cfg.dep_q, device=h.device)[None, :].expand(B, -1) <= k
    for l in range(cfg.depformer_num_layers):
        p = f"depformer.layers.{l}"
        y = var_norm(x, w[f"{p}.norm1.alpha"], DEPFORMER_EPS)
        qkv = linear(w, f"{p}.self_attn.in_proj_weight", y, rows=slice(3 * dd * k, 3 * dd * (k + 1)))
        q, kk, v = qkv.view(B, 3, H, D).unbind(1)
        cache[l, :, 0, k], cache[l, :, 1, k] = kk, v
        attn = attention(q, cache[l, :, 0], cache[l, :, 1], visible)
        x = x + linear(w, f"{p}.self_attn.out_proj.weight", attn.reshape(B, dd), rows=slice(dd * k, dd * (k + 1)))
        y = var_norm(x, w[f"{p}.norm2.alpha"], DEPFORMER_EPS)
        x = x + swiglu(w, f"{p}.gating.{k}", y)
    return linear(w, f"audio_linears.{k}.weight", x).float()


# ---- sampling (SPEC.md §7) ----------------------------------------------------------------------
# Sampling's reference is `moshivis_kernels.sampling.sample_tokens_reference`: plain PyTorch beside its
# kernel, drawing with the same counter-based random numbers so both backends give the same tokens.


def repetition_penalty(logits: torch.Tensor, text_tokens: list[int], penalty: float, context: int,
                       ignored: tuple[int, ...]) -> torch.Tensor:
    """Kyutai's text repetition penalty, as its Rust server applies it (`apply_repetition_penalty` in
    moshi-core's lm_generate_multistream.rs): walk the stream's text tokens newest first, skip the
    ignored ones (padding, end-of-padding), count `context` others and penalise each distinct one once,
    l / penalty if l >= 0 else l * penalty (fp32). logits [V] -> a new tensor."""
    out = logits.float().clone()
    seen: set[int] = set()
    counted = 0
    for token in reversed(text_tokens):
        if token in ignored:
            continue
        if counted >= context:
            break
        counted += 1
        if token in seen:
            continue
        seen.add(token)
        x = out[token]
        out[token] = x / penalty if x >= 0 else x * penalty
    return out.to(logits.dtype)


# ---- one stream, stepped as Kyutai's generator steps it (SPEC.md §7) ----------------------------
class StreamingReference:
    """One stream stepped by hand with the functions above, written like Kyutai's `MoshiVisGen.step`:
    its own token cache, K/V cache, position and text history, nothing shared with the engine. The
    anchor for the engine's streaming behaviour (delays, images attended from `xa_start`, per-image
    token counts, the repetition penalty).

    image: features [n, image_encoder_dim] or None; xa_start: the first frame that attends to the image
    (Kyutai's server passes no image before it, so earlier frames skip the block); sampling: greedy at
    temperature 0, otherwise drawn with `sample_tokens_reference` (the engine's random numbers, keyed by
    seed, frame and codebook); repetition_penalty / repetition_context: `repetition_penalty` on the
    text logits, ignoring the padding and end-of-padding tokens.
    """

    def __init__(self, w: dict, cfg: MoshiVisConfig, image: torch.Tensor | None = None, xa_start: int = 0,
                 seed: int = 0, temperature: tuple[float, float] = (0.0, 0.0), top_k: tuple[int, int] = (0, 0),
                 repetition_penalty: float = 1.0, repetition_context: int = 0):
        self.w, self.cfg = w, cfg
        dtype, device = w["llm.text_emb.weight"].dtype, w["llm.text_emb.weight"].device
        self.image_kv = None if image is None else image_kv(w, cfg, image.to(device, dtype))[None]
        self.xa_start, self.seed = xa_start, seed
        self.temperature, self.top_k = temperature, top_k
        self.penalty, self.context = repetition_penalty, repetition_context
        self.ignored = (END_OF_PADDING, cfg.padding_token_id)
        self.cache = torch.full((1 + cfg.n_q, cfg.max_delay + 2), -2, dtype=torch.long, device=device)
        self.kv = torch.zeros(cfg.num_layers, 1, 2, cfg.context, cfg.num_heads, cfg.head_dim, dtype=dtype,
                              device=device)
        self.t = 0
        self.text_tokens: list[int] = []  # every text token of the stream so far (drawn or forced)

    def _choose(self, logits: torch.Tensor, codebook: int, forced: int) -> int:
        if forced >= 0:
            return forced
        kind = min(codebook, 1)
        one = lambda v, dt: torch.tensor([v], dtype=dt, device=logits.device)  # noqa: E731
        return int(sample_tokens_reference(logits[None], one(self.temperature[kind], torch.float32),
                                           one(self.top_k[kind], torch.int64), one(self.seed, torch.int64),
                                           one(self.t, torch.int64), codebook)[0])

    def step(self, user: torch.Tensor, forced: torch.Tensor | None = None):
        """One frame: user [num_audio_in] tokens, forced [1 + dep_q] (-1: draw) -> (tokens [1 + dep_q]
        after delays, -2 during the warm-up frames; text_logits [text_card] after the penalty;
        audio_logits [dep_q, audio_card]; gate_means [num_layers] fp32, 0 in frames without the image)."""
        cfg, w, t = self.cfg, self.w, self.t
        delays, L = cfg.delays, self.cache.shape[1]
        initial = [cfg.text_card] + [cfg.audio_card] * cfg.n_q
        forced = [-1] * (1 + cfg.dep_q) if forced is None else [int(f) for f in forced]
        for j, token in enumerate(user.tolist()):  # the user's codebooks enter at their delay
            r = 1 + cfg.dep_q + j
            self.cache[r, (t + delays[r]) % L] = token
        for r, delay in enumerate(delays):  # rows younger than their delay read the initial token
            if t <= delay:
                self.cache[r, t % L] = initial[r]
        inputs = self.cache[:, t % L][None]
        position, row = torch.tensor([t], device=self.cache.device), torch.tensor([0], device=self.cache.device)
        gates = torch.zeros(cfg.num_layers, 1, dtype=torch.float32, device=self.cache.device)
        attend = self.image_kv is not None and t >= self.xa_start
        x = embed_inputs(w, cfg, inputs)
        for i in range(cfg.num_layers):
            x = self_attention(w, cfg, i, x, self.kv[i], row, position)
            if attend:
                x = cross_attention(w, cfg, i, x, self.image_kv, torch.tensor([True]), gates[i])
            x = ffn(w, i, x)
        h, logits = text_logits(w, x)
        penalised = repetition_penalty(logits[0], self.text_tokens, self.penalty, self.context, self.ignored)
        tokens = [self._choose(penalised, 0, forced[0])]
        self.text_tokens.append(tokens[0])
        cache = torch.zeros(cfg.depformer_num_layers, 1, 2, cfg.dep_q, cfg.depformer_num_heads,
                            cfg.depformer_head_dim, dtype=h.dtype, device=h.device)
        audio_logits = []
        for k in range(cfg.dep_q):
            lk = depformer_step(w, cfg, k, h, torch.tensor([tokens[-1]], device=h.device), cache)[0]
            audio_logits.append(lk)
            tokens.append(self._choose(lk, 1 + k, forced[1 + k]))
        self.t = t = t + 1
        self.cache[: 1 + cfg.dep_q, t % L] = torch.tensor(tokens, device=self.cache.device)
        if t <= cfg.max_delay:
            out = torch.full((1 + cfg.dep_q,), -2, dtype=torch.long)
        else:
            out = torch.stack([self.cache[r, (t - cfg.max_delay + delays[r]) % L] for r in range(1 + cfg.dep_q)])
        return out.cpu(), penalised, torch.stack(audio_logits), gates[:, 0]
