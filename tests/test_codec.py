"""The batched streaming Mimi (`moshivis.codec.MimiStreams`) against transformers' own Mimi.

Oracles: `MimiModel.encode` on each stream's whole signal (codes exactly equal), its encoder half
for the continuous latents the codes quantize (within 2e-6 of their largest magnitude, measured
~1e-6: GEMMs sum in another order than the whole-signal convolutions), and each
stream alone through the per-stream `DecoderStream` of `moshivis.audio` (PCM within 1e-5 fp32,
measured ~6e-7). The model is test_e2e's tiny random Mimi: the real frame (24 kHz, SEANet ratios
8, 6, 5, 4, two transformer layers) at tiny widths, with a sliding window of 4 tokens, so the KV ring
buffer (4 + 2 - 1 entries) wraps every few frames of these tests; its codebooks are scaled to its
latents, and the encode test checks that no code of its inputs is a near-tie (nearest and second
nearest entry within 2e-5 relative, 20x the latents' error), where rounding could pick either.
"""
from __future__ import annotations

import random

import pytest
import torch
from moshivis.demo import tiny_mimi
from transformers import MimiModel

from bench.codec import fit_codebooks
from moshivis.audio import AudioError, MimiCodec
from moshivis.codec import PAD_SLOT, MimiStreams

FRAME, NQ, CARD = 1920, 8, 64
pytestmark = [pytest.mark.filterwarnings("error::UserWarning"),  # e.g. an `out=` buffer resized by broadcasting
              pytest.mark.usefixtures("one_thread")]
MARGIN = 2e-5  # smallest relative gap between the nearest and second-nearest codebook entry the tests allow


