"""INT8 weight-only checkpoints (bitsandbytes row-wise format; layout in `checkpoint`'s docstring).

python -m moshivis.quantize --checkpoint IN [--config CONFIG.json | --preset NAME] --out OUT.safetensors

IN is a `.safetensors` file or a directory of shards in Kyutai's layout. Tensors are read and
quantized one at a time, so the model is never in memory twice; the output is then re-read by the
strict loader (`weights="int8"`) to check it. Tensors the language model does not use (the SigLIP
encoder) are copied unchanged.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moshivis_kernels.linear import quantize_rowwise

from . import checkpoint
from .checkpoint import quantized_keys, scale_key
from .config import MoshiVisConfig, preset


def quantize_weights(weights: dict[str, torch.Tensor], cfg: MoshiVisConfig) -> dict[str, torch.Tensor]:
    """In place: each large linear weight becomes its CB (int8) plus SCB (fp32) at `scale_key`."""
    for key in quantized_keys(cfg):
        weights[key], weights[scale_key(key)] = quantize_rowwise(weights[key])
    return weights


def quantize_checkpoint(src: str | Path, out: str | Path, cfg: MoshiVisConfig) -> int:
    """Write the INT8 checkpoint of `src` to `out`; returns the number of tensors quantized."""
    todo = set(quantized_keys(cfg))
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint.shard_files(src):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if key in todo:
                    if t.dtype == torch.int8:
                        raise checkpoint.CheckpointError(f"{key} in {file.name} is already int8: {src} is quantized")
                    tensors[key], tensors[scale_key(key)] = quantize_rowwise(t)
                else:
                    tensors[key] = t
    missing = sorted(todo - tensors.keys())
    if missing:
        raise checkpoint.CheckpointError(f"checkpoint {src} lacks {len(missing)} linear weights: " + ", ".join(missing))
    save_file(tensors, str(out), metadata={"format": "pt", "moshivis_weights": "int8-rowwise"})
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--config", default=None, help="config.json (default: next to the checkpoint, else --preset)")
    ap.add_argument("--preset", default="moshika-vis")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    src = Path(args.checkpoint)
    cfg_path = Path(args.config) if args.config else (src if src.is_dir() else src.parent) / "config.json"
    cfg = MoshiVisConfig.from_json(cfg_path) if cfg_path.exists() else preset(args.preset)
    n = quantize_checkpoint(src, args.out, cfg)
    checkpoint.load(args.out, cfg, weights="int8")
    print(f"{args.out}: {n} linear weights quantized to int8 (bitsandbytes row-wise), checked by the loader")
    return 0


if __name__ == "__main__":
    sys.exit(main())
