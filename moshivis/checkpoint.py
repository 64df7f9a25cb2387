"""Safetensors checkpoints in Kyutai's key layout (SPEC.md §8): strict load, save, random init.

Weights are a flat `dict[str, Tensor]` keyed exactly as in Kyutai's checkpoint, so the reference
model reads like the key table. The SigLIP encoder (`image_prefix.enc.model.*`) is not part of the
language model and is skipped here; the image path takes encoder features.

INT8 checkpoints (`python -m moshivis.quantize`) keep every key; each large linear weight KEY (see
`quantized_keys`) holds bitsandbytes' row-wise CB (int8, same shape) and `scale_key(KEY)`
its SCB (fp32 [rows]), e.g. `llm.transformer.layers.0.gating.linear_in.weight` +
`llm.transformer.layers.0.gating.linear_in.SCB`, `...self_attn.in_proj_weight` +
`...self_attn.in_proj_SCB`. Embeddings, norms and the image projection stay in the compute dtype.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import MoshiVisConfig

IMAGE_ENCODER_PREFIX = "image_prefix.enc.model."
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
XA = "llm.transformer.layers.0.cross_attention.mha"  # the ONE shared cross-attention projection


# safetensors' dtype names (the header's "dtype" field).
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


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


def scale_key(key: str) -> str:
    """Where an int8 weight's row scales live: `...linear_in.weight` -> `...linear_in.SCB`,
    `...in_proj_weight` -> `...in_proj_SCB` (bitsandbytes' naming)."""
    return key[: -len("weight")] + "SCB"


def quantized_keys(cfg: MoshiVisConfig) -> list[str]:
    """The large linear weights that INT8 checkpoints store as CB + SCB (embedding tables and the
    once-per-image `proj_xa` stay dense)."""
    return [k for k in expected_shapes(cfg)
            if k.endswith("weight") and "emb" not in k and not k.startswith("image_prefix.")]


def meta_tensor(shape, dtype: str) -> torch.Tensor:
    """A tensor with a header's shape and dtype (safetensors' name, e.g. "BF16") and no data."""
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported safetensors dtype {dtype!r}")
    return torch.empty(tuple(shape), dtype=DTYPES[dtype], device="meta")


def read_header(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name) from a safetensors file's header alone (its first 8 + N
    bytes); no tensor data is read. A file that is no safetensors file is a CheckpointError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= MAX_HEADER_BYTES:
                raise ValueError(f"header size {size} is out of range")
            header = json.loads(f.read(size))
        return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError) as e:  # JSON errors are ValueErrors
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def shard_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():  # Kyutai's release folder also holds the Mimi codec, `tokenizer-*.safetensors`
        files = sorted(f for f in path.glob("*.safetensors") if not f.name.startswith("tokenizer-"))
        if not files:
            raise CheckpointError(f"no *.safetensors file in directory {path}")
        return files
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint {path} is not a .safetensors file (pickle is never loaded)")
    return [path]


def load(path: str | Path, cfg: MoshiVisConfig, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu", weights: str = "dense") -> dict[str, torch.Tensor]:
    """Load a `.safetensors` file or a directory of shards, strictly, tensor by tensor.

    weights="dense": every tensor cast to `dtype`; weights="int8": an INT8 checkpoint, whose
    `quantized_keys` stay int8 with their fp32 SCB scales and everything else is cast to `dtype`.
    Each tensor is read, cast and moved to `device` before the next is read, so a large checkpoint is
    never held twice; device="meta" checks every key, shape and dtype from the files' headers and
    reads no data (meta tensors out). All problems (missing keys, unexpected keys, wrong shapes or
    dtypes, unreadable files) are collected and reported together.
    """
    if weights not in ("dense", "int8"):
        raise CheckpointError(f"weights must be 'dense' or 'int8', got {weights!r}")
    expected = expected_shapes(cfg)
    int8 = set(quantized_keys(cfg)) if weights == "int8" else set()
    scales = {scale_key(k): k for k in int8}
    expected.update({s: expected[k][:1] for s, k in scales.items()})
    meta = torch.device(device).type == "meta"
    loaded: dict[str, torch.Tensor] = {}
    unexpected, duplicated = [], []
    wrong: dict[str, str] = {}
    for file in shard_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.startswith(IMAGE_ENCODER_PREFIX):
                        continue
                    if key not in expected:
                        unexpected.append(f"{key} (in {file.name})")
                        continue
                    if key in loaded:
                        duplicated.append(f"{key} (again in {file.name})")
                        continue
                    info = f.get_slice(key)
                    shape, stored = tuple(info.get_shape()), DTYPES.get(info.get_dtype())
                    if shape != expected[key]:
                        wrong[key] = f"{key}: expected shape {list(expected[key])}, found {list(shape)}"
                        continue
                    want = torch.int8 if key in int8 else torch.float32 if key in scales else None
                    if want is not None and stored != want:
                        wrong[key] = f"{key}: expected dtype {want}, found {stored or info.get_dtype()}"
                        continue
                    if want is None and (stored is None or not stored.is_floating_point):
                        hint = " (an INT8 checkpoint: load it with weights='int8')" if stored == torch.int8 else ""
                        wrong[key] = f"{key}: expected a floating-point tensor, found {stored or info.get_dtype()}{hint}"
                        continue
                    if meta:  # shapes and dtypes only: the data is never read
                        loaded[key] = torch.empty(shape, dtype=want or dtype, device="meta")
                    else:
                        loaded[key] = f.get_tensor(key).to(device=device, dtype=want or dtype)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {file} is not a readable safetensors file: {e}") from e
    missing = [k for k in expected if k not in loaded and k not in wrong]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    if wrong:
        problems.append(f"shape or dtype mismatches ({len(wrong)}): " + "; ".join(wrong.values()))
    if unexpected:
        hint = " (INT8 scales: load with weights='int8')" if any(".SCB" in u or "_SCB" in u for u in unexpected) else ""
        problems.append(f"unexpected keys ({len(unexpected)}){hint}: " + ", ".join(unexpected))
    if duplicated:
        problems.append(f"duplicated keys ({len(duplicated)}): " + ", ".join(duplicated))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the config:\n  " + "\n  ".join(problems))
    return loaded


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
