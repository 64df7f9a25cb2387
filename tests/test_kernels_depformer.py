"""The depformer step kernel (moshivis_kernels.depformer) against its fp32 PyTorch reference.

On CPU the kernel runs in the Triton interpreter, in fp32: a fused launch there has one program (the
grid barrier's single-program case); the multi-launch mode runs several programs. bf16 and the fused
launch over every SM run only on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import moshivis_kernels.depformer as D
from moshivis import reference as R
from moshivis_kernels import count_launches

# the interpreter reads scalar kernel arguments as 1-element arrays when they bound a range()
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
FP32 = dict(atol=1e-4, rtol=1e-4)
BF16 = dict(atol=5e-2, rtol=5e-2)
# odd sizes: no dimension a multiple of a block; head_dim 12 is not a power of two
SMALL = dict(dim=40, dd=24, heads=2, layers=2, hidden=44, card=37, text_rows=29, steps=8)


def random_weights(gen, *, dim, dd, heads, layers, hidden, card, text_rows, steps, dtype=torch.float32,
                   device="cpu") -> D.DepformerWeights:
    """Random weights in the stacked layout, scaled so activations stay O(1) through the layers."""
    def r(*shape, scale=None):
        t = torch.randn(*shape, generator=gen) * (shape[-1] ** -0.5 if scale is None else scale)
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


# ---- the pieces, one phase at a time ----------------------------------------------------------------
@pytest.mark.parametrize("path", ["fma", "dot"])
def test_each_phase_matches_reference(gen, path):
    """Each phase run alone (not fused, 3 programs) from the state the previous one left, against the
    same piece in PyTorch; cache entries of later steps are NaN and must stay unread and unwritten."""
    w = random_weights(gen, **SMALL)
    B = 9 if path == "dot" else int(torch.randint(1, 9, (1,), generator=gen))
    assert D._step_config(B, w.dim, w.dd, w.hidden, w.card, w.head_dim, 3).use_dot == (path == "dot")
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
        torch.testing.assert_close(ws.q, D._var_norm(x, w.norm1[layer]) @ w.in_proj[layer, 3 * w.dd * step:][:w.dd].T,
                                   **FP32)
        torch.testing.assert_close(ws.cache[layer, :, :, :step + 1], cache[layer, :, :, :step + 1], **FP32)
        assert ws.cache[layer + 1:, :, :, step].isnan().all() and ws.cache[:, :, :, step + 1:].isnan().all()
        run(p + 1)
        torch.testing.assert_close(ws.x, want_x, **FP32)

        x = ws.x.clone()
        run(p + 2)
        gate, up = (D._var_norm(x, w.norm2[layer]) @ w.linear_in[layer, step].T).chunk(2, dim=-1)
        torch.testing.assert_close(ws.g, torch.nn.functional.silu(gate) * up, **FP32)
        run(p + 3)
        torch.testing.assert_close(ws.x, D.depformer_ffn_reference(w, layer, step, x), **FP32)
    x = ws.x.clone()
    run(D.num_phases(w) - 1)
    torch.testing.assert_close(out, x @ w.audio_linears[step].T, **FP32)


# ---- whole steps and frames ---------------------------------------------------------------------------
@pytest.mark.parametrize("fused, programs", [(True, 1), (False, 3)])
def test_steps_match_reference(gen, fused, programs):
    """Every step of a frame (random previous tokens) against depformer_step_reference: logits and the
    K/V the step adds to the cache."""
    w = random_weights(gen, **SMALL)
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


def test_dot_path_step_with_int32_tokens_and_strided_h(gen):
    """B = 11 (the tl.dot path, a 16-row tile with 5 masked rows), h a column slice, prev int32."""
    w = random_weights(gen, **{**SMALL, "steps": 3})
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


def test_frame_greedy_is_the_reference_argmax_chain(gen):
    w = random_weights(gen, **SMALL)
    B = random_batch(gen)
    h = torch.randn(B, w.dim, generator=gen)
    text = torch.randint(0, w.text_emb.shape[0], (B,), generator=gen)
    logits = torch.full((B, w.steps, w.card), float("nan"))
    toks = torch.full((B, w.steps), -7, dtype=torch.int64)
    got_t, got_l = D.depformer_frame(w, h, text, nan_workspace(w, B), logits_out=logits, tokens_out=toks)
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
    forced[0, 2] = -1
    got_t, got_l = D.depformer_frame(w, h, forced[:, 0], nan_workspace(w, B), forced=forced, fused=False,
                                     num_programs=2)
    want_t, want_l = D.depformer_frame_reference(w, h, forced[:, 0], forced=forced)
    assert torch.equal(got_t, forced[:, 1:])
    torch.testing.assert_close(got_l, want_l, **FP32)


# ---- Kyutai's keys: the golden tiny checkpoint ------------------------------------------------------------
def test_golden_tiny_weights_match_moshivis_reference(gen, tiny_cfg, tiny_weights):
    """The stacked layout reproduces moshivis.reference.depformer_step on Kyutai's keys, step by step,
    K/V cache included ([L, B, 2, S, H, D] there, [L, 2, B, S, dd] here)."""
    from moshivis.backends.triton import depformer_weights  # the runtime's stacking of Kyutai's keys
    cfg, w = tiny_cfg, depformer_weights(dict(tiny_weights), tiny_cfg)
    B = random_batch(gen)
    h = torch.randn(B, cfg.dim, generator=gen)
    ws = nan_workspace(w, B)
    cache = torch.zeros(cfg.depformer_num_layers, B, 2, cfg.dep_q, cfg.depformer_num_heads, cfg.depformer_head_dim)
    prev = torch.randint(0, cfg.text_card + 1, (B,), generator=gen)
    prev[0] = -1
    for k in range(cfg.dep_q):
        want = R.depformer_step(tiny_weights, cfg, k, h, prev, cache)
        got = D.depformer_step(w, k, h, prev, ws, out=torch.full((B, cfg.audio_card), float("nan")))
        torch.testing.assert_close(got, want, **FP32)
        theirs = cache.permute(0, 2, 1, 3, 4, 5).flatten(-2)[:, :, :, :k + 1]
        torch.testing.assert_close(ws.cache[:, :, :, :k + 1], theirs, **FP32)
        prev = want.argmax(-1)


# ---- launches ------------------------------------------------------------------------------------------
def test_launch_counts(gen):
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


# ---- GPU only: bf16 and the fused launch over every SM --------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (the interpreter's bf16 is unreliable "
                                                               "and it cannot run a multi-program grid barrier)")
MID = dict(dim=512, dd=256, heads=4, layers=3, hidden=700, card=300, text_rows=333, steps=8)


@gpu
@pytest.mark.parametrize("B", [1, 7, 40])
def test_gpu_bf16_fused_matches_unfused_and_reference(gen, B):
    """bf16 weights at a mid size, fused over every SM (grid barriers between phases): repeated launches
    are bit-identical (no atomics on data), and agree with one launch per phase and with the reference."""
    w = random_weights(gen, **MID, dtype=torch.bfloat16, device="cuda")
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


@gpu
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
    logits.zero_()
    toks.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(toks, want_t) and torch.equal(logits, want_l)
