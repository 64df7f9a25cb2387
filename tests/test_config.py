"""Config: Kyutai's field names, the presets, and errors that name the field."""
from __future__ import annotations

import json

import pytest

from moshivis import ConfigError, MoshiVisConfig, preset


def test_reads_the_golden_config_as_is(golden_dir):
    raw = json.loads((golden_dir / "config.json").read_text())
    cfg = MoshiVisConfig.from_json(golden_dir / "config.json")
    assert all(getattr(cfg, k) == v for k, v in raw.items())
    assert cfg == preset("tiny")
    # README of the golden set: SwiGLU hidden 176 (temporal) and 88 (depformer).
    assert (cfg.hidden, cfg.depformer_hidden, cfg.gate_dim, cfg.head_dim) == (176, 88, 8, 16)


def test_moshika_vis_sizes_are_spec_sizes():
    cfg = preset("moshika-vis")
    assert (cfg.dim, cfg.num_heads, cfg.head_dim, cfg.num_layers, cfg.context) == (4096, 32, 128, 32, 3000)
    assert (cfg.hidden, cfg.depformer_hidden, cfg.gate_dim) == (11264, 2816, 512)
    assert (cfg.depformer_dim, cfg.depformer_num_heads, cfg.depformer_head_dim) == (1024, 16, 64)
    assert cfg.delays == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
    assert (cfg.num_image_tokens, cfg.image_encoder_dim, cfg.text_card, cfg.audio_card) == (1024, 1152, 32000, 2048)


def test_round_trip_through_json(tmp_path):
    cfg = preset("small")
    cfg.to_json(tmp_path / "c.json")
    assert MoshiVisConfig.from_json(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("field, value, message", [
    ("dim", 65, r"'dim' \(65\) must be divisible by 'num_heads' \(4\)"),
    ("context", 0, r"config field 'context' must be a positive integer, got 0"),
    ("num_layers", 2.5, r"config field 'num_layers' must be a positive integer"),
    ("hidden_scale", -1.0, r"config field 'hidden_scale' must be > 0"),
    ("delays", [0] * 16, r"config field 'delays' must be a list of n_q \+ 1 = 17"),
    ("delays", [0] * 16 + [-1], r"config field 'delays' must hold non-negative integers"),
    ("norm", "layer_norm", r"config field 'norm' = 'layer_norm' is not supported"),
    ("xa_shared", False, r"config field 'xa_shared' = False is not supported"),
    ("dep_q", 20, r"config field 'dep_q' \(20\) must be <= 'n_q' \(16\)"),
    ("dep_q", 9, r"config fields 'n_q' \(16\) and 'dep_q' \(9\): .* \(n_q = 2\*dep_q\)"),
])
def test_impossible_values_name_the_field(golden_dir, field, value, message):
    raw = json.loads((golden_dir / "config.json").read_text())
    raw[field] = value
    with pytest.raises(ConfigError, match=message):
        MoshiVisConfig.from_dict(raw)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
