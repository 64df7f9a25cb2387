"""Sampling through the engine against math, not against the engine: each stream's own parameters are the
ones applied, per codebook, on both backends.

Oracles, none of them the engine or its sampler:
  - greedy or top-k 1: the token is the first argmax of the logits the engine returns for that frame;
  - the draw itself: the Gumbel-max race written out here, argmax over the top K of l / T - log(-log u),
    with u keyed by (seed, frame, codebook) as `moshivis_kernels.sampling` documents it, from Philox4x32-10
    (`philox4x32_reference`, checked against Random123's published vectors and triton's tl.rand in
    test_kernels.py);
  - the distribution of many draws (many streams, one seed each, identical logits): a chi-square test
    (Monte-Carlo p-value) against softmax(l / T) over the top K, computed in float64 here.
The returned tokens are realigned by the delays of the config (SPEC.md §7): token j handed out at frame t
was drawn at frame t - max_delay + delays[j].
"""
from __future__ import annotations

import pytest
import torch

from moshivis import Engine, SamplingParams
from moshivis_kernels.sampling import philox4x32_reference, uint32_to_uniform_reference

ALPHA = 1e-3  # significance of the chi-square tests; every seed is fixed, so each run is deterministic


def handed_out(cfg, tokens: torch.Tensor):
    """(t, j, s) for every token tokens[t, :, j] handed out (t >= max_delay): codebook j (0 = text) drawn at
    frame s = t - max_delay + delays[j] (SPEC.md §7; the golden README spells out the tiny config's case)."""
    for t in range(cfg.max_delay, tokens.shape[0]):
        for j in range(1 + cfg.dep_q):
            yield t, j, t - cfg.max_delay + cfg.delays[j]


