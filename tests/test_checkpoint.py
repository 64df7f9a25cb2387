"""Checkpoint loading in Kyutai's key layout: strict, every problem named, safetensors only."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from moshivis import CheckpointError, checkpoint, preset
from moshivis.checkpoint import expected_shapes


def test_golden_checkpoint_has_exactly_the_expected_keys(golden_dir, tiny_cfg, tiny_weights):
    """The golden file was written by Kyutai's code: our key table must be exactly its keys."""
    from safetensors import safe_open
    with safe_open(str(golden_dir / "model.safetensors"), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == expected_shapes(tiny_cfg)
    assert set(tiny_weights) == set(shapes)


def test_every_problem_is_reported_by_name(tmp_path, tiny_cfg, tiny_weights):
    w = dict(tiny_weights)
    del w["llm.text_linear.weight"]
    del w["depformer.layers.1.gating.5.linear_out.weight"]
    w["llm.transformer.layers.1.self_attn.out_proj.weight"] = torch.zeros(64, 63)
    w["llm.transformer.layers.7.norm1.alpha"] = torch.zeros(1, 1, 64)
    checkpoint.save(w, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(tmp_path / "bad.safetensors", tiny_cfg)
    msg = str(info.value)
    assert "missing keys (2): " in msg
    assert "llm.text_linear.weight" in msg and "depformer.layers.1.gating.5.linear_out.weight" in msg
    assert "llm.transformer.layers.1.self_attn.out_proj.weight: expected shape [64, 64], found [64, 63]" in msg
    assert "unexpected keys (1): llm.transformer.layers.7.norm1.alpha" in msg


def test_shards_load_like_one_file_and_duplicates_are_refused(tmp_path, tiny_cfg, tiny_weights):
    keys = sorted(tiny_weights)
    (tmp_path / "shards").mkdir()
    save_file({k: tiny_weights[k] for k in keys[::2]}, str(tmp_path / "shards" / "a.safetensors"))
    save_file({k: tiny_weights[k] for k in keys[1::2]}, str(tmp_path / "shards" / "b.safetensors"))
    loaded = checkpoint.load(tmp_path / "shards", tiny_cfg)
    assert set(loaded) == set(tiny_weights)
    assert all(torch.equal(loaded[k], tiny_weights[k]) for k in keys)
    # Kyutai's release folder also holds the Mimi codec: not a shard of the language model.
    save_file({"encoder.conv.weight": torch.ones(2)}, str(tmp_path / "shards" / "tokenizer-e351c8d8-checkpoint125.safetensors"))
    assert set(checkpoint.load(tmp_path / "shards", tiny_cfg)) == set(tiny_weights)
    save_file({keys[0]: tiny_weights[keys[0]]}, str(tmp_path / "shards" / "c.safetensors"))
    with pytest.raises(CheckpointError, match=rf"duplicated keys \(1\): {keys[0]} \(again in c.safetensors\)"):
        checkpoint.load(tmp_path / "shards", tiny_cfg)


def test_dtype_cast_on_the_way_and_image_encoder_keys_skipped(tmp_path, tiny_cfg, tiny_weights):
    w = dict(tiny_weights)
    w["image_prefix.enc.model.embeddings.patch_embedding.weight"] = torch.ones(3, 3)  # SigLIP: not the LM's
    checkpoint.save(w, tmp_path / "m.safetensors")
    loaded = checkpoint.load(tmp_path / "m.safetensors", tiny_cfg, dtype=torch.bfloat16)
    assert set(loaded) == set(tiny_weights)
    assert all(v.dtype == torch.bfloat16 for v in loaded.values())
    assert torch.equal(loaded["llm.out_norm.alpha"], tiny_weights["llm.out_norm.alpha"].bfloat16())


def test_only_safetensors_files_are_read(tmp_path, tiny_cfg, tiny_weights):
    torch.save(tiny_weights, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="is not a .safetensors file"):
        checkpoint.load(tmp_path / "model.pt", tiny_cfg)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nope.safetensors", tiny_cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors file in directory"):
        checkpoint.load(tmp_path / "empty", tiny_cfg)


def test_random_init_is_seeded_and_complete():
    cfg = preset("tiny")
    a, b, c = checkpoint.random_init(cfg, seed=1), checkpoint.random_init(cfg, seed=1), checkpoint.random_init(cfg, seed=2)
    assert {k: tuple(v.shape) for k, v in a.items()} == expected_shapes(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)
    # Linears ~ N(0, 1/fan_in): the output of a unit-variance input has unit variance.
    w = a["llm.transformer.layers.0.gating.linear_in.weight"]
    assert 0.8 < float(w.pow(2).sum(1).mean()) < 1.2


def test_save_load_round_trip(tmp_path, tiny_cfg):
    w = checkpoint.random_init(tiny_cfg, seed=3)
    checkpoint.save(w, tmp_path / "rt.safetensors")
    loaded = checkpoint.load(tmp_path / "rt.safetensors", tiny_cfg)
    assert all(torch.equal(loaded[k], w[k]) for k in w)
