"""INT8 weight-only checkpoints: quantize, save, load, replay; model-level quality on golden tiny. The
int8 self-attention KV cache's model-level quality, alone and with INT8 weights."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moshivis import CheckpointError, Engine, checkpoint, preset, random_init
from moshivis.checkpoint import quantized_keys, scale_key
from moshivis.quantize import main as quantize_main, quantize_weights
from moshivis.replay import run_stream


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum()))


@pytest.fixture(scope="module")
def int8_file(golden_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "model-int8.safetensors"
    assert quantize_main(["--checkpoint", str(golden_dir / "model.safetensors"), "--out", str(out)]) == 0
    return out


def test_file_layout_and_round_trip(int8_file, tiny_cfg, tiny_weights):
    with safe_open(str(int8_file), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["moshivis_weights"] == "int8-rowwise"
        cb = f.get_tensor("llm.transformer.layers.0.gating.linear_in.weight")
        scb = f.get_tensor("llm.transformer.layers.0.gating.linear_in.SCB")
    assert cb.dtype == torch.int8 and scb.dtype == torch.float32 and scb.shape == (cb.shape[0],)
    assert "llm.transformer.layers.0.self_attn.in_proj_SCB" in keys
    assert keys == set(tiny_weights) | {scale_key(k) for k in quantized_keys(tiny_cfg)}
    loaded = checkpoint.load(int8_file, tiny_cfg, weights="int8")
    in_memory = quantize_weights(dict(tiny_weights), tiny_cfg)
    assert loaded.keys() == in_memory.keys() and all(torch.equal(loaded[k], in_memory[k]) for k in loaded)
    # w ~= CB * SCB / 127 within half a step per row.
    w = tiny_weights["llm.transformer.layers.0.gating.linear_in.weight"]
    assert ((cb.float() * scb[:, None] / 127 - w).abs() <= scb[:, None] / 254 + 1e-7).all()


def test_teacher_forced_quality_on_golden_tiny(int8_file, tiny_cfg, tiny_weights, golden_streams):
    """Logits of the int8 model vs the fp32 model, same forced tokens: SQNR >= 25 dB and top-1
    agreement >= 95%, for text and audio (printed with -s)."""
    q = checkpoint.load(int8_file, tiny_cfg, weights="int8")
    for name, stream in golden_streams.items():
        ref = run_stream(Engine(tiny_cfg, tiny_weights, max_streams=2), stream, teacher_force=True)
        got = run_stream(Engine(tiny_cfg, q, max_streams=2), stream, teacher_force=True)
        for key in ("text_logits", "audio_logits"):
            db = sqnr_db(ref[key], got[key])
            agree = float((ref[key].argmax(-1) == got[key].argmax(-1)).float().mean())
            print(f"{name} {key}: SQNR {db:.1f} dB, top-1 agreement {agree:.1%}")
            assert db >= 25 and agree >= 0.95, (name, key, db, agree)


def quality(ref: dict, got: dict) -> dict[str, tuple[float, float]]:
    """(SQNR dB, top-1 agreement) of got's text and audio logits against ref's."""
    return {key: (sqnr_db(ref[key], got[key]), float((ref[key].argmax(-1) == got[key].argmax(-1)).float().mean()))
            for key in ("text_logits", "audio_logits")}


def assert_quality(name: str, ref: dict, runs: dict[str, dict]) -> None:
    """The int8 KV cache keeps >= 30 dB and >= 97% top-1 against the fp32 cache (fp32 compute); with INT8
    weights too, >= 25 dB and >= 95% (the INT8-weights test's bar). Printed with -s."""
    bars = {"int8 KV": (30, 0.97), "int8 KV + int8 weights": (25, 0.95)}
    for label, run in runs.items():
        for key, (db, agree) in quality(ref, run).items():
            print(f"{name} {label} {key}: SQNR {db:.1f} dB, top-1 agreement {agree:.1%}")
            assert db >= bars[label][0] and agree >= bars[label][1], (name, label, key, db, agree)


def test_int8_kv_quality_on_golden_tiny(int8_file, tiny_cfg, tiny_weights, golden_streams):
    """Teacher-forced logits with an int8 self-attention cache against the fp32 cache, fp32 compute."""
    q = checkpoint.load(int8_file, tiny_cfg, weights="int8")
    for name, stream in golden_streams.items():
        ref = run_stream(Engine(tiny_cfg, tiny_weights, max_streams=2), stream, teacher_force=True)
        assert_quality(name, ref, {
            "int8 KV": run_stream(Engine(tiny_cfg, tiny_weights, max_streams=2, kv_dtype="int8"), stream,
                                  teacher_force=True),
            "int8 KV + int8 weights": run_stream(Engine(tiny_cfg, q, max_streams=2, kv_dtype="int8"), stream,
                                                 teacher_force=True)})


def test_int8_kv_quality_on_a_600_frame_small_stream(one_thread):
    """The small preset (seeded random weights) with a 100-frame context, one stream with an image, 600
    frames (the ring buffer wraps 6 times), teacher-forced with random tokens of its own: logits with an
    int8 cache against the fp32 cache."""
    cfg = dataclasses.replace(preset("small"), context=100)
    w = random_init(cfg, seed=3)
    gen = torch.Generator().manual_seed(600)
    T = 600
    stream = {"user_audio_tokens": torch.randint(0, cfg.audio_card, (1, cfg.num_audio_in, T), generator=gen),
              "sampled_tokens": torch.cat([torch.randint(0, cfg.text_card, (1, 1, T), generator=gen),
                                           torch.randint(0, cfg.audio_card, (1, cfg.dep_q, T), generator=gen)], 1),
              "image_features": torch.randn(1, cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen)}
    ref = run_stream(Engine(cfg, w, kv_dtype="auto"), stream, teacher_force=True)
    int8_kv = run_stream(Engine(cfg, w, kv_dtype="int8"), stream, teacher_force=True)
    both = run_stream(Engine(cfg, quantize_weights(dict(w), cfg), kv_dtype="int8"), stream, teacher_force=True)
    assert_quality("small, 600 frames", ref, {"int8 KV": int8_kv, "int8 KV + int8 weights": both})


def test_bad_quantized_files_name_the_problem(int8_file, tmp_path, tiny_cfg, capsys):
    with safe_open(str(int8_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    scale = "llm.transformer.layers.1.gating.linear_out.SCB"
    no_scale = {k: v for k, v in tensors.items() if k != scale}
    save_file(no_scale, str(tmp_path / "a.safetensors"))
    with pytest.raises(CheckpointError, match=rf"missing keys \(1\): {scale}"):
        checkpoint.load(tmp_path / "a.safetensors", tiny_cfg, weights="int8")
    key = "depformer_in.3.weight"
    save_file({**tensors, key: tensors[key].float()}, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{key}: expected dtype torch.int8, found torch.float32"):
        checkpoint.load(tmp_path / "b.safetensors", tiny_cfg, weights="int8")
    with pytest.raises(CheckpointError, match=r"load it with weights='int8'"):
        checkpoint.load(int8_file, tiny_cfg)
    assert quantize_main(["--checkpoint", str(int8_file), "--config", str(tiny_cfg_path(tmp_path, tiny_cfg)),
                          "--out", str(tmp_path / "c.safetensors")]) == 2
    assert re.fullmatch(r"error: .* is already int8: .*model-int8\.safetensors is quantized\n", capsys.readouterr().err)


def tiny_cfg_path(tmp_path, cfg):
    cfg.to_json(tmp_path / "config.json")
    return tmp_path / "config.json"


def test_int8_weights_triton_frames_equal_torch(tiny_cfg, tiny_weights, golden_streams):
    """INT8 weights through the whole frame on the triton backend (Triton interpreter, CPU) against the torch
    backend (the model's INT8 linear: F.linear(x, CB) * SCB / 127): both golden streams in one engine, 3 frames
    each, free-running greedy: identical tokens, text and audio logits within 3e-5 (measured: 3e-6, fp32 sum
    order)."""
    q = quantize_weights(dict(tiny_weights), tiny_cfg)
    engines = {b: Engine(tiny_cfg, dict(q), max_streams=2, backend=b) for b in ("torch", "triton")}
    for name, stream in golden_streams.items():
        short = dict(stream, user_audio_tokens=stream["user_audio_tokens"][..., :3])
        want, got = (run_stream(engines[b], short) for b in ("torch", "triton"))
        assert torch.equal(got["output_tokens"], want["output_tokens"]), name
        assert (got["output_tokens"][..., 1:] >= 0).all()
        for key in ("text_logits", "audio_logits"):
            torch.testing.assert_close(got[key], want[key], atol=3e-5, rtol=0)
