"""The streaming engine: stream lifecycle, images, sampling, and bad input that fails alone.

The oracle is the golden tiny set (Kyutai's outputs) and the engine's own uninterrupted runs.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from moshivis import Engine, ImageError, SamplingParams, StreamError, preset
from moshivis import gates as gates_module
from moshivis.replay import run_stream
from moshivis.state import KV_DTYPES, StreamState

GREEDY = SamplingParams.greedy()


@pytest.fixture
def engine(tiny_cfg, tiny_weights):
    return Engine(tiny_cfg, tiny_weights, max_streams=3)


def step_all(engine, ids, user, t):
    return engine.step(user[:, :, t], ids, return_logits=True)


def test_bad_requests_fail_alone_and_leave_other_streams_intact(engine, golden_streams, tiny_cfg):
    """Interleave every kind of bad request with a golden stream; its outputs must not change."""
    s = golden_streams["stream_image_b2"]
    user, feats = s["user_audio_tokens"], s["image_features"]
    ids = [engine.open_stream(sampling=GREEDY, image=feats[b]) for b in range(2)]
    closed = engine.open_stream()
    engine.close_stream(closed)
    bystander = engine.open_stream(seed=7)
    bad_image = feats[0].clone()
    bad_image[3, 5] = float("nan")
    n, c = tiny_cfg.num_image_tokens, tiny_cfg.image_encoder_dim
    bad_calls = [
        (StreamError, r"token 40 of stream 1 at codebook 3 is out of range \[-1, 40\)",
         lambda: engine.step(user[:, :, 0].index_put((torch.tensor(1), torch.tensor(3)), torch.tensor(40)), ids)),
        (StreamError, r"token -5 of stream 0 at codebook 0",
         lambda: engine.step(user[:, :, 0].index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(-5)), ids)),
        (StreamError, r"user_audio_tokens must have shape \[2, 8\], got \[2, 7\]",
         lambda: engine.step(user[:, :7, 0], ids)),
        (StreamError, r"user_audio_tokens must be an integer tensor",
         lambda: engine.step(user[:, :, 0].float(), ids)),
        (StreamError, rf"stream id {closed} is closed", lambda: engine.step(user[:, :, 0], [ids[0], closed])),
        (StreamError, r"stream id 99 is unknown", lambda: engine.step(user[:, :, 0], [ids[0], 99])),
        (StreamError, r"repeated", lambda: engine.step(user[:, :, 0], [ids[0], ids[0]])),
        (StreamError, r"stream id 99 is unknown", lambda: engine.set_image(99, None)),
        (StreamError, rf"stream id {closed} is closed", lambda: engine.close_stream(closed)),
        (StreamError, r"all max_streams=3 slots are in use", lambda: engine.open_stream()),
        (ImageError, rf"image features for stream {ids[1]} must have shape \[N, {c}\] .* with 1 <= N <= {n} "
                     rf"\(max_image_tokens\), got \[{n}, {c - 1}\]",
         lambda: engine.set_image(ids[1], feats[0, :, :-1])),
        (ImageError, r"must be floating point, got dtype torch.int64",
         lambda: engine.set_image(ids[1], feats[0].long())),
        (ImageError, r"NaN or infinite", lambda: engine.set_image(ids[1], bad_image)),
        (StreamError, r"forced_tokens: token 48 of stream 0 at codebook 0",
         lambda: engine.step(user[:, :, 0], ids, forced_tokens=torch.full((2, 9), 48))),
    ]
    got = []
    for t in range(user.shape[-1]):
        if t < len(bad_calls):
            err, match, call = bad_calls[t]
            with pytest.raises(err, match=match):
                call()
        got.append(step_all(engine, ids, user, t))
    assert torch.equal(torch.stack([g[0] for g in got], -1), s["output_tokens"])
    # fp32 against Kyutai's logits: measured 7e-7
    torch.testing.assert_close(torch.stack([g[1] for g in got], 1), s["text_logits"], atol=1e-5, rtol=0)
    assert bystander in engine.streams


def test_more_streams_than_max_streams(tiny_cfg, tiny_weights):
    engine = Engine(tiny_cfg, tiny_weights, max_streams=2)
    a, b = engine.open_stream(), engine.open_stream()
    with pytest.raises(StreamError, match="max_streams=2"):
        engine.open_stream()
    engine.close_stream(a)
    c = engine.open_stream()  # the freed slot is reused, as a fresh stream
    assert c not in (a, b) and len(engine.streams) == 2


def test_engine_rejects_bad_construction(tiny_cfg, tiny_weights):
    with pytest.raises(ValueError, match="max_streams must be a positive integer, got 0"):
        Engine(tiny_cfg, tiny_weights, max_streams=0)
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        Engine(tiny_cfg, tiny_weights, backend="jax")
    with pytest.raises(ValueError, match=r"kv_dtype must be one of \['auto', 'int8'\], got 'int4'"):
        Engine(tiny_cfg, tiny_weights, kv_dtype="int4")


@pytest.mark.parametrize("preset_name", ["tiny", "moshika-vis"])
def test_int8_kv_halves_the_bytes_a_stream_allocates(tiny_cfg, tiny_weights, preset_name):
    """The cache tensors as allocated (the real config's on the meta device: shapes and dtypes, no memory):
    int8 K/V plus one fp32 scale per token per head is (head_dim + 4) / (2 head_dim) of bf16's bytes
    (0.516 at head_dim 128), whatever the compute dtype; the memory model counts exactly those bytes."""
    cfg = preset(preset_name)
    allocated = {}
    for dtype in (torch.bfloat16, torch.float32):
        for kv_dtype in KV_DTYPES:
            state = StreamState(cfg, 3, dtype, torch.device("meta"), kv_dtype)
            allocated[dtype, kv_dtype] = state.kv_bytes_allocated() / 3
            assert allocated[dtype, kv_dtype] == StreamState.kv_bytes_per_stream(cfg, dtype, kv_dtype)
    D = cfg.head_dim
    assert allocated[torch.bfloat16, "int8"] / allocated[torch.bfloat16, "auto"] == (D + 4) / (2 * D)
    assert allocated[torch.float32, "int8"] == allocated[torch.bfloat16, "int8"]
    if preset_name == "moshika-vis":  # the 1.57 GB per stream at 3000 frames, now 0.81 GB
        assert allocated[torch.bfloat16, "auto"] == 32 * 2 * 4096 * 3000 * 2
        assert allocated[torch.bfloat16, "int8"] == 32 * 2 * 3000 * (4096 + 32 * 4)
    engine = Engine(tiny_cfg, tiny_weights, max_streams=2, kv_dtype="int8")  # what an engine allocates
    assert engine.state.kv.dtype == torch.int8 and engine.state.kv_scale.dtype == torch.float32
    assert engine.state.kv_scale.shape == (tiny_cfg.num_layers, 2, 2, tiny_cfg.num_heads, tiny_cfg.context)
    assert engine.state.kv_bytes_allocated() == 2 * StreamState.kv_bytes_per_stream(tiny_cfg, torch.float32, "int8")


def test_reused_slot_starts_fresh(engine, golden_streams):
    """A stream opened in a slot another stream used must see none of its K/V or tokens."""
    s = golden_streams["stream_noimage_b1"]
    first = run_stream(engine, s)  # opens, runs 14 frames and closes
    again = run_stream(engine, s)
    assert torch.equal(first["output_tokens"], again["output_tokens"])
    assert torch.equal(first["text_logits"], again["text_logits"])


def test_reused_slot_starts_with_no_text_history(tiny_cfg, tiny_weights, golden_streams):
    """A stream with a repetition penalty opened in the slot of one that had one sees none of its text
    tokens: frame by frame it follows `reference.StreamingReference` (its own, fresh text history). Text
    logits after the penalty within 1e-5 (measured 0: the same ops on one row), tokens identical."""
    from moshivis.reference import StreamingReference
    user = golden_streams["stream_noimage_b1"]["user_audio_tokens"][0]
    # 3 tokens looked back over, fewer than a stream's 8 frames: the window's edge matters too
    sampling = SamplingParams(0.8, 5, 0.8, 10, repetition_penalty=4.0, repetition_penalty_context=3)
    engine = Engine(tiny_cfg, dict(tiny_weights), max_streams=1)  # one slot: the second stream reuses it
    for seed in (1, 2):
        sid = engine.open_stream(seed=seed, sampling=sampling)
        ref = StreamingReference(tiny_weights, tiny_cfg, seed=seed, temperature=(0.8, 0.8), top_k=(5, 10),
                                 repetition_penalty=4.0, repetition_context=3)
        for t in range(8):
            tokens, text, _ = engine.step(user[None, :, t], [sid], return_logits=True)
            want_tokens, want_text, _, _ = ref.step(user[:, t])
            assert torch.equal(tokens[0], want_tokens), (seed, t)
            torch.testing.assert_close(text[0], want_text, atol=1e-5, rtol=0)
        assert len(set(ref.text_tokens) - {0, tiny_cfg.padding_token_id}) > 3  # more history than the window
        engine.close_stream(sid)


def test_set_image_takes_effect_at_the_next_frame(engine, golden_streams):
    """Teacher-forced, a stream without an image follows the no-image golden run until the image
    arrives; from that frame on it differs."""
    noimg, img = golden_streams["stream_noimage_b1"], golden_streams["stream_image_b2"]
    user, forced = noimg["user_audio_tokens"], noimg["sampled_tokens"]
    sid = engine.open_stream(sampling=GREEDY)
    attach_at = 4
    text = []
    for t in range(user.shape[-1]):
        if t == attach_at:
            engine.set_image(sid, img["image_features"][0])
        _, tl, _ = engine.step(user[:, :, t], [sid], forced_tokens=forced[:, :, t], return_logits=True)
        text.append(tl[0])
    text = torch.stack(text)
    torch.testing.assert_close(text[:attach_at], noimg["text_logits"][0, :attach_at], atol=1e-5, rtol=0)  # 6e-7
    assert (text[attach_at] - noimg["text_logits"][0, attach_at]).abs().max() > 1e-3


def test_image_pool_dedup_replace_release_and_full(tiny_cfg, tiny_weights, gen):
    from moshivis.reference import image_kv
    engine = Engine(tiny_cfg, tiny_weights, max_streams=4, max_images=2)
    feats = [torch.randn(tiny_cfg.num_image_tokens, tiny_cfg.image_encoder_dim, generator=gen) for _ in range(3)]
    a = engine.open_stream(image=feats[0])
    b = engine.open_stream(image=feats[0].clone())  # same content: stored once
    assert engine.pool.used == 1 and engine._streams[a].image_slot == engine._streams[b].image_slot
    c = engine.open_stream(image=feats[1])
    assert engine.pool.used == 2
    with pytest.raises(ImageError, match="image pool is full"):
        engine.open_stream(image=feats[2])
    assert len(engine.streams) == 3  # the refused stream took nothing
    with pytest.raises(ImageError, match="image pool is full"):
        engine.set_image(a, feats[2])  # a's slot is shared with b: it cannot be overwritten
    assert engine._streams[a].image_slot == engine._streams[b].image_slot and engine.pool.refcount.count(2) == 1
    engine.close_stream(a)
    assert engine.pool.used == 2  # b still holds the shared image
    old = engine._streams[b].image_slot
    engine.set_image(b, feats[2])  # b alone holds its slot: replacing reuses it, no spare needed
    assert engine._streams[b].image_slot == old and engine.pool.used == 2
    engine.pool.flush()
    torch.testing.assert_close(engine.pool.kv[old], image_kv(tiny_weights, tiny_cfg, feats[2]), atol=0, rtol=0)
    engine.set_image(c, None)
    assert engine.pool.used == 1
    engine.close_stream(b)
    assert engine.pool.used == 0


def test_sampling_is_per_stream_reproducible(tiny_cfg, tiny_weights, golden_streams):
    """Same seed, same tokens, whether the stream runs alone or beside others, in any position. (The triton
    backend draws each token from its own stream's seed, frame and codebook, test_engine_sampling.py, and
    its frames equal the torch backend's as the batch and its padding change,
    test_triton_follows_torch_as_the_batch_changes.)"""
    s = golden_streams["stream_image_b2"]
    user, feats = s["user_audio_tokens"], s["image_features"]
    frames = user.shape[-1]

    def run(order, seeds):
        engine = Engine(tiny_cfg, dict(tiny_weights), max_streams=4)
        ids = [engine.open_stream(seed=seeds[r], image=feats[r % 2]) for r in order]
        toks = [engine.step(user[[r % 2 for r in order], :, t], ids) for t in range(frames)]
        return torch.stack(toks, -1)

    alone = run([0], {0: 11})[0]
    batched = run([2, 1, 0], {0: 11, 1: 5, 2: 6})
    assert torch.equal(batched[2], alone) and (alone >= 0).any()
    other_seed = run([0], {0: 12})[0]
    assert not torch.equal(other_seed, alone)


def test_sampling_params_validation(engine):
    with pytest.raises(StreamError, match=r"seed must be an integer in \[0, 2\*\*63\), got -1"):
        engine.open_stream(seed=-1)
    assert engine.streams == []
    with pytest.raises(ValueError, match="temperature_text must be a number >= 0"):
        SamplingParams(temperature_text=-1)
    with pytest.raises(ValueError, match="top_k_audio must be an integer >= 0"):
        SamplingParams(top_k_audio=2.5)
    with pytest.raises(ValueError, match="temperature_audio"):
        SamplingParams(temperature_audio=float("nan"))


def test_triton_frame_launches_at_real_layer_counts():
    """Issue [temporal]'s launch budget, counted at tiny widths with the real layer counts (32 temporal,
    6 depformer layers, 8 codebooks): at most 400 Triton launches per frame and no PyTorch op beside
    but the copy of the tokens handed out."""
    import dataclasses

    from bench.common import count_launches
    from moshivis import preset, random_init
    from moshivis_kernels import count_launches as count_triton

    cfg = dataclasses.replace(preset("tiny"), num_layers=32, depformer_num_layers=6)
    engine = Engine(cfg, random_init(cfg), max_streams=2, backend="triton")
    gen = torch.Generator().manual_seed(5)
    ids = [engine.open_stream(seed=1, image=torch.randn(cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen)),
           engine.open_stream(seed=2)]
    user = torch.randint(0, cfg.audio_card, (2, cfg.num_audio_in), generator=gen)
    engine.step(user, ids)  # warm-up: workspaces and tables are made on first use
    with count_triton() as per_kernel:
        counts = count_launches(lambda: engine.step(user, ids))
    print(counts, per_kernel)
    assert counts["triton"] <= 400, per_kernel
    assert per_kernel["self_attention_decode"] == cfg.num_layers
    assert per_kernel["depformer_step"] == cfg.dep_q and per_kernel["sample_tokens"] == 1 + cfg.dep_q
    assert per_kernel["frame_input_tokens"] == per_kernel["frame_output_tokens"] == 1
    assert engine.last_frame_launches == per_kernel  # what the runtime exposes
    assert counts["torch_ops"] <= 1, counts  # the copy of the tokens handed out; bookkeeping is on kernels


def _profiled_allocations(step) -> list[tuple[str, int]]:
    """(op, bytes) of every CPU tensor allocation made by step(), seen by the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return [(e.name, e.cpu_memory_usage) for e in prof.events() if e.cpu_memory_usage > 0]


