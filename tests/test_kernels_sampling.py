"""moshivis_kernels.sampling against plain PyTorch (interpreter on CPU; fp32 logits unless stated).

Sampled tokens are compared EXACTLY with sample_tokens_reference, which rebuilds the kernel's Philox
uniforms with int64 arithmetic; the reference's Philox is itself checked against published Philox4x32-10
test vectors and against triton's own tl.randint4x / tl.rand.
"""
import math

import pytest
import torch

from moshivis_kernels import count_launches
from moshivis_kernels import sampling as S

import triton  # noqa: E402  (after moshivis_kernels: it chooses the interpreter before any @triton.jit)
import triton.language as tl  # noqa: E402

# the interpreter reads scalar kernel arguments (range(0, V, BLOCK)) through a numpy call NumPy deprecates
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

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
])
def test_bad_inputs_name_the_argument(name, bad, err):
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
