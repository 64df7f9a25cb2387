"""Replay golden stream files through the engine and compare with their recorded outputs.

python -m moshivis.replay --golden DIR --backend torch|triton --dtype float32|bfloat16
                          [--weights bf16|int8] [--kv-dtype auto|int8] [--teacher-force] --out OUTDIR

DIR holds `config.json`, `model.safetensors` and `stream_*.safetensors` (golden/tiny/README.md
gives the layout). Any sizes work: everything is read from the config and the files.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import checkpoint, cli
from .checkpoint import CheckpointError
from .config import ConfigError, MoshiVisConfig
from .engine import Engine, SamplingParams, StreamError
from .image_pool import ImageError
from .state import add_kv_dtype_arg

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ReplayError(ValueError):
    """A golden folder or stream file that cannot be replayed; the message names the file."""


@dataclass
class Comparison:
    tokens_equal: int
    tokens_total: int
    text_logits_max_err: float
    audio_logits_max_err: float

    def line(self, name: str) -> str:
        return (f"{name}: tokens {self.tokens_equal}/{self.tokens_total} identical, "
                f"max |text logit err| {self.text_logits_max_err:.2e}, "
                f"max |audio logit err| {self.audio_logits_max_err:.2e}")


def read_stream(path: str | Path) -> dict[str, torch.Tensor]:
    """A stream file's tensors; it must hold integer `user_audio_tokens` [B, num_audio_in, T]."""
    try:
        with safe_open(str(path), framework="pt") as f:
            stream = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ReplayError(f"stream file {path} is not a readable safetensors file: {e}") from e
    user = stream.get("user_audio_tokens")
    if user is None:
        raise ReplayError(f"stream file {path} has no 'user_audio_tokens' (it holds {sorted(stream)})")
    if user.dim() != 3 or user.is_floating_point():
        raise ReplayError(f"stream file {path}: 'user_audio_tokens' must be integer [B, num_audio_in, T], got "
                          f"{user.dtype} {list(user.shape)}")
    return stream


def run_stream(engine: Engine, stream: dict[str, torch.Tensor], teacher_force: bool = False,
               rows: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Run the stream file's rows (all, or `rows`) as one batch, greedy, frame by frame."""
    user = stream["user_audio_tokens"]
    rows = list(range(user.shape[0])) if rows is None else rows
    features = stream.get("image_features")
    ids = [engine.open_stream(seed=r, sampling=SamplingParams.greedy(),
                              image=None if features is None else features[r]) for r in rows]
    out_tokens, text_logits, audio_logits = [], [], []
    try:
        for t in range(user.shape[-1]):
            forced = stream["sampled_tokens"][rows, :, t] if teacher_force else None
            tok, tl, al = engine.step(user[rows, :, t], ids, forced_tokens=forced, return_logits=True)
            out_tokens.append(tok.cpu())
            text_logits.append(tl.float().cpu())
            audio_logits.append(al.float().cpu())
    finally:
        for i in ids:
            engine.close_stream(i)
    return {"output_tokens": torch.stack(out_tokens, dim=-1),
            "text_logits": torch.stack(text_logits, dim=1),
            "audio_logits": torch.stack(audio_logits, dim=1)}


def compare(result: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rows: list[int] | None = None) -> Comparison:
    sel = slice(None) if rows is None else rows
    want = expected["output_tokens"][sel]
    return Comparison(
        tokens_equal=int((result["output_tokens"] == want).sum()),
        tokens_total=want.numel(),
        text_logits_max_err=float((result["text_logits"] - expected["text_logits"][sel]).abs().max()),
        audio_logits_max_err=float((result["audio_logits"] - expected["audio_logits"][sel]).abs().max()),
    )


def load_weights(path: str | Path, cfg: MoshiVisConfig, dtype: torch.dtype, device: str, weights: str) -> dict:
    """Weights in `dtype` ("bf16": dense) or INT8 ("int8": an INT8 checkpoint as it is, or a dense one
    quantized on load)."""
    if weights == "bf16":
        return checkpoint.load(path, cfg, dtype=dtype, device=device)
    with safe_open(str(path), framework="pt") as f:
        is_int8 = (f.metadata() or {}).get("moshivis_weights", "").startswith("int8")
    if is_int8:
        return checkpoint.load(path, cfg, dtype=dtype, device=device, weights="int8")
    from .quantize import quantize_weights
    return quantize_weights(checkpoint.load(path, cfg, dtype=dtype, device=device), cfg)


def load_engine(golden: str | Path, backend: str, dtype: torch.dtype, device: str, weights: str,
                max_streams: int, kv_dtype: str = "auto") -> tuple[MoshiVisConfig, Engine]:
    golden = Path(golden)
    cfg = MoshiVisConfig.from_json(golden / "config.json")
    w = load_weights(golden / "model.safetensors", cfg, dtype, device, weights)
    return cfg, Engine(cfg, w, max_streams=max_streams, backend=backend, kv_dtype=kv_dtype)


@cli.guard(ReplayError, CheckpointError, ConfigError, StreamError, ImageError)
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m moshivis.replay", description=__doc__)
    ap.add_argument("--golden", required=True, help="directory with config.json, model.safetensors, stream_*.safetensors")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--weights", default="bf16", choices=["bf16", "int8"],
                    help="bf16: dense weights in --dtype; int8: weight-only int8 (a dense file is quantized on load)")
    add_kv_dtype_arg(ap)
    ap.add_argument("--device", type=cli.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--teacher-force", action="store_true",
                    help="feed each file's sampled_tokens back as the model's own tokens")
    ap.add_argument("--out", required=True, help="directory for the replayed stream files")
    args = ap.parse_args(argv)

    golden = Path(args.golden)
    if not golden.is_dir():
        raise ReplayError(f"golden folder {golden} does not exist" + (" (it is a file)" if golden.exists() else ""))
    files = sorted(golden.glob("stream_*.safetensors"))
    if not files:
        raise ReplayError(f"no stream_*.safetensors in {golden}")
    streams = {f: read_stream(f) for f in files}
    max_streams = max(s["user_audio_tokens"].shape[0] for s in streams.values())
    _, engine = load_engine(args.golden, args.backend, DTYPES[args.dtype], args.device, args.weights, max_streams,
                            args.kv_dtype)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f, stream in streams.items():
        result = run_stream(engine, stream, teacher_force=args.teacher_force)
        save_file({k: v.contiguous() for k, v in result.items()}, str(out_dir / f.name))
        if "output_tokens" in stream:
            print(compare(result, stream).line(f.name))
        else:
            print(f"{f.name}: replayed (no expected outputs in the file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