def test_triton_steady_state_frames_allocate_nothing(tiny_cfg, tiny_weights, gen):
    """Issue [temporal]: once a batch size has run, a frame on the triton backend allocates no tensor
    (every intermediate lives in the bucket's buffers; inputs are staged through numpy views). Three
    streams in the bucket of four, one padding row; an image attached mid-run is projected (that frame
    may allocate) and then costs nothing either. The same probe sees the torch backend allocate."""
    engine = Engine(tiny_cfg, dict(tiny_weights), max_streams=4, backend="triton")
    with pytest.raises(StreamError, match="no frame has run yet"):
        engine.gate_means([0])
    feats = torch.randn(tiny_cfg.num_image_tokens, tiny_cfg.image_encoder_dim, generator=gen)
    ids = [engine.open_stream(seed=1, image=feats), engine.open_stream(seed=2), engine.open_stream(seed=3)]
    user = torch.randint(-1, tiny_cfg.audio_card, (3, tiny_cfg.num_audio_in), generator=gen)
    out = torch.empty(3, 1 + tiny_cfg.dep_q, dtype=torch.long)
    engine.step(user, ids, out=out)  # the bucket's buffers are made here
    assert _profiled_allocations(lambda: engine.step(user, ids, out=out)) == []
    engine.set_image(ids[1], feats * 2)
    engine.step(user, ids, out=out)
    assert _profiled_allocations(lambda: engine.step(user, ids, out=out)) == []
    reference = Engine(tiny_cfg, dict(tiny_weights), max_streams=4, backend="torch")
    rids = [reference.open_stream(seed=1, image=feats)]
    reference.step(user[:1], rids, out=out[:1])
    assert _profiled_allocations(lambda: reference.step(user[:1], rids, out=out[:1]))  # the probe works


