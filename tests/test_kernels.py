"""Every Triton kernel against its plain PyTorch reference, in the Triton interpreter on CPU.

Fresh random inputs per test, outputs pre-filled with NaN (or an impossible token) so unwritten
elements fail, shapes that are not multiples of the block sizes, tolerances stated per dtype: fp32
in the interpreter (its bf16 arithmetic is unreliable); bf16 and timing-free GPU checks run natively
when a CUDA device is present and skip with that reason otherwise. One section per kernel file.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import moshivis_kernels.depformer as D
from moshivis import checkpoint, reference
from moshivis import reference as R
from moshivis.checkpoint import XA
from moshivis.config import tiny
from moshivis_kernels import count_launches
from moshivis_kernels import cross_attention as xa
from moshivis_kernels import sampling as S
from moshivis_kernels.embedding import embed_tokens, embed_tokens_reference
from moshivis_kernels.linear import launch_config, linear, linear_reference, quantize_rowwise
from moshivis_kernels.self_attention import (dequantize_kv, quantize_kv, self_attention_decode,
                                             self_attention_decode_reference, self_attention_workspace)

import triton  # noqa: E402  (after moshivis_kernels, which picks the interpreter)
import triton.language as tl  # noqa: E402

mod = importlib.import_module("moshivis_kernels.linear")  # the module: the package exports a function `linear`


def assert_graph_replays(run, out, want, counters):
    """run() (writing `out`) captured in a CUDA graph replays to the bits of `want`, out NaN-filled before
    each replay, and leaves its arrival counters at zero."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    assert not counters.any()


# ==================================================================================================
# Embedding and self-attention (temporal step)
#
# Temporal-transformer kernels against plain PyTorch, in the interpreter on CPU (fp32, 1e-5: the kernels and
# the references differ only in the order of fp32 sums, measured <= 9e-7 on O(1) outputs):
# self-attention decode (RoPE + KV ring-buffer append + windowed attention) and the input embedding sum.
#
# The interpreter's bf16 conversions truncate instead of rounding, so bf16 is checked only by the static
# audit (bench/audit.py); here every tensor is fp32.
# ==================================================================================================
FP32_TOL_temporal = {"atol": 1e-5, "rtol": 1e-5}
NAN = float("nan")

# (heads, head_dim, context, several splits): one split; two splits, the second one partial; ten splits,
# most of them empty while the window fills (the last split to finish merges them, in the same launch).
SA_SHAPES = [(2, 16, 37, False), (2, 128, 37, True), (1, 128, 300, True)]


