"""Each Triton kernel against its baselines, at the real shapes, swept over the batch.

python -m bench.kernels [--preset moshika-vis|small|tiny] [--only xattn self_attention embedding
       sampling depformer linear] [--device cuda|cpu] [--dtype bfloat16|float32] [--budget-s S]
       [--threads N] [--json PATH]

Kernels and their baselines (every baseline does the same work on the same inputs):
  xattn           gated cross-attention block, B streams with distinct images, B in {1,4,16,64,256}:
                  the PyTorch reference (moshivis.reference, as the torch backend runs it), the same
                  block with F.scaled_dot_product_attention on the gathered image K/V, and with
                  flash-attn's flash_attn_with_kvcache (cache_batch_idx: no gather) when installed
  self_attention  RoPE + KV append + decode attention over a full context window, B in {1,4,16,64}:
                  the PyTorch reference, SDPA on the gathered cache, flash-attn (rotary + append); ours
                  also on an int8 cache (one fp32 scale per token per head) beside its PyTorch reference
  embedding       the 17-table embedding sum vs the PyTorch reference
  sampling        temperature + top-k draw, text (V=32000) and audio (V=2048) rows vs the PyTorch
                  reference (same random numbers, same tokens) and torch.topk + torch.multinomial
  depformer       the 8 codebook steps with their sampling (one persistent launch per step, and one
                  launch per phase), dense and INT8 weights, vs the PyTorch reference loop, B in
                  {1,4,16,64,256}
  linear          weight-only linears at the model's shapes (dim->3dim, dim->2hidden, hidden->dim,
                  depformer dd->3dd), M in {1,2,4,...,256}: ours with bf16 and INT8 weights vs cuBLAS
                  bf16 F.linear, the PyTorch INT8 reference F.linear(x, CB) * SCB/127 and bitsandbytes
                  Linear8bitLt when installed
On a GPU every implementation is timed with triton.testing.do_bench (L2 flushed between runs; median,
p10, p90 in microseconds) and, when its median is under 100 us or it is the depformer, also as a CUDA
graph (triton.testing.do_bench_cudagraph: launch cost removed, L2 not flushed). GB/s counts the bytes
the operation must move at least; "% roofline" is that over the measured device copy bandwidth.
Without a GPU the shapes are the tiny preset's and only the PyTorch baselines are timed: our kernels
run once in the Triton interpreter to check their outputs against the reference, and are NOT timed.
"""
from __future__ import annotations

import importlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from moshivis import cli, preset
from moshivis import reference as R
from moshivis.checkpoint import XA, expected_shapes
from moshivis_kernels import linear, quantize_rowwise

from .common import add_common_args, copy_bandwidth, environment, set_threads, table, time_cpu, write_json

SECTIONS = ("xattn", "self_attention", "embedding", "sampling", "depformer", "linear")
SWEEPS = {
    "cuda": {"xattn": [1, 4, 16, 64, 256], "self_attention": [1, 4, 16, 64], "embedding": [1, 64, 256],
             "sampling": [1, 64], "depformer": [1, 4, 16, 64, 256], "linear": [1, 2, 4, 8, 16, 32, 64, 128, 256]},
    "cpu": {"xattn": [1, 4], "self_attention": [1, 4], "embedding": [1, 4], "sampling": [1, 4],
            "depformer": [2], "linear": [1, 16]},
}
GRAPH_BELOW_US = 100.0
NOT_TIMED = "not timed: Triton interpreter (kernel timings need a GPU)"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Impl:
    name: str
    description: str
    fn: Callable | None
    ours: bool = False
    status: str = "ok"
    check_against: str | None = None  # the baseline whose output ours must match
    bytes: float | None = None  # bytes this implementation must move, when not the case's
    graph: bool = True  # may be captured in a CUDA graph
    vs: str = "triton"  # a baseline's time is reported over this implementation of ours


