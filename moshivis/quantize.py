"""INT8 weight-only checkpoints (bitsandbytes row-wise format; layout in `checkpoint`'s docstring).

python -m moshivis.quantize --checkpoint IN [--config CONFIG.json | --preset NAME] --out OUT.safetensors

IN is a `.safetensors` file or a directory of shards in Kyutai's layout. Tensors are read and
quantized one at a time, so the model is never in memory twice; the output is then re-read by the
strict loader (`weights="int8"`) to check it. Tensors the language model does not use (the SigLIP
encoder) are copied unchanged.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moshivis_kernels.linear import quantize_rowwise

from . import checkpoint, cli
from .checkpoint import CheckpointError, quantized_keys, scale_key
from .config import ConfigError, MoshiVisConfig, preset


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
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    t = f.get_tensor(key)
                    if key in todo:
                        if t.dtype == torch.int8:
                            raise CheckpointError(f"{key} in {file.name} is already int8: {src} is quantized")
                        tensors[key], tensors[scale_key(key)] = quantize_rowwise(t)
                    else:
                        tensors[key] = t
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint file {file} is not a readable safetensors file: {e}") from e
    missing = sorted(todo - tensors.keys())
    if missing:
        raise CheckpointError(f"checkpoint {src} lacks {len(missing)} linear weights: " + ", ".join(missing))
    save_file(tensors, str(out), metadata={"format": "pt", "moshivis_weights": "int8-rowwise"})
    return len(todo)


@cli.guard(CheckpointError, ConfigError)
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m moshivis.quantize", description=__doc__)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--config", default=None, help="config.json (default: next to the checkpoint, else --preset)")
    ap.add_argument("--preset", type=cli.preset_name, default="moshika-vis")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    src, out = Path(args.checkpoint), Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise cli.UsageError(f"cannot write {out}: " + ("it is a folder" if out.is_dir() else
                                                        f"folder {out.parent} does not exist"))
    if args.config:  # given: it must exist (from_json says so); not given: the checkpoint's, else the preset
        cfg = MoshiVisConfig.from_json(args.config)
    else:
        beside = (src if src.is_dir() else src.parent) / "config.json"
        cfg = MoshiVisConfig.from_json(beside) if beside.is_file() else preset(args.preset)
    n = quantize_checkpoint(src, out, cfg)
    checkpoint.load(args.out, cfg, weights="int8")
    print(f"{args.out}: {n} linear weights quantized to int8 (bitsandbytes row-wise), checked by the loader")
    return 0


if __name__ == "__main__":
    sys.exit(main())