def _positions(scenario: str, B: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """Absolute positions: before the window fills, at the wrap, far past it, or all of these."""
    choices = {
        "filling": [0, 1, ctx // 2, ctx - 2],
        "wrap": [ctx - 1, ctx, ctx + 1],
        "far": [5 * ctx + 3, 7 * ctx - 1, 9 * ctx],
    }
    pool = sum(choices.values(), []) if scenario == "mixed" else choices[scenario]
    pool = pool + [int(torch.randint(0, ctx, (1,), generator=gen)) if scenario == "filling"
                   else int(torch.randint(ctx, 10 * ctx, (1,), generator=gen))]
    pick = torch.randint(0, len(pool), (B,), generator=gen)
    pick[: min(B, len(pool))] = torch.arange(min(B, len(pool)))  # every listed case when B allows
    return torch.tensor(pool, dtype=torch.int64)[pick]


def _written(kv_shape, rows, positions) -> torch.Tensor:
    """[S, context] True where this call appends (slot rows[b], index positions[b] % context)."""
    S, _, ctx = kv_shape[:3]
    mask = torch.zeros(S, ctx, dtype=torch.bool)
    mask[rows.long(), positions % ctx] = True
    return mask


def _padded_batch(S: int, B: int, ctx: int, gen: torch.Generator):
    """(rows, pad, positions) of B streams in S slots, about half of them padding (-1; row 0 is, row 1 is
    not), at positions of every scenario."""
    rows = torch.randperm(S, generator=gen)[:B]
    pad = torch.rand(B, generator=gen) < 0.5
    pad[0], pad[1] = True, False
    rows[pad] = -1
    return rows, pad, _positions("mixed", B, ctx, gen)


# ---- self-attention decode ----------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["filling", "wrap", "far", "mixed"])
@pytest.mark.parametrize("H, D, ctx, splits", SA_SHAPES)
def test_self_attention_decode_matches_reference(gen, H, D, ctx, splits, scenario):
    B = int(torch.randint(1, 10, (1,), generator=gen))
    S = 2 * B + 3
    # layer 1 of a two-layer cache filled with "history"; streams in scattered slots
    kv_all = torch.randn(2, S, 2, ctx, H, D, generator=gen)
    kv = kv_all[1]
    before = kv_all.clone()
    rows = torch.randperm(S, generator=gen)[:B].to(torch.int32 if scenario == "far" else torch.int64)
    positions = _positions(scenario, B, ctx, gen)
    qkv = torch.randn(B, 3 * H * D + 5, generator=gen)[:, : 3 * H * D]  # row stride != width
    out = torch.full((B, H * D + 3), NAN)[:, : H * D]

    kv_ref = kv.clone()
    want = self_attention_decode_reference(qkv, kv_ref, rows, positions)
    with count_launches() as launches:
        got = self_attention_decode(qkv, kv, rows, positions, out=out)
    assert got is out
    assert launches == {"self_attention_decode": 1}
    assert (self_attention_workspace(B, H, D, ctx, "cpu") is not None) == splits
    torch.testing.assert_close(got, want, **FP32_TOL_temporal)

    written = _written(kv.shape, rows, positions)
    torch.testing.assert_close(kv.transpose(1, 2)[written], kv_ref.transpose(1, 2)[written], **FP32_TOL_temporal)
    assert torch.equal(kv.transpose(1, 2)[~written], before[1].transpose(1, 2)[~written])  # rest untouched
    assert torch.equal(kv_all[0], before[0])  # the other layer too


@pytest.mark.parametrize("H, D, ctx, splits", SA_SHAPES)
def test_self_attention_decode_padding_rows(gen, H, D, ctx, splits):
    """Rows of -1 (a batch padded to a captured size) write no cache and attend to their own token only,
    whatever their position; the real rows beside them are unaffected."""
    B = int(torch.randint(3, 10, (1,), generator=gen))
    S = B + 2
    kv = torch.randn(S, 2, ctx, H, D, generator=gen)
    before = kv.clone()
    rows, pad, positions = _padded_batch(S, B, ctx, gen)
    qkv = torch.randn(B, 3 * H * D, generator=gen)
    kv_ref = kv.clone()
    want = self_attention_decode_reference(qkv, kv_ref, rows, positions)
    got = self_attention_decode(qkv, kv, rows, positions, out=torch.full((B, H * D), NAN))
    torch.testing.assert_close(got, want, **FP32_TOL_temporal)
    torch.testing.assert_close(got[pad], qkv[pad, 2 * H * D:], rtol=0, atol=0)  # softmax over one key: v
    written = _written(kv.shape, rows[~pad], positions[~pad])
    torch.testing.assert_close(kv.transpose(1, 2)[written], kv_ref.transpose(1, 2)[written], **FP32_TOL_temporal)
    assert torch.equal(kv.transpose(1, 2)[~written], before.transpose(1, 2)[~written])


def _self_attention_layer(gen: torch.Generator):
    """(cfg, weights, rows, positions): layer 0's self-attention block at dim 256, 2 heads (head_dim 128: two
    splits), context 37, random weights; three streams in slots 5, 1, 3 filling, at the wrap, far past it."""
    cfg = dataclasses.replace(tiny(), dim=256, num_heads=2, context=37)
    dim, p = cfg.dim, "llm.transformer.layers.0"
    w = {f"{p}.norm1.alpha": torch.rand(1, 1, dim, generator=gen) + 0.5,
         f"{p}.self_attn.in_proj_weight": torch.randn(3 * dim, dim, generator=gen) / math.sqrt(dim),
         f"{p}.self_attn.out_proj.weight": torch.randn(dim, dim, generator=gen) / math.sqrt(dim)}
    return cfg, w, torch.tensor([5, 1, 3]), torch.tensor([0, cfg.context - 6, 5 * cfg.context - 3])


def test_self_attention_decode_streaming_matches_model_reference(gen):
    """Frames of moshivis.reference.self_attention against qkv projection + kernel + out projection, with
    the kernel's own reference beside them; three streams fill, wrap and run far past the context."""
    cfg, w, rows, positions = _self_attention_layer(gen)
    dim, H, D, ctx, p = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.context, "llm.transformer.layers.0"
    S = 6
    kv_model = torch.randn(S, 2, ctx, H, D, generator=gen)  # history of slots' previous users
    kv_kernel, kv_mine = kv_model.clone(), kv_model.clone()
    workspace = self_attention_workspace(3, H, D, ctx, "cpu")
    assert workspace is not None
    partials, counters = workspace[: -3 * H], workspace[-3 * H:].view(torch.int32)  # see self_attention_workspace

    for _ in range(9):
        x = torch.randn(3, dim, generator=gen)
        want = R.self_attention(w, cfg, 0, x, kv_model, rows, positions)
        qkv = F.linear(R.rms_norm(x, w[f"{p}.norm1.alpha"]), w[f"{p}.self_attn.in_proj_weight"])
        project = lambda attn: x + F.linear(attn, w[f"{p}.self_attn.out_proj.weight"])  # noqa: E731
        mine = project(self_attention_decode_reference(qkv, kv_mine, rows, positions, max_period=cfg.max_period))
        torch.testing.assert_close(mine, want, atol=1e-6, rtol=1e-6)
        assert torch.equal(kv_mine, kv_model)
        partials.fill_(NAN)
        got = project(self_attention_decode(qkv, kv_kernel, rows, positions, max_period=cfg.max_period,
                                            workspace=workspace))
        assert not counters.any()  # the merging split reset them
        torch.testing.assert_close(got, want, **FP32_TOL_temporal)
        torch.testing.assert_close(kv_kernel, kv_model, **FP32_TOL_temporal)
        positions = positions + 1


@pytest.mark.parametrize("ctx, max_period", [(37, 500.0), (1, 10000.0), (2, 10000.0)])
def test_self_attention_decode_small_context_and_other_max_period(gen, ctx, max_period):
    """context 1: only the new token is visible; context 2: one older key; a non-default RoPE period."""
    H, D = 2, 16
    kv = torch.randn(3, 2, ctx, H, D, generator=gen)
    kv_ref = kv.clone()
    qkv = torch.randn(3, 3 * H * D, generator=gen)
    rows, positions = torch.tensor([2, 0, 1]), torch.tensor([ctx + 4, 11, 0])
    want = self_attention_decode_reference(qkv, kv_ref, rows, positions, max_period=max_period)
    got = self_attention_decode(qkv, kv, rows, positions, max_period=max_period, out=torch.full((3, H * D), NAN))
    torch.testing.assert_close(got, want, **FP32_TOL_temporal)
    torch.testing.assert_close(kv, kv_ref, **FP32_TOL_temporal)
    if ctx == 1:  # softmax over one key: the new v itself
        torch.testing.assert_close(got, qkv[:, 2 * H * D:], **FP32_TOL_temporal)


@pytest.mark.parametrize("with_workspace", [False, True])
def test_self_attention_decode_counters_reset(gen, with_workspace):
    """Two identical calls (the second re-appends the same k, v) give the same bits, with one workspace
    or with the shared per-device counters, and leave every arrival counter at zero."""
    from moshivis_kernels._arrival import shared_counters
    H, D, ctx, B = 2, 128, 300, 3  # ten splits
    kv = torch.randn(4, 2, ctx, H, D, generator=gen)
    qkv = torch.randn(B, 3 * H * D, generator=gen)
    rows, positions = torch.tensor([3, 0, 2]), torch.tensor([7, 2 * ctx + 5, 150])
    ws = self_attention_workspace(B, H, D, ctx, "cpu") if with_workspace else None
    first = self_attention_decode(qkv, kv, rows, positions, workspace=ws, out=torch.full((B, H * D), NAN))
    second = self_attention_decode(qkv, kv, rows, positions, workspace=ws, out=torch.full((B, H * D), NAN))
    assert torch.equal(first, second)
    counters = ws[-B * H:].view(torch.int32) if with_workspace else shared_counters("cpu", B * H)
    assert not counters.any()
    torch.testing.assert_close(first, self_attention_decode_reference(qkv, kv.clone(), rows, positions),
                               **FP32_TOL_temporal)


def test_self_attention_decode_empty_batch(gen):
    H, D, ctx = 2, 16, 37
    kv = torch.randn(3, 2, ctx, H, D, generator=gen)
    before = kv.clone()
    empty = torch.zeros(0, dtype=torch.int64)
    with count_launches() as launches:
        out = self_attention_decode(torch.randn(0, 3 * H * D), kv, empty, empty)
    assert out.shape == (0, H * D) and launches == {} and torch.equal(kv, before)
    assert self_attention_workspace(1, H, D, ctx, "cpu") is None  # one split: no scratch


def _sa_inputs(H=2, D=16, ctx=5, B=3, S=4):
    return {"qkv": torch.randn(B, 3 * H * D), "kv": torch.randn(S, 2, ctx, H, D),
            "rows": torch.arange(B), "positions": torch.arange(B)}


@pytest.mark.parametrize("change, name", [
    (lambda a: a.update(qkv=a["qkv"][:, :-1]), "qkv"),
    (lambda a: a.update(qkv=a["qkv"].to(torch.int32)), "qkv"),
    (lambda a: a.update(qkv=a["qkv"].t().contiguous().t()), "qkv"),
    (lambda a: a.update(kv=a["kv"][0]), "kv"),
    (lambda a: a.update(kv=torch.randn(4, 3, 5, 2, 16)), "kv"),
    (lambda a: a.update(kv=torch.randn(4, 2, 5, 2, 12), qkv=torch.randn(3, 72)), "kv"),  # head_dim not 2^k
    (lambda a: a.update(kv=torch.randn(4, 2, 5, 16, 2).transpose(3, 4)), "kv"),
    (lambda a: a.update(rows=a["rows"].float()), "rows"),
    (lambda a: a.update(rows=a["rows"][:2]), "rows"),
    (lambda a: a.update(positions=a["positions"][:, None]), "positions"),
    (lambda a: a.update(positions=torch.arange(4)), "positions"),
    (lambda a: a.update(max_period=0.0), "max_period"),
    (lambda a: a.update(out=torch.empty(3, 31)), "out"),
    (lambda a: a.update(out=torch.empty(3, 32, dtype=torch.int64)), "out"),
    (lambda a: a.update(kv=torch.randn(4, 2, 40, 2, 128), qkv=torch.randn(3, 768),
                        workspace=torch.empty(10)), "workspace"),
    (lambda a: a.update(kv=torch.randn(4, 2, 40, 2, 128), qkv=torch.randn(3, 768),
                        workspace=torch.empty(10**6, dtype=torch.float64)), "workspace"),
    (lambda a: a.update(kv=torch.randn(4, 2, 40, 2, 128), qkv=torch.randn(3, 768),  # made for another batch
                        workspace=self_attention_workspace(4, 2, 128, 40, "cpu")), "workspace"),
    (lambda a: a.update(kv=a["kv"].to(torch.int8)), "kv_scale"),  # int8 without its scales
    (lambda a: a.update(kv_scale=torch.rand(4, 2, 2, 5)), "kv_scale"),  # scales beside a float cache
    (lambda a: a.update(kv=a["kv"].to(torch.int8), kv_scale=torch.rand(4, 2, 5, 2)), "kv_scale"),  # [.., ctx, H]
    (lambda a: a.update(kv=a["kv"].to(torch.int8), kv_scale=torch.rand(4, 2, 5, 2).transpose(2, 3)), "kv_scale"),
    (lambda a: a.update(kv=a["kv"].to(torch.int8), kv_scale=torch.rand(4, 2, 2, 5).half()), "kv_scale"),
    (lambda a: a.update(kv=a["kv"].to(torch.uint8), kv_scale=torch.rand(4, 2, 2, 5)), "kv"),
])
def test_self_attention_decode_rejects_bad_inputs(change, name):
    args = _sa_inputs()
    change(args)
    with pytest.raises((ValueError, TypeError), match=name):
        self_attention_decode(args.pop("qkv"), args.pop("kv"), args.pop("rows"), args.pop("positions"), **args)


# ---- self-attention decode on an INT8 cache ------------------------------------------------------
# fp32 in the interpreter. The kernel scales scores and weights by the int8 scales in registers where the
# reference dequantizes the window in memory: measured max |error| 7e-7 on these shapes, held to 1e-5.
# What it appends is the reference's: V to the bit (same arithmetic on the same numbers), K within one
# int8 step (RoPE's cos/sin may differ by an ulp between the interpreter and PyTorch).
FP32_TOL_int8kv = {"atol": 1e-5, "rtol": 1e-5}


def _int8_cache(S, ctx, H, D, gen):
    """A random INT8 cache: kv int8 [S, 2, ctx, H, D] in [-127, 127], scales [S, 2, H, ctx] fp32 > 0."""
    return (torch.randint(-127, 128, (S, 2, ctx, H, D), generator=gen, dtype=torch.int8),
            torch.rand(S, 2, H, ctx, generator=gen) * 0.05 + 1e-3)


def _assert_int8_cache(kv, scale, kv_ref, scale_ref, before, written):
    """Appended entries as the reference appended them (V exact, K within one step), the rest untouched."""
    at = lambda t: t.transpose(1, 2)[written]  # [n, 2, H, D] (cache) or [n, 2, H] (scales)  # noqa: E731
    scales = lambda t: t.permute(0, 3, 1, 2)[written]  # noqa: E731
    assert torch.equal(at(kv)[:, 1], at(kv_ref)[:, 1]) and torch.equal(scales(scale)[:, 1], scales(scale_ref)[:, 1])
    assert (at(kv)[:, 0].int() - at(kv_ref)[:, 0].int()).abs().max() <= 1
    torch.testing.assert_close(scales(scale)[:, 0], scales(scale_ref)[:, 0], atol=0, rtol=1e-6)
    assert torch.equal(kv.transpose(1, 2)[~written], before[0].transpose(1, 2)[~written])
    assert torch.equal(scale.permute(0, 3, 1, 2)[~written], before[1].permute(0, 3, 1, 2)[~written])


@pytest.mark.parametrize("scenario", ["filling", "wrap", "far", "mixed"])
@pytest.mark.parametrize("H, D, ctx, splits", SA_SHAPES)
def test_self_attention_decode_int8_kv_matches_reference(gen, H, D, ctx, splits, scenario):
    """Windows shorter than the context (filling), at the wrap, far past it; one and several splits."""
    B = int(torch.randint(1, 10, (1,), generator=gen))
    S = 2 * B + 3
    kv, scale = _int8_cache(S, ctx, H, D, gen)
    before = kv.clone(), scale.clone()
    rows = torch.randperm(S, generator=gen)[:B]
    positions = _positions(scenario, B, ctx, gen)
    qkv = torch.randn(B, 3 * H * D + 5, generator=gen)[:, : 3 * H * D]  # row stride != width
    out = torch.full((B, H * D + 3), NAN)[:, : H * D]

    kv_ref, scale_ref = kv.clone(), scale.clone()
    want = self_attention_decode_reference(qkv, kv_ref, rows, positions, kv_scale=scale_ref)
    with count_launches() as launches:
        got = self_attention_decode(qkv, kv, rows, positions, kv_scale=scale, out=out)
    assert got is out and launches == {"self_attention_decode": 1}
    torch.testing.assert_close(got, want, **FP32_TOL_int8kv)
    _assert_int8_cache(kv, scale, kv_ref, scale_ref, before, _written(kv.shape, rows, positions))


@pytest.mark.parametrize("H, D, ctx, splits", SA_SHAPES)
def test_self_attention_decode_int8_kv_padding_rows(gen, H, D, ctx, splits):
    """Padding rows (-1) write no cache and attend to their own quantized token: v within half a step."""
    B = int(torch.randint(3, 10, (1,), generator=gen))
    S = B + 2
    kv, scale = _int8_cache(S, ctx, H, D, gen)
    before = kv.clone(), scale.clone()
    rows, pad, positions = _padded_batch(S, B, ctx, gen)
    qkv = torch.randn(B, 3 * H * D, generator=gen)
    kv_ref, scale_ref = kv.clone(), scale.clone()
    want = self_attention_decode_reference(qkv, kv_ref, rows, positions, kv_scale=scale_ref)
    got = self_attention_decode(qkv, kv, rows, positions, kv_scale=scale, out=torch.full((B, H * D), NAN))
    torch.testing.assert_close(got, want, **FP32_TOL_int8kv)
    v = qkv[pad, 2 * H * D:].view(-1, H, D)
    step = v.abs().amax(-1, keepdim=True) / 127
    assert ((got[pad].view(-1, H, D) - v).abs() <= step / 2 * (1 + 1e-6)).all()
    _assert_int8_cache(kv, scale, kv_ref, scale_ref, before, _written(kv.shape, rows[~pad], positions[~pad]))


def test_int8_kv_rounding_rule(gen):
    """The rule by hand: scale = max|x| / 127, round half to even, zero vectors stay zero, |error| <= scale / 2;
    in PyTorch (quantize_kv / dequantize_kv) and in the kernel's append (V, which RoPE does not touch)."""
    H, D, ctx = 2, 16, 5
    ties = torch.tensor([127, 0.5, 1.5, 2.5, -0.5, -2.5, 3.5, -126.5, 0.25, -0.75, 126.5, 0, 0, 0, 0, 0])
    want = torch.tensor([127, 0, 2, 2, 0, -2, 4, -126, 0, -1, 126, 0, 0, 0, 0, 0], dtype=torch.int8)
    v = torch.randn(3, H, D, generator=gen)
    v[0, 0], v[0, 1], v[1, 0] = ties, 0.0, ties * 2.0 ** -10  # scale exactly 1, 0 and 2^-10: ties stay ties
    q, scale = quantize_kv(v)
    assert torch.equal(q[0, 0], want) and torch.equal(q[1, 0], want) and not q[0, 1].any()
    assert scale[0, 0] == 1.0 and scale[0, 1] == 0.0 and scale[1, 0] == 2.0 ** -10
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.abs().amax(-1)[scale > 0].eq(127).all()
    assert ((dequantize_kv(q, scale) - v).abs() <= scale[..., None] / 2).all()

    kv, kv_scale = _int8_cache(4, ctx, H, D, gen)
    qkv = torch.cat([torch.randn(3, 2 * H * D, generator=gen), v.flatten(1)], dim=1)
    rows, positions = torch.tensor([3, 0, 1]), torch.tensor([2, ctx + 4, 0])
    self_attention_decode(qkv, kv, rows, positions, kv_scale=kv_scale)
    assert torch.equal(kv[rows, 1, positions % ctx], q) and torch.equal(kv_scale[rows, 1, :, positions % ctx], scale)


def test_self_attention_decode_int8_kv_streaming_matches_model_reference(gen):
    """Frames of moshivis.reference.self_attention on an INT8 cache against qkv projection + kernel + out
    projection; three streams fill, wrap and run far past the context, each frame on the cache the
    kernel's previous frames left."""
    cfg, w, rows, positions = _self_attention_layer(gen)
    dim, H, D, ctx, p = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.context, "llm.transformer.layers.0"
    kv_model, scale_model = _int8_cache(6, ctx, H, D, gen)  # history of slots' previous users
    kv_kernel, scale_kernel = kv_model.clone(), scale_model.clone()
    for _ in range(9):
        x = torch.randn(3, dim, generator=gen)
        want = R.self_attention(w, cfg, 0, x, kv_model, rows, positions, scale_model)
        qkv = F.linear(R.rms_norm(x, w[f"{p}.norm1.alpha"]), w[f"{p}.self_attn.in_proj_weight"])
        attn = self_attention_decode(qkv, kv_kernel, rows, positions, kv_scale=scale_kernel, max_period=cfg.max_period)
        got = x + F.linear(attn, w[f"{p}.self_attn.out_proj.weight"])
        torch.testing.assert_close(got, want, **FP32_TOL_int8kv)
        assert (kv_kernel.int() - kv_model.int()).abs().max() <= 1
        torch.testing.assert_close(scale_kernel, scale_model, atol=0, rtol=1e-6)
        positions = positions + 1


def test_self_attention_decode_int8_kv_compiles_for_sm90_with_128bit_loads_and_no_spills():
    """The int8-KV kernel at the real shapes (one stream, 16 splits; 64 streams): K/V tiles load 128 bits
    (16 int8 per thread, two loads per tile each for K and V), no byte-wide global loads, no spills."""
    report = compile_for_sm90("self_attention", ["int8kv"])
    assert len(report) == 2, report
    for name, r in report.items():
        assert r["spills"] == 0 and r["max_load_bits"] == 128 and r["loads_128"] >= 4 and r["loads_8"] == 0, (name, r)


@pytest.mark.gpu(reason="needs a CUDA GPU (only there does the last split vary)")
def test_self_attention_decode_repeatable_and_graph_replays_gpu():
    """Real sizes, one stream (16 splits): which split merges varies between runs on a GPU, the bits do
    not; a CUDA graph of the call replays to the same bits (the counters are back at zero each time)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    H, D, ctx = 32, 128, 3000
    kv = torch.randn(2, 2, ctx, H, D, device="cuda", generator=g).bfloat16()
    qkv = torch.randn(1, 3 * H * D, device="cuda", generator=g).bfloat16()
    rows, positions = torch.tensor([1], device="cuda"), torch.tensor([5 * ctx + 7], device="cuda")
    ws = self_attention_workspace(1, H, D, ctx, "cuda")
    assert ws is not None
    out = torch.empty(1, H * D, device="cuda", dtype=torch.bfloat16)
    first = self_attention_decode(qkv, kv, rows, positions, workspace=ws).clone()  # re-appends the same k, v
    for _ in range(20):
        assert torch.equal(self_attention_decode(qkv, kv, rows, positions, workspace=ws), first)
    assert_graph_replays(lambda: self_attention_decode(qkv, kv, rows, positions, workspace=ws, out=out), out, first,
                         ws[-H:].view(torch.int32))


@pytest.mark.gpu(reason="needs a CUDA GPU (the interpreter's bf16 arithmetic is unreliable)")
def test_self_attention_decode_bf16_real_sizes_gpu():
    """Real sizes, bf16 qkv and cache, streams before the window fills, at the wrap and far past it (one
    padding row): the output against the fp32 reference on the same (upcast) inputs, within twice PyTorch's
    own bf16 error plus a bf16 step (flash-attention's rule; bf16 steps are 4e-3 on O(1) values); the
    appended V is the input's bits, the appended K (RoPE in fp32, rounded to bf16) within one bf16 step of
    the reference's, the rest of the cache untouched. Outputs NaN-filled first."""
    g = torch.Generator(device="cuda").manual_seed(1)
    H, D, ctx, S = 32, 128, 3000, 6
    kv = torch.randn(S, 2, ctx, H, D, device="cuda", generator=g).bfloat16()
    qkv = torch.randn(5, 3 * H * D, device="cuda", generator=g).bfloat16()
    rows = torch.tensor([1, 3, -1, 0, 5], device="cuda")
    positions = torch.tensor([0, ctx - 1, 7, ctx, 5 * ctx + 7], device="cuda")
    exact = self_attention_decode_reference(qkv.float(), kv.float(), rows, positions)
    kv_bf16 = kv.clone()
    torch_bf16 = self_attention_decode_reference(qkv, kv_bf16, rows, positions)
    before = kv.clone()
    out = torch.full((5, H * D), float("nan"), device="cuda", dtype=torch.bfloat16)
    got = self_attention_decode(qkv, kv, rows, positions, out=out, workspace=self_attention_workspace(5, H, D, ctx, "cuda"))
    torch_err = (torch_bf16.float() - exact).abs().max()
    assert (got.float() - exact).abs().max() <= 2 * torch_err + 4e-3, ((got.float() - exact).abs().max(), torch_err)
    real = rows >= 0
    slot, idx = rows[real], positions[real] % ctx
    assert torch.equal(kv[slot, 1, idx], qkv[real, 2 * H * D:].view(-1, H, D))
    torch.testing.assert_close(kv[slot, 0, idx].float(), kv_bf16[slot, 0, idx].float(), atol=8e-3, rtol=8e-3)
    written = torch.zeros(S, ctx, dtype=torch.bool, device="cuda")
    written[slot, idx] = True
    assert torch.equal(kv.transpose(1, 2)[~written], before.transpose(1, 2)[~written])


@pytest.mark.gpu(reason="needs a CUDA GPU (bf16 and the native rounding of the append)")
def test_self_attention_decode_int8_kv_real_sizes_gpu():
    """Real sizes, bf16 qkv, an INT8 cache: the appended V is quantize_kv's bits (the native division and
    rounding are the rule's), K within one step; the output within bf16 rounding of the reference (2e-2 on
    O(1) values, bf16 steps are 4e-3); repeatable; a CUDA graph of the call replays to the same bits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    H, D, ctx, B = 32, 128, 3000, 3  # six splits
    kv = torch.randint(-127, 128, (4, 2, ctx, H, D), device="cuda", generator=g, dtype=torch.int8)
    scale = torch.rand(4, 2, H, ctx, device="cuda", generator=g) * 0.05 + 1e-3
    qkv = torch.randn(B, 3 * H * D, device="cuda", generator=g).bfloat16()
    rows, positions = torch.tensor([1, 3, 0], device="cuda"), torch.tensor([5 * ctx + 7, 10, ctx - 1], device="cuda")
    kv_ref, scale_ref = kv.clone(), scale.clone()
    want = self_attention_decode_reference(qkv, kv_ref, rows, positions, kv_scale=scale_ref)
    ws = self_attention_workspace(B, H, D, ctx, "cuda")
    run = lambda out=None: self_attention_decode(qkv, kv, rows, positions, kv_scale=scale, workspace=ws,  # noqa: E731
                                                 out=out)
    first = run().clone()
    idx = positions % ctx
    assert torch.equal(kv[rows, 1, idx], kv_ref[rows, 1, idx])
    assert torch.equal(scale[rows, 1, :, idx], scale_ref[rows, 1, :, idx])
    assert (kv[rows, 0, idx].int() - kv_ref[rows, 0, idx].int()).abs().max() <= 1
    torch.testing.assert_close(first.float(), want.float(), atol=2e-2, rtol=2e-2)
    for _ in range(5):  # re-appends the same k, v
        assert torch.equal(run(), first)
    out = torch.empty_like(first)
    assert_graph_replays(lambda: run(out), out, first, ws[-B * H:].view(torch.int32))


# ---- input embedding ----------------------------------------------------------------------------
@pytest.mark.parametrize("dim, n_q", [(600, 16), (64, 16), (37, 3)])
def test_embed_tokens_matches_reference(gen, dim, n_q):
    B = int(torch.randint(1, 10, (1,), generator=gen))
    v_text, v_audio = 50, 21
    text = torch.randn(v_text, dim, generator=gen)
    audio = torch.randn(n_q, v_audio, dim + 4, generator=gen)[:, :, :dim]  # row stride != dim
    buf = torch.randint(0, v_audio, (B, 1 + n_q, 3), generator=gen)  # like the engine's token buffer
    buf[:, 0] = torch.randint(0, v_text, (B, 3), generator=gen)
    buf[torch.rand(B, 1 + n_q, 3, generator=gen) < 0.25] = -1  # zero tokens
    buf[0, :, 1] = -1  # a row of zero tokens only
    tokens = buf[:, :, 1]  # a strided column
    out = torch.full((B, dim), NAN)
    with count_launches() as launches:
        got = embed_tokens(tokens, text, audio, out=out)
    assert got is out and launches == {"embed_tokens": 1}
    torch.testing.assert_close(got, embed_tokens_reference(tokens, text, audio), **FP32_TOL_temporal)
    assert torch.equal(got[0], torch.zeros(dim))  # exact zeros


def test_embed_tokens_matches_model_embed_inputs(gen):
    cfg = tiny()
    w = {"llm.text_emb.weight": torch.randn(cfg.text_card + 1, cfg.dim, generator=gen)}
    w |= {f"audio_emb.{j}.weight": torch.randn(cfg.audio_card + 1, cfg.dim, generator=gen) for j in range(cfg.n_q)}
    B = 5
    tokens = torch.randint(0, cfg.audio_card + 1, (B, 1 + cfg.n_q), generator=gen, dtype=torch.int32)
    tokens[:, 0] = torch.tensor([cfg.text_card, 0, 3, -1, cfg.text_card - 1])  # initial, pad, zero tokens
    tokens[2, 5:9] = -1
    tokens[3, 1:] = cfg.audio_card  # initial audio token
    stacked = torch.stack([w[f"audio_emb.{j}.weight"] for j in range(cfg.n_q)])
    want = R.embed_inputs(w, cfg, tokens.long())
    torch.testing.assert_close(embed_tokens_reference(tokens, w["llm.text_emb.weight"], stacked), want,
                               atol=1e-6, rtol=1e-6)
    got = embed_tokens(tokens, w["llm.text_emb.weight"], stacked, out=torch.full((B, cfg.dim), NAN))
    torch.testing.assert_close(got, want, **FP32_TOL_temporal)


def _emb_inputs():
    return {"tokens": torch.zeros(2, 4, dtype=torch.int64), "text_emb": torch.randn(7, 8),
            "audio_emb": torch.randn(3, 5, 8)}


@pytest.mark.parametrize("change, name", [
    (lambda a: a.update(tokens=a["tokens"][:, :3]), "tokens"),
    (lambda a: a.update(tokens=a["tokens"].float()), "tokens"),
    (lambda a: a.update(tokens=a["tokens"][0]), "tokens"),
    (lambda a: a.update(text_emb=a["text_emb"][None]), "text_emb"),
    (lambda a: a.update(text_emb=a["text_emb"].to(torch.int64)), "text_emb"),
    (lambda a: a.update(text_emb=torch.randn(8, 7).t()), "text_emb"),
    (lambda a: a.update(audio_emb=a["audio_emb"].double()), "audio_emb"),
    (lambda a: a.update(audio_emb=a["audio_emb"][..., :6]), "audio_emb"),
    (lambda a: a.update(audio_emb=a["audio_emb"][0]), "audio_emb"),
    (lambda a: a.update(out=torch.empty(2, 9)), "out"),
    (lambda a: a.update(out=torch.empty(2, 8, dtype=torch.bfloat16)), "out"),
])
def test_embed_tokens_rejects_bad_inputs(change, name):
    args = _emb_inputs()
    change(args)
    with pytest.raises((ValueError, TypeError), match=name):
        embed_tokens(args.pop("tokens"), args.pop("text_emb"), args.pop("audio_emb"), **args)

# ==================================================================================================
# Weight-only linear: dense or INT8 weights, norm prologue, epilogues
#
# Weight-only linear (moshivis_kernels.linear) against plain PyTorch, in the interpreter on CPU.
#
# Weights: int8 (bitsandbytes row-wise, from quantize_rowwise) and dense fp32; dense bf16/fp16 weights
# with fp32 activations (the interpreter converts them to fp32 exactly).
# Tolerances: with fp32 activations, every weight format is exact in fp32 (|CB| <= 127, 16-bit floats),
# so the kernel and the fp32 reference differ only by the order of fp32 sums (dot products, the norm's
# statistics, the int8 scale applied after the sum rather than to each weight): rtol = atol = 1e-5 on
# outputs of order 1 (observed <= ~8e-6). 16-bit activations: the kernel rounds the normed activations
# and its fp32 result to x's dtype once each, like the reference, so the two differ by about an ulp of
# the output: fp16 (ulp <= 2^-10 relative) rtol = atol = 2e-3 (observed <= ~7e-4); bf16 (ulp <= 2^-7,
# and the interpreter truncates instead of rounding) rtol = atol = 1e-2.
# ==================================================================================================
FP32_TOL_linear = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=1e-2, atol=1e-2)
FP16_TOL = dict(rtol=2e-3, atol=2e-3)
SPLIT_SMS = {False: 1, True: 132}  # pretend GPU size: 1 SM never splits K, 132 SMs splits small-N shapes
DENSE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS = ["int8", "fp32"]
VARIANTS = ["plain", "bias", "residual", "gate", "gate_bias_residual"]


def _weight(kind, n_w, K, g):
    """(weight, scale): int8 CB and SCB, or a dense weight and None; entries of order 1 / sqrt(K)."""
    w = torch.randn(n_w, K, generator=g) / K ** 0.5
    if kind == "int8":
        return quantize_rowwise(w)
    return w.to(DENSE[kind]), None


def _problem_linear(seed, M, K, N, *, weight="int8", variant="plain", norm=None, dtype=torch.float32):
    """linear() arguments: x [M, K] with a nonzero mean (so the var norm's centring matters), weights
    (2N rows with the gate), outputs of order 1; bias / residual / gate as `variant` names them."""
    g = torch.Generator().manual_seed(seed)
    gate = variant.startswith("gate")
    n_w = 2 * N if gate else N
    w, scale = _weight(weight, n_w, K, g)
    args = dict(x=(torch.randn(M, K, generator=g) + 0.5).to(dtype), weight=w, scale=scale,
                bias=torch.randn(n_w, generator=g) if "bias" in variant else None,
                residual=torch.randn(M, N, generator=g).to(dtype) if "residual" in variant else None,
                epilogue="silu_gate" if gate else "none")
    if norm is not None:
        args.update(norm=norm, norm_alpha=torch.rand(1, 1, K, generator=g) + 0.5)  # the checkpoint's shape
    return args


def _nan_out(M, N, dtype=torch.float32):
    return torch.full((M, N), float("nan"), dtype=dtype)


def _check(args, tol=FP32_TOL_linear, **kwargs):
    """linear() into a NaN-filled out against linear_reference()."""
    M, N = args["x"].shape[0], args["weight"].shape[0] // (2 if args["epilogue"] == "silu_gate" else 1)
    out = _nan_out(M, N, args["x"].dtype)
    y = linear(**args, out=out, **kwargs)
    assert y is out
    torch.testing.assert_close(y.float(), linear_reference(**args).float(), **tol)


@pytest.fixture(params=[False, True], ids=["nosplit", "splitk"])
def split(request, monkeypatch):
    monkeypatch.setattr(mod, "_num_sms", lambda index: SPLIT_SMS[request.param])
    return request.param


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("M", [1, 2, 3, 16, 65])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(M, variant, weight, split):
    K, N = 200, 77
    args = _problem_linear(M * 31 + len(variant), M, K, N, weight=weight, variant=variant)
    cfg = launch_config(M, N, K, gate=variant.startswith("gate"), weight_dtype=args["weight"].dtype,
                        dot_fp32=True, norm=False, num_sms=SPLIT_SMS[split])
    assert cfg.gemv == (M <= mod._GEMV_MAX_M) and (cfg.split_k > 1) == split
    _check(args)


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("M", [1, 3, 16, 65])
@pytest.mark.parametrize("norm", ["rms", "var"])
@pytest.mark.parametrize("variant", ["plain", "bias", "residual", "gate"])
def test_norm_prologue(M, norm, variant, weight, monkeypatch):
    """rms / var norm fused before the product, with each epilogue; K and N are not block multiples.
    Without split-K (norms with split-K: the long-K, strided-view and fp16 tests)."""
    monkeypatch.setattr(mod, "_num_sms", lambda index: SPLIT_SMS[False])
    args = _problem_linear(M * 7 + len(variant) + len(norm), M, 200, 77, weight=weight, variant=variant, norm=norm)
    _check(args)


@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("norm", ["rms", "var"])
def test_norm_statistics_over_several_tiles(M, norm, monkeypatch):
    """Statistics tiles narrower than K (with a tail), in the GEMV programs and in the stats launch."""
    monkeypatch.setattr(mod, "_NORM_TILE", 128)
    cfg = launch_config(M, 77, 200, gate=False, weight_dtype=torch.int8, dot_fp32=True, norm=True)
    assert cfg.norm_block_k < 200 and 200 % cfg.norm_block_k
    _check(_problem_linear(M, M, 200, 77, variant="bias", norm=norm))


@pytest.mark.parametrize("M", [1, 16])
def test_var_norm_of_rows_with_a_large_mean(M):
    """mean >> std: a one-pass sum(x^2) - sum(x)^2 / K would cancel to noise; two passes do not."""
    args = _problem_linear(M, M, 200, 40, weight="fp32", norm="var")
    args["x"] = args["x"] + 1000
    args["norm_alpha"] = args["norm_alpha"] * 1e-3  # normed rows of order 1
    _check(args)


@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_long_k_many_splits(M, weight, split):
    """K over several split-K ranges and not a multiple of any block; the norm's statistics still
    cover the whole row in every split."""
    _check(_problem_linear(M, M, 1000, 45, weight=weight, variant="gate_bias_residual", norm="rms"))


@pytest.mark.parametrize("M", [1, 3, 65])
@pytest.mark.parametrize("variant", ["bias_residual", "gate_bias_residual"])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_residual_in_place(M, variant, weight, split):
    args = _problem_linear(7 + M, M, 200, 77, weight=weight, variant=variant, norm="rms")
    expected = linear_reference(**args)
    r = args["residual"]
    y = linear(**args, out=r)
    assert y is r
    torch.testing.assert_close(r, expected, **FP32_TOL_linear)


@pytest.mark.parametrize("M", [1, 2, 20])
@pytest.mark.parametrize("weight", WEIGHTS)
def test_strided_views(M, weight, split):
    """Non-contiguous x, residual and out are handled through their strides."""
    K, N = 96, 40
    args = _problem_linear(3 + M, M, 2 * K, N, weight=weight, norm="var")
    args["x"] = args["x"][:, ::2]                                  # stride_xk = 2
    args["weight"] = args["weight"][:, :K]                         # row stride 2K, unit stride along K
    args["norm_alpha"] = args["norm_alpha"][..., :K]
    g = torch.Generator().manual_seed(5)
    args["residual"] = torch.randn(N, M, generator=g).t()          # stride_rm = 1
    out = torch.full((M, 2 * N), float("nan"))[:, ::2]
    y = linear(**args, out=out)
    assert y is out
    torch.testing.assert_close(y, linear_reference(**args), **FP32_TOL_linear)


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("gate", [False, True])
def test_weight_row_slice_of_a_bigger_tensor(M, weight, gate, split):
    """A weight that is rows [a, a + N_w) and columns [c, c + K) of a stacked tensor (the depformer's
    per-step slices), with the matching slice of the scales and bias."""
    K, N = 72, 24
    n_w = 2 * N if gate else N
    g = torch.Generator().manual_seed(M + gate)
    big, big_scale = _weight(weight, 3 * n_w, K + 5, g)
    args = _problem_linear(M, M, K, N, weight=weight, variant="gate_bias" if gate else "bias", norm="rms")
    args["weight"] = big[n_w:2 * n_w, 5:]
    if big_scale is not None:
        args["scale"] = big_scale[n_w:2 * n_w]
    args["bias"] = torch.randn(3 * n_w, generator=g)[n_w:2 * n_w]
    assert args["weight"].data_ptr() != big.data_ptr() and args["weight"].stride() == (K + 5, 1)
    _check(args)


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("weight", ["int8", "bf16"])
def test_bf16_activations_gemv(M, weight, split):
    """GEMV path in bf16. Not the tl.dot path (the interpreter's bf16 tl.dot is wrong) nor the norm (the
    interpreter truncates the normed activations to bf16, a one-signed error of up to 2^-7 each):
    16-bit activations with a norm are checked in fp16 below, bf16 on a GPU."""
    _check(_problem_linear(11 + M, M, 200, 77, weight=weight, variant="gate_bias_residual", dtype=torch.bfloat16), BF16_TOL)


@pytest.mark.parametrize("M", [1, 2, 16, 65])
@pytest.mark.parametrize("weight", ["int8", "fp16"])
@pytest.mark.parametrize("norm", ["rms", "var"])
def test_fp16_activations_with_norm(M, weight, norm, split):
    """16-bit activations, GEMV and tl.dot paths: the normed activations are rounded to fp16 before
    the product, as in the reference."""
    _check(_problem_linear(13 + M, M, 200, 77, weight=weight, variant="gate_bias_residual", norm=norm, dtype=torch.float16),
           FP16_TOL)


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("weight", ["bf16", "fp16"])
def test_16bit_weights_with_fp32_activations(M, weight, split):
    """Mixed dtypes: 16-bit weights widened to fp32 (GEMV) or an fp32 tl.dot."""
    _check(_problem_linear(M, M, 200, 77, weight=weight, variant="gate_bias_residual", norm="var"))


# --- the reference ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_norms_are_the_models(dtype):
    """linear_reference's prologue is moshivis.reference's rms_norm / var_norm (fp32, cast to x.dtype)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5, 64, generator=g) + 0.5).to(dtype)
    w = torch.randn(24, 64, generator=g).to(dtype)
    alpha = (torch.rand(1, 1, 64, generator=g) + 0.5).to(dtype)
    for norm, model_norm in (("rms", R.rms_norm(x, alpha, 1e-8)), ("var", R.var_norm(x, alpha, 1e-8))):
        expected = F.linear(model_norm.float(), w.float()).to(dtype)
        got = linear_reference(x, w, norm=norm, norm_alpha=alpha, norm_eps=1e-8)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_reference_dequantizes_like_bitsandbytes():
    """F.linear on CB * SCB / 127 equals F.linear(x, CB) * SCB / 127 (the kernel's order) in fp32."""
    args = _problem_linear(0, 4, 64, 24, variant="bias")
    x, cb, scb, b = args["x"], args["weight"], args["scale"], args["bias"]
    torch.testing.assert_close(linear_reference(x, cb, scb, b), F.linear(x, cb.float()) * (scb / 127) + b, **FP32_TOL_linear)


# --- launches and empty shapes ----------------------------------------------------------------------

@pytest.mark.parametrize("M, norm, kernels", [
    (1, None, {"linear.gemv": 1}),
    (1, "rms", {"linear.gemv": 1}),
    (16, None, {"linear.mm": 1}),
    (16, "var", {"linear.norm_stats": 1, "linear.mm": 1}),
])
def test_linear_launch_counts(M, norm, kernels, split):
    """Split-K or not, one launch (plus the statistics launch on the tl.dot path with a norm): the last
    program of each output tile reduces it."""
    args = _problem_linear(0, M, 200, 77, norm=norm)
    with count_launches() as launches:
        linear(**args)
    assert launches == kernels


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("variant", ["gate_bias_residual", "residual"])
def test_split_k_workspace_and_counter_reset(M, variant, split):
    """Two calls with one workspace give the same bits as a call without (its partials NaN-filled in
    between, so stale partials would show), and leave every arrival counter at zero; so do the shared
    per-device counters."""
    from moshivis_kernels._arrival import shared_counters
    args = _problem_linear(40 + M, M, 1000, 45, variant=variant, norm="rms")
    ws = mod.linear_workspace(args["x"], args["weight"], epilogue=args["epilogue"])
    assert (ws is not None) == split
    N = 45
    plain = linear(**args, out=_nan_out(M, N))
    results = []
    for _ in range(2):
        if ws is not None:
            ws.partials.fill_(float("nan"))
        results.append(linear(**args, out=_nan_out(M, N), workspace=ws))
        if ws is not None:
            assert ws.counters.numel() > 0 and not ws.counters.any()
    assert torch.equal(results[0], plain) and torch.equal(results[1], plain)
    assert not shared_counters("cpu", SPLIT_SMS[True]).any()  # a split call uses fewer than num_sms tiles
    torch.testing.assert_close(plain, linear_reference(**args), **FP32_TOL_linear)


def test_one_workspace_serves_several_shapes(split):
    """A workspace made for the largest call serves smaller ones: the counters sit at fixed places."""
    big = _problem_linear(1, 2, 1000, 45, variant="gate_bias_residual")
    ws = mod.linear_workspace(big["x"], big["weight"], epilogue=big["epilogue"])
    for args in (big, _problem_linear(2, 1, 700, 30, weight="fp32"), big, _problem_linear(3, 2, 300, 20)):
        M, N = args["x"].shape[0], args["weight"].shape[0] // (2 if args["epilogue"] == "silu_gate" else 1)
        got = linear(**args, out=_nan_out(M, N), workspace=ws)
        torch.testing.assert_close(got, linear_reference(**args), **FP32_TOL_linear)
    assert ws is None or not ws.counters.any()


def test_workspace_covering_a_frames_calls(split):
    """LinearWorkspace.covering: one workspace for several calls (split-K partials and counters, norm
    statistics on the tl.dot path), NaN-filled before each call, gives the bits of calls without one and
    leaves its counters at zero."""
    calls = [_problem_linear(7, 16, 300, 45, norm="rms"), _problem_linear(8, 1, 1000, 45, variant="gate_bias_residual"),
             _problem_linear(9, 5, 200, 33, norm="var", variant="residual")]
    need = [mod.linear_workspace(a["x"], a["weight"], epilogue=a["epilogue"], norm=a.get("norm")) for a in calls]
    assert need[0] is not None and need[0].rstd.numel() == 16  # M = 16 takes the tl.dot path
    ws = mod.LinearWorkspace.covering(need, "cpu")
    assert ws.rstd.numel() == 16 and (ws.counters.numel() > 0) == split
    for a in calls:
        ws.partials.fill_(float("nan"))
        ws.rstd.fill_(float("nan"))
        M, N = a["x"].shape[0], a["weight"].shape[0] // (2 if a["epilogue"] == "silu_gate" else 1)
        got = linear(**a, out=_nan_out(M, N), workspace=ws)
        assert torch.equal(got, linear(**a, out=_nan_out(M, N)))
        assert not ws.counters.any()
    assert mod.LinearWorkspace.covering([None, None], "cpu") is None
    with pytest.raises(ValueError, match="workspace.rstd"):
        linear(**calls[0], workspace=mod.LinearWorkspace(ws.partials, ws.counters, ws.rstd[:3]))


@pytest.mark.parametrize("weight", WEIGHTS)
def test_empty_shapes(weight):
    args = _problem_linear(0, 0, 32, 8, weight=weight, norm="rms")
    assert linear(**args).shape == (0, 8)
    b = torch.randn(8, generator=torch.Generator().manual_seed(0))
    w, scale = (torch.zeros(8, 0, dtype=torch.int8), torch.ones(8)) if weight == "int8" else (torch.zeros(8, 0), None)
    y = linear(torch.zeros(2, 0), w, scale, b, out=_nan_out(2, 8))
    torch.testing.assert_close(y, b.expand(2, 8))  # K = 0: only the bias


# --- quantize_rowwise -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rowwise_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 203, generator=g) * torch.rand(37, 1, generator=g) * 5).to(dtype)
    w[3] = 0  # an all-zero row
    cb, scb = quantize_rowwise(w)
    assert cb.dtype == torch.int8 and scb.dtype == torch.float32 and cb.shape == w.shape and scb.shape == (37,)
    torch.testing.assert_close(scb, w.float().abs().amax(dim=1), rtol=0, atol=0)
    assert cb.abs().max() == 127 and (cb[3] == 0).all()
    err = (w.float() - cb.float() * scb[:, None] / 127).abs()
    # half a quantization step, plus the fp32 rounding of the dequantization (ties are exactly at it)
    assert (err <= scb[:, None] * (1 / 254 + 2 ** -22)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rowwise_equals_bitsandbytes(dtype):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(64, 300, generator=g) * 3).to(dtype)
    cb_ref, scb_ref, outliers = bnb_functional.int8_vectorwise_quant(w.clone())
    assert outliers is None
    cb, scb = quantize_rowwise(w)
    assert torch.equal(cb, cb_ref)
    assert torch.equal(scb, scb_ref)


# --- validation -------------------------------------------------------------------------------------

def _inputs():
    return _problem_linear(0, 3, 32, 8, variant="bias_residual", norm="rms")


@pytest.mark.parametrize("change, match", [
    (dict(weight=torch.zeros(8, 32, dtype=torch.int32)), "weight must have dtype"),
    (dict(weight=torch.zeros(8, 31, dtype=torch.int8)), r"weight must have shape \[N, 32\]"),
    (dict(weight=torch.zeros(32, 8, dtype=torch.int8).t()), "weight must be contiguous along K"),
    (dict(weight=torch.zeros(8)), "weight must have 2 dimensions"),
    (dict(scale=None), "int8 weight needs scale"),
    (dict(weight=torch.zeros(8, 32)), "scale is only for int8 weight"),
    (dict(scale=torch.ones(9)), "scale must be a contiguous"),
    (dict(scale=torch.ones(16)[::2]), "scale must be a contiguous"),
    (dict(scale=torch.ones(8, dtype=torch.bfloat16)), "scale must have dtype"),
    (dict(scale=torch.ones(8, 1)), "scale must have 1 dimensions"),
    (dict(x=torch.zeros(3, 32, dtype=torch.int32)), "x must have dtype"),
    (dict(x=torch.zeros(32)), "x must have 2 dimensions"),
    (dict(bias=torch.ones(7)), "bias must be a contiguous"),
    (dict(norm="layer"), "norm must be one of"),
    (dict(norm_alpha=None), "norm='rms' needs norm_alpha"),
    (dict(norm=None), "norm_alpha given without a norm"),
    (dict(norm_alpha=torch.ones(33)), r"norm_alpha must have shape \[32\]"),
    (dict(norm_alpha=torch.ones(2, 32)), r"norm_alpha must have shape \[32\]"),
    (dict(norm_alpha=torch.ones(64)[::2]), "norm_alpha must have shape .* unit stride"),
    (dict(norm_alpha=torch.ones(32, dtype=torch.int32)), "norm_alpha must have dtype"),
    (dict(norm_alpha=[1.0] * 32), "norm_alpha must be a torch.Tensor"),
    (dict(x=torch.zeros(3, 1), weight=torch.zeros(8, 1, dtype=torch.int8), norm="var", norm_alpha=torch.ones(1)),
     "norm='var' needs x with K >= 2"),
    (dict(residual=torch.zeros(3, 9)), r"residual must have shape \[3, 8\]"),
    (dict(out=torch.zeros(3, 8, dtype=torch.bfloat16)), "out must have dtype"),
    (dict(out=torch.zeros(4, 8)), r"out must have shape \[3, 8\]"),
    (dict(epilogue="gelu"), "epilogue must be one of"),
    (dict(weight=torch.zeros(7, 32, dtype=torch.int8), scale=torch.ones(7), bias=None, residual=None,
          epilogue="silu_gate"), "even number of weight rows"),
])
def test_linear_bad_inputs_name_the_argument(change, match):
    kwargs = {**_inputs(), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        linear(**kwargs)


def test_linear_bad_workspace(monkeypatch):
    monkeypatch.setattr(mod, "_num_sms", lambda index: SPLIT_SMS[True])
    args = _problem_linear(0, 1, 1000, 45)
    ws = mod.linear_workspace(args["x"], args["weight"])
    with pytest.raises(TypeError, match="workspace must be a LinearWorkspace"):
        linear(**args, workspace=torch.zeros(10**5))
    with pytest.raises(ValueError, match="workspace.partials must be contiguous with at least"):
        linear(**args, workspace=mod.LinearWorkspace(ws.partials[:-1], ws.counters))
    with pytest.raises(ValueError, match="workspace.counters must have dtype"):
        linear(**args, workspace=mod.LinearWorkspace(ws.partials, ws.counters.float()))
    with pytest.raises(ValueError, match="workspace.counters must be contiguous with at least"):
        linear(**args, workspace=mod.LinearWorkspace(ws.partials, ws.counters[:0]))


def test_out_must_not_overlap_inputs():
    kw = _inputs()
    big = torch.zeros(3, 40)
    with pytest.raises(ValueError, match="out must not overlap x"):
        linear(big[:, :32], kw["weight"], kw["scale"], out=big[:, 32:])
    alpha = torch.zeros(64)
    with pytest.raises(ValueError, match="out must not overlap norm_alpha"):
        linear(kw["x"], kw["weight"], kw["scale"], norm="rms", norm_alpha=alpha[:32], out=alpha[8:32].view(3, 8))
    res = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="out may alias residual only exactly"):
        linear(kw["x"], kw["weight"], kw["scale"], residual=res[:3], out=res[1:])


# --- static audit and GPU checks --------------------------------------------------------------------

def test_audit_cases_are_well_formed():
    cases = mod.audit_cases()
    assert len({c["name"] for c in cases}) == len(cases)
    for c in cases:
        assert set(c["signature"]) == set(c["fn"].arg_names), c["name"]
        assert all(c["signature"][k] == "constexpr" for k in c["constexprs"]), c["name"]
        assert all(c["signature"][k] == "i32" for k in c["int_values"]), c["name"]
        assert c["num_warps"] in (4, 8) and c["num_stages"] >= 1
    names = " ".join(c["name"] for c in cases)
    for wname in ("bf16", "int8"):
        for kernel in ("gemv", "mm"):
            M = 1 if kernel == "gemv" else 64
            assert f"{kernel}.{wname}.ffn_linear_in.M{M}.4096x22528.rms" in names
            assert f"{kernel}.{wname}.dep_in_proj.M{M}.1024x3072.var" in names
            assert f"{kernel}.{wname}.attn_out_proj.M{M}" in names
    assert "linear.norm_stats.attn_in_proj.M64" in names


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, re, sys
    from bench.audit import compile_case
    import importlib
    mod = importlib.import_module(f"moshivis_kernels.{sys.argv[2]}")
    wanted = sys.argv[1].split(",")
    report = {}
    for case in mod.audit_cases():
        if not any(w in case["name"] for w in wanted):
            continue
        r = compile_case(case, 90)
        report[case["name"]] = {"spills": r["spills"], "max_load_bits": r["max_load_bits"],
                                "loads_128": r["global_loads"].get(128, 0), "loads_8": r["global_loads"].get(8, 0)}
    print(json.dumps(report))
""")


def compile_for_sm90(module: str, wanted: list[str]) -> dict:
    """bench.audit's compile (sm_90a, no GPU needed) of `module`'s audit cases whose names contain one of
    `wanted`, in a subprocess without the interpreter: name -> spills, widest load, 128-bit and 8-bit loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, ",".join(wanted), module], capture_output=True,
                          text=True, env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_gemv_compiles_for_sm90_with_128bit_loads_and_no_spills():
    """bench.audit's compile (sm_90a, no GPU needed) of GEMV cases: 16-byte weight loads (4 per step
    for int8, 8 for bf16, plus x), no spills; a normed tl.dot case and the stats kernel: no spills."""
    wanted = ["gemv.int8.attn_out_proj.M1", "gemv.bf16.attn_out_proj.M1", "gemv.bf16.attn_in_proj.M1",
              "gemv.int8.ffn_linear_in.M1", "mm.bf16.attn_in_proj.M64", "norm_stats.attn_in_proj"]
    report = compile_for_sm90("linear", wanted)
    assert len(report) == len(wanted), report
    for name, r in report.items():
        assert r["spills"] == 0 and r["max_load_bits"] == 128, (name, r)
        if ".gemv." in name:
            assert r["loads_128"] >= (8 if ".bf16." in name else 4) + 1, (name, r)


@pytest.mark.gpu(reason="needs a CUDA GPU (bf16 tl.dot is unreliable in the interpreter)")
@pytest.mark.parametrize("weight", ["int8", "bf16"])
@pytest.mark.parametrize("M", [1, 2, 5, 64, 256])
@pytest.mark.parametrize("K, n_w, norm, epilogue, residual", [
    (4096, 12288, "rms", "none", False), (4096, 4096, None, "none", True), (4096, 22528, "rms", "silu_gate", False),
    (11264, 4096, None, "none", True), (1024, 5632, "var", "silu_gate", False), (4096, 32000, "rms", "none", False),
])
def test_bf16_real_shapes_gpu(weight, M, K, n_w, norm, epilogue, residual):
    g = torch.Generator(device="cuda").manual_seed(M + K)
    N = n_w // 2 if epilogue == "silu_gate" else n_w
    x = (torch.randn(M, K, device="cuda", generator=g) + 0.5).bfloat16()
    w = torch.randn(n_w, K, device="cuda", generator=g) / K ** 0.5
    w, scale = quantize_rowwise(w) if weight == "int8" else (w.bfloat16(), None)
    alpha = (torch.rand(1, 1, K, device="cuda", generator=g) + 0.5).bfloat16() if norm else None
    r = torch.randn(M, N, device="cuda", generator=g).bfloat16() if residual else None
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    args = dict(norm=norm, norm_alpha=alpha, residual=r, epilogue=epilogue)
    y = linear(x, w, scale, **args, out=out)
    ref = linear_reference(x, w, scale, **args)
    torch.testing.assert_close(y.float(), ref.float(), **BF16_TOL)


@pytest.mark.gpu(reason="needs a CUDA GPU (only there does the last program vary)")
@pytest.mark.parametrize("M", [1, 16])
def test_split_k_repeatable_and_graph_replays_gpu(M):
    """ffn linear_out at real size (split-K): which program reduces a tile varies between runs on a GPU,
    the bits do not; a CUDA graph of the call replays to the same bits (counters back at zero each time)."""
    g = torch.Generator(device="cuda").manual_seed(M)
    K, N = 11264, 4096
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w, scale = quantize_rowwise(torch.randn(N, K, device="cuda", generator=g) / K ** 0.5)
    r = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    ws = mod.linear_workspace(x, w)
    if ws is None:
        pytest.skip("this GPU does not split K at this shape")
    first = linear(x, w, scale, residual=r, workspace=ws)
    torch.testing.assert_close(first.float(), linear_reference(x, w, scale, residual=r).float(), **BF16_TOL)
    for _ in range(20):
        assert torch.equal(linear(x, w, scale, residual=r, workspace=ws), first)
        assert torch.equal(linear(x, w, scale, residual=r), first)  # shared counters, partials per call
    out = torch.empty_like(first)
    assert_graph_replays(lambda: linear(x, w, scale, residual=r, out=out, workspace=ws), out, first, ws.counters)

# ==================================================================================================
# Gated cross-attention over the image KV pool
#
# Gated cross-attention kernels (moshivis_kernels.cross_attention) against plain PyTorch.
#
# Interpreter on CPU, fp32: the kernels and the fp32 references differ only in the order of fp32 sums
# (blocked dot products, split online softmax), so rtol = atol = 1e-5 on outputs of order 1 (measured:
# <= 2.4e-7 for the block, 4.8e-7 for the attention, 1.4e-6 for the gated output with INT8 weights). Rows
# without an image must equal x bit for bit. The bf16 check at the real sizes runs only on a GPU (the
# interpreter's bf16 arithmetic is unreliable).
# ==================================================================================================
TOL = dict(rtol=1e-5, atol=1e-5)
# The interpreter turns a loop bound given as a kernel argument into a scalar this way (its own quirk).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


def cdiv(a, b):
    return -(-a // b)


@pytest.fixture(params=[132, 1], ids=["h100", "1sm"])
def sms(request, monkeypatch):
    """Launch configs for an H100, and for 1 SM: wide column tiles (with tails) and few attention
    splits, each of several key blocks (the online-softmax rescaling)."""
    monkeypatch.setattr(xa, "_num_sms", lambda device: request.param)
    return request.param


def _problem_xattn(gen, B, *, H=2, D=16, N=37, S=3, G=8, slots=None, dtype=torch.float32, device="cpu"):
    """Inputs of gated_cross_attention with unit-scale activations; slots mix shared images and -1."""
    dim = H * D
    in_proj = torch.randn(3 * dim, dim, generator=gen) / math.sqrt(dim)
    if slots is None:
        slots = torch.randint(-1, S, (B,), generator=gen)
        slots[: min(B, 3)] = torch.tensor([0, -1, 0])[: min(B, 3)]  # a shared slot and a no-image row
    p = dict(
        x=torch.randn(B, dim, generator=gen),
        norm_alpha=1 + 0.1 * torch.randn(1, 1, dim, generator=gen),
        wq=in_proj[:dim],
        image_kv=torch.randn(S, N, 2, H, D, generator=gen),
        slots=torch.as_tensor(slots, dtype=torch.int32),
        wo=torch.randn(dim, dim, generator=gen) / math.sqrt(dim),
        gate_w0=torch.randn(G, dim, generator=gen) / math.sqrt(dim),
        gate_w2=torch.randn(dim, G, generator=gen) / math.sqrt(G) + 0.5,  # gates away from 0
    )
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in p.items()}


def _nan(*shape, dtype=torch.float32, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


_XA_WEIGHTS = ("wq", "wo", "gate_w0", "gate_w2")


def _int8(p, names=_XA_WEIGHTS):
    """p with the named weights row-wise INT8 (bitsandbytes' CB) and their `<name>_scale` (SCB)."""
    p = dict(p)
    for name in names:
        p[name], p[f"{name}_scale"] = quantize_rowwise(p[name])
    return p


def _weights(p, weights):
    return _int8(p) if weights == "int8" else p


def _check_block(p, out, gate_mean):
    ref_out, ref_mean = xa.gated_cross_attention_reference(**p)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(gate_mean, ref_mean, **TOL)
    none = p["slots"] < 0
    assert torch.equal(out[none].view(torch.int32), p["x"][none].view(torch.int32)), "no-image rows must be x"
    assert torch.all(gate_mean[none] == 0)


# ---- the whole block ------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["dense", "int8"])
@pytest.mark.parametrize("N", [12, 37, 100, 1024])
def test_block_matches_reference(gen, N, sms, weights):
    B = int(torch.randint(1, 10, (1,), generator=gen))
    p = _weights(_problem_xattn(gen, B, N=N, H=3), weights)  # dim 48: column tails with 1 SM
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=_nan(B, p["x"].shape[1]), gate_mean=gate_mean)
    _check_block(p, out, gate_mean)


@pytest.mark.parametrize("slots", [[2], [-1], [-1, -1, -1], [1, 1, 1, 1, 1]],
                         ids=["b1", "b1_none", "none", "one_image"])
def test_block_edge_batches(gen, slots):
    B = len(slots)
    p = _problem_xattn(gen, B, N=70, slots=slots)
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=_nan(B, p["x"].shape[1]), gate_mean=gate_mean)
    _check_block(p, out, gate_mean)