needs_cuda = pytest.mark.gpu(reason="needs a CUDA device (CUDA graphs)")


@needs_cuda
@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_cuda_graph_frames_equal_eager_frames_and_never_sync(weights):
    """On a GPU: frames replayed from each bucket's CUDA graph give the bits of eager frames (same kernels),
    capture succeeds (the depformer's cooperative launch included), a captured bucket picks up other
    rows and a new image, and steady-state frames run under torch.cuda.set_sync_debug_mode("error")
    (the tokens and the gate statistics are handed out by waiting on one event); gate means and colours
    agree between eager and replayed frames; a stream looking at its image from frame 6 on and one with a
    repetition penalty (its text history appended inside the graph) replay like eager frames."""
    from moshivis import preset, random_init
    from moshivis.quantize import quantize_weights
    cfg = preset("tiny")
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(2, cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen)
    user = torch.randint(-1, cfg.audio_card, (14, 3, cfg.num_audio_in), generator=gen)
    runs = []
    for graphs in (False, True):
        w = random_init(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
        if weights == "int8":
            quantize_weights(w, cfg)
        engine = Engine(cfg, w, max_streams=4, backend="triton")
        engine.backend.use_cuda_graphs = graphs
        engine.warmup()
        ids = [engine.open_stream(seed=0), engine.open_stream(seed=1, image=feats[0], xa_start=6),
               engine.open_stream(seed=2, image=feats[0], sampling=SamplingParams(repetition_penalty=1.15))]
        out = torch.empty(3, 1 + cfg.dep_q, dtype=torch.long)
        tokens, logits, gates = [], [], []
        for t in range(14):
            if t == 8:  # the same bucket, other rows and a new image (projected, with a sync, before the frame)
                ids = [ids[2], ids[0], ids[1]]
                engine.set_image(ids[0], feats[1])
                engine.step(user[t], ids, out=out)
                tokens.append(out.clone())
                continue
            sync_free = t >= 4  # steady state: handing out tokens only (logits are copied synchronously)
            torch.cuda.set_sync_debug_mode("error" if sync_free else 0)
            try:
                if sync_free:  # the gate statistics come back with the tokens: reading them syncs nothing more
                    engine.step(user[t], ids, out=out)
                    tokens.append(out.clone())
                    gates.append((engine.gate_means(ids), engine.text_colors(ids)))
                else:
                    tok, tl, _ = engine.step(user[t], ids, return_logits=True)
                    tokens.append(tok)
                    logits.append(tl)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        assert engine.backend.graph_error is None, engine.backend.graph_error
        assert all(b.graph is not None for b in engine.backend._buckets.values()) == graphs
        runs.append((torch.stack(tokens), logits, engine.last_frame_launches, gates))
    assert torch.equal(runs[0][0], runs[1][0]) and (runs[0][0] >= 0).any()
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(runs[0][3], runs[1][3]))
    frame4, frame6 = runs[1][3][0][0], runs[1][3][2][0]  # stream 0 has no image, stream 1 looks from frame 6 on
    assert (frame4[:2] == 0).all() and (frame4[2] > 0).all() and (frame6[0] == 0).all() and (frame6[1:] > 0).all()
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    assert runs[0][2] == runs[1][2] and sum(runs[1][2].values()) > 0  # a replay counts the graph's kernels


