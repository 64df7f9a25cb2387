"""The reference model's building blocks against math written independently of it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moshivis import reference as R


def test_rms_norm_and_var_norm(gen):
    x = torch.randn(5, 37, generator=gen, dtype=torch.float64) * 3
    alpha = torch.randn(1, 1, 37, generator=gen, dtype=torch.float64)
    want = x * alpha[0] / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-8)
    # The temporal norm computes in float32 whatever the input dtype (as Kyutai's code): fp32 tolerance.
    torch.testing.assert_close(R.rms_norm(x, alpha), want, atol=1e-5, rtol=1e-5)
    centred = x - x.mean(-1, keepdim=True)
    var = (centred ** 2).sum(-1, keepdim=True) / (x.shape[-1] - 1)  # unbiased
    torch.testing.assert_close(R.var_norm(x, alpha, 1e-5), x * alpha[0] / torch.sqrt(var + 1e-5))


def test_rope_rotates_interleaved_pairs_like_complex_multiplication(gen):
    B, H, D = 3, 2, 8
    x = torch.randn(B, H, D, generator=gen)
    pos = torch.tensor([0, 5, 2999])
    z = torch.view_as_complex(x.reshape(B, H, D // 2, 2).contiguous())
    theta = pos[:, None, None].double() * 10000.0 ** (-2 * torch.arange(D // 2).double() / D)
    want = torch.view_as_real(z * torch.polar(torch.ones_like(theta), theta).to(z.dtype)).reshape(B, H, D)
    torch.testing.assert_close(R.rope(x, pos, 10000), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(R.rope(x, pos, 10000)[0], x[0])  # position 0: identity


def test_attention_matches_sdpa_with_mask(gen):
    B, T, H, D = 3, 11, 4, 16
    q = torch.randn(B, H, D, generator=gen)
    k, v = torch.randn(2, B, T, H, D, generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.6
    mask[:, 0] = True
    want = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask[:, None, None, :])[:, :, 0]
    torch.testing.assert_close(R.attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)


def test_embed_zero_token_gives_exact_zeros(gen):
    table = torch.randn(10, 4, generator=gen)
    out = R.embed(table, torch.tensor([[3, -1, 0]]))
    assert torch.equal(out[0, 0], table[3]) and torch.equal(out[0, 1], torch.zeros(4))


def test_swiglu_and_int8_linear(gen):
    x = torch.randn(2, 6, generator=gen)
    w = {"m.linear_in.weight": torch.randn(10, 6, generator=gen), "m.linear_out.weight": torch.randn(6, 5, generator=gen)}
    u = x @ w["m.linear_in.weight"].T
    want = (u[:, :5] * torch.sigmoid(u[:, :5]) * u[:, 5:]) @ w["m.linear_out.weight"].T
    torch.testing.assert_close(R.swiglu(w, "m", x), want)
    # int8 (bitsandbytes naming: the scales of `m.linear_in.weight` are `m.linear_in.SCB`): CB * SCB / 127.
    cb = torch.randint(-127, 128, (10, 6), generator=gen, dtype=torch.int8)
    scb = torch.rand(10, generator=gen) + 0.5
    q = {"m.linear_in.weight": cb, "m.linear_in.SCB": scb}
    torch.testing.assert_close(R.linear(q, "m.linear_in.weight", x, rows=slice(2, 7)),
                               x @ (cb[2:7].float() * scb[2:7, None] / 127).T, atol=1e-5, rtol=1e-5)
