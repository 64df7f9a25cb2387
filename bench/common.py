"""What every benchmark shares: the environment record, JSON output, percentiles, the memory
roofline of a frame, the memory a stream holds, timers and the count of kernel launches."""
from __future__ import annotations

import datetime
import json
import math
import platform
import statistics
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moshivis_kernels  # noqa: F401  (sets TRITON_INTERPRET on CPU before anything imports triton)
from moshivis import cli
from moshivis.checkpoint import expected_shapes, quantized_keys
from moshivis.config import MoshiVisConfig
from moshivis.state import StreamState

FRAME_BUDGET_MS = 80.0
GIB = 1 << 30

# Devices the capacity model describes when there is no GPU to measure: the memory torch can use
# on the lent machines (torch.cuda.mem_get_info's total, about 78 / 139 GiB) and the vendors' peak
# bandwidth (SPEC.md §9). A model, never a measurement.
DEVICE_MODELS = {
    "H100 SXM 80 GB": {"memory_bytes": 78 * GIB, "bandwidth_bytes_per_s": 3.35e12},
    "H200 141 GB": {"memory_bytes": 139 * GIB, "bandwidth_bytes_per_s": 4.8e12},
}


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
    extra = {}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        extra = {"cuda": torch.version.cuda, "memory_bytes": props.total_memory, "sms": props.multi_processor_count}
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device_type": device.type, "device": name, "label": "GPU" if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "commit": commit, **extra,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def document(benchmark: str, env: dict, results: list[dict], **extra) -> dict:
    """The JSON every command writes: {"benchmark", "env", "results": [rows], ...extra sections}."""
    return {"benchmark": benchmark, "env": env, "results": results, **extra}


def write_json(path: str | Path | None, benchmark: str, env: dict, results: list[dict], **extra) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(document(benchmark, env, results, **extra), f, indent=1)


def add_common_args(ap) -> None:
    """--threads, --seed and --json: the arguments every benchmark command takes."""
    ap.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads for torch (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here as JSON")


def set_threads(threads: int | None) -> None:
    """CPU threads for torch (None: its default). One thread keeps CPU timings steady on a shared
    machine, where idle OpenMP threads spinning against other processes can cost 10-100x."""
    if threads:
        torch.set_num_threads(threads)


def percentile(samples: list[float], q: float) -> float:
    return float(torch.tensor(samples, dtype=torch.float64).quantile(q / 100))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(fn, min_time_s: float = 0.05, max_reps: int = 200, warmup: int = 2) -> dict[str, float]:
    """Host wall-clock of fn() in microseconds (median, p10, p90): for CPU reference timings."""
    for _ in range(warmup):
        fn()
    samples, start = [], time.perf_counter()
    while len(samples) < 5 or (time.perf_counter() - start < min_time_s and len(samples) < max_reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return {"us": statistics.median(samples), "us_p10": percentile(samples, 10), "us_p90": percentile(samples, 90),
            "reps": len(samples)}


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


def _act_dtype(act_bytes: int) -> torch.dtype:
    return {2: torch.bfloat16, 4: torch.float32}[act_bytes]


def frame_bytes(cfg: MoshiVisConfig, batch: int, window: float, distinct_images: int,
                act_bytes: int, weight_bytes: float, kv_dtype: str = "auto") -> dict[str, float]:
    """Bytes one frame must move at least, by part (SPEC.md §9).

    weight_bytes per weight element (2 bf16, 1 int8, 4 fp32); act_bytes per image K/V element and per
    self-attention K/V element unless kv_dtype is "int8" (1 byte, plus a 4-byte scale per head vector);
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
        "self_attention_kv": batch * window * StreamState.kv_bytes_per_token(cfg, _act_dtype(act_bytes), kv_dtype),
        "image_kv": distinct_images * cfg.num_image_tokens * 2 * d * act_bytes,
    }


def model_weight_bytes(cfg: MoshiVisConfig, weight_bytes: float, act_bytes: int) -> float:
    """Bytes the language model's weights occupy on the device: the linears an INT8 checkpoint
    quantizes at weight_bytes per element (plus their fp32 row scales when that is less than
    act_bytes), everything else (embeddings, norms, the image projection) at act_bytes."""
    quantized = set(quantized_keys(cfg)) if weight_bytes < act_bytes else set()
    total = 0.0
    for key, shape in expected_shapes(cfg).items():
        n = math.prod(shape)
        total += n * weight_bytes + shape[0] * 4 if key in quantized else n * act_bytes
    return total


def stream_bytes(cfg: MoshiVisConfig, act_bytes: int, kv_dtype: str = "auto") -> dict[str, int]:
    """Device memory one stream holds: its self-attention KV ring buffer at full context (every layer,
    K and V, in kv_dtype) and its image's K/V in the pool (a distinct image per stream: the worst case)."""
    kv = StreamState.kv_bytes_per_stream(cfg, _act_dtype(act_bytes), kv_dtype)
    image = cfg.num_image_tokens * 2 * cfg.dim * act_bytes
    return {"self_attention_kv": kv, "image_kv": image, "total": kv + image}


class _OpCounter(TorchDispatchMode):
    """Counts the PyTorch ops that run a device kernel (views and allocations launch none).

    Ops made while the Triton interpreter runs a kernel (it copies every tensor argument to the host
    and back) are not counted: on a GPU that launch is one kernel, counted by the kernel wrapper."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (self.paused or func.is_view or name.startswith(("empty", "detach", "alias", "lift_fresh"))):
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _interpreter_paused(counter: _OpCounter):
    """While the counter is active, every interpreted Triton launch pauses it (no-op on a GPU)."""
    from moshivis_kernels._runtime import INTERPRET
    if not INTERPRET:
        yield
        return
    from triton.runtime.interpreter import GridExecutor
    call = GridExecutor.__call__
    owner = threading.get_ident()

    def paused_call(self, *args, **kwargs):
        mine = threading.get_ident() == owner
        counter.paused += mine
        try:
            return call(self, *args, **kwargs)
        finally:
            counter.paused -= mine

    GridExecutor.__call__ = paused_call
    try:
        yield
    finally:
        GridExecutor.__call__ = call


def count_launches(fn) -> dict[str, int]:
    """Kernel launches made by `fn()`: Triton launches (counted by the kernels) and PyTorch ops."""
    from moshivis_kernels import count_launches as count_triton
    ops = _OpCounter()
    with count_triton() as triton_counts, ops, _interpreter_paused(ops):
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