@needs_cuda
def test_cuda_graphs_replay_across_bucket_switches_like_the_torch_backend():
    """On a GPU, fp32: streams join and leave so frames move between buckets 1, 2 and 4 and back, each
    bucket's captured graph replayed with other rows; before every frame every bucket's outputs (tokens,
    logits, gate means) are filled with NaN or -7, so a replay that skipped one would show. Each frame's
    tokens equal those of the torch backend on the same GPU (sampled: both draw with the same Philox numbers
    from logits 1e-4 apart), text and audio logits within 1e-4 and gate means within 1e-5 (fp32, IEEE dots)."""
    from moshivis import preset, random_init
    cfg = preset("tiny")
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen)
    batches = [[0], [0, 1], [0, 1, 2], [2], [1, 2], [0, 2], [0], [0, 1, 2], [1]]
    user = torch.randint(-1, cfg.audio_card, (len(batches), 3, cfg.num_audio_in), generator=gen)
    w = random_init(cfg, seed=0, dtype=torch.float32, device="cuda")
    engines = {b: Engine(cfg, dict(w), max_streams=4, backend=b) for b in ("torch", "triton")}
    engines["triton"].warmup()
    buckets = engines["triton"].backend._buckets
    assert sorted(buckets) == [1, 2, 4] and all(b.graph is not None for b in buckets.values())
    ids = {b: [e.open_stream(seed=9, image=feats), e.open_stream(seed=8, sampling=SamplingParams(repetition_penalty=1.3)),
               e.open_stream(seed=7, image=feats, xa_start=2)] for b, e in engines.items()}
    for t, rows in enumerate(batches):
        for bucket in buckets.values():
            for out in (bucket.fb.text_logits, bucket.fb.audio_logits, bucket.fb.gate_mean):
                out.fill_(float("nan"))
            bucket.fb.tokens.fill_(-7)
        frames = {}
        for b, e in engines.items():
            streams = [ids[b][i] for i in rows]
            frames[b] = (*e.step(user[t, : len(rows)], streams, return_logits=True), e.gate_means(streams))
        (tok_a, text_a, audio_a, gate_a), (tok_b, text_b, audio_b, gate_b) = frames["torch"], frames["triton"]
        assert torch.equal(tok_b, tok_a), t
        torch.testing.assert_close(text_b, text_a, atol=1e-4, rtol=0)
        torch.testing.assert_close(audio_b, audio_a, atol=1e-4, rtol=0)
        torch.testing.assert_close(gate_b, gate_a, atol=1e-5, rtol=0)
    assert engines["triton"].backend.graph_error is None
    assert all(b.graph is not None for b in buckets.values())