@dataclass
class Case:
    kernel: str
    label: str
    params: dict
    bytes: float
    impls: list[Impl]
    compare: Callable = None  # (ours output, reference output) -> error
    error_name: str = "max_abs_err"
    always_graph: bool = False


def max_abs_err(a, b) -> float:
    return float((first(a).float() - first(b).float()).abs().max())


def mismatches(a, b) -> float:
    return float((first(a) != first(b)).sum())


def first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


# ---- optional libraries ----------------------------------------------------------------------------
def optional(module: str):
    """The module, or None when it is not installed (or fails to import)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # their deprecation warnings are not ours to act on
            warnings.simplefilter("ignore")
            return importlib.import_module(module)
    except Exception:  # noqa: BLE001  (an optional baseline: any import failure means unavailable)
        return None


# ---- inputs ---------------------------------------------------------------------------------------
class Rand:
    """Seeded random tensors on one device, in one dtype."""

    def __init__(self, device, dtype, seed: int = 0):
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def normal(self, *shape, scale: float = 1.0, dtype=None) -> torch.Tensor:
        t = torch.randn(shape, generator=self.gen, device=self.device, dtype=torch.float32) * scale
        return t.to(dtype or self.dtype)

    def ints(self, low: int, high: int, *shape) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.gen, device=self.device)

    def weights(self, cfg, keep: Callable[[str], bool]) -> dict:
        """random_init's rules (linears N(0, 1/fan_in), embeddings N(0, 1), norms 1 + N(0, 0.01)) for
        the keys `keep` selects."""
        w = {}
        for key, shape in expected_shapes(cfg).items():
            if not keep(key):
                continue
            if key.endswith(".alpha"):
                w[key] = (1 + self.normal(*shape, scale=0.1, dtype=torch.float32)).to(self.dtype)
            else:
                w[key] = self.normal(*shape, scale=1.0 if "emb" in key else shape[-1] ** -0.5)
        return w


# ---- cases ----------------------------------------------------------------------------------------
def xattn_cases(cfg, rnd: Rand, sweep: list[int]) -> Iterator[Case]:
    from moshivis_kernels import gated_cross_attention
    flash = optional("flash_attn")
    dim, H, D, N, G = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.num_image_tokens, cfg.gate_dim
    p = "llm.transformer.layers.0"
    w = rnd.weights(cfg, lambda k: k.startswith(XA) or k.startswith(f"{p}.norm_cross")
                    or k.startswith(f"{p}.cross_attention.gate"))
    wq, wo = w[f"{XA}.in_proj_weight"][:dim], w[f"{XA}.out_proj.weight"]
    w0, w2 = w[f"{p}.cross_attention.gate.alpha.0.weight"], w[f"{p}.cross_attention.gate.alpha.2.weight"]
    alpha = w[f"{p}.norm_cross.alpha"]
    ab = rnd.dtype.itemsize
    for B in sweep:
        pool = rnd.normal(B, N, 2, H, D)  # B distinct images: the worst case
        slots = torch.arange(B, device=rnd.device)
        x = rnd.normal(B, dim)

        def block(attend, x=x, slots=slots, B=B):
            """The reference block with its attention core swapped."""
            y = R.rms_norm(x, alpha)
            q = F.linear(y, wq).view(B, H, D)
            a = F.linear(attend(q).reshape(B, dim), wo)
            g = torch.sigmoid(F.linear(F.relu(F.linear(a, w0)), w2) - 4)
            return torch.where((slots >= 0)[:, None], x + a * g, x)

        def sdpa(q, pool=pool, slots=slots):
            kv = pool[slots]  # [B, N, 2, H, D]
            k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
            return F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]

        def flash_core(q, pool=pool, slots=slots):
            seqlens = torch.full((q.shape[0],), N, dtype=torch.int32, device=q.device)
            return flash.flash_attn_with_kvcache(q[:, None], pool[:, :, 0], pool[:, :, 1], cache_seqlens=seqlens,
                                                 cache_batch_idx=slots.to(torch.int32))[:, 0]

        impls = [
            Impl("triton", "ours: moshivis_kernels.gated_cross_attention (5 launches)",
                 lambda x=x, pool=pool, slots=slots: gated_cross_attention(x, alpha, wq, pool, slots, wo, w0, w2),
                 ours=True, check_against="torch"),
            Impl("torch", "PyTorch reference as the torch backend runs it (gather + fp32 softmax)",
                 lambda x=x, pool=pool, slots=slots: R.cross_attention(w, cfg, 0, x, pool[slots], slots >= 0)),
            Impl("sdpa", "PyTorch block with F.scaled_dot_product_attention on the gathered K/V",
                 lambda b=block, core=sdpa: b(core)),
            Impl("flash_attn", "PyTorch block with flash_attn_with_kvcache (cache_batch_idx, no gather)",
                 (lambda b=block, core=flash_core: b(core)) if flash else None,
                 status="ok" if flash else "not installed"),
        ]
        nbytes = (2 * dim * dim + 2 * dim * G) * ab + B * N * 2 * dim * ab + 2 * B * dim * ab
        yield Case("xattn", f"B={B}", {"B": B, "images": B, "N": N, "dim": dim}, nbytes, impls, max_abs_err)


def self_attention_cases(cfg, rnd: Rand, sweep: list[int]) -> Iterator[Case]:
    from moshivis_kernels import self_attention_decode, self_attention_workspace
    from moshivis_kernels.self_attention import quantize_kv, self_attention_decode_reference
    flash = optional("flash_attn")
    dim, H, D, ctx, mp = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.context, float(cfg.max_period)
    ab = rnd.dtype.itemsize
    for B in sweep:
        kv = rnd.normal(B, 2, ctx, H, D)  # one layer's ring buffers of B streams
        kv8, scale8 = quantize_kv(kv)  # the same cache in int8, scales [B, 2, H, ctx]
        scale8 = scale8.transpose(-1, -2).contiguous()
        qkv = rnd.normal(B, 3 * dim)
        rows = torch.arange(B, device=rnd.device)
        positions = torch.full((B,), ctx + 7, dtype=torch.int64, device=rnd.device)  # wrapped: full window
        ws = self_attention_workspace(B, H, D, ctx, rnd.device)

        def torch_op(attend, kv=kv, qkv=qkv, rows=rows, positions=positions):
            """The reference's RoPE, append and gather (R.self_attention without its projections)."""
            q, k, v = qkv.view(qkv.shape[0], 3, H, D).unbind(1)
            q, k = R.rope(q, positions, mp), R.rope(k, positions, mp)
            kv[rows, 0, positions % ctx] = k
            kv[rows, 1, positions % ctx] = v
            keys, values = kv[rows].unbind(1)
            visible = torch.arange(ctx, device=kv.device)[None, :] <= positions[:, None]
            return attend(q, keys, values, visible).reshape(q.shape[0], dim)

        def sdpa(q, keys, values, visible):
            return F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                                  attn_mask=visible[:, None, None, :])[:, :, 0]

        def flash_op(kv=kv, qkv=qkv, rows=rows):
            q, k, v = qkv.view(qkv.shape[0], 3, H, D).unbind(1)
            angle = torch.arange(ctx, device=kv.device, dtype=torch.float32)[:, None] * torch.exp(
                torch.arange(D // 2, device=kv.device, dtype=torch.float32) * (-math.log(mp) * 2 / D))
            seqlens = torch.full((q.shape[0],), ctx - 1, dtype=torch.int32, device=kv.device)  # appends the last slot
            out = flash.flash_attn_with_kvcache(
                q[:, None], kv[:, 0], kv[:, 1], k=k[:, None], v=v[:, None], rotary_cos=angle.cos().to(q.dtype),
                rotary_sin=angle.sin().to(q.dtype), cache_seqlens=seqlens, cache_batch_idx=rows.to(torch.int32),
                rotary_interleaved=True)
            return out.reshape(q.shape[0], dim)

        impls = [
            Impl("triton", "ours: moshivis_kernels.self_attention_decode (RoPE + append + split-K attention)",
                 lambda kv=kv, qkv=qkv, rows=rows, positions=positions, ws=ws: self_attention_decode(
                     qkv, kv, rows, positions, max_period=mp, workspace=ws), ours=True, check_against="torch"),
            Impl("torch", "PyTorch reference (RoPE, append, gather, fp32 softmax)",
                 lambda op=torch_op: op(R.attention)),
            Impl("sdpa", "PyTorch RoPE + append, F.scaled_dot_product_attention on the gathered cache",
                 lambda op=torch_op: op(sdpa)),
            Impl("flash_attn", "flash_attn_with_kvcache (rotary, append, cache_batch_idx)",
                 flash_op if flash else None, status="ok" if flash else "not installed"),
            Impl("triton_int8kv", "ours on an int8 cache (dequantized in registers)",
                 lambda qkv=qkv, rows=rows, positions=positions, ws=ws, kv8=kv8, s8=scale8: self_attention_decode(
                     qkv, kv8, rows, positions, kv_scale=s8, max_period=mp, workspace=ws),
                 ours=True, check_against="torch_int8kv", bytes=B * ctx * 2 * (dim + 4 * H) + B * 4 * dim * ab),
            Impl("torch_int8kv", "PyTorch reference on the int8 cache (quantize on append, dequantize the window)",
                 lambda qkv=qkv, rows=rows, positions=positions, kv8=kv8, s8=scale8: self_attention_decode_reference(
                     qkv, kv8, rows, positions, kv_scale=s8, max_period=mp),
                 vs="triton_int8kv", bytes=B * ctx * 2 * (dim + 4 * H) + B * 4 * dim * ab),
        ]
        nbytes = B * 2 * ctx * dim * ab + B * 4 * dim * ab
        yield Case("self_attention", f"B={B}", {"B": B, "context": ctx, "dim": dim}, nbytes, impls,
                          max_abs_err)


def embedding_cases(cfg, rnd: Rand, sweep: list[int]) -> Iterator[Case]:
    from moshivis_kernels import embed_tokens
    w = rnd.weights(cfg, lambda k: k == "llm.text_emb.weight" or k.startswith("audio_emb."))
    audio = torch.stack([w[f"audio_emb.{j}.weight"] for j in range(cfg.n_q)])
    w.update({f"audio_emb.{j}.weight": audio[j] for j in range(cfg.n_q)})
    text = w["llm.text_emb.weight"]
    for B in sweep:
        tokens = torch.cat([rnd.ints(0, cfg.text_card, B, 1), rnd.ints(-1, cfg.audio_card, B, cfg.n_q)], dim=1)
        impls = [Impl("triton", "ours: moshivis_kernels.embed_tokens (one launch)",
                      lambda t=tokens: embed_tokens(t, text, audio), ours=True, check_against="torch"),
                 Impl("torch", "PyTorch reference (17 F.embedding + adds)",
                      lambda t=tokens: R.embed_inputs(w, cfg, t))]
        nbytes = B * (2 + cfg.n_q) * cfg.dim * rnd.dtype.itemsize
        yield Case("embedding", f"B={B}", {"B": B, "dim": cfg.dim}, nbytes, impls, max_abs_err)


def sampling_cases(cfg, rnd: Rand, sweep: list[int]) -> Iterator[Case]:
    from moshivis_kernels import sample_tokens
    from moshivis_kernels.sampling import sample_tokens_reference
    for what, V, T, k, codebook in (("text", cfg.text_card, 0.7, 25, 0), ("audio", cfg.audio_card, 0.8, 250, 1)):
        for B in sweep:
            logits = rnd.normal(B, V, scale=3.0, dtype=torch.float32)
            temp = torch.full((B,), T, device=rnd.device)
            top_k = torch.full((B,), k, dtype=torch.int32, device=rnd.device)
            seed = torch.arange(B, device=rnd.device, dtype=torch.int64)
            frame = torch.full((B,), 10, device=rnd.device, dtype=torch.int64)
            args = (logits, temp, top_k, seed, frame, codebook)

            def topk_multinomial(logits=logits, k=min(k, V), T=T):
                vals, idx = torch.topk(logits / T, k, dim=-1)
                return idx.gather(1, torch.multinomial(vals.softmax(-1), 1))[:, 0]

            impls = [Impl("triton", "ours: moshivis_kernels.sample_tokens (radix top-k + exponential race)",
                          lambda a=args: sample_tokens(*a), ours=True, check_against="torch"),
                     Impl("torch", "PyTorch reference (sort + the same Philox uniforms: same tokens)",
                          lambda a=args: sample_tokens_reference(*a), graph=False),  # copies host -> device
                     Impl("torch_topk", "torch.topk + softmax + torch.multinomial", topk_multinomial)]
            yield Case("sampling", f"{what} V={V} B={B}", {"B": B, "V": V, "top_k": k}, B * V * 4 + B * 32,
                              impls, mismatches, error_name="token_mismatches")


def depformer_cases(cfg, rnd: Rand, sweep: list[int]) -> Iterator[Case]:
    from moshivis.backends.triton import depformer_weights
    from moshivis_kernels import depformer_frame, depformer_workspace
    from moshivis_kernels.sampling import sample_tokens_reference

    from moshivis.checkpoint import quantized_keys, scale_key

    from .common import frame_bytes
    w = rnd.weights(cfg, lambda k: k.startswith(("depformer", "audio_linears")))
    dw = depformer_weights(dict(w), cfg)
    w8 = dict(w)  # the same weights in the INT8 checkpoint layout (CB + SCB)
    for key in quantized_keys(cfg):
        if key in w8:
            w8[key], w8[scale_key(key)] = quantize_rowwise(w8[key])
    dw8 = depformer_weights(w8, cfg)
    S, L = cfg.dep_q, cfg.depformer_num_layers
    weights_read = frame_bytes(cfg, 1, 1, 0, rnd.dtype.itemsize, rnd.dtype.itemsize)["depformer_weights"]
    int8_read = frame_bytes(cfg, 1, 1, 0, rnd.dtype.itemsize, 1)["depformer_weights"]
    for B in sweep:
        h = rnd.normal(B, cfg.dim)
        text = rnd.ints(0, cfg.text_card, B)
        sampling = dict(temperature=torch.full((B,), 0.8, device=rnd.device),
                        top_k=torch.full((B,), 250, dtype=torch.int32, device=rnd.device),
                        seed=torch.arange(B, device=rnd.device, dtype=torch.int64),
                        frame=torch.full((B,), 10, device=rnd.device, dtype=torch.int64))
        ws = depformer_workspace(dw, B)

        def reference(h=h, text=text, s=sampling, weights=w):
            cache = torch.zeros(L, h.shape[0], 2, S, cfg.depformer_num_heads, cfg.depformer_head_dim,
                                dtype=h.dtype, device=h.device)
            prev, logits = text, []
            for k in range(S):
                logits.append(R.depformer_step(weights, cfg, k, h, prev, cache))
                prev = sample_tokens_reference(logits[-1], s["temperature"], s["top_k"], s["seed"], s["frame"], 1 + k)
            return torch.stack(logits, dim=1)

        impls = [Impl("triton", "ours: depformer_frame, one persistent launch per step + its sampler (16 launches)",
                      lambda h=h, text=text, ws=ws, s=sampling: depformer_frame(dw, h, text, ws, **s)[1],
                      ours=True, check_against="torch"),
                 Impl("triton_unfused", f"ours: depformer_frame, one launch per phase ({4 * L + 2} per step)",
                      lambda h=h, text=text, ws=ws, s=sampling: depformer_frame(dw, h, text, ws, fused=False, **s)[1],
                      ours=True, check_against="torch"),
                 Impl("triton_int8", "ours: depformer_frame with INT8 weights (CB int8 + SCB fp32)",
                      lambda h=h, text=text, ws=ws, s=sampling: depformer_frame(dw8, h, text, ws, **s)[1],
                      ours=True, check_against="torch_int8", bytes=int8_read + B * S * cfg.audio_card * 4),
                 Impl("torch_int8", "PyTorch reference loop on the INT8 weights (moshivis.reference's INT8 rule)",
                      lambda h=h, text=text, s=sampling: reference(h, text, s, w8), graph=False, vs="triton_int8",
                      bytes=int8_read + B * S * cfg.audio_card * 4),
                 Impl("torch", "PyTorch reference loop (moshivis.reference.depformer_step + sampling reference)",
                      reference, graph=False)]  # the sampling reference copies host -> device
        # step 0's logits do not depend on sampled tokens: compare those
        yield Case("depformer", f"B={B}", {"B": B, "steps": S}, weights_read + B * S * cfg.audio_card * 4,
                          impls, lambda a, b: max_abs_err(a[:, 0], b[:, 0]), always_graph=True)


def linear_cases(cfg, rnd: Rand, sweep: list[int]) -> Iterator[Case]:
    source = "moshivis_kernels.linear"
    bnb = optional("bitsandbytes")
    shapes = [("attn_in_proj", cfg.dim, 3 * cfg.dim), ("ffn_linear_in", cfg.dim, 2 * cfg.hidden),
              ("ffn_linear_out", cfg.hidden, cfg.dim), ("dep_in_proj", cfg.depformer_dim, 3 * cfg.depformer_dim)]
    ab = rnd.dtype.itemsize
    for name, K, N in shapes:
        w = rnd.normal(N, K, scale=K ** -0.5)
        cb, scb = quantize_rowwise(w)
        layer = None
        if bnb is not None:
            try:
                layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=0.0)
                layer.weight = bnb.nn.Int8Params(w.detach().cpu().to(torch.float16 if ab == 2 else torch.float32),
                                                 requires_grad=False, has_fp16_weights=False)
                layer = layer.to(rnd.device)
            except Exception as e:  # noqa: BLE001  (a baseline that cannot be built is reported, not fatal)
                layer = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        for M in sweep:
            x = rnd.normal(M, K)
            io = M * K * ab + M * N * ab
            int8_bytes = N * K + N * 4 + io
            impls = [
                Impl("triton", f"ours: {source} with dense {rnd.dtype} weights", lambda x=x, w=w: linear(x, w),
                     ours=True, check_against="torch"),
                Impl("triton_int8", f"ours: {source} with INT8 weights (CB int8 + SCB fp32)",
                     lambda x=x, cb=cb, scb=scb: linear(x, cb, scb), ours=True, check_against="torch_int8",
                     bytes=int8_bytes),
                Impl("torch", f"F.linear with dense {rnd.dtype} weights (cuBLAS on a GPU)",
                     lambda x=x, w=w: F.linear(x, w)),
                Impl("torch_int8", "PyTorch INT8 reference: F.linear(x, CB.to(dtype)) * SCB / 127",
                     lambda x=x, cb=cb, scb=scb: F.linear(x, cb.to(x.dtype)) * (scb / 127).to(x.dtype),
                     bytes=int8_bytes, vs="triton_int8"),
                Impl("bnb_int8", "bitsandbytes Linear8bitLt (int8 weights, threshold 0)",
                     (lambda x=x, layer=layer: layer(x)) if isinstance(layer, torch.nn.Module) else None,
                     bytes=int8_bytes, graph=False, vs="triton_int8",
                     status="ok" if isinstance(layer, torch.nn.Module) else layer or "not installed"),
            ]
            yield Case("linear", f"{name} {K}->{N} M={M}", {"shape": name, "M": M, "K": K, "N": N},
                              N * K * ab + io, impls, max_abs_err)


BUILDERS = {"xattn": xattn_cases, "self_attention": self_attention_cases, "embedding": embedding_cases,
            "sampling": sampling_cases, "depformer": depformer_cases, "linear": linear_cases}


# ---- timing -----------------------------------------------------------------------------------------
def time_gpu(fn, graph: bool) -> dict[str, float]:
    from triton.testing import do_bench, do_bench_cudagraph
    q = (do_bench_cudagraph(fn, rep=20, quantiles=[0.5, 0.1, 0.9]) if graph
         else do_bench(fn, warmup=10, rep=50, quantiles=[0.5, 0.1, 0.9]))
    return {"us": q[0] * 1e3, "us_p10": q[1] * 1e3, "us_p90": q[2] * 1e3}


def _recover(device: torch.device) -> None:
    """After a failed implementation: free what it left in the allocator (a broken CUDA context stays broken:
    the following implementations then report their own errors)."""
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass


def _error(e: Exception) -> str:
    return f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def run_case(case: Case, device: torch.device, bandwidth: float, deadline: float | None) -> list[dict]:
    """Rows for every implementation of the case (and its CUDA-graph variant where it applies)."""
    rows, outputs = [], {}
    cuda = device.type == "cuda"
    for impl in sorted(case.impls, key=lambda i: i.ours):  # baselines first: ours is checked against them
        base = {"kernel": case.kernel, "case": case.label, **case.params, "impl": impl.name,
                "description": impl.description, "ours": impl.ours, "cuda_graph": False,
                "bytes": impl.bytes or case.bytes, "timed": False, "status": impl.status}
        if impl.fn is None:
            rows.append(base)
            continue
        if deadline is not None and time.monotonic() > deadline:
            rows.append(base | {"status": "skipped: time budget"})
            continue
        try:
            out = impl.fn()
            if cuda:
                torch.cuda.synchronize(device)
            outputs[impl.name] = out
            if impl.ours and impl.check_against in outputs:
                base[case.error_name] = case.compare(out, outputs[impl.check_against])
                base["checked_against"] = impl.check_against
            if impl.ours and not cuda:
                rows.append(base | {"status": NOT_TIMED})
                continue
            timing = time_gpu(impl.fn, graph=False) if cuda else time_cpu(impl.fn)
        except Exception as e:  # noqa: BLE001  (one failing implementation must not end the benchmark)
            rows.append(base | {"status": _error(e)})
            _recover(device)
            continue
        rows.append(_with_rates(base | timing | {"timed": True}, bandwidth))
        if cuda and impl.graph and (case.always_graph or timing["us"] < GRAPH_BELOW_US):
            graph_row = base | {"cuda_graph": True}
            try:
                rows.append(_with_rates(graph_row | time_gpu(impl.fn, graph=True) | {"timed": True}, bandwidth))
            except Exception as e:  # noqa: BLE001
                rows.append(graph_row | {"status": _error(e)})
                _recover(device)
    ours = {(r["impl"], r["cuda_graph"]): r["us"] for r in rows if r["ours"] and r.get("us")}
    versus = {i.name: i.vs for i in case.impls}
    for r in rows:
        mine = ours.get((versus[r["impl"]], r["cuda_graph"]))
        if not r["ours"] and r.get("us") and mine:
            r["ours_speedup"], r["vs"] = r["us"] / mine, versus[r["impl"]]
    return rows


def _with_rates(row: dict, bandwidth: float) -> dict:
    seconds = row["us"] * 1e-6
    return row | {"gb_per_s": row["bytes"] / seconds / 1e9, "roofline_pct": 100 * row["bytes"] / bandwidth / seconds}


def measure(args, log=print) -> tuple[dict, list[dict]]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bfloat16" if cuda else "float32")]
    cfg = preset(args.preset or ("moshika-vis" if cuda else "tiny"))
    env = environment(device)
    sweeps = SWEEPS["cuda" if cuda else "cpu"]
    log(f"# kernels: preset {args.preset or ('moshika-vis' if cuda else 'tiny')}, {dtype}, on {env['device']} "
        f"({'GPU' if cuda else 'CPU figures, not GPU'}); commit {env['commit']}")
    if not cuda:
        log("# no GPU: only the PyTorch baselines are timed (CPU); our kernels run once in the Triton "
            "interpreter to check their outputs and are NOT timed: kernel timings need a GPU")
    bandwidth = copy_bandwidth(device)
    env.update(copy_bandwidth_bytes_per_s=bandwidth, dtype=str(dtype).removeprefix("torch."),
               preset=args.preset or ("moshika-vis" if cuda else "tiny"))
    log(f"# measured copy bandwidth {bandwidth / 1e9:.1f} GB/s (the roofline)")
    deadline = time.monotonic() + args.budget_s if args.budget_s else None
    rnd = Rand(device, dtype, args.seed)
    rows = []
    with torch.no_grad():
        for section in args.only or SECTIONS:
            t0 = time.monotonic()
            if deadline is not None and t0 > deadline:
                log(f"# {section}: skipped (time budget)")
                rows.append({"kernel": section, "status": "skipped: time budget", "timed": False})
                continue
            section_rows = []
            try:  # cases are made one at a time, so one batch size's inputs are freed before the next
                for case in BUILDERS[section](cfg, rnd, sweeps[section]):
                    section_rows += run_case(case, device, bandwidth, deadline)
            except Exception as e:  # noqa: BLE001  (inputs that cannot be built end the section, not the run)
                log(f"# {section}: could not build its inputs: {_error(e)}")
                section_rows.append({"kernel": section, "status": _error(e), "timed": False})
            if cuda:
                torch.cuda.empty_cache()
            rows += section_rows
            report(section_rows, log)
            log(f"({section}: {time.monotonic() - t0:.1f} s)\n")
    return env, rows


def report(rows: list[dict], log=print) -> None:
    shown = []
    for r in rows:
        spread = f"{r['us_p10']:.1f}-{r['us_p90']:.1f}" if r.get("us_p10") is not None else None
        shown.append(r | {"impl_label": r.get("impl", "-") + (" (graph)" if r.get("cuda_graph") else ""),
                          "spread": spread, "err": r.get("max_abs_err", r.get("token_mismatches"))})
    log(table(shown, [("kernel", "kernel", ""), ("case", "case", ""), ("impl", "impl_label", ""), ("us", "us", ".1f"),
                      ("p10-p90 us", "spread", ""), ("GB/s", "gb_per_s", ".0f"), ("% roofline", "roofline_pct", ".1f"),
                      ("time / ours", "ours_speedup", ".2f"), ("err vs ref", "err", ".2e"), ("status", "status", "")]))


def parser() -> cli.ArgumentParser:
    ap = cli.ArgumentParser(prog="python -m bench.kernels", description=__doc__)
    cuda = torch.cuda.is_available()
    ap.add_argument("--preset", type=cli.preset_name, default=None, help="default: moshika-vis on a GPU, tiny on CPU")
    ap.add_argument("--only", nargs="+", choices=SECTIONS, default=None)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="activations and dense weights (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--device", type=cli.device_name, default="cuda" if cuda else "cpu")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new measurements after this many seconds (the rest: 'skipped')")
    add_common_args(ap)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    set_threads(args.threads)
    env, rows = measure(args, log=lambda s: print(s, flush=True))
    write_json(args.json, "kernels", env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
