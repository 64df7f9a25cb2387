"""What every benchmark shares: the environment record, JSON output, percentiles, the memory
roofline of a frame and the count of kernel launches."""
from __future__ import annotations

import datetime
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moshivis.config import MoshiVisConfig

FRAME_BUDGET_MS = 80.0


def environment(device: torch.device) -> dict:
    """Device, library versions, commit and time: recorded with every result."""
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device_type": device.type, "device": name, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "commit": commit,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: str | Path | None, benchmark: str, env: dict, results: list[dict]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"benchmark": benchmark, "env": env, "results": results}, f, indent=1)


def percentile(samples: list[float], q: float) -> float:
    return float(torch.tensor(samples, dtype=torch.float64).quantile(q / 100))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 10) -> float:
    """Achievable memory bandwidth in bytes/s: a large device-to-device copy (read + write)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # touched: no lazily mapped zero pages
    dst = torch.zeros_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def frame_bytes(cfg: MoshiVisConfig, batch: int, window: float, distinct_images: int,
                act_bytes: int, weight_bytes: float) -> dict[str, float]:
    """Bytes one frame must move at least, by part (SPEC.md §9).

    weight_bytes per weight element (2 bf16, 1 int8, 4 fp32); act_bytes per cached K/V element;
    window: visible self-attention positions per stream. Weights are read once per frame whatever the
    batch; the shared cross-attention projection is counted once per layer (it does not fit in L2 at
    real sizes); image K/V once per distinct image (L2-resident across layers: the lower bound).
    """
    d, dd, L = cfg.dim, cfg.depformer_dim, cfg.num_layers
    temporal = L * (4 * d * d + 3 * d * cfg.hidden + 2 * d * cfg.gate_dim)
    xattn = L * 2 * d * d
    heads = cfg.text_card * d
    per_step = dd * d + cfg.depformer_num_layers * (4 * dd * dd + 3 * dd * cfg.depformer_hidden) + cfg.audio_card * dd
    return {
        "temporal_weights": temporal * weight_bytes,
        "cross_attention_weights": xattn * weight_bytes,
        "text_head": heads * weight_bytes,
        "depformer_weights": cfg.dep_q * per_step * weight_bytes,
        "self_attention_kv": batch * L * 2 * window * d * act_bytes,
        "image_kv": distinct_images * cfg.num_image_tokens * 2 * d * act_bytes,
    }


class _OpCounter(TorchDispatchMode):
    """Counts the PyTorch ops that run a device kernel (views and allocations launch none)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name.startswith(("empty", "detach", "alias", "lift_fresh"))):
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn) -> dict[str, int]:
    """Kernel launches made by `fn()`: Triton launches (counted by the kernels) and PyTorch ops."""
    from moshivis_kernels import count_launches as count_triton
    with count_triton() as triton_counts, _OpCounter() as ops:
        fn()
    triton = sum(triton_counts.values())
    return {"triton": triton, "torch_ops": ops.count, "total": triton + ops.count}


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of `rows`; columns are (header, key, format)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if r.get(k) is not None else "-" for _, k, f in columns) + " |"
            for r in rows]
    return "\n".join([head, rule, *body])