def test_warmup_prepares_every_bucket_and_changes_no_state(tiny_cfg, tiny_weights, gen):
    """Engine.warmup runs each bucket's frame on padding rows only: buffers made, no stream state touched,
    and the frames after it are those of an engine that never warmed up."""
    user = torch.randint(-1, tiny_cfg.audio_card, (3, 2, tiny_cfg.num_audio_in), generator=gen)
    feats = torch.randn(tiny_cfg.num_image_tokens, tiny_cfg.image_encoder_dim, generator=gen)
    results = []
    for warm in (True, False):
        engine = Engine(tiny_cfg, dict(tiny_weights), max_streams=3, backend="triton")
        ids = [engine.open_stream(seed=4, image=feats), engine.open_stream(seed=5)]
        engine.step(user[0], ids)
        if warm:
            kv, tokens = engine.state.kv.clone(), engine.state.tokens.clone()
            engine.warmup()
            assert sorted(engine.backend._buckets) == [1, 2, 3]
            assert torch.equal(engine.state.kv, kv) and torch.equal(engine.state.tokens, tokens)
        results.append(torch.stack([engine.step(user[t], ids) for t in (1, 2)]))
    assert torch.equal(results[0], results[1])


def test_triton_follows_torch_as_the_batch_changes(tiny_cfg, tiny_weights, gen):
    """Streams join and leave between frames, so frames run in buckets 1, 2 and 4 (padding rows in the
    last) and a bucket is reused with other rows: every frame's tokens, logits and per-layer gate means
    match the torch backend's (sampled, Philox draws shared by both); a stream without an image has
    gate means of exactly 0, one with an image strictly inside (0, 1). One frame is partly teacher
    forced: its forced entries (>= 0) are the tokens that enter the streams' buffers, the -1 entries
    are drawn (the same on both backends)."""
    feats = torch.randn(tiny_cfg.num_image_tokens, tiny_cfg.image_encoder_dim, generator=gen)
    user = torch.randint(-1, tiny_cfg.audio_card, (6, 3, tiny_cfg.num_audio_in), generator=gen)
    batches = [[0], [0, 1], [0, 1, 2], [2], [1, 2], [0, 2]]
    forced = torch.randint(0, tiny_cfg.audio_card, (3, 1 + tiny_cfg.dep_q), generator=gen)
    forced[torch.rand(forced.shape, generator=gen) < 0.4] = -1
    runs = []
    for backend in ("torch", "triton"):
        engine = Engine(tiny_cfg, dict(tiny_weights), max_streams=4, backend=backend)
        ids = [engine.open_stream(seed=9, image=feats), engine.open_stream(seed=8),
               engine.open_stream(seed=7, image=feats)]
        frames = []
        for t, b in enumerate(batches):
            streams = [ids[i] for i in b]
            slots = [engine._streams[i].slot for i in streams]
            column = (engine.state.t[slots] + 1) % engine.state.tokens.shape[-1]  # where this frame's tokens go
            f = forced if t == 2 else None
            frames.append((*engine.step(user[t, :len(b)], streams, forced_tokens=f, return_logits=True),
                           engine.gate_means(streams)))
            if f is not None:
                written = engine.state.tokens[slots, : 1 + tiny_cfg.dep_q].cpu()[torch.arange(len(b)), :, column]
                assert torch.equal(written[f >= 0], f[f >= 0]) and (written[f < 0] >= 0).all()
            gates = frames[-1][-1]
            assert (gates[[i == 1 for i in b]] == 0).all() and ((gates[[i != 1 for i in b]] > 0) &
                                                               (gates[[i != 1 for i in b]] < 1)).all()
        runs.append(frames)
        with pytest.raises(StreamError, match="not in the last step"):
            engine.gate_means([ids[1]])
        with pytest.raises(StreamError, match=r"out must be an int64 CPU tensor of shape \[1, 9\]"):
            engine.step(user[0, :1], ids[:1], out=torch.empty(1, 8, dtype=torch.long))
    for (tok_a, text_a, audio_a, gate_a), (tok_b, text_b, audio_b, gate_b) in zip(*runs):
        assert torch.equal(tok_a, tok_b)  # logits measured 2e-6 apart: 2e-5 allowed
        torch.testing.assert_close(text_b, text_a, atol=2e-5, rtol=0)
        torch.testing.assert_close(audio_b, audio_a, atol=2e-5, rtol=0)
        torch.testing.assert_close(gate_b, gate_a, atol=1e-5, rtol=0)
    assert any((frame[0] >= 0).any() for frame in runs[0])