@pytest.mark.parametrize("weights", ["dense", "int8"])
@pytest.mark.parametrize("B", [1, 6, 40])
def test_block_in_place(gen, B, weights):
    p = _weights(_problem_xattn(gen, B, N=37), weights)
    p["x"][p["slots"] < 0, 0] = -0.0  # the sign of zero survives a no-image row
    x0 = p["x"].clone()
    ref_out, ref_mean = xa.gated_cross_attention_reference(**p)
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=p["x"], gate_mean=gate_mean)
    assert out is p["x"]
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(gate_mean, ref_mean, **TOL)
    none = p["slots"] < 0
    assert torch.equal(out[none].view(torch.int32), x0[none].view(torch.int32))


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_block_large_batch_shared_images(gen, weights):
    """tl.dot tiles (B > 8) over two row tiles, and a slot shared by more rows than one attention chunk."""
    B = 70
    slots = torch.randint(-1, 4, (B,), generator=gen)
    slots[torch.randperm(B, generator=gen)[:20]] = 2  # >= 16 rows on slot 2: two chunks, rows scattered
    p = _weights(_problem_xattn(gen, B, N=50, S=4, slots=slots), weights)
    cfg = xa._linear_config(B, p["x"].shape[1], p["x"].shape[1])
    assert cfg["USE_DOT"] and cdiv(B, cfg["BLOCK_B"]) == 2
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=_nan(B, p["x"].shape[1]), gate_mean=gate_mean)
    _check_block(p, out, gate_mean)