def mimi_with_fitted_codebooks(seed: int) -> MimiModel:
    """test_e2e's tiny Mimi with attention that is not uniform (its random q/k projections gave
    scores of ~0.02, so every key weighed the same and position errors went unseen), quantizing like
    a trained one (`bench.codec.fit_codebooks`: its random latents are ~10x its unit-normal
    codebooks, so the nearest entry won by ~1e-6 relative, within float rounding) and decoding
    within [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # tiny_mimi scales by the std of MimiModel's own (global RNG) init
        torch.manual_seed(seed)
        model = tiny_mimi(gen)
    with torch.no_grad():  # attention scores of a few units, not ~0.02: softmax weights (RoPE, mask) matter
        for transformer in (model.encoder.encoder_transformer, model.decoder.decoder_transformer):
            for layer in transformer.layers:
                layer.self_attn.q_proj.weight.mul_(10)
                layer.self_attn.k_proj.weight.mul_(10)
                layer.self_attn_layer_scale.scale.mul_(10)
    fit_codebooks(model, gen, NQ)
    return model


def nearest_margin(model: MimiModel, signal: torch.Tensor) -> float:
    """The smallest relative gap (second - nearest) / nearest of the distances behind every code of
    MimiModel.encode(signal): codes can only be compared exactly where rounding cannot swap the two."""
    gaps, q = [], model.quantizer
    with torch.no_grad():
        latents = model.encoder(signal[None, None]).latents
        for rvq, count in ((q.semantic_residual_vector_quantizer, q.num_semantic_quantizers),
                           (q.acoustic_residual_vector_quantizer, NQ - q.num_semantic_quantizers)):
            residual = rvq.input_proj(latents)[0].T
            for layer in rvq.layers[:count]:
                dist = torch.cdist(residual[None], layer.codebook.embed[None])[0].sort(-1).values
                gaps.append((dist[:, 1] - dist[:, 0]) / dist[:, 0])
                residual = residual - layer.codebook.embed[layer.codebook.quantize(residual)]
    return float(torch.cat(gaps).min())


@pytest.fixture(scope="module")
def mimi():
    return mimi_with_fitted_codebooks(4321)


@pytest.fixture(scope="module")
def codec(mimi):
    return MimiCodec(mimi, NQ)


def schedule(streams: dict, frames: int, max_streams: int, seed: int):
    """Per frame, its rows: (name, frame index) or None for padding. Streams are {name: (slot, start,
    length)}; rows come in a shuffled order with padding rows mixed in (none in the first frame)."""
    rng = random.Random(seed)
    out = []
    for t in range(frames):
        live = [(n, t - start) for n, (slot, start, length) in streams.items() if start <= t < start + length]
        pads = 0 if t == 0 else rng.randint(0, max(0, max_streams - len(live))) if live else 1
        rows = live + [None] * pads
        rng.shuffle(rows)
        out.append(rows)
    return out


def slots_of(rows, streams):
    return [PAD_SLOT if r is None else streams[r[0]][0] for r in rows]


# Five streams through four slots: C joins late, D reuses A's slot after A left (past the window),
# E reuses B's slot in the frame after B's last.
STREAMS = {"A": (0, 0, 7), "B": (1, 1, 9), "C": (2, 4, 11), "D": (0, 8, 8), "E": (1, 10, 6)}
FRAMES = 16


def test_streams_joining_at_different_frames_encode_like_whole_signal_mimi(mimi, codec, gen):
    streams = MimiStreams(codec, max_streams=4)
    pcm = {n: 0.3 * torch.randn(length * FRAME, generator=gen) for n, (_, _, length) in STREAMS.items()}
    codes = {n: torch.full((NQ, length), -1) for n, (_, _, length) in STREAMS.items()}
    latents = {n: torch.full((length, mimi.config.hidden_size), float("nan")) for n, (_, _, length) in STREAMS.items()}
    buckets = set()
    for rows in schedule(STREAMS, FRAMES, 4, seed=1):
        for r in rows:
            if r is not None and r[1] == 0:
                streams.reset(STREAMS[r[0]][0])
        x = torch.stack([torch.zeros(FRAME) if r is None else pcm[r[0]][r[1] * FRAME:(r[1] + 1) * FRAME]
                         for r in rows])
        lat = torch.full((len(rows), mimi.config.hidden_size), float("nan"))
        out = streams.encode(x, slots_of(rows, STREAMS), latents=lat)
        buckets.add(min(1 << (len(rows) - 1).bit_length(), 4))
        for i, r in enumerate(rows):
            if r is not None:
                codes[r[0]][:, r[1]] = out[i]
                latents[r[0]][r[1]] = lat[i]
    assert buckets == {1, 2, 4}
    worst = 0.0
    with torch.no_grad():
        for n, signal in pcm.items():
            assert nearest_margin(mimi, signal) > MARGIN, f"stream {n}'s input has a near-tie code: change its seed"
            whole = mimi.encode(signal[None, None], num_quantizers=NQ).audio_codes[0]      # [NQ, frames]
            assert torch.equal(codes[n], whole), n
            ref = mimi.encoder(signal[None, None]).latents[0].T                            # [frames, hidden]
            scale = float(ref.abs().max())
            torch.testing.assert_close(latents[n], ref, atol=2e-6 * scale, rtol=0)
            worst = max(worst, float((latents[n] - ref).abs().max()) / scale)
    print(f"encode: max |batched - MimiEncoderModel| latents = {worst:.1e} of their largest magnitude")


def test_streams_joining_at_different_frames_decode_like_each_stream_alone(codec, gen):
    streams = MimiStreams(codec, max_streams=4)
    codes = {n: torch.randint(0, CARD, (length, NQ), generator=gen) for n, (_, _, length) in STREAMS.items()}
    alone = {n: codec.decoder() for n in STREAMS}
    worst = peak = 0.0
    for rows in schedule(STREAMS, FRAMES, 4, seed=2):
        for r in rows:
            if r is not None and r[1] == 0:
                streams.reset(STREAMS[r[0]][0])
        x = torch.stack([torch.zeros(NQ, dtype=torch.long) if r is None else codes[r[0]][r[1]] for r in rows])
        out = torch.full((len(rows), FRAME), float("nan"))
        streams.decode(x, slots_of(rows, STREAMS), out=out)
        for i, r in enumerate(rows):
            if r is not None:
                ref = alone[r[0]].step(codes[r[0]][r[1]][None])[0]
                torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)
                worst = max(worst, float((out[i] - ref).abs().max()))
                peak = max(peak, float(ref.abs().max()))
    assert 1e-2 < peak <= 1  # audio, not silence
    print(f"decode: max |batched - DecoderStream| = {worst:.1e} (PCM peak {peak:.2f})")


def test_a_reused_slot_carries_nothing_over(codec, gen):
    """Stream X fills slot 2 past the window; after reset(2), stream Y in slot 2 equals Y in a fresh
    codec, both directions. Without the reset it would not (the probe can fail)."""
    pcm_x, pcm_y = 0.3 * torch.randn(6, FRAME, generator=gen), 0.3 * torch.randn(5, FRAME, generator=gen)
    codes_x, codes_y = torch.randint(0, CARD, (6, NQ), generator=gen), torch.randint(0, CARD, (5, NQ), generator=gen)

    def run(streams, pcm, codes, slot):
        enc = torch.stack([streams.encode(pcm[t][None], [slot])[0] for t in range(len(pcm))])
        dec = torch.stack([streams.decode(codes[t][None], [slot])[0] for t in range(len(codes))])
        return enc, dec

    fresh = run(MimiStreams(codec, 3), pcm_y, codes_y, 0)
    used = MimiStreams(codec, 3)
    run(used, pcm_x, codes_x, 2)
    stale = run(used, pcm_y, codes_y, 2)
    assert not torch.equal(stale[0], fresh[0]) and not torch.allclose(stale[1], fresh[1], atol=1e-3, rtol=0)
    used.reset(2)
    run(used, pcm_x, codes_x, 2)
    used.reset(2)
    enc, dec = run(used, pcm_y, codes_y, 2)
    assert torch.equal(enc, fresh[0])
    torch.testing.assert_close(dec, fresh[1], atol=1e-5, rtol=0)


def test_padding_rows_and_padding_only_frames_touch_no_stream(codec, gen):
    """A stream stepped in frames full of padding rows (after a warm-up on padding rows, and with
    padding-only frames between its own) gives what it gives alone."""
    pcm = 0.3 * torch.randn(6, FRAME, generator=gen)
    codes = torch.randint(0, CARD, (6, NQ), generator=gen)
    alone = MimiStreams(codec, 4)
    ref_enc = torch.stack([alone.encode(pcm[t][None], [1])[0] for t in range(6)])
    ref_dec = torch.stack([alone.decode(codes[t][None], [1])[0] for t in range(6)])
    busy = MimiStreams(codec, 4)
    busy.warmup()  # every bucket's buffers, on padding rows only
    assert set(busy.encoder.plans) == set(busy.decoder.plans) == {1, 2, 4}
    for t in range(6):
        noise = torch.randn(3, FRAME, generator=gen)
        enc = busy.encode(torch.cat([noise[:2], pcm[t][None], noise[2:]]), [PAD_SLOT, PAD_SLOT, 1, PAD_SLOT])
        dec = busy.decode(torch.cat([codes[t][None], torch.randint(0, CARD, (2, NQ), generator=gen)]),
                          [1, PAD_SLOT, PAD_SLOT])
        assert torch.equal(enc[2], ref_enc[t])
        torch.testing.assert_close(dec[0], ref_dec[t], atol=1e-5, rtol=0)
        busy.encode(noise, [PAD_SLOT] * 3)
        busy.decode(torch.randint(0, CARD, (1, NQ), generator=gen), [PAD_SLOT])


def test_bad_input_raises_a_clear_error_and_changes_no_state(codec, gen):
    streams = MimiStreams(codec, 4)
    alone = MimiStreams(codec, 4)
    pcm, codes = 0.3 * torch.randn(4, FRAME, generator=gen), torch.randint(0, CARD, (4, NQ), generator=gen)
    for t in range(2):
        streams.encode(pcm[t][None], [3])
        alone.encode(pcm[t][None], [3])
        streams.decode(codes[t][None], [3])
        alone.decode(codes[t][None], [3])
    bad = [
        (lambda: streams.encode(torch.zeros(1, 1000), [3]), r"pcm must be a float tensor \[1, 1920\]"),
        (lambda: streams.encode(torch.zeros(2, FRAME), [3]), r"pcm must be a float tensor \[1, 1920\]"),
        (lambda: streams.encode(torch.zeros(1, FRAME, dtype=torch.long), [3]), r"pcm must be a float tensor"),
        (lambda: streams.encode(pcm[:1], [4]), r"slots: slot 4 is not a slot of this codec \(0 <= slot < 4\)"),
        (lambda: streams.encode(pcm[:1], [-2]), r"slot -2 is not a slot"),
        (lambda: streams.encode(pcm[:2], [3, 3]), r"slot 3 appears twice"),
        (lambda: streams.encode(torch.zeros(5, FRAME), [0, 1, 2, 3, -1]), r"1 to 4 rows \(max_streams\), got 5"),
        (lambda: streams.encode(pcm[:1], []), r"1 to 4 rows"),
        (lambda: streams.encode(pcm[:1], [3], out=torch.empty(1, NQ, dtype=torch.int32)), r"out must be a CPU"),
        (lambda: streams.decode(torch.full((1, NQ), CARD), [3]), r"codes\[0, 0\] = 64 \(slot 3\) is out of range"),
        (lambda: streams.decode(torch.tensor([[0, 1, 2, 3, 4, 5, 6, -1]]), [3]), r"codes\[0, 7\] = -1"),
        (lambda: streams.decode(torch.zeros(1, NQ - 1, dtype=torch.long), [3]),
         r"codes must be an integer tensor \[1, 8\]"),
        (lambda: streams.decode(torch.zeros(1, NQ), [3]), r"codes must be an integer tensor"),
        (lambda: streams.reset(7), r"reset: slot 7 is not a slot"),
        (lambda: streams.reset("0"), r"reset: slot '0' is not a slot"),
        (lambda: MimiStreams(codec, 0), r"max_streams must be a positive integer"),
    ]
    for call, message in bad:
        with pytest.raises(AudioError, match=message):
            call()
    for t in range(2, 4):  # the stream goes on as if nothing had happened
        assert torch.equal(streams.encode(pcm[t][None], [3]), alone.encode(pcm[t][None], [3]))
        torch.testing.assert_close(streams.decode(codes[t][None], [3]), alone.decode(codes[t][None], [3]),
                                   atol=0, rtol=0)


def _profiled_allocations(step) -> list[tuple[str, int]]:
    """(op, bytes) of every CPU tensor allocation made by step(), seen by the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]