def gumbel_race(logits: torch.Tensor, temperature: float, top_k: int, seed: int, frame: int, codebook: int) -> int:
    """The token a stream must draw (rule of `moshivis_kernels.sampling`, written out here): greedy at T <= 0,
    else argmax over {v : l[v] >= l_(K)} (all v when K <= 0 or K >= V) of l[v] / T - log(-log u[v]), where
    u[v] is word v mod 4 of Philox4x32-10 with key = seed and counter = (v div 4, codebook, frame)."""
    x = logits.float()
    V = x.shape[0]
    if temperature <= 0:
        return int(x.argmax())
    counter = torch.arange((V + 3) // 4, dtype=torch.int64)
    full = lambda value: torch.full_like(counter, value)  # noqa: E731
    words = philox4x32_reference(torch.tensor(seed, dtype=torch.int64), counter, full(codebook),
                                 full(frame & 0xFFFFFFFF), full(frame >> 32))
    u = uint32_to_uniform_reference(torch.stack(words, dim=1).reshape(-1)[:V])
    keep = torch.ones(V, dtype=torch.bool) if top_k <= 0 or top_k >= V else x >= torch.topk(x, top_k).values[-1]
    return int(torch.where(keep, x / temperature - torch.log(-torch.log(u)), float("-inf")).argmax())


def topk_softmax(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    p = torch.softmax(logits.double() / temperature, -1)
    if 0 < top_k < logits.numel():
        p = torch.where(logits >= torch.topk(logits, top_k).values[-1], p, 0.0)
    return p / p.sum()


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, simulations: int = 10_000) -> float:
    """Monte-Carlo p-value of Pearson's chi-square statistic of `counts` against `probs` (tokens of
    probability 0 left out; they are checked apart): the share of `simulations` multinomial samples of the
    same size whose statistic is at least the observed one (R's chisq.test(simulate.p.value = TRUE)). Valid
    for any number of draws, the few of the Triton interpreter included; seeded, so deterministic."""
    p = probs[probs > 0].double()
    n = int(counts.sum())
    g = torch.Generator().manual_seed(n)
    drawn = torch.multinomial(p.float().expand(simulations, -1), n, replacement=True, generator=g)
    simulated = torch.zeros(simulations, p.numel(), dtype=torch.float64).scatter_add_(
        1, drawn, torch.ones(drawn.shape, dtype=torch.float64))
    statistic = lambda c: ((c - n * p) ** 2 / (n * p)).sum(-1)  # noqa: E731
    observed = statistic(counts[probs > 0].double())
    return float((1 + (statistic(simulated) >= observed - 1e-9).sum()) / (1 + simulations))


# ---- per codebook, per stream: the parameters asked for are the ones applied --------------------------
TEXT_GREEDY = SamplingParams(temperature_text=0.0, top_k_text=25, temperature_audio=2.0, top_k_audio=0)
AUDIO_TOP1 = SamplingParams(temperature_text=2.0, top_k_text=0, temperature_audio=1.0, top_k_audio=1)
SWAPPED = [SamplingParams(temperature_text=1.7, top_k_text=3, temperature_audio=0.6, top_k_audio=11),
           SamplingParams(temperature_text=0.6, top_k_text=11, temperature_audio=1.7, top_k_audio=3,
                          repetition_penalty=1.6, repetition_penalty_context=4)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_each_codebook_draws_with_its_streams_own_parameters(tiny_cfg, tiny_weights, gen, backend):
    """Four streams in one batch: text greedy with audio sampled hot; text sampled hot with audio at top-k 1;
    and two streams whose text and audio parameters are each other's swapped (one with a repetition
    penalty). Every drawn token of every codebook and frame is the Gumbel race of its stream's own (T, K,
    seed, frame, codebook) over the logits returned with it; greedy and top-k 1 codebooks are the plain
    argmax, and the sampled ones are not always (the check could fail). The Triton interpreter runs 3 frames
    (2 drawn frames of text and codebook 0, 3 of the others), torch 6."""
    cfg = tiny_cfg
    frames = 6 if backend == "torch" else 3
    specs = [(11, TEXT_GREEDY), (12, AUDIO_TOP1), (13, SWAPPED[0]), (2**62 + 5, SWAPPED[1])]
    engine = Engine(cfg, dict(tiny_weights), max_streams=4, backend=backend)
    ids = [engine.open_stream(seed=seed, sampling=sp) for seed, sp in specs]
    user = torch.randint(-1, cfg.audio_card, (frames, len(ids), cfg.num_audio_in), generator=gen)
    tokens, text, audio = zip(*(engine.step(user[t], ids, return_logits=True) for t in range(frames)))
    tokens, text, audio = torch.stack(tokens), torch.stack(text), torch.stack(audio)
    assert (tokens[cfg.max_delay:] >= 0).all()
    is_argmax = {}  # (stream, text or audio) -> whether each of its tokens was the argmax
    for t, j, s in handed_out(cfg, tokens):
        for b, (seed, sp) in enumerate(specs):
            T, K = (sp.temperature_text, sp.top_k_text) if j == 0 else (sp.temperature_audio, sp.top_k_audio)
            row = text[s, b] if j == 0 else audio[s, b, j - 1]
            token = int(tokens[t, b, j])
            assert token == gumbel_race(row, T, K, seed, s, j), (b, t, j)
            is_argmax.setdefault((b, min(j, 1)), []).append(token == int(row.argmax()))
    assert all(is_argmax[0, 0]) and not all(is_argmax[0, 1])  # text at T = 0; audio at T = 2, all kept
    assert all(is_argmax[1, 1]) and not all(is_argmax[1, 0])  # audio at top-k 1; text at T = 2, all kept


# ---- the distribution of many draws ---------------------------------------------------------------------
TEXT_T, TEXT_K, AUDIO_T, AUDIO_K = 1.6, 5, 0.7, 9  # distinct, so parameters applied to the wrong codebook show
DISTRIBUTION = SamplingParams(temperature_text=TEXT_T, top_k_text=TEXT_K, temperature_audio=AUDIO_T,
                              top_k_audio=AUDIO_K)


def identical_logit_draws(engine, cfg, streams_per_group: int, rounds: int, gen) -> dict[int, tuple]:
    """Draws of three codebooks from many streams (one seed each) whose logits for that codebook are the
    same: every stream gets the same user tokens, and the tokens before the codebook under test are forced
    to the same values. Group "text" draws its text token at frame 0; group "audio 0" its audio codebook 0
    at frame 0 (text forced); group "audio 7" its last audio codebook at frame 1 (frame 0 wholly forced, then
    text and codebooks 0..6). All three come out at frame 1. Returns {codebook j: (tokens [N], logits [N, V])}."""
    n, J = streams_per_group, 1 + cfg.dep_q
    user = torch.randint(0, cfg.audio_card, (2, 1, cfg.num_audio_in), generator=gen).expand(-1, 3 * n, -1)
    fixed = torch.cat([torch.randint(0, cfg.text_card, (2, 1), generator=gen),
                       torch.randint(0, cfg.audio_card, (2, cfg.dep_q), generator=gen)], dim=1)
    forced = torch.full((2, 3 * n, J), -1, dtype=torch.long)
    forced[0, n: 2 * n, 0] = fixed[0, 0]
    forced[0, 2 * n:] = fixed[0]
    forced[1, 2 * n:, : J - 1] = fixed[1, : J - 1]
    got = {0: ([], []), 1: ([], []), J - 1: ([], [])}
    for r in range(rounds):
        ids = [engine.open_stream(seed=7919 * (r * 3 * n + b) + 1, sampling=DISTRIBUTION) for b in range(3 * n)]
        _, text0, audio0 = engine.step(user[0], ids, forced_tokens=forced[0], return_logits=True)
        tokens1, _, audio1 = engine.step(user[1], ids, forced_tokens=forced[1], return_logits=True)
        for g, (j, logits) in enumerate([(0, text0), (1, audio0[:, 0]), (J - 1, audio1[:, J - 2])]):
            rows = slice(g * n, (g + 1) * n)
            got[j][0].append(tokens1[rows, j])
            got[j][1].append(logits[rows])
        for i in ids:
            engine.close_stream(i)
    return {j: (torch.cat(t), torch.cat(l)) for j, (t, l) in got.items()}


@pytest.mark.parametrize("backend, streams, rounds", [("torch", 80, 12), ("triton", 16, 1)])
def test_draws_follow_softmax_over_the_top_k(tiny_cfg, tiny_weights, gen, backend, streams, rounds):
    """Text, audio codebook 0 and the last audio codebook, each drawn by many streams from identical logits
    at the streams' (T, top-k) (text 1.6 and 5, audio 0.7 and 9): no token outside the top k, and the counts
    pass a chi-square test against softmax(l / T) over the top k (p > 1e-3). 960 draws per codebook on torch;
    16 on the Triton interpreter (slow), where the per-draw race above is the sharp check. A seed ignored, a
    parameter of the other codebook or a top-k off by one fail it: the streams would all draw one token, or
    draw from another distribution."""
    cfg = tiny_cfg
    engine = Engine(cfg, dict(tiny_weights), max_streams=3 * streams, backend=backend)
    for j, (tokens, logits) in identical_logit_draws(engine, cfg, streams, rounds, gen).items():
        # the same inputs in other rows: measured 0 apart on torch, 1.4e-6 on the Triton interpreter
        torch.testing.assert_close(logits, logits[:1].expand_as(logits), atol=1e-5, rtol=0)
        T, K = (TEXT_T, TEXT_K) if j == 0 else (AUDIO_T, AUDIO_K)
        probs = topk_softmax(logits[0], T, K)
        counts = torch.bincount(tokens, minlength=logits.shape[1])
        assert counts[probs == 0].sum() == 0, (j, counts, probs)
        assert chi2_pvalue(counts, probs) > ALPHA, (j, counts, probs * counts.sum())