# ---- Kyutai's session options: xa_start, repetition penalty, image resolution, coloured text -------
def _follow_reference(engine, cfg, weights, specs, user, frames):
    """Step `specs` (open_stream kwargs) as one batch of the engine and, one by one, through
    `reference.StreamingReference`; returns per stream (engine, reference) lists of (tokens, text logits,
    gate means)."""
    from moshivis.reference import StreamingReference
    ids = [engine.open_stream(**spec) for spec in specs]
    refs = []
    for spec in specs:
        sp = spec["sampling"]
        refs.append(StreamingReference(weights, cfg, spec.get("image"), spec.get("xa_start", 0), spec["seed"],
                                       (sp.temperature_text, sp.temperature_audio), (sp.top_k_text, sp.top_k_audio),
                                       sp.repetition_penalty, sp.repetition_penalty_context))
    got, want = [[] for _ in specs], [[] for _ in specs]
    for t in range(frames):
        tokens, text, _ = engine.step(user[:, :, t], ids, return_logits=True)
        gate_means = engine.gate_means(ids)
        for b, ref in enumerate(refs):
            got[b].append((tokens[b], text[b], gate_means[b]))
            r_tokens, r_text, _, r_gates = ref.step(user[b, :, t])
            want[b].append((r_tokens, r_text, r_gates))
    return got, want


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_streams_follow_the_hand_stepped_reference(tiny_cfg, tiny_weights, golden_streams, backend):
    """Three streams in one batch against `reference.StreamingReference` (Kyutai's generator written out:
    its own token cache, K/V and text history; nothing shared with the engine's state, frame buffers or
    kernels): an image of 7 of the pool's 12 tokens, attended to from frame `xa_start` on and sampled with a
    repetition penalty; a 12-token image from frame 0, greedy; no image, sampled with the penalty. Tokens
    equal frame by frame; text logits (after the penalty) within 1e-5 (measured: 1e-6); per-layer gate means
    within 1e-6 and exactly 0 before xa_start and without an image. The Triton interpreter runs 3 frames
    (the first without the image)."""
    s = golden_streams["stream_image_b2"]
    feats, user = s["image_features"], s["user_audio_tokens"]
    frames, xa_start = (6, 3) if backend == "torch" else (3, 1)
    penalised = SamplingParams(0.5, 3, 0.8, 10, repetition_penalty=3.0, repetition_penalty_context=8)
    specs = [dict(seed=3, image=feats[0][:7], xa_start=xa_start, sampling=penalised),
             dict(seed=4, image=feats[1], sampling=GREEDY),
             dict(seed=6, image=None, sampling=penalised)]
    engine = Engine(tiny_cfg, dict(tiny_weights), max_streams=4, backend=backend)
    got, want = _follow_reference(engine, tiny_cfg, tiny_weights, specs, user[[0, 1, 0]], frames)
    for b in range(len(specs)):
        for t, ((tok, text, gates), (r_tok, r_text, r_gates)) in enumerate(zip(got[b], want[b])):
            assert torch.equal(tok, r_tok), (b, t)
            torch.testing.assert_close(text, r_text, atol=1e-5, rtol=0)
            torch.testing.assert_close(gates, r_gates, atol=1e-6, rtol=0)
    assert all((g == 0).all() for _, _, g in got[0][:xa_start] + got[2])
    assert all(((g > 0) & (g < 1)).all() for _, _, g in got[0][xa_start:] + got[1])
    assert engine.text_colors(engine.streams) == gates_module.text_colors(engine.gate_means(engine.streams))
    if backend == "torch":  # the options change what the reference does: the checks above can fail
        plain = [dict(spec, xa_start=0, sampling=dataclasses.replace(spec["sampling"], repetition_penalty=1.0))
                 for spec in specs]
        other = Engine(tiny_cfg, dict(tiny_weights), max_streams=4)
        _, without = _follow_reference(other, tiny_cfg, tiny_weights, plain, user[[0, 1, 0]], frames)
        assert (without[0][0][1] - want[0][0][1]).abs().max() > 1e-3  # frame 0 would have seen the image
        assert any(not torch.equal(a[0], b[0]) for a, b in zip(without[2], want[2]))  # the penalty matters