def test_block_matches_model_reference(gen):
    """Layer 1 of the tiny model through moshivis.reference.cross_attention (its own image K/V path)."""
    cfg = tiny()
    w = checkpoint.random_init(cfg, seed=3)
    features = torch.randn(2, cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen)
    pool = reference.image_kv(w, cfg, features)  # [2, N, 2, H, D]
    slots = torch.tensor([1, -1, 0, 1], dtype=torch.int64)
    x = torch.randn(4, cfg.dim, generator=gen)
    rows = pool[slots.clamp(min=0)]
    expected = reference.cross_attention(w, cfg, 1, x, rows, slots >= 0)
    p = "llm.transformer.layers.1"
    out = xa.gated_cross_attention(
        x, w[f"{p}.norm_cross.alpha"], w[f"{XA}.in_proj_weight"][: cfg.dim], pool, slots,
        w[f"{XA}.out_proj.weight"], w[f"{p}.cross_attention.gate.alpha.0.weight"],
        w[f"{p}.cross_attention.gate.alpha.2.weight"], out=_nan(4, cfg.dim))
    torch.testing.assert_close(out, expected, **TOL)


def test_block_launches_and_workspace(gen):
    """Five launches; a workspace sized for more rows serves a smaller batch and gives the same result."""
    p = _problem_xattn(gen, 5, N=37)
    dim, G = p["x"].shape[1], p["gate_w0"].shape[0]
    ws = xa.cross_attention_workspace(12, dim, 2, 37, G, torch.float32, "cpu")
    assert ws.counters.shape == (12, 2) and not ws.counters.any()
    for name, t in vars(ws).items():
        if name != "counters":
            t.fill_(float("nan"))
    gate_mean = _nan(5)
    with count_launches() as launches:
        out = xa.gated_cross_attention(**p, out=_nan(5, dim), gate_mean=gate_mean, workspace=ws)
    assert launches == {"xattn_rows_linear": 3, "xattn_attention": 1, "xattn_gate_residual": 1}
    _check_block(p, out, gate_mean)
    assert not ws.counters.any()


@pytest.mark.parametrize("with_workspace", [False, True])
def test_counters_reset(gen, with_workspace, sms):
    """The attention's last split resets its arrival counter: two calls with one workspace (or the shared
    per-device counters) give the same bits, and every counter is zero afterwards."""
    from moshivis_kernels._arrival import shared_counters
    B = 20  # two chunks of rows on slot 0 (16 per chunk), rows without an image
    slots = torch.zeros(B, dtype=torch.int32)
    slots[[3, 11]] = -1
    slots[5] = 2
    p = _problem_xattn(gen, B, N=100, slots=slots)
    dim, G = p["x"].shape[1], p["gate_w0"].shape[0]
    ws = xa.cross_attention_workspace(B, dim, 2, 100, G, torch.float32, "cpu") if with_workspace else None
    first, second = (xa.gated_cross_attention(**p, out=_nan(B, dim), workspace=ws) for _ in range(2))
    assert torch.equal(first, second)
    counters = ws.counters if with_workspace else shared_counters("cpu", B * 2)
    assert not counters.any()
    torch.testing.assert_close(first, xa.gated_cross_attention_reference(**p)[0], **TOL)


def test_wq_row_stride_view(gen):
    """wq as a strided view (every other row of a bigger matrix) and a pool slice as image_kv."""
    p = _problem_xattn(gen, 4, N=37)
    dim = p["x"].shape[1]
    big = torch.randn(2 * dim, dim, generator=gen) / math.sqrt(dim)
    p["wq"] = big[::2]
    p["image_kv"] = torch.randn(4, 37, 2, 2, 16, generator=gen)[1:]
    out = xa.gated_cross_attention(**p, out=_nan(4, dim))
    torch.testing.assert_close(out, xa.gated_cross_attention_reference(**p)[0], **TOL)


@pytest.mark.parametrize("B", [3, 20])
def test_int8_wq_row_slice_of_in_proj(gen, B):
    """wq = rows [0, dim) of an INT8 in_proj (CB) with the matching slice of its SCB, the other weights
    INT8 too; the reference dequantizes first, and matches the block on the dequantized dense weights."""
    p = _problem_xattn(gen, B, N=37)
    dim = p["x"].shape[1]
    cb, scb = quantize_rowwise(torch.randn(3 * dim, dim, generator=gen) / math.sqrt(dim))
    p = {**_int8(p, ("wo", "gate_w0", "gate_w2")), "wq": cb[:dim], "wq_scale": scb[:dim]}
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=_nan(B, dim), gate_mean=gate_mean)
    _check_block(p, out, gate_mean)
    dense = {k: v for k, v in p.items() if not k.endswith("_scale")}
    for name in _XA_WEIGHTS:
        dense[name] = p[name].float() * (p[f"{name}_scale"] / 127)[:, None]
    torch.testing.assert_close(out, xa.gated_cross_attention_reference(**dense)[0], **TOL)


# ---- the pieces -----------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("with_slots", [False, True])
def test_norm_q_projection(gen, B, with_slots, sms):
    H, D = 3, 16  # dim 48: not a multiple of the column tiles
    p = _problem_xattn(gen, B, H=H, D=D)
    slots = p["slots"] if with_slots else None
    q = xa.norm_q_projection(p["x"], p["norm_alpha"], p["wq"], slots=slots, out=_nan(B, H * D))
    torch.testing.assert_close(q, xa.norm_q_projection_reference(p["x"], p["norm_alpha"], p["wq"], slots=slots), **TOL)


@pytest.mark.parametrize("B", [1, 8, 33])  # GEMV tiles and tl.dot tiles
def test_norm_q_projection_int8(gen, B, sms):
    p = _int8(_problem_xattn(gen, B, H=3, D=16), ("wq",))
    args = (p["x"], p["norm_alpha"], p["wq"])
    q = xa.norm_q_projection(*args, slots=p["slots"], wq_scale=p["wq_scale"], out=_nan(B, 48))
    expected = xa.norm_q_projection_reference(*args, slots=p["slots"], wq_scale=p["wq_scale"])
    torch.testing.assert_close(q, expected, **TOL)


@pytest.mark.parametrize("N", [5, 37, 1024])
def test_image_attention(gen, N, sms):
    B = int(torch.randint(1, 10, (1,), generator=gen))
    p = _problem_xattn(gen, B, N=N, H=2, D=32)
    q = torch.randn(B, 2, 32, generator=gen)
    with count_launches() as launches:
        attn = xa.image_attention(q, p["image_kv"], p["slots"], out=_nan(B, 2, 32))
    assert launches == {"xattn_attention": 1}
    torch.testing.assert_close(attn, xa.image_attention_reference(q, p["image_kv"], p["slots"]), **TOL)
    assert torch.all(attn[p["slots"] < 0] == 0)


