"""Temporal-transformer kernels against plain PyTorch, in the interpreter on CPU (fp32, 1e-4):
self-attention decode (RoPE + KV ring-buffer append + windowed attention) and the input embedding sum.

The interpreter's bf16 conversions truncate instead of rounding, so bf16 is checked only by the static
audit (bench/audit.py); here every tensor is fp32.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from moshivis import reference as R
from moshivis.config import tiny
from moshivis_kernels import count_launches
from moshivis_kernels.embedding import embed_tokens, embed_tokens_reference
from moshivis_kernels.self_attention import (self_attention_decode, self_attention_decode_reference,
                                             self_attention_workspace)

FP32_TOL = {"atol": 1e-4, "rtol": 1e-4}
NAN = float("nan")

# (heads, head_dim, context, launches of the combine kernel): one split; two splits, the second one
# partial; ten splits, most of them empty while the window fills.
SA_SHAPES = [(2, 16, 37, 0), (2, 128, 37, 1), (1, 128, 300, 1)]


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


# ---- self-attention decode ----------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ["filling", "wrap", "far", "mixed"])
@pytest.mark.parametrize("H, D, ctx, combines", SA_SHAPES)
def test_self_attention_decode_matches_reference(gen, H, D, ctx, combines, scenario):
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
    assert launches == {"self_attention_decode": 1, **({"self_attention_combine": 1} if combines else {})}
    torch.testing.assert_close(got, want, **FP32_TOL)

    written = _written(kv.shape, rows, positions)
    torch.testing.assert_close(kv.transpose(1, 2)[written], kv_ref.transpose(1, 2)[written], **FP32_TOL)
    assert torch.equal(kv.transpose(1, 2)[~written], before[1].transpose(1, 2)[~written])  # rest untouched
    assert torch.equal(kv_all[0], before[0])  # the other layer too


def test_self_attention_decode_streaming_matches_model_reference(gen):
    """Frames of moshivis.reference.self_attention against qkv projection + kernel + out projection, with
    the kernel's own reference beside them; three streams fill, wrap and run far past the context."""
    cfg = dataclasses.replace(tiny(), dim=256, num_heads=2, context=37)  # head_dim 128: two splits
    dim, H, D, ctx = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.context
    p = "llm.transformer.layers.0"
    w = {f"{p}.norm1.alpha": torch.rand(1, 1, dim, generator=gen) + 0.5,
         f"{p}.self_attn.in_proj_weight": torch.randn(3 * dim, dim, generator=gen) / math.sqrt(dim),
         f"{p}.self_attn.out_proj.weight": torch.randn(dim, dim, generator=gen) / math.sqrt(dim)}
    S = 6
    rows = torch.tensor([5, 1, 3])
    positions = torch.tensor([0, ctx - 6, 5 * ctx - 3])
    kv_model = torch.randn(S, 2, ctx, H, D, generator=gen)  # history of slots' previous users
    kv_kernel, kv_mine = kv_model.clone(), kv_model.clone()
    workspace = self_attention_workspace(3, H, D, ctx, "cpu")
    assert workspace is not None

    for _ in range(9):
        x = torch.randn(3, dim, generator=gen)
        want = R.self_attention(w, cfg, 0, x, kv_model, rows, positions)
        qkv = F.linear(R.rms_norm(x, w[f"{p}.norm1.alpha"]), w[f"{p}.self_attn.in_proj_weight"])
        project = lambda attn: x + F.linear(attn, w[f"{p}.self_attn.out_proj.weight"])  # noqa: E731
        mine = project(self_attention_decode_reference(qkv, kv_mine, rows, positions, max_period=cfg.max_period))
        torch.testing.assert_close(mine, want, atol=1e-6, rtol=1e-6)
        assert torch.equal(kv_mine, kv_model)
        workspace.fill_(NAN)
        got = project(self_attention_decode(qkv, kv_kernel, rows, positions, max_period=cfg.max_period,
                                            workspace=workspace))
        torch.testing.assert_close(got, want, **FP32_TOL)
        torch.testing.assert_close(kv_kernel, kv_model, **FP32_TOL)
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
    torch.testing.assert_close(got, want, **FP32_TOL)
    torch.testing.assert_close(kv, kv_ref, **FP32_TOL)
    if ctx == 1:  # softmax over one key: the new v itself
        torch.testing.assert_close(got, qkv[:, 2 * H * D:], **FP32_TOL)


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
])
def test_self_attention_decode_rejects_bad_inputs(change, name):
    args = _sa_inputs()
    change(args)
    with pytest.raises((ValueError, TypeError), match=name):
        self_attention_decode(args.pop("qkv"), args.pop("kv"), args.pop("rows"), args.pop("positions"), **args)


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
    torch.testing.assert_close(got, embed_tokens_reference(tokens, text, audio), **FP32_TOL)
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
    torch.testing.assert_close(got, want, **FP32_TOL)


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