def test_text_colors_hand_computed():
    """Kyutai's colour byte: g = mean gate of the last min(10, layers) layers, round(clamp((g - 0.005) /
    0.016, 0, 1) * 10). Each row's value worked out by hand."""
    twelve = torch.zeros(7, 12)
    twelve[:, :2] = 0.5  # layers 0 and 1 are not among the last ten: they change nothing
    twelve[0, 2:] = 0.005                       # floor: 0
    twelve[1, 2:] = 0.013                       # (0.008 / 0.016) * 10 = 5
    twelve[2, 2:] = 0.021                       # the span's top: 10
    twelve[3, 2:] = 0.2                         # clamped: 10
    twelve[4, 2:7] = 0.0142                     # g = 0.0071 -> 1.3125 -> 1
    twelve[5, 2:] = torch.linspace(0.004, 0.012, 10)  # g = 0.008 -> 1.875 -> 2
    twelve[6, 11] = 0.1                         # g = 0.01 -> 3.125 -> 3
    assert gates_module.text_colors(twelve) == [0, 5, 10, 10, 1, 2, 3]
    two = torch.tensor([[0.01, 0.03], [0.0, 0.0], [0.009, 0.008]])  # fewer than ten layers: all of them
    assert gates_module.text_colors(two) == [9, 0, 2]  # g = 0.02 -> 9.375; 0; 0.0085 -> 2.1875
    with pytest.raises(ValueError, match="gate_means must be"):
        gates_module.text_colors(torch.zeros(3))