@pytest.mark.parametrize("weights", ["dense", "int8"])
@pytest.mark.parametrize("B", [1, 7, 20])
def test_gated_output(gen, B, sms, weights):
    p = _weights(_problem_xattn(gen, B, H=3, D=16, G=24), weights)
    attn = torch.randn(B, 48, generator=gen)
    gate_mean = _nan(B)
    scales = {k: v for k, v in p.items() if k.endswith("_scale") and k != "wq_scale"}
    out = xa.gated_output(p["x"], attn, p["slots"], p["wo"], p["gate_w0"], p["gate_w2"],
                          out=_nan(B, 48), gate_mean=gate_mean, **scales)
    ref_out, ref_mean = xa.gated_output_reference(p["x"], attn, p["slots"], p["wo"], p["gate_w0"], p["gate_w2"],
                                                  **scales)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(gate_mean, ref_mean, **TOL)


def test_reference_equals_definition(gen):
    """The kernel-side reference is the block's math written out once more, in fp32."""
    p = _problem_xattn(gen, 5, N=37)
    x, S = p["x"], p["slots"]
    y = x * p["norm_alpha"].reshape(-1) / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)
    q = (y @ p["wq"].T).view(5, 2, 16)
    kv = p["image_kv"][S.clamp(min=0).long()]
    att = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, kv[:, :, 0]) / 4, -1)
    a = torch.einsum("bhn,bnhd->bhd", att, kv[:, :, 1]).reshape(5, 32) @ p["wo"].T
    g = torch.sigmoid(torch.relu(a @ p["gate_w0"].T) @ p["gate_w2"].T - 4)
    expected = torch.where((S >= 0)[:, None], x + a * g, x)
    torch.testing.assert_close(xa.gated_cross_attention_reference(**p)[0], expected, **TOL)


# ---- images with fewer tokens than the pool holds (another resolution) ---------------------------
def _slot_attention_by_truncation(q, image_kv, slots, counts):
    """Independent of any mask: each row attends to its slot's first counts[slot] K/V rows, cut off, fp64."""
    D = q.shape[-1]
    rows = []
    for b, s in enumerate(slots.tolist()):
        if s < 0:
            rows.append(torch.zeros(q.shape[1:], dtype=torch.float64))
            continue
        k, v = image_kv[s, : counts[s], 0].double(), image_kv[s, : counts[s], 1].double()
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) / math.sqrt(D), -1)
        rows.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(rows).float()


def _with_loud_tails(image_kv, counts):
    """Tokens past each slot's count made large (a kernel reading them would be far off)."""
    kv = image_kv.clone()
    for s, n in enumerate(counts):
        kv[s, n:, 0] *= 30
        kv[s, n:, 1] = 1e4
    return kv


# Token counts that are not multiples of the key block (16..64), a single token, the full pool, a split
# (H100: 4+ splits) holding none of an image's keys, and several counts in one batch.
_COUNTS = [(37, [5, 37, 1]), (100, [17, 64, 65, 99]), (1024, [121, 1024, 1, 256, 900])]


