"""Safetensors checkpoints in Kyutai's key layout (SPEC.md §8): strict load, save, random init.

Weights are a flat `dict[str, Tensor]` keyed exactly as in Kyutai's checkpoint, so the reference
model reads like the key table. The SigLIP encoder (`image_prefix.enc.model.*`) is not part of the
language model and is skipped here; the image path takes encoder features.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import MoshiVisConfig

IMAGE_ENCODER_PREFIX = "image_prefix.enc.model."
XA = "llm.transformer.layers.0.cross_attention.mha"  # the ONE shared cross-attention projection


class CheckpointError(ValueError):
    """A checkpoint that does not match the config; the message lists every offending key."""


def expected_shapes(cfg: MoshiVisConfig) -> dict[str, tuple[int, ...]]:
    """Every language-model key with its shape, for this config."""
    d, dd, steps = cfg.dim, cfg.depformer_dim, cfg.dep_q
    s: dict[str, tuple[int, ...]] = {"llm.text_emb.weight": (cfg.text_card + 1, d)}
    for j in range(cfg.n_q):
        s[f"audio_emb.{j}.weight"] = (cfg.audio_card + 1, d)
    for i in range(cfg.num_layers):
        p = f"llm.transformer.layers.{i}"
        for norm in ("norm1", "norm_cross", "norm2"):
            s[f"{p}.{norm}.alpha"] = (1, 1, d)
        s[f"{p}.self_attn.in_proj_weight"] = (3 * d, d)
        s[f"{p}.self_attn.out_proj.weight"] = (d, d)
        s[f"{p}.cross_attention.gate.alpha.0.weight"] = (cfg.gate_dim, d)
        s[f"{p}.cross_attention.gate.alpha.2.weight"] = (d, cfg.gate_dim)
        s[f"{p}.gating.linear_in.weight"] = (2 * cfg.hidden, d)
        s[f"{p}.gating.linear_out.weight"] = (d, cfg.hidden)
    s[f"{XA}.in_proj_weight"] = (3 * d, d)
    s[f"{XA}.out_proj.weight"] = (d, d)
    s["llm.out_norm.alpha"] = (1, 1, d)
    s["llm.text_linear.weight"] = (cfg.text_card, d)
    s["depformer_text_emb.weight"] = (cfg.text_card + 1, dd)
    for k in range(steps):
        s[f"depformer_in.{k}.weight"] = (dd, d)
        s[f"audio_linears.{k}.weight"] = (cfg.audio_card, dd)
        if k < steps - 1:
            s[f"depformer_emb.{k}.weight"] = (cfg.audio_card + 1, dd)
    for l in range(cfg.depformer_num_layers):
        p = f"depformer.layers.{l}"
        s[f"{p}.norm1.alpha"] = (1, 1, dd)
        s[f"{p}.norm2.alpha"] = (1, 1, dd)
        s[f"{p}.self_attn.in_proj_weight"] = (steps * 3 * dd, dd)
        s[f"{p}.self_attn.out_proj.weight"] = (steps * dd, dd)
        for k in range(steps):
            s[f"{p}.gating.{k}.linear_in.weight"] = (2 * cfg.depformer_hidden, dd)
            s[f"{p}.gating.{k}.linear_out.weight"] = (dd, cfg.depformer_hidden)
    s["image_prefix.proj_xa.weight"] = (d, cfg.image_encoder_dim)
    s["image_prefix.proj_xa.bias"] = (d,)
    s["image_prefix.norm_xa.alpha"] = (1, 1, d)
    return s


def _files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors file in directory {path}")
        return files
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint {path} is not a .safetensors file (pickle is never loaded)")
    return [path]


def load(path: str | Path, cfg: MoshiVisConfig, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a `.safetensors` file or a directory of shards, strictly, tensor by tensor.

    Each tensor is read, cast to `dtype` and moved to `device` before the next is read, so a large
    checkpoint is never held twice. All problems (missing keys, unexpected keys, wrong shapes) are
    collected and reported together.
    """
    expected = expected_shapes(cfg)
    weights: dict[str, torch.Tensor] = {}
    unexpected, duplicated = [], []
    wrong_shape: dict[str, str] = {}
    for file in _files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith(IMAGE_ENCODER_PREFIX):
                    continue
                if key not in expected:
                    unexpected.append(f"{key} (in {file.name})")
                    continue
                if key in weights:
                    duplicated.append(f"{key} (again in {file.name})")
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != expected[key]:
                    wrong_shape[key] = f"{key}: expected {list(expected[key])}, found {list(shape)}"
                    continue
                weights[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    missing = [k for k in expected if k not in weights and k not in wrong_shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if wrong_shape:
        problems.append(f"shape mismatches ({len(wrong_shape)}): " + "; ".join(wrong_shape.values()))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if duplicated:
        problems.append(f"duplicated keys ({len(duplicated)}): " + ", ".join(duplicated))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the config:\n  " + "\n  ".join(problems))
    return weights


def save(weights: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(path), metadata=metadata)


def random_init(cfg: MoshiVisConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Seeded random weights with sane magnitudes, for benchmarks and tests without a checkpoint.

    Each tensor has its own generator seeded from (seed, key), so a tensor's values do not depend on
    the device's generator state or on which other tensors exist. Linears ~ N(0, 1/fan_in),
    embeddings ~ N(0, 1), norm weights ~ 1 + N(0, 0.1^2).
    """
    weights = {}
    for key, shape in expected_shapes(cfg).items():
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        gen = torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if key.endswith(".alpha"):
            t = 1 + 0.1 * t
        elif key.endswith("proj_xa.bias"):
            t = 0.1 * t
        elif "emb" not in key:
            t = t / math.sqrt(shape[-1])
        weights[key] = t.to(dtype)
    return weights