def test_session_options_are_validated(engine, tiny_cfg, gen):
    """Every SamplingParams field refuses out-of-range values with an error naming it; xa_start and image
    token counts are checked at open, before anything changes."""
    cases = [(dict(top_k_text=2 ** 63), "top_k_text"), (dict(top_k_audio=-1), "top_k_audio"),
             (dict(top_k_text=True), "top_k_text"), (dict(temperature_text=float("inf")), "temperature_text"),
             (dict(temperature_audio=1e39), "temperature_audio"), (dict(temperature_text=True), "temperature_text"),
             (dict(repetition_penalty=0.0), "repetition_penalty"),
             (dict(repetition_penalty=-1.1), "repetition_penalty"),
             (dict(repetition_penalty=float("nan")), "repetition_penalty"),
             (dict(repetition_penalty=1e-50), "repetition_penalty"),  # 0 in fp32
             (dict(repetition_penalty="1.1"), "repetition_penalty"),
             (dict(repetition_penalty_context=257), "repetition_penalty_context"),
             (dict(repetition_penalty_context=-1), "repetition_penalty_context"),
             (dict(repetition_penalty_context=4.0), "repetition_penalty_context")]
    for kwargs, name in cases:
        with pytest.raises(ValueError, match=f"sampling {name} must be"):
            SamplingParams(**kwargs)
    assert SamplingParams(top_k_text=2 ** 63 - 1, repetition_penalty_context=256, repetition_penalty=0.5)
    n, c = tiny_cfg.num_image_tokens, tiny_cfg.image_encoder_dim
    for bad, match in ((-1, r"xa_start must be an integer in \[0, 2\*\*63\)"), (1.5, "xa_start"), (True, "xa_start")):
        with pytest.raises(StreamError, match=match):
            engine.open_stream(xa_start=bad)
    for shape in ((n + 1, c), (0, c), (n, c, 1)):
        got = ", ".join(map(str, shape))
        with pytest.raises(ImageError, match=rf"with 1 <= N <= {n} \(max_image_tokens\), got \[{got}\]"):
            engine.open_stream(image=torch.randn(shape, generator=gen))
    assert engine.streams == [] and engine.pool.used == 0
    with pytest.raises(ValueError, match="max_image_tokens must be a positive integer, got 0"):
        Engine(tiny_cfg, engine.weights, max_image_tokens=0)


def test_pool_holds_images_of_several_token_counts(tiny_cfg, tiny_weights, gen):
    """max_image_tokens above the config's: images of 3, 20, 12 and 3 tokens (the two of 3 projected in one
    batch) in their slots' first rows, with their counts."""
    from moshivis.reference import image_kv
    engine = Engine(tiny_cfg, tiny_weights, max_streams=4, max_image_tokens=20)
    counts = [3, 20, 12, 3]
    feats = [torch.randn(n, tiny_cfg.image_encoder_dim, generator=gen) for n in counts]
    ids = [engine.open_stream(image=f) for f in feats]
    engine.pool.flush()
    for sid, f in zip(ids, feats):
        slot = engine._streams[sid].image_slot
        assert int(engine.pool.num_tokens[slot]) == f.shape[0]
        # fp32; batched with another image of its count or alone: measured 1e-6 apart
        torch.testing.assert_close(engine.pool.kv[slot, : f.shape[0]], image_kv(tiny_weights, tiny_cfg, f),
                                   atol=1e-5, rtol=0)