@pytest.mark.parametrize("N, counts", _COUNTS)
def test_image_attention_reads_only_each_slots_tokens(gen, N, counts, sms):
    """Measured max error against the truncated fp64 attention: 2.4e-7 (fp32); tolerance 1e-6."""
    S, B, H, D = len(counts), 11, 2, 32
    slots = torch.randint(-1, S, (B,), generator=gen, dtype=torch.int32)
    slots[: S + 1] = torch.tensor(list(range(S)) + [-1], dtype=torch.int32)  # every count, and no image
    slots[-2:] = 0  # slot 0 shared by several rows
    num_tokens = torch.tensor(counts, dtype=torch.int32)
    image_kv = _with_loud_tails(torch.randn(S, N, 2, H, D, generator=gen), counts)
    q = torch.randn(B, H, D, generator=gen)
    attn = xa.image_attention(q, image_kv, slots, num_tokens=num_tokens, out=_nan(B, H, D))
    expected = _slot_attention_by_truncation(q, image_kv, slots, counts)
    torch.testing.assert_close(attn, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(xa.image_attention_reference(q, image_kv, slots, num_tokens), expected,
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_block_with_token_counts_matches_reference(gen, sms, weights):
    """The whole block over a pool of images with 7, 50 and 23 of 50 tokens (int64 counts), mixed in one
    batch with rows without an image; the reference masks, and equals the block on truncated pools.
    Measured max error 2.4e-7 (dense) and 6e-8 (int8) in fp32; the block tolerance TOL (1e-4) applies."""
    counts = [7, 50, 23]
    B = 9
    p = _weights(_problem_xattn(gen, B, N=50, S=3), weights)
    p["image_kv"] = _with_loud_tails(p["image_kv"], counts)
    p["num_tokens"] = torch.tensor(counts)
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=_nan(B, p["x"].shape[1]), gate_mean=gate_mean)
    _check_block(p, out, gate_mean)
    for s, n in enumerate(counts):  # rows on slot s: as if the pool held just its n tokens
        rows = p["slots"] == s
        if rows.any():
            alone = {**p, "x": p["x"][rows], "slots": torch.zeros(int(rows.sum()), dtype=torch.int32),
                     "image_kv": p["image_kv"][s: s + 1, :n], "num_tokens": None}
            torch.testing.assert_close(out[rows], xa.gated_cross_attention_reference(**alone)[0], **TOL)


def test_token_counts_bad_input_names_the_argument(gen):
    p = _problem_xattn(gen, 3, N=37, S=3)
    for bad in (torch.ones(2, dtype=torch.int32), torch.ones(3), torch.ones(3, 1, dtype=torch.int32)):
        with pytest.raises(ValueError, match="num_tokens"):
            xa.gated_cross_attention(**p, num_tokens=bad)
        with pytest.raises(ValueError, match="num_tokens"):
            xa.image_attention(torch.randn(3, 2, 16), p["image_kv"], p["slots"], num_tokens=bad)


# ---- launch configuration and audit ---------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 2, 8, 9, 64, 256])
@pytest.mark.parametrize("N", [12, 37, 1024])
def test_attention_config_splits_cover_keys(B, N):
    cfg = xa._attention_config(B, 32, N)
    n, kps, splits = cfg["BLOCK_N"], cfg["keys_per_split"], cfg["splits"]
    assert kps % n == 0 and (splits - 1) * kps < N <= splits * kps  # no empty split, every key covered
    assert cfg["BLOCK_ALL"] >= B


def test_real_shape_configs_fill_the_gpu():
    assert xa._attention_config(1, 32, 1024)["splits"] * 32 >= 2 * 132
    cfg = xa._linear_config(1, 4096, 4096)
    assert not cfg["USE_DOT"] and cdiv(4096, cfg["BLOCK_N"]) >= 2 * 132


def test_audit_cases_describe_every_kernel():
    kernels = {xa._rows_linear_kernel, xa._attention_kernel, xa._gate_residual_kernel}
    cases = xa.audit_cases()
    assert {c["fn"] for c in cases} == kernels
    for c in cases:
        constexprs = xa._constexpr_params(c["fn"])
        assert set(c["signature"]) == set(c["fn"].arg_names) - constexprs, c["name"]
        assert set(c["constexprs"]) == constexprs, c["name"]
        assert set(c["int_values"]) <= {n for n, t in c["signature"].items() if t == "i32"}, c["name"]


# ---- bad input ------------------------------------------------------------------------------------
def _bad(p, **changes):
    return {**p, **changes}


@pytest.mark.parametrize("change, name", [
    (lambda p: dict(x=p["x"][0]), "x"),
    (lambda p: dict(x=p["x"].long()), "x"),
    (lambda p: dict(norm_alpha=p["norm_alpha"][..., :-1]), "norm_alpha"),
    (lambda p: dict(wq=p["wq"][:, :-1]), "wq"),
    (lambda p: dict(wq=p["wq"].double()), "wq"),
    (lambda p: dict(wq=p["wq"].T), "wq"),  # last dimension not contiguous
    (lambda p: dict(image_kv=p["image_kv"][:, :, :1]), "image_kv"),
    (lambda p: dict(image_kv=p["image_kv"].to(torch.bfloat16)), "image_kv"),
    (lambda p: dict(image_kv=p["image_kv"][..., :8]), "image_kv"),
    (lambda p: dict(slots=p["slots"].float()), "slots"),
    (lambda p: dict(slots=p["slots"][:-1]), "slots"),
    (lambda p: dict(wo=p["wo"][:-1]), "wo"),
    (lambda p: dict(gate_w0=p["gate_w0"].to(torch.bfloat16)), "gate_w0"),
    (lambda p: dict(gate_w2=p["gate_w2"][:, :-1]), "gate_w2"),
    (lambda p: dict(out=p["x"][:, :-1].clone()), "out"),
    (lambda p: dict(gate_mean=torch.zeros(len(p["slots"]), dtype=torch.float64)), "gate_mean"),
    (lambda p: dict(gate_mean=torch.zeros(len(p["slots"]) + 1)), "gate_mean"),
    (lambda p: dict(workspace=xa.cross_attention_workspace(2, 32, 2, 37, 8, torch.float32, "cpu")), "workspace"),
    (lambda p: dict(workspace=xa.cross_attention_workspace(4, 32, 2, 37, 8, torch.bfloat16, "cpu")), "workspace.q"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_the_argument(gen, change, name):
    p = _problem_xattn(gen, 4, N=37)
    with pytest.raises((ValueError, TypeError), match=name.replace(".", r"\.")):
        xa.gated_cross_attention(**_bad(p, **change(p)))


@pytest.mark.parametrize("change, name", [
    (lambda p: dict(wq_scale=None), "wq_scale"),  # int8 weight without its scales
    (lambda p: dict(wo_scale=None), "wo_scale"),
    (lambda p: dict(gate_w0_scale=None), "gate_w0_scale"),
    (lambda p: dict(gate_w2_scale=None), "gate_w2_scale"),
    (lambda p: dict(wq_scale=p["wq_scale"][:-1]), "wq_scale"),
    (lambda p: dict(wo_scale=p["wo_scale"].double()), "wo_scale"),
    (lambda p: dict(gate_w0_scale=p["gate_w0_scale"].to(torch.bfloat16)), "gate_w0_scale"),
    (lambda p: dict(gate_w2_scale=torch.stack([p["gate_w2_scale"]] * 2, 1)[:, 0]), "gate_w2_scale"),  # strided
    (lambda p: dict(gate_w2_scale=p["gate_w2_scale"][None]), "gate_w2_scale"),
    (lambda p: dict(wq=p["wq"].float() * p["wq_scale"][:, None] / 127), "wq_scale"),  # scale for a dense wq
    (lambda p: dict(gate_w0=p["gate_w0"].float(), gate_w0_scale=None, wo=p["wo"].to(torch.int16)), "wo"),
    (lambda p: dict(wo=p["wo"][:, :-1]), "wo"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_int8_input_names_the_argument(gen, change, name):
    p = _int8(_problem_xattn(gen, 4, N=37))
    with pytest.raises((ValueError, TypeError), match=name):
        xa.gated_cross_attention(**_bad(p, **change(p)))


def test_out_overlapping_x_is_rejected(gen):
    p = _problem_xattn(gen, 4, N=37)
    buf = torch.zeros(5, p["x"].shape[1])
    buf[:4] = p["x"]
    with pytest.raises(ValueError, match="out must be x itself"):
        xa.gated_cross_attention(**_bad(p, x=buf[:4], out=buf[1:]))


def test_piece_bad_input(gen):
    p = _problem_xattn(gen, 3, N=37)
    with pytest.raises(ValueError, match="q"):
        xa.image_attention(torch.randn(3, 2, 16, dtype=torch.float64), p["image_kv"], p["slots"])
    with pytest.raises(ValueError, match="head_dim"):
        xa.image_attention(torch.randn(3, 2, 12), torch.randn(1, 5, 2, 2, 12), p["slots"])
    with pytest.raises(ValueError, match="attn"):
        xa.gated_output(p["x"], torch.randn(3, 31), p["slots"], p["wo"], p["gate_w0"], p["gate_w2"])
    with pytest.raises(ValueError, match="norm_alpha"):
        xa.norm_q_projection(p["x"], torch.ones(31), p["wq"])


# ---- GPU only -------------------------------------------------------------------------------------
gpu_xattn = pytest.mark.gpu(reason="needs a CUDA GPU (bf16 and sync checks)")


@gpu_xattn
@pytest.mark.parametrize("B", [1, 8, 64])
def test_real_shapes_bf16_gpu(gen, B):
    """Real sizes in bf16: the kernel's error vs the fp32 reference at most ~2x PyTorch's own bf16 error."""
    p32 = _problem_xattn(gen, B, H=32, D=128, N=1024, S=4, G=512, device="cuda")
    p16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in p32.items()}
    exact = xa.gated_cross_attention_reference(**p32)[0]
    torch_err = (xa.gated_cross_attention_reference(**p16)[0].float() - exact).abs().max()
    out = xa.gated_cross_attention(**p16, gate_mean=torch.empty(B, device="cuda"))
    assert (out.float() - exact).abs().max() <= 2 * torch_err + 1e-2


@gpu_xattn
def test_no_host_sync_gpu(gen):
    p = _problem_xattn(gen, 8, H=4, D=64, N=300, device="cuda")
    ws = xa.cross_attention_workspace(8, 256, 4, 300, 8, torch.float32, "cuda")
    gate_mean = torch.empty(8, device="cuda")
    xa.gated_cross_attention(**p, gate_mean=gate_mean, workspace=ws)  # compile outside the check
    torch.cuda.synchronize()
    want, want_mean = xa.gated_cross_attention_reference(**p)
    gate_mean.fill_(float("nan"))
    torch.cuda.set_sync_debug_mode("error")
    try:
        xa.gated_cross_attention(**p, out=p["x"], gate_mean=gate_mean, workspace=ws)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # fp32 on the GPU, the dots in IEEE fp32 (no TF32): the interpreter's former bound (not measured on a GPU)
    torch.testing.assert_close(p["x"], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gate_mean, want_mean, atol=1e-4, rtol=1e-4)


@gpu_xattn
@pytest.mark.parametrize("B", [1, 8])
def test_repeatable_and_graph_replays_gpu(gen, B):
    """Real sizes: which split merges varies between runs on a GPU, the bits do not; a CUDA graph of the
    block replays to the same bits (the counters are back at zero each time)."""
    p = _problem_xattn(gen, B, H=32, D=128, N=1024, S=4, G=512, dtype=torch.bfloat16, device="cuda")
    ws = xa.cross_attention_workspace(B, 4096, 32, 1024, 512, torch.bfloat16, "cuda")
    first = xa.gated_cross_attention(**p, workspace=ws)
    for _ in range(20):
        assert torch.equal(xa.gated_cross_attention(**p, workspace=ws), first)
    out = torch.empty_like(first)
    assert_graph_replays(lambda: xa.gated_cross_attention(**p, out=out, workspace=ws), out, first, ws.counters)

# ==================================================================================================
# Sampling: greedy, temperature + top-k, Philox race
#
# moshivis_kernels.sampling against plain PyTorch (interpreter on CPU; fp32 logits unless stated).
#
# Sampled tokens are compared EXACTLY with sample_tokens_reference, which rebuilds the kernel's Philox
# uniforms with int64 arithmetic; the reference's Philox is itself checked against published Philox4x32-10
# test vectors and against triton's own tl.randint4x / tl.rand.
# ==================================================================================================
NO_TOKEN = -7  # outputs are pre-filled with this, so an unwritten row fails


def _out(B):
    return torch.full((B,), NO_TOKEN, dtype=torch.int64)


def _row_params(B, V, g):
    """Mixed per-row parameters: temperatures incl. 0 and < 0, top-k incl. 0, 1, V, > V and random."""
    temperature = torch.tensor([0.0, 0.7, 1.3, -1.0, 0.8, 2.5, 0.05, 1.0, 0.6][:B], dtype=torch.float32)
    top_k = torch.tensor([5, 0, 1, 3, V, V + 7, 2, int(torch.randint(1, V, (1,), generator=g)), 250][:B])
    perm = torch.randperm(B, generator=g)
    seed = torch.randint(-2**63, 2**63 - 1, (B,), generator=g, dtype=torch.int64)
    frame = torch.randint(0, 2**40, (B,), generator=g, dtype=torch.int64)
    return temperature[perm], top_k[perm], seed, frame


def _chi2_pvalue(counts, probs):
    """Pearson chi-square p-value of observed counts vs probabilities (bins with expected < 5 pooled)."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def _topk_probs(logits, temperature, k):
    p = torch.softmax(logits.double() / temperature, -1)
    if 0 < k < logits.numel():
        p = torch.where(logits >= torch.topk(logits, k).values[-1], p, 0.0)
    return p / p.sum()


# ---- Philox ------------------------------------------------------------------------------------------
def test_reference_philox_known_answers():
    """Random123's kat_vectors for philox4x32_10 (counter words, key words -> output words)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for ctr, (k0, k1), want in cases:
        key = torch.tensor([k0 | (k1 << 32)], dtype=torch.uint64).view(torch.int64)
        got = S.philox4x32_reference(key, *[torch.tensor([c], dtype=torch.int64) for c in ctr])
        assert [int(w) for w in got] == list(want)


@triton.jit
def _randint4x_kernel(seed, offset_ptr, words_ptr, uniform_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < N
    offset = tl.load(offset_ptr + i, mask=mask, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, offset)  # uint32 words, stored zero-extended
    tl.store(words_ptr + 4 * i, w0.to(tl.int64), mask=mask)
    tl.store(words_ptr + 4 * i + 1, w1.to(tl.int64), mask=mask)
    tl.store(words_ptr + 4 * i + 2, w2.to(tl.int64), mask=mask)
    tl.store(words_ptr + 4 * i + 3, w3.to(tl.int64), mask=mask)
    tl.store(uniform_ptr + i, tl.rand(seed, offset), mask=mask)


@pytest.mark.parametrize("seed", [0, 1234, -5, 2**62 + 977])
def test_reference_philox_matches_triton_randint4x_and_rand(seed):
    g = torch.Generator().manual_seed(10)
    N = 53
    offset = torch.cat([torch.arange(5), torch.randint(0, 2**62, (N - 5,), generator=g)])
    words = torch.full((N, 4), -1, dtype=torch.int64)
    uniform = torch.full((N,), float("nan"))
    _randint4x_kernel[(1,)](seed, offset, words, uniform, N, BLOCK=64)
    key = torch.full((N,), seed, dtype=torch.int64)
    zero = torch.zeros(N, dtype=torch.int64)
    want = S.philox4x32_reference(key, offset & 0xFFFFFFFF, offset >> 32, zero, zero)
    torch.testing.assert_close(words, torch.stack(want, dim=1), rtol=0, atol=0)
    torch.testing.assert_close(uniform, S.uint32_to_uniform_reference(want[0]), rtol=0, atol=0)


# ---- greedy ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V", [1, 37, 2048 + 5, 32000])
def test_greedy_is_torch_argmax_with_planted_ties(V):
    g = torch.Generator().manual_seed(V)
    B = 7
    logits = torch.randn(B, V, generator=g) * 3
    for b in range(1, B):  # the same maximum at 2-3 places, across chunks for the larger V
        where = torch.randperm(V, generator=g)[: min(V, 2 + b % 2)]
        logits[b, where] = logits[b].max() + 1
    logits[B - 1] = float("-inf")  # all equal: index 0
    if V > 1:
        logits[B - 2, :] = -1.0
        logits[B - 2, V // 2], logits[B - 2, V - 1] = -0.0, 0.0  # -0.0 == +0.0: the first one wins
    want = torch.argmax(logits, dim=-1)
    torch.testing.assert_close(S.greedy_tokens(logits, out=_out(B)), want, rtol=0, atol=0)
    torch.testing.assert_close(S.greedy_tokens_reference(logits), want, rtol=0, atol=0)
    # temperature <= 0 rows of sample_tokens are greedy too, whatever their top-k
    temperature = torch.tensor([0.0, -1.0] * 4)[:B]
    top_k = torch.arange(B)
    got = S.sample_tokens(logits, temperature, top_k, torch.arange(B), torch.zeros(B, dtype=torch.int64), 0,
                          out=_out(B))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- exact agreement with the reference --------------------------------------------------------------
@pytest.mark.parametrize("V", [37, 2048 + 5, 32000])
@pytest.mark.parametrize("per_row_codebook", [False, True])
def test_sampled_tokens_equal_reference(V, per_row_codebook):
    g = torch.Generator().manual_seed(1000 * V + per_row_codebook)
    B = int(torch.randint(1, 10, (1,), generator=g)) if V < 32000 else 4
    logits = torch.randn(B, V, generator=g) * 2.5
    logits[0, torch.randperm(V, generator=g)[:3]] = logits[0].max()  # ties at the top (top-k 1..3)
    if B > 1:  # repeated values at the k-th place, and masked tokens
        logits[1, torch.randperm(V, generator=g)[:6]] = 0.25
        logits[1, torch.randperm(V, generator=g)[: V // 3]] = float("-inf")
    temperature, top_k, seed, frame = _row_params(B, V, g)
    codebook = torch.randint(0, 9, (B,), generator=g, dtype=torch.int32) if per_row_codebook else 3
    got = S.sample_tokens(logits, temperature, top_k, seed, frame, codebook, out=_out(B))
    want = S.sample_tokens_reference(logits, temperature, top_k, seed, frame, codebook)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sampled_tokens_strided_inputs_and_bf16_logits():
    """Rows and parameters read through strides (columns of wider tensors); bf16 logits upcast to fp32."""
    g = torch.Generator().manual_seed(7)
    B, V = 5, 2048 + 5
    wide = torch.randn(B, 3, V, generator=g).to(torch.bfloat16)
    logits = wide[:, 1]  # row stride 3V
    params = torch.rand(B, 2, generator=g) + 0.3
    temperature = params[:, 1]
    top_k = torch.tensor([[0, 1], [9, 250], [1, 2], [3, 0], [8, 5000]])[:, 1]
    seed = torch.randint(0, 2**40, (B, 2), generator=g)[:, 0]
    frame = torch.randint(0, 2**33, (B, 2), generator=g)[:, 1]
    codebook = torch.arange(2 * B).reshape(B, 2)[:, 1]
    out = torch.full((B, 9), NO_TOKEN, dtype=torch.int64)
    S.sample_tokens(logits, temperature, top_k, seed, frame, codebook, out=out[:, 4])
    want = S.sample_tokens_reference(logits.float(), temperature, top_k, seed, frame, codebook)
    torch.testing.assert_close(out[:, 4], want, rtol=0, atol=0)
    assert (out[:, :4] == NO_TOKEN).all() and (out[:, 5:] == NO_TOKEN).all()


def test_forced_rows_take_their_token_and_the_others_are_drawn(gen):
    """Teacher forcing per row: forced >= 0 is written as is (even where it is not the argmax), forced < 0
    is drawn exactly as without forcing; for the sampler and for greedy, through a strided forced column."""
    B, V = 7, 2048 + 5
    logits = torch.randn(B, V, generator=gen) * 2
    temperature, top_k, seed, frame = _row_params(B, V, gen)
    table = torch.randint(0, V, (B, 3), generator=gen)
    table[torch.tensor([0, 3, 4]), 1] = -1
    forced = table[:, 1]
    got = S.sample_tokens(logits, temperature, top_k, seed, frame, 2, forced=forced, out=_out(B))
    free = S.sample_tokens_reference(logits, temperature, top_k, seed, frame, 2)
    assert torch.equal(got, torch.where(forced >= 0, forced, free))
    assert torch.equal(S.sample_tokens_reference(logits, temperature, top_k, seed, frame, 2, forced=forced), got)
    greedy = S.greedy_tokens(logits, forced=forced, out=_out(B))
    assert torch.equal(greedy, torch.where(forced >= 0, forced, logits.argmax(-1)))


# ---- repetition penalty ------------------------------------------------------------------------------
IGNORED = (0, 3)


def _history(gen, slots, H, V, lengths):
    """A history ring per slot after `lengths[s]` appends of tokens from a small range (so they repeat),
    some of them the ignored ones; built by appending one token at a time (the reference's append)."""
    history = torch.full((slots, H), -9, dtype=torch.int64)  # never appended: a read of it would show
    length = torch.zeros(slots, dtype=torch.int64)
    for s, n in enumerate(lengths):
        appended = 0
        while appended < n:
            token = int(torch.randint(0, min(V, 12), (1,), generator=gen))
            rep = _rep(torch.tensor([s]), history, length)
            S.append_history_reference(rep, torch.tensor([token]))
            appended += token not in IGNORED
    return history, length


def _rep(rows, history, length, penalty=None, context=None):
    B = rows.shape[0]
    return S.RepetitionPenalty(torch.ones(B) if penalty is None else penalty,
                               torch.zeros(B, dtype=torch.int64) if context is None else context,
                               rows, history, length, IGNORED)


def test_repetition_penalty_reference_is_kyutais_rule_by_hand():
    """Hand-computed: tokens 1, 3, 3, 0, 4 drawn (0 and 3 are padding: not recorded), penalty 2 over the
    last 2 recorded tokens (4, 1): l[4] = -2 * 2, l[1] = -1 * 2; context 3 adds nothing (only 2 recorded)."""
    history, length = torch.zeros(1, 8, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    for token in (1, 3, 3, 0, 4):
        S.append_history_reference(_rep(torch.tensor([0]), history, length), torch.tensor([token]))
    assert length.tolist() == [2] and history[0, :2].tolist() == [1, 4]
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    for context, want in ((1, [2.0, -1.0, 0.5, 3.0, -4.0, 1.0]), (2, [2.0, -2.0, 0.5, 3.0, -4.0, 1.0]),
                          (3, [2.0, -2.0, 0.5, 3.0, -4.0, 1.0]), (0, [2.0, -1.0, 0.5, 3.0, -2.0, 1.0])):
        rep = _rep(torch.tensor([0]), history, length, torch.tensor([2.0]), torch.tensor([context]))
        assert S.repetition_penalty_reference(logits, rep)[0].tolist() == want
    positive = torch.tensor([[2.0, 4.0, 0.5, 3.0, 8.0, 1.0]])  # l >= 0 is divided
    rep = _rep(torch.tensor([0]), history, length, torch.tensor([2.0]), torch.tensor([2]))
    assert S.repetition_penalty_reference(positive, rep)[0].tolist() == [2.0, 2.0, 0.5, 3.0, 4.0, 1.0]


def test_repetition_penalty_ring_equals_kyutais_loop_over_all_tokens(gen):
    """The ring reference (the kernel's) against Kyutai's rule written over the whole token list
    (`moshivis.reference.repetition_penalty`: newest first, padding skipped, `context` counted, each
    distinct token once), for contexts shorter and longer than the tokens recorded, and past a wrapped ring."""
    H, V = 16, 30
    tokens = torch.randint(0, 12, (70,), generator=gen).tolist()
    history, length = torch.zeros(1, H, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    logits = torch.randn(1, V, generator=gen) * 3
    for t, token in enumerate(tokens):
        S.append_history_reference(_rep(torch.tensor([0]), history, length), torch.tensor([token]))
        for context in (1, 5, H):
            rep = _rep(torch.tensor([0]), history, length, torch.tensor([1.3]), torch.tensor([context]))
            want = reference.repetition_penalty(logits[0], tokens[: t + 1], 1.3, context, IGNORED)
            assert torch.equal(S.repetition_penalty_reference(logits, rep)[0], want), (t, context)
    assert int(length) > H  # the ring wrapped


@pytest.mark.parametrize("V", [37, 2048 + 5, 32000])
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.gpu(
    reason="bf16 rounding needs a GPU (the interpreter's fp32 -> bf16 cast truncates)"))])
def test_repetition_penalty_kernel_equals_reference(gen, V, dtype):
    """Rows with penalty 1, > 1 and < 1, contexts 0, shorter and longer than what each history holds (and
    than the ring), empty and wrapped histories, a padding row (-1), greedy and sampled rows, forced rows:
    the kernel's tokens, its penalised logits (written in place, rounded to their dtype) and the histories
    after the append equal the reference's exactly."""
    B, Sl, H = 9, 11, 16
    history, length = _history(gen, Sl, H, V, [0, 3, 16, 40, 5, 100, 17, 1, 2, 9, 30])
    rows = torch.tensor([1, -1, 3, 5, 6, 0, 2, 8, 10])
    penalty = torch.tensor([1.5, 2.0, 1.15, 0.7, 1.0, 3.0, 1.3, 1.8, 1.15])
    context = torch.tensor([64, 3, 5, 16, 8, 4, 1, 200, 0])
    temperature, top_k, seed, frame = _row_params(B, V, gen)
    forced = torch.full((B,), -1, dtype=torch.int64)
    forced[[2, 7]] = torch.tensor([3, 5]) % V  # an ignored token (3) is not recorded
    logits = (torch.randn(B, V, generator=gen) * 3).to(dtype)
    for b, s in enumerate(rows.tolist()):  # the recorded tokens near the top: the penalty decides draws
        if s >= 0 and length[s] > 0:
            logits[b, history[s, : min(int(length[s]), H)].clamp(0, V - 1)] += 4
    device = "cuda" if dtype == torch.bfloat16 else "cpu"
    rows, history, length, penalty, context, temperature, top_k, seed, frame, forced, logits = (
        t.to(device) for t in (rows, history, length, penalty, context, temperature, top_k, seed, frame, forced,
                               logits))
    want_rep = _rep(rows, history.clone(), length.clone(), penalty, context)
    want_logits = S.repetition_penalty_reference(logits, want_rep)
    want = S.sample_tokens_reference(want_logits, temperature, top_k, seed, frame, 0, forced=forced)
    S.append_history_reference(want_rep, want)
    got_rep = _rep(rows, history.clone(), length.clone(), penalty, context)
    got_logits = logits.clone()
    got = S.sample_tokens(got_logits, temperature, top_k, seed, frame, 0, forced=forced, out=_out(B).to(device),
                          repetition=got_rep)
    assert torch.equal(got, want)
    assert torch.equal(got_logits.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       want_logits.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    assert torch.equal(got_rep.history, want_rep.history) and torch.equal(got_rep.length, want_rep.length)
    changed = (want_logits != logits).any(-1)
    # unchanged: no slot (row 1), penalty 1 (row 4), an empty history (row 5), context 0 (row 8)
    assert changed[[0, 2, 3, 6, 7]].all() and not changed[[1, 4, 5, 8]].any()
    grew = torch.zeros(Sl, dtype=torch.int64)
    for s, token in zip(rows.tolist(), want.tolist()):
        grew[s] += s >= 0 and token not in IGNORED
    assert torch.equal((want_rep.length - length).cpu(), grew) and want[2] == 3 and grew[3] == 0


def test_repetition_penalty_changes_draws_and_keeps_streams_apart(gen):
    """Greedy rows whose best token stays 7: without the penalty it repeats, with penalty 3 over context 4
    the kernel moves down the list (each of the last 4 recorded tokens is disfavoured), hand-computed;
    two streams in one launch keep their own histories."""
    V, steps = 37, 12
    history, length = torch.zeros(2, 8, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    logits_row = torch.zeros(V)
    logits_row[[7, 8, 9, 10, 11]] = torch.tensor([5.0, 4.5, 4.0, 3.5, 3.0])
    drawn = []
    for t in range(steps):
        logits = logits_row.expand(2, V).clone()
        rep = _rep(torch.tensor([1, 0]), history, length, torch.tensor([1.0, 3.0]), torch.tensor([4, 4]))
        drawn.append(S.sample_tokens(logits, torch.zeros(2), torch.zeros(2, dtype=torch.int64),  # greedy
                                     torch.zeros(2, dtype=torch.int64), torch.full((2,), t), 0, out=_out(2),
                                     repetition=rep))
    drawn = torch.stack(drawn)
    assert (drawn[:, 0] == 7).all()                                   # penalty 1: greedy repeats
    assert drawn[:, 1].tolist()[:5] == [7, 8, 9, 10, 11]              # penalty 3: each recent one pushed down
    assert length.tolist() == [steps, steps] and set(history[0].tolist()) <= set(range(7, 12))


def test_repetition_penalty_bad_input_names_the_field():
    kwargs = _good()
    ok = _rep(torch.zeros(3, dtype=torch.int64), torch.zeros(4, 8, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    for field, bad, match in (("penalty", torch.ones(3, dtype=torch.float64), "repetition.penalty"),
                              ("context", torch.zeros(2, dtype=torch.int64), "repetition.context"),
                              ("rows", torch.zeros(3), "repetition.rows"),
                              ("history", torch.zeros(4, 8, dtype=torch.int32), "repetition.history"),
                              ("history", torch.zeros(8, 4, dtype=torch.int64).t(), "repetition.history"),
                              ("length", torch.zeros(5, dtype=torch.int64), "repetition.length"),
                              ("ignored", (0,), "repetition.ignored")):
        with pytest.raises(ValueError, match=match):
            S.sample_tokens(**kwargs, repetition=dataclasses.replace(ok, **{field: bad}))
    with pytest.raises(TypeError, match="repetition must be a RepetitionPenalty"):
        S.sample_tokens(**kwargs, repetition=(1.0, 4))


# ---- reproducibility per stream ----------------------------------------------------------------------
def test_stream_draw_is_independent_of_batch_mates_and_position():
    g = torch.Generator().manual_seed(3)
    V = 301
    row = torch.randn(1, V, generator=g) * 0.3  # flat: many tokens are likely
    t, k, cb = torch.tensor([1.0]), torch.tensor([40]), 5
    s, f = torch.tensor([987654321987]), torch.tensor([2**35 + 11])
    alone = S.sample_tokens(row, t, k, s, f, cb, out=_out(1))
    assert torch.equal(S.sample_tokens(row, t, k, s, f, cb), alone)  # same call again, same token
    B = 6
    for pos in (0, 2, B - 1):
        logits = torch.randn(B, V, generator=g)
        temperature, top_k = torch.rand(B, generator=g) + 0.5, torch.randint(0, V, (B,), generator=g)
        seed, frame = torch.randint(0, 2**50, (B,), generator=g), torch.randint(0, 2**50, (B,), generator=g)
        codebook = torch.randint(0, 9, (B,), generator=g)
        logits[pos], temperature[pos], top_k[pos], seed[pos], frame[pos], codebook[pos] = row[0], t, k, s, f, cb
        got = S.sample_tokens(logits, temperature, top_k, seed, frame, codebook, out=_out(B))
        assert got[pos] == alone[0]


def test_frames_codebooks_and_seeds_give_different_draws():
    """One launch: 24 frames of one stream, the same frames at another codebook and with another seed."""
    V, n = 1000, 24
    logits = torch.zeros(3 * n, V)  # uniform: every token equally likely
    frame = torch.arange(n).repeat(3)
    seed = torch.tensor([11] * (2 * n) + [12] * n)
    codebook = torch.tensor([1] * n + [2] * n + [1] * n)
    tok = S.sample_tokens(logits, torch.ones(3 * n), torch.zeros(3 * n, dtype=torch.int64), seed, frame, codebook,
                          out=_out(3 * n))
    by_frame, other_cb, other_seed = tok[:n], tok[n: 2 * n], tok[2 * n:]
    assert len(set(by_frame.tolist())) >= n - 3  # 24 draws from 1000 tokens rarely collide
    assert (by_frame != other_cb).sum() >= n - 3 and (by_frame != other_seed).sum() >= n - 3


# ---- top-k and the distribution ----------------------------------------------------------------------
def test_top_k_never_returns_a_token_outside_the_top_k():
    g = torch.Generator().manual_seed(5)
    B, V = 160, 97
    logits = torch.randn(B, V, generator=g)
    top_k = torch.randint(1, 12, (B,), generator=g)
    temperature = torch.rand(B, generator=g) * 20 + 5  # hot: a leak below the threshold would show
    tok = S.sample_tokens(logits, temperature, top_k, torch.randint(0, 2**62, (B,), generator=g),
                          torch.randint(0, 2**62, (B,), generator=g), 2, out=_out(B))
    kth = torch.stack([torch.topk(logits[b], int(top_k[b])).values[-1] for b in range(B)])
    assert (logits.gather(1, tok[:, None])[:, 0] >= kth).all()
    assert len(set(tok.tolist())) > 50  # and the hot draws really spread over the kept tokens


ALPHA = 1e-3  # significance level of the chi-square tests; all seeds fixed, so they are deterministic


def test_kernel_draws_follow_softmax_top_k():
    """800 draws of one stream (frames 0..799, seed 2024) at fixed logits, T 0.8, top-k 6."""
    g = torch.Generator().manual_seed(0)
    V, k, T, n = 29, 6, 0.8, 800
    row = torch.randn(V, generator=g)
    tok = S.sample_tokens(row.expand(n, V).contiguous(), torch.full((n,), T), torch.full((n,), k),
                          torch.full((n,), 2024), torch.arange(n), 4, out=_out(n))
    counts = torch.bincount(tok, minlength=V)
    probs = _topk_probs(row, T, k)
    assert counts[probs == 0].sum() == 0
    assert _chi2_pvalue(counts, probs) > ALPHA


@pytest.mark.parametrize("V,k,T,n", [(29, 6, 0.8, 50_000), (200, 0, 1.5, 20_000), (2048, 250, 0.8, 5_000)])
def test_reference_draws_follow_softmax_top_k(V, k, T, n):
    """The reference, which the kernel equals token for token, with many more draws (fast in PyTorch)."""
    g = torch.Generator().manual_seed(V)
    row = torch.randn(V, generator=g) * 2
    tok = S.sample_tokens_reference(row.expand(n, V), torch.full((n,), T), torch.full((n,), k),
                                    torch.full((n,), 99), torch.arange(n), 1)
    counts = torch.bincount(tok, minlength=V)
    probs = _topk_probs(row, T, k)
    assert counts[probs == 0].sum() == 0
    assert _chi2_pvalue(counts, probs) > ALPHA


def test_chi2_pvalue_helper():
    """The p-value helper against known quantiles: chi2(df=5) 0.999-quantile is 20.515."""
    stat_at = lambda p: float(torch.special.gammaincc(torch.tensor(2.5, dtype=torch.float64),  # noqa: E731
                                                     torch.tensor(p / 2, dtype=torch.float64)))
    assert math.isclose(stat_at(20.515), 1e-3, rel_tol=1e-3)
    assert math.isclose(stat_at(11.070), 0.05, rel_tol=1e-3)


# ---- launches and validation -------------------------------------------------------------------------
def test_one_launch_per_call_and_empty_batch():
    B, V = 3, 37
    args = (torch.ones(B), torch.zeros(B, dtype=torch.int64), torch.zeros(B, dtype=torch.int64),
            torch.zeros(B, dtype=torch.int64), 0)
    with count_launches() as n:
        S.sample_tokens(torch.randn(B, V), *args)
        S.greedy_tokens(torch.randn(B, V))
    assert n == {"sample_tokens": 1, "greedy_tokens": 1}
    empty = torch.zeros(0, dtype=torch.int64)
    assert S.sample_tokens(torch.randn(0, V), torch.ones(0), empty, empty, empty, 0).shape == (0,)


def _good(B=3, V=37):
    return dict(logits=torch.randn(B, V), temperature=torch.ones(B), top_k=torch.zeros(B, dtype=torch.int64),
                seed=torch.zeros(B, dtype=torch.int64), frame=torch.zeros(B, dtype=torch.int64), codebook=1)


@pytest.mark.parametrize("name,bad,err", [
    ("logits", torch.randn(37), ValueError),
    ("logits", torch.randn(3, 37, dtype=torch.float64), ValueError),
    ("logits", torch.randn(3, 0), ValueError),
    ("logits", torch.randn(37, 3).t(), ValueError),
    ("logits", [[0.0] * 37] * 3, TypeError),
    ("temperature", torch.ones(4), ValueError),
    ("temperature", torch.ones(3, dtype=torch.float64), ValueError),
    ("top_k", torch.zeros(3), ValueError),
    ("top_k", torch.zeros(3, 1, dtype=torch.int64), ValueError),
    ("seed", torch.zeros(3, dtype=torch.int32), ValueError),
    ("frame", torch.zeros(2, dtype=torch.int64), ValueError),
    ("codebook", -1, ValueError),
    ("codebook", 1.0, TypeError),
    ("codebook", True, TypeError),
    ("codebook", torch.zeros(2, dtype=torch.int64), ValueError),
    ("codebook", torch.zeros(3), ValueError),
    ("forced", torch.zeros(4, dtype=torch.int64), ValueError),
    ("forced", torch.zeros(3), ValueError),
])
def test_sampling_bad_inputs_name_the_argument(name, bad, err):
    kwargs = _good()
    kwargs[name] = bad
    with pytest.raises(err, match=name):
        S.sample_tokens(**kwargs)


@pytest.mark.parametrize("bad", [torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int64)])
def test_bad_out_names_the_argument(bad):
    with pytest.raises(ValueError, match="out"):
        S.sample_tokens(**_good(), out=bad)
    with pytest.raises(ValueError, match="out"):
        S.greedy_tokens(torch.randn(3, 37), out=bad)

# ==================================================================================================
# Depformer codebook step
#
# The depformer step kernel (moshivis_kernels.depformer) against its fp32 PyTorch reference.
#
# On CPU the kernel runs in the Triton interpreter, in fp32: a fused launch there has one program (the
# grid barrier's single-program case); the multi-launch mode runs several programs. bf16 and the fused
# launch over every SM run only on a GPU. INT8 weights (quantize_rowwise: CB int8 + SCB fp32) with fp32
# activations are exact in fp32 too (|CB| <= 127), so they share the dense tolerance: the kernel and the
# fp32 reference differ only in the order of fp32 sums (measured <= 3.0e-6 on O(1) outputs: 3e-5 allowed).
# ==================================================================================================
FP32 = dict(atol=3e-5, rtol=3e-5)
BF16 = dict(atol=5e-2, rtol=5e-2)
# odd sizes: no dimension a multiple of a block; head_dim 12 is not a power of two
SMALL = dict(dim=40, dd=24, heads=2, layers=2, hidden=44, card=37, text_rows=29, steps=8)
# head_dim 16, a power of two: with INT8 weights the out-projection reads the Wo columns of 2 heads at a
# time as one contiguous chunk (SMALL: 2 heads of 12 columns, padded to 16, in one chunk)
POW2_HEADS = dict(SMALL, dd=96, heads=6, layers=1, steps=4)


def random_weights(gen, *, dim, dd, heads, layers, hidden, card, text_rows, steps, dtype=torch.float32,
                   device="cpu") -> D.DepformerWeights:
    """Random weights in the stacked layout, scaled so activations stay O(1) through the layers."""
    def r(*shape, scale=None):
        t = torch.randn(*shape, generator=gen, device=gen.device) * (shape[-1] ** -0.5 if scale is None else scale)
        return t.to(dtype=dtype, device=device)

    return D.DepformerWeights(
        depformer_in=r(steps, dd, dim), text_emb=r(text_rows, dd, scale=1.0),
        audio_emb=r(steps - 1, card + 1, dd, scale=1.0),
        norm1=1 + r(layers, dd, scale=0.2), norm2=1 + r(layers, dd, scale=0.2),
        in_proj=r(layers, steps * 3 * dd, dd), out_proj=r(layers, steps * dd, dd),
        linear_in=r(layers, steps, 2 * hidden, dd), linear_out=r(layers, steps, dd, hidden),
        audio_linears=r(steps, card, dd), num_heads=heads)


def nan_workspace(w: D.DepformerWeights, B: int) -> D.DepformerWorkspace:
    ws = D.depformer_workspace(w, B)
    for t in (ws.x, ws.q, ws.g, ws.cache):
        t.fill_(float("nan"))
    return ws


def tokens(gen, B: int, rows: int) -> torch.Tensor:
    """Valid ids, with the zero token -1 in the first row and an id past the table in the last."""
    t = torch.randint(0, rows, (B,), generator=gen)
    t[0] = -1
    if B > 1:
        t[-1] = rows
    return t


def random_batch(gen) -> int:
    return int(torch.randint(1, 10, (1,), generator=gen))


def quantized(w: D.DepformerWeights) -> D.DepformerWeights:
    """w with its six projections in INT8: quantize_rowwise per matrix row, scales stacked alike."""
    q = {}
    for name in D.PROJECTIONS:
        t = getattr(w, name)
        cb, scb = quantize_rowwise(t.reshape(-1, t.shape[-1]))
        q[name], q[f"{name}_scale"] = cb.view(t.shape), scb.view(t.shape[:-1])
    return dataclasses.replace(w, **q)


def make_weights(gen, kind: str, shape=SMALL, **kwargs) -> D.DepformerWeights:
    w = random_weights(gen, **shape, **kwargs)
    return quantized(w) if kind == "int8" else w


# ---- the pieces, one phase at a time ----------------------------------------------------------------
@pytest.mark.parametrize("weights", ["dense", "int8"])
@pytest.mark.parametrize("path", ["fma", "dot"])
def test_each_phase_matches_reference(gen, path, weights):
    """Each phase run alone (not fused, 3 programs) from the state the previous one left, against the
    same piece in PyTorch; cache entries of later steps are NaN and must stay unread and unwritten."""
    w = make_weights(gen, weights)
    B = 9 if path == "dot" else int(torch.randint(1, 9, (1,), generator=gen))
    assert D._step_config(B, w.dim, w.dd, w.hidden, w.card, w.head_dim, 3, w.quantized).use_dot == (path == "dot")
    step = int(torch.randint(1, w.steps - 1, (1,), generator=gen))
    h = torch.randn(B, w.dim, generator=gen)
    prev = tokens(gen, B, w.card + 1)
    ws = nan_workspace(w, B)
    ws.cache[:, :, :, :step] = torch.randn(w.num_layers, 2, B, step, w.dd, generator=gen)  # earlier steps
    out = torch.full((B, w.card), float("nan"))
    run = lambda p: D._launch(w, step, h, prev, ws, out, p, p + 1, False, 3)  # noqa: E731

    run(0)
    torch.testing.assert_close(ws.x, D.depformer_input_reference(w, step, h, prev), **FP32)
    for layer in range(w.num_layers):
        p = 1 + 4 * layer
        x, cache = ws.x.clone(), ws.cache.clone()
        run(p)
        want_x = D.depformer_attention_reference(w, layer, step, x, cache)  # also fills cache entry `step`
        q_rows = (layer, slice(3 * w.dd * step, 3 * w.dd * step + w.dd))
        torch.testing.assert_close(ws.q, D._project(w, "in_proj", q_rows, D._var_norm(x, w.norm1[layer])), **FP32)
        torch.testing.assert_close(ws.cache[layer, :, :, :step + 1], cache[layer, :, :, :step + 1], **FP32)
        assert ws.cache[layer + 1:, :, :, step].isnan().all() and ws.cache[:, :, :, step + 1:].isnan().all()
        run(p + 1)
        torch.testing.assert_close(ws.x, want_x, **FP32)

        x = ws.x.clone()
        run(p + 2)
        gate, up = D._project(w, "linear_in", (layer, step), D._var_norm(x, w.norm2[layer])).chunk(2, dim=-1)
        torch.testing.assert_close(ws.g, torch.nn.functional.silu(gate) * up, **FP32)
        run(p + 3)
        torch.testing.assert_close(ws.x, D.depformer_ffn_reference(w, layer, step, x), **FP32)
    x = ws.x.clone()
    run(D.num_phases(w) - 1)
    torch.testing.assert_close(out, D._project(w, "audio_linears", (step,), x), **FP32)


# ---- whole steps and frames ---------------------------------------------------------------------------
@pytest.mark.parametrize("weights, shape, fused, programs", [
    ("dense", SMALL, True, 1), ("dense", SMALL, False, 3), ("int8", SMALL, True, 1), ("int8", SMALL, False, 3),
    ("int8", POW2_HEADS, True, 1)], ids=["dense-fused", "dense-3", "int8-fused", "int8-3", "int8-pow2-heads"])
def test_steps_match_reference(gen, fused, programs, weights, shape):
    """Every step of a frame (random previous tokens) against depformer_step_reference: logits and the
    K/V the step adds to the cache."""
    w = make_weights(gen, weights, shape)
    B = random_batch(gen)
    h = torch.randn(B, w.dim, generator=gen)
    ws = nan_workspace(w, B)
    cache = torch.zeros(w.num_layers, 2, B, w.steps, w.dd)
    for k in range(w.steps):
        prev = tokens(gen, B, w.text_emb.shape[0] if k == 0 else w.card + 1)
        out = torch.full((B, w.card), float("nan"))
        got = D.depformer_step(w, k, h, prev, ws, out=out, fused=fused, num_programs=programs)
        assert got is out
        torch.testing.assert_close(out, D.depformer_step_reference(w, k, h, prev, cache), **FP32)
        torch.testing.assert_close(ws.cache[:, :, :, :k + 1], cache[:, :, :, :k + 1], **FP32)


@pytest.mark.parametrize("weights", ["dense", "int8"])
def test_dot_path_step_with_int32_tokens_and_strided_h(gen, weights):
    """B = 11 (the tl.dot path, a 16-row tile with 5 masked rows), h a column slice, prev int32."""
    w = make_weights(gen, weights, {**SMALL, "steps": 3})
    B = 11
    h = torch.randn(B, w.dim + 7, generator=gen)[:, 3:3 + w.dim]
    ws = nan_workspace(w, B)
    cache = torch.zeros(w.num_layers, 2, B, w.steps, w.dd)
    for k in range(w.steps):
        prev = tokens(gen, B, w.card + 1).to(torch.int32)
        got = D.depformer_step(w, k, h, prev, ws, out=torch.full((B, w.card), float("nan")))
        torch.testing.assert_close(got, D.depformer_step_reference(w, k, h, prev, cache), **FP32)


def test_bf16_cache(gen):
    """A bf16 K/V cache (fp32 weights) against the reference keeping its cache in bf16 too. Loose: the
    interpreter converts fp32 to bf16 by truncation, not round-to-nearest as the GPU and torch do."""
    w = random_weights(gen, **{**SMALL, "steps": 3})
    B = random_batch(gen)
    h = torch.randn(B, w.dim, generator=gen)
    ws = D.depformer_workspace(w, B, cache_dtype=torch.bfloat16)
    cache = torch.zeros(w.num_layers, 2, B, w.steps, w.dd, dtype=torch.bfloat16)
    for k in range(w.steps):
        prev = tokens(gen, B, w.card + 1)
        got = D.depformer_step(w, k, h, prev, ws)
        torch.testing.assert_close(got, D.depformer_step_reference(w, k, h, prev, cache), **BF16)
        torch.testing.assert_close(ws.cache[:, :, :, :k + 1], cache[:, :, :, :k + 1], **BF16)


@pytest.mark.parametrize("weights, shape, fused, programs", [("dense", SMALL, True, 1),
                                                             ("int8", {**SMALL, "steps": 4}, False, 2)])
def test_frame_greedy_is_the_reference_argmax_chain(gen, weights, shape, fused, programs):
    w = make_weights(gen, weights, shape)
    B = random_batch(gen)
    h = torch.randn(B, w.dim, generator=gen)
    text = torch.randint(0, w.text_emb.shape[0], (B,), generator=gen)
    logits = torch.full((B, w.steps, w.card), float("nan"))
    toks = torch.full((B, w.steps), -7, dtype=torch.int64)
    got_t, got_l = D.depformer_frame(w, h, text, nan_workspace(w, B), logits_out=logits, tokens_out=toks,
                                     fused=fused, num_programs=programs)
    want_t, want_l = D.depformer_frame_reference(w, h, text)
    assert got_t is toks and got_l is logits
    assert torch.equal(got_t, want_t)
    torch.testing.assert_close(got_l, want_l, **FP32)


def test_frame_sampled_matches_reference_with_the_same_uniforms(gen):
    """Per-row temperature (row 0 greedy), top-k, seed and frame: the same tokens as the reference
    sampler given the reference logits, i.e. the sampler sees codebook 1 + k at step k."""
    w = random_weights(gen, **SMALL)
    B = max(2, random_batch(gen))
    h = torch.randn(B, w.dim, generator=gen)
    text = torch.randint(0, w.text_emb.shape[0], (B,), generator=gen)
    temperature = torch.rand(B, generator=gen) + 0.5
    temperature[0] = 0.0
    top_k = torch.randint(0, w.card + 3, (B,), generator=gen)
    seed = torch.randint(0, 2**62, (B,), generator=gen)
    frame = torch.randint(0, 1000, (B,), generator=gen)
    got_t, got_l = D.depformer_frame(w, h, text, nan_workspace(w, B), temperature=temperature, top_k=top_k,
                                     seed=seed, frame=frame)
    want_t, want_l = D.depformer_frame_reference(w, h, text, temperature=temperature, top_k=top_k, seed=seed,
                                                 frame=frame)
    assert torch.equal(got_t, want_t)
    torch.testing.assert_close(got_l, want_l, **FP32)


def test_frame_forced_tokens(gen):
    w = random_weights(gen, **{**SMALL, "steps": 4})
    B = random_batch(gen)
    h = torch.randn(B, w.dim, generator=gen)
    forced = torch.randint(0, w.card, (B, 1 + w.steps), generator=gen)
    forced[0, 2] = -1  # not forced: drawn (greedy here), and the next step reads the drawn token
    got_t, got_l = D.depformer_frame(w, h, forced[:, 0], nan_workspace(w, B), forced=forced, fused=False,
                                     num_programs=2)
    want_t, want_l = D.depformer_frame_reference(w, h, forced[:, 0], forced=forced)
    assert torch.equal(got_t, want_t)
    keep = forced[:, 1:] >= 0
    assert torch.equal(got_t[keep], forced[:, 1:][keep]) and got_t[0, 1] == want_l[0, 1].argmax()
    torch.testing.assert_close(got_l, want_l, **FP32)


# ---- Kyutai's keys: the golden tiny checkpoint ------------------------------------------------------------
def check_against_model_reference(gen, cfg, weights: dict, w: D.DepformerWeights) -> None:
    """depformer_step on w, step by step, against moshivis.reference.depformer_step on Kyutai's keys
    `weights`, K/V cache included ([L, B, 2, S, H, D] there, [L, 2, B, S, dd] here)."""
    B = random_batch(gen)
    h = torch.randn(B, cfg.dim, generator=gen)
    ws = nan_workspace(w, B)
    cache = torch.zeros(cfg.depformer_num_layers, B, 2, cfg.dep_q, cfg.depformer_num_heads, cfg.depformer_head_dim)
    prev = torch.randint(0, cfg.text_card + 1, (B,), generator=gen)
    prev[0] = -1
    for k in range(cfg.dep_q):
        want = R.depformer_step(weights, cfg, k, h, prev, cache)
        got = D.depformer_step(w, k, h, prev, ws, out=torch.full((B, cfg.audio_card), float("nan")))
        torch.testing.assert_close(got, want, **FP32)
        theirs = cache.permute(0, 2, 1, 3, 4, 5).flatten(-2)[:, :, :, :k + 1]
        torch.testing.assert_close(ws.cache[:, :, :, :k + 1], theirs, **FP32)
        prev = want.argmax(-1)


def test_golden_tiny_weights_match_moshivis_reference(gen, tiny_cfg, tiny_weights):
    """The stacked layout reproduces moshivis.reference.depformer_step on Kyutai's keys."""
    from moshivis.backends.triton import depformer_weights  # the runtime's stacking of Kyutai's keys
    check_against_model_reference(gen, tiny_cfg, tiny_weights, depformer_weights(dict(tiny_weights), tiny_cfg))


def test_golden_tiny_int8_weights_match_moshivis_reference(gen, tiny_cfg, tiny_weights):
    """The INT8 checkpoint's depformer (moshivis.quantize: CB int8 + SCB), stacked by the runtime with each
    SCB stacked like its weight, against moshivis.reference on the same quantized dict (its INT8 rule)."""
    from moshivis.backends.triton import depformer_weights
    from moshivis.quantize import quantize_weights
    q = quantize_weights(dict(tiny_weights), tiny_cfg)
    w = depformer_weights(dict(q), tiny_cfg)
    assert w.quantized and w.in_proj.dtype == torch.int8 and w.in_proj_scale.shape == w.in_proj.shape[:2]
    check_against_model_reference(gen, tiny_cfg, q, w)


# ---- launches ------------------------------------------------------------------------------------------
def test_depformer_launch_counts(gen):
    """Fused: one launch per step (plus the sampler's); not fused: one per phase, 4 per layer + 2."""
    w = random_weights(gen, **{**SMALL, "steps": 2, "layers": 1})
    B = random_batch(gen)
    h, prev = torch.randn(B, w.dim, generator=gen), torch.zeros(B, dtype=torch.int64)
    ws = D.depformer_workspace(w, B)
    with count_launches() as n:
        D.depformer_step(w, 0, h, prev, ws)
    assert n == {"depformer_step": 1}
    with count_launches() as n:
        D.depformer_step(w, 1, h, prev, ws, fused=False, num_programs=2)
    assert n == {"depformer_step": D.num_phases(w)} and D.num_phases(w) == 6
    with count_launches() as n:
        D.depformer_frame(w, h, prev, ws)
    assert n == {"depformer_step": 2, "greedy_tokens": 2}
    ones = torch.ones(B, dtype=torch.int64)
    with count_launches() as n:
        D.depformer_frame(w, h, prev, ws, temperature=torch.ones(B), top_k=ones, seed=ones, frame=ones)
    assert n == {"depformer_step": 2, "sample_tokens": 2}
    with count_launches() as n:
        D.depformer_step(w, 0, h[:0], prev[:0], D.depformer_workspace(w, 0))
    assert n == {}


def test_workspace_barrier_counter_is_left_at_zero(gen):
    w = random_weights(gen, **{**SMALL, "steps": 2, "layers": 1})
    ws = D.depformer_workspace(w, 2)
    D.depformer_step(w, 0, torch.randn(2, w.dim, generator=gen), torch.zeros(2, dtype=torch.int64), ws)
    assert ws.sync[0] == 0 and ws.sync[1] == D.num_phases(w) - 1  # one generation per barrier


def test_audit_cases_cover_every_argument():
    for case in D.audit_cases():
        assert set(case["signature"]) == set(case["fn"].arg_names), case["name"]
        assert all(case["signature"][k] == "constexpr" for k in case["constexprs"])


# ---- validation ------------------------------------------------------------------------------------------
def test_bad_inputs_raise_errors_naming_the_argument(gen):
    w = random_weights(gen, **{**SMALL, "steps": 2, "layers": 1})
    B = 3
    h, prev, ws = torch.randn(B, w.dim), torch.zeros(B, dtype=torch.int64), D.depformer_workspace(w, B)
    with pytest.raises(ValueError, match="step"):
        D.depformer_step(w, 2, h, prev, ws)
    with pytest.raises(ValueError, match="h must"):
        D.depformer_step(w, 0, torch.randn(B, w.dim + 1), prev, ws)
    with pytest.raises(ValueError, match="prev"):
        D.depformer_step(w, 0, h, prev.float(), ws)
    with pytest.raises(ValueError, match="prev"):
        D.depformer_step(w, 0, h, prev[:2], ws)
    with pytest.raises(ValueError, match="workspace.x"):
        D.depformer_step(w, 0, h, prev, D.depformer_workspace(w, B + 1))
    with pytest.raises(ValueError, match="out"):
        D.depformer_step(w, 0, h, prev, ws, out=torch.empty(B, w.card + 1))
    with pytest.raises(ValueError, match="num_programs"):
        D.depformer_step(w, 0, h, prev, ws, num_programs=2)  # fused in the interpreter
    with pytest.raises(ValueError, match="in_proj"):
        D.depformer_step(D.DepformerWeights(**{**vars(w), "in_proj": w.in_proj[:, :-1]}), 0, h, prev, ws)
    with pytest.raises(ValueError, match="linear_out"):
        D.depformer_step(D.DepformerWeights(**{**vars(w), "linear_out": w.linear_out.to(torch.bfloat16)}),
                         0, h, prev, ws)
    with pytest.raises(ValueError, match="contiguous"):
        D.depformer_step(D.DepformerWeights(**{**vars(w), "audio_linears": w.audio_linears.transpose(1, 2)
                                               .contiguous().transpose(1, 2)}), 0, h, prev, ws)
    with pytest.raises(ValueError, match="num_heads"):
        D.depformer_step(D.DepformerWeights(**{**vars(w), "num_heads": 5}), 0, h, prev, ws)
    with pytest.raises(ValueError, match="forced"):
        D.depformer_frame(w, h, prev, ws, forced=torch.zeros(B, w.steps, dtype=torch.int64))
    with pytest.raises(ValueError, match="together"):
        D.depformer_frame(w, h, prev, ws, temperature=torch.ones(B))


def _int8_change(w: D.DepformerWeights, change: str) -> D.DepformerWeights:
    if change == "missing scale":
        return dataclasses.replace(w, in_proj_scale=None)
    if change == "no scales":
        return dataclasses.replace(w, **{f"{n}_scale": None for n in D.PROJECTIONS})
    if change == "scale shape":
        return dataclasses.replace(w, linear_in_scale=w.linear_in_scale[:, :, :-1])
    if change == "scale dtype":
        return dataclasses.replace(w, audio_linears_scale=w.audio_linears_scale.double())
    if change == "scale strides":
        return dataclasses.replace(w, audio_linears_scale=w.audio_linears_scale.T.contiguous().T)
    if change == "one dense projection":
        return dataclasses.replace(w, linear_out=w.linear_out.float())
    if change == "table dtype":
        return dataclasses.replace(w, audio_emb=w.audio_emb.to(torch.bfloat16))
    dense = random_weights(torch.Generator().manual_seed(0), **{**SMALL, "steps": 2, "layers": 1})
    if change == "scale with dense weight":
        return dataclasses.replace(dense, in_proj_scale=w.in_proj_scale)
    if change == "dense table dtype":
        return dataclasses.replace(dense, text_emb=dense.text_emb.to(torch.bfloat16))
    assert change == "one int8 projection"
    return dataclasses.replace(dense, in_proj=w.in_proj)


@pytest.mark.parametrize("change, match", [
    ("missing scale", r"in_proj_scale is missing: int8 in_proj needs its fp32 row scales"),
    ("no scales", r"depformer_in_scale is missing"),
    ("scale shape", r"linear_in_scale must be contiguous with shape \[1, 2, 88\]"),
    ("scale dtype", r"audio_linears_scale must have dtype in \['torch.float32'\]"),
    ("scale strides", r"audio_linears_scale must be contiguous"),
    ("one dense projection", r"linear_out has dtype torch.float32, expected torch.int8"),
    ("table dtype", r"audio_emb has dtype torch.bfloat16, expected torch.float32 like text_emb"),
    ("scale with dense weight", r"in_proj_scale given for a dense \(torch.float32\) in_proj"),
    ("one int8 projection", r"in_proj has dtype torch.int8, expected torch.float32 like depformer_in"),
    ("dense table dtype", r"text_emb has dtype torch.bfloat16, expected torch.float32 like depformer_in"),
])
def test_bad_int8_weights_raise_errors_naming_the_field(gen, change, match):
    w = quantized(random_weights(gen, **{**SMALL, "steps": 2, "layers": 1}))
    w.validate()
    B = 2
    h, prev, ws = torch.randn(B, w.dim), torch.zeros(B, dtype=torch.int64), D.depformer_workspace(w, B)
    with pytest.raises(ValueError, match=match):
        D.depformer_step(_int8_change(w, change), 0, h, prev, ws)


# ---- GPU only: bf16 and the fused launch over every SM --------------------------------------------------
gpu_depformer = pytest.mark.gpu(reason="needs a GPU (the interpreter's bf16 is unreliable "
                                                               "and it cannot run a multi-program grid barrier)")
MID = dict(dim=512, dd=256, heads=4, layers=3, hidden=700, card=300, text_rows=333, steps=8)


@gpu_depformer
@pytest.mark.parametrize("weights", ["dense", "int8"])
@pytest.mark.parametrize("B", [1, 7, 40])
def test_gpu_bf16_fused_matches_unfused_and_reference(gen, B, weights):
    """bf16 weights (or INT8 ones with bf16 tables) at a mid size, fused over every SM (grid barriers
    between phases): repeated launches are bit-identical (no atomics on data), and agree with one launch
    per phase and with the reference."""
    w = make_weights(gen, weights, MID, dtype=torch.bfloat16, device="cuda")
    h = torch.randn(B, w.dim, generator=gen).to("cuda", torch.bfloat16)
    ws_a, ws_b = D.depformer_workspace(w, B), D.depformer_workspace(w, B)
    cache = torch.zeros(w.num_layers, 2, B, w.steps, w.dd, device="cuda")
    prev = torch.randint(0, w.text_emb.shape[0], (B,), generator=gen).cuda()
    for k in range(w.steps):
        fused = D.depformer_step(w, k, h, prev, ws_a)
        for _ in range(3):
            assert torch.equal(D.depformer_step(w, k, h, prev, ws_a), fused)
        unfused = D.depformer_step(w, k, h, prev, ws_b, fused=False)
        torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, D.depformer_step_reference(w, k, h, prev, cache), **BF16)
        prev = fused.argmax(-1)
    assert ws_a.sync[0].item() == 0


def real_depformer_shape() -> dict:
    """The released model's depformer (moshika-vis): 1024 wide, 16 heads, 6 layers, 8 steps, 2048 audio tokens."""
    from moshivis import preset
    cfg = preset("moshika-vis")
    return dict(dim=cfg.dim, dd=cfg.depformer_dim, heads=cfg.depformer_num_heads, layers=cfg.depformer_num_layers,
                hidden=cfg.depformer_hidden, card=cfg.audio_card, text_rows=cfg.text_card + 1, steps=cfg.dep_q)


@gpu_depformer
@pytest.mark.parametrize("B", [64, 256])
def test_gpu_bf16_fused_matches_unfused_at_the_real_size(B):
    """The real depformer (1024 wide, 6 layers, 8 steps) in bf16 at batch 64 and 256 (the tl.dot path), fused
    over every SM against one launch per phase (the same arithmetic: within 1e-5, as at the mid size) and
    against the fp32 reference (bf16 tolerance), step by step, each step's input the fused step's argmax;
    outputs NaN-filled first."""
    g = torch.Generator(device="cuda").manual_seed(B)
    w = random_weights(g, **real_depformer_shape(), dtype=torch.bfloat16, device="cuda")
    assert w.dd == 1024 and w.num_layers == 6
    h = torch.randn(B, w.dim, generator=g, device="cuda").bfloat16()
    ws_a, ws_b = D.depformer_workspace(w, B), D.depformer_workspace(w, B)
    cache = torch.zeros(w.num_layers, 2, B, w.steps, w.dd, device="cuda")
    prev = torch.randint(0, w.text_emb.shape[0], (B,), generator=g, device="cuda")
    for k in range(w.steps):
        fused = D.depformer_step(w, k, h, prev, ws_a, out=torch.full((B, w.card), float("nan"), device="cuda"))
        unfused = D.depformer_step(w, k, h, prev, ws_b, fused=False,
                                   out=torch.full((B, w.card), float("nan"), device="cuda"))
        torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, D.depformer_step_reference(w, k, h, prev, cache), **BF16)
        prev = fused.argmax(-1)
    assert ws_a.sync[0].item() == 0


@gpu_depformer
def test_gpu_frame_replays_in_a_cuda_graph(gen):
    """The 8 cooperative step launches and the sampler's, captured once and replayed: the same tokens
    and logits as eager launches."""
    w = random_weights(gen, **MID, dtype=torch.bfloat16, device="cuda")
    B = 5
    h = torch.randn(B, w.dim, generator=gen).to("cuda", torch.bfloat16)
    text = torch.randint(0, w.text_emb.shape[0], (B,), generator=gen).cuda()
    ws = D.depformer_workspace(w, B)
    want_t, want_l = D.depformer_frame(w, h, text, ws)
    logits = torch.zeros(B, w.steps, w.card, device="cuda")
    toks = torch.zeros(B, w.steps, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation) outside the capture
        D.depformer_frame(w, h, text, ws, logits_out=logits, tokens_out=toks)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        D.depformer_frame(w, h, text, ws, logits_out=logits, tokens_out=toks)
    for _ in range(3):  # every replay writes every output
        logits.fill_(float("nan"))
        toks.fill_(-7)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(toks, want_t) and torch.equal(logits, want_l)


# ==================================================================================================
# RMSNorm rows (h = out_norm(x) before the text head and the depformer)
# ==================================================================================================
def test_rms_norm_matches_reference_and_model_norm(gen):
    from moshivis_kernels.rms_norm import rms_norm, rms_norm_reference
    B, dim = int(torch.randint(1, 10, (1,), generator=gen)), 2048 + 37  # two column blocks, the second partial
    x = torch.randn(B, dim, generator=gen) * 3
    alpha = 1 + 0.1 * torch.randn(1, 1, dim, generator=gen)
    out = torch.full_like(x, float("nan"))
    with count_launches() as n:
        rms_norm(x, alpha, out=out)
    assert n == {"rms_norm": 1}
    torch.testing.assert_close(out, rms_norm_reference(x, alpha), rtol=1e-5, atol=1e-5)  # fp32 sum order
    torch.testing.assert_close(rms_norm_reference(x, alpha), R.rms_norm(x, alpha), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"alpha must hold dim=2085 values"):
        rms_norm(x, alpha[..., :-1])
    with pytest.raises(ValueError, match=r"x must have 2 dimensions"):
        rms_norm(x[None], alpha)


# ==================================================================================================
# Delayed token streams (frame inputs in, delayed outputs out)
# ==================================================================================================
from moshivis_kernels import token_delays as TD  # noqa: E402

SENTINEL = 99  # never a token, nor -1 / -2: unwritten outputs show


def _delay_setup(gen, C=17, U=8, K=9):
    delays = torch.randint(0, 4, (C,), generator=gen)
    delays[0], delays[C - U] = 0, 0  # a delay-0 model row and user row (read back from registers)
    max_delay = int(delays[:K].max())
    delays[K:] = delays[K:].clamp(max=max_delay)
    initial = torch.randint(100, 200, (C,), generator=gen)
    return delays, initial, max_delay


def test_token_delays_match_reference_with_padding(gen):
    """Many frames of scattered streams (some rows padding) at mixed positions, wrap-arounds included:
    kernels == references on the outputs and on the whole buffer after every call."""
    C, U, K = 17, 8, 9
    delays, initial, max_delay = _delay_setup(gen, C, U, K)
    S, W = 7, max_delay + 2
    buf = torch.randint(-2, 50, (S, C, W), generator=gen)
    ref = buf.clone()
    for frame in range(8):
        B = int(torch.randint(1, 7, (1,), generator=gen))
        rows = torch.randperm(S, generator=gen)[:B]
        rows[torch.rand(B, generator=gen) < 0.3] = -1
        positions = torch.randint(0, 3 * W, (B,), generator=gen)
        user = torch.randint(-1, 40, (B, U), generator=gen)
        got = TD.frame_input_tokens(buf, rows, positions, user, delays, initial,
                                    out=torch.full((B, C), SENTINEL))
        want = TD.frame_input_tokens_reference(ref, rows, positions, user, delays, initial)
        assert torch.equal(got, want) and torch.equal(buf, ref), frame
        tokens = torch.randint(0, 40, (B, K), generator=gen)
        got = TD.frame_output_tokens(buf, rows, positions, tokens, delays, max_delay,
                                     out=torch.full((B, K), SENTINEL))
        want = TD.frame_output_tokens_reference(ref, rows, positions, tokens, delays, max_delay)
        assert torch.equal(got, want) and torch.equal(buf, ref), frame
        assert (got[rows < 0] == -2).all()


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_token_delays_are_kyutais_delays(gen, impl):
    """One stream, frame by frame, against the definition (SPEC.md §7): the input of row j at frame t is
    initial[j] while t <= d_j, else the user's token of frame t - d_j (user rows) or the model's token
    of frame t - 1 (model rows); the output of row j after frame t is the model's token of frame
    t - max_delay + d_j, or -2 before frame max_delay."""
    C, U, K = 17, 8, 9
    delays, initial, max_delay = _delay_setup(gen, C, U, K)
    W = max_delay + 2
    buf = torch.full((2, C, W), -2)
    rows = torch.tensor([1])
    fin = TD.frame_input_tokens if impl == "kernel" else TD.frame_input_tokens_reference
    fout = TD.frame_output_tokens if impl == "kernel" else TD.frame_output_tokens_reference
    users, models = [], []
    for t in range(12):
        pos = torch.tensor([t])
        users.append(torch.randint(0, 40, (1, U), generator=gen))
        got_in = fin(buf, rows, pos, users[-1], delays, initial)[0]
        for j in range(C):
            d = int(delays[j])
            want = initial[j] if t <= d else (users[t - d][0, j - (C - U)] if j >= C - U else models[t - 1][0, j])
            assert got_in[j] == want, (t, j)
        models.append(torch.randint(0, 40, (1, K), generator=gen))
        got_out = fout(buf, rows, pos, models[-1], delays, max_delay)[0]
        for j in range(K):
            src = t - max_delay + int(delays[j])
            assert got_out[j] == (-2 if t + 1 <= max_delay else models[src][0, j]), (t, j)


def test_token_delays_launches_and_bad_inputs(gen):
    delays, initial, max_delay = _delay_setup(gen)
    buf = torch.zeros(3, 17, max_delay + 2, dtype=torch.long)
    rows, pos = torch.tensor([0, 2]), torch.tensor([4, 0])
    user, tokens = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 9, dtype=torch.long)
    with count_launches() as n:
        TD.frame_input_tokens(buf, rows, pos, user, delays, initial)
        TD.frame_output_tokens(buf, rows, pos, tokens, delays, max_delay)
    assert n == {"frame_input_tokens": 1, "frame_output_tokens": 1}
    bad_calls = [
        ("buf", lambda: TD.frame_input_tokens(buf.int(), rows, pos, user, delays, initial)),
        ("rows", lambda: TD.frame_input_tokens(buf, rows.int(), pos, user, delays, initial)),
        ("positions", lambda: TD.frame_input_tokens(buf, rows, pos[:1], user, delays, initial)),
        ("delays", lambda: TD.frame_input_tokens(buf, rows, pos, user, delays[:-1], initial)),
        ("user", lambda: TD.frame_input_tokens(buf, rows, pos, user[:1], delays, initial)),
        ("initial", lambda: TD.frame_input_tokens(buf, rows, pos, user, delays, initial[:3])),
        ("out", lambda: TD.frame_input_tokens(buf, rows, pos, user, delays, initial, out=torch.zeros(2, 16).long())),
        ("tokens", lambda: TD.frame_output_tokens(buf, rows, pos, tokens[:, :0], delays, max_delay)),
        ("max_delay", lambda: TD.frame_output_tokens(buf, rows, pos, tokens, delays, max_delay + 2)),
    ]
    for name, call in bad_calls:
        with pytest.raises(ValueError, match=name):
            call()