def test_steady_frames_allocate_nothing(codec, gen):
    """Once a bucket has run, encode and decode with `out=` allocate no tensor (three rows in the
    bucket of four, one padding row). The same probe sees a call without `out=` allocate."""
    streams = MimiStreams(codec, 4)
    pcm, codes = torch.randn(3, FRAME, generator=gen), torch.randint(0, CARD, (3, NQ), generator=gen)
    slots = [2, PAD_SLOT, 0]
    out_codes, out_pcm = torch.empty(3, NQ, dtype=torch.long), torch.empty(3, FRAME)
    streams.encode(pcm, slots, out=out_codes)
    streams.decode(codes, slots, out=out_pcm)
    assert _profiled_allocations(lambda: streams.encode(pcm, slots, out=out_codes)) == []
    assert _profiled_allocations(lambda: streams.decode(codes, slots, out=out_pcm)) == []
    assert _profiled_allocations(lambda: streams.decode(codes, slots))  # the probe works


@pytest.mark.gpu(reason="needs a CUDA device (CUDA graphs)")
def test_cuda_graphs_replay_the_batched_codec(mimi, gen):
    """On a GPU each bucket's frame is captured once and replayed; streams joining, leaving and
    reusing slots through the graphs give the CPU codec's codes and PCM (fp32, TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = MimiStreams(MimiCodec(mimi, NQ), 4)
    gpu_model = mimi_with_fitted_codebooks(4321).cuda()
    gpu = MimiStreams(MimiCodec(gpu_model, NQ), 4)
    gpu.warmup()
    assert gpu.graph_error is None
    pcm = {n: 0.3 * torch.randn(length * FRAME, generator=gen) for n, (_, _, length) in STREAMS.items()}
    codes = {n: torch.randint(0, CARD, (length, NQ), generator=gen) for n, (_, _, length) in STREAMS.items()}
    for rows in schedule(STREAMS, FRAMES, 4, seed=3):
        for r in rows:
            if r is not None and r[1] == 0:
                cpu.reset(STREAMS[r[0]][0])
                gpu.reset(STREAMS[r[0]][0])
        slots = slots_of(rows, STREAMS)
        x = torch.stack([torch.zeros(FRAME) if r is None else pcm[r[0]][r[1] * FRAME:(r[1] + 1) * FRAME]
                         for r in rows])
        c = torch.stack([torch.zeros(NQ, dtype=torch.long) if r is None else codes[r[0]][r[1]] for r in rows])
        real = [i for i, r in enumerate(rows) if r is not None]
        assert torch.equal(gpu.encode(x, slots)[real], cpu.encode(x, slots)[real])
        torch.testing.assert_close(gpu.decode(c, slots)[real], cpu.decode(c, slots)[real], atol=1e-4, rtol=0)
    assert all(p.graph is not None for d in (gpu.encoder, gpu.decoder) for p in d.plans.values())
