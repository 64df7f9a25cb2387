"""Concurrent streams: frame latency and deadline misses against the 80 ms budget, memory per stream,
how many streams fit in the device memory, and the largest stream count that holds p99 <= 80 ms.

python -m bench.concurrency [--preset small|moshika-vis|tiny] [--backend torch|triton]
       [--streams 1 8 16 ...] [--frames N] [--warmup N] [--position N] [--reserve-gb G]
       [--dtype float32|bfloat16] [--weights bf16|int8] [--kv-dtype auto|int8] [--device cpu|cuda]
       [--threads N] [--json PATH]

Streams are fast-forwarded to `--position` (default: the config's context, so every frame attends
the full self-attention window: the steady state of a long conversation) and each has its own image.
Memory per stream = its self-attention KV ring buffer at full context (in --kv-dtype: the compute
dtype, or int8 with one fp32 scale per token per head) + its image's K/V. On a GPU the
streams that fit are measured: torch.cuda.mem_get_info after the weights are loaded, less
--reserve-gb for activations and allocator slack, over the memory per stream; the sweep stops at
the first stream count over the budget (p99 > 80 ms), or out of memory. Without a GPU the fit is a
MODEL of an H100 80 GB and an H200 141 GB (vendor peak bandwidth, memory torch can use there) and the
latency figures are CPU figures. The capacity model (moshika-vis sizes, bf16 and int8 weights, bf16
and int8 self-attention KV) is printed either way.
"""
from __future__ import annotations

import gc
import math

import torch

from moshivis import cli, preset
from moshivis.state import StreamState, add_kv_dtype_arg

from .common import (DEVICE_MODELS, FRAME_BUDGET_MS, GIB, add_common_args, copy_bandwidth, environment,
                     frame_bytes, model_weight_bytes, set_threads, stream_bytes, table, write_json)
from .frame_latency import DTYPES, model_weights, run_config

GPU_STREAMS = [1, 8, 16, 24, 32, 40, 48, 64, 96, 128]
CPU_STREAMS = [1, 2, 4, 8, 16, 32]


def allocated_kv_bytes(cfg, dtype: torch.dtype, kv_dtype: str) -> int:
    """The cache tensors one engine slot allocates, measured on a one-slot StreamState made on the meta
    device (real shapes and dtypes, no memory)."""
    return StreamState(cfg, 1, dtype, torch.device("meta"), kv_dtype).kv_bytes_allocated()


def capacity_model(cfg, preset_name: str, reserve_bytes: float, act_bytes: int = 2) -> list[dict]:
    """Streams that fit on each modelled device, for bf16 and int8 weights and a bf16 or int8
    self-attention cache (activations and image K/V in bf16): by memory, and by the bandwidth roofline of
    a frame at full context within 80 ms. Each row also gives the cache bytes a slot allocates (measured
    on meta tensors), which the model's bytes per stream must include exactly."""
    rows = []
    for device, spec in DEVICE_MODELS.items():
        for weights, wbytes in (("bf16", 2), ("int8", 1)):
            resident = model_weight_bytes(cfg, wbytes, act_bytes)
            for kv_dtype, kv_label in (("auto", "bf16"), ("int8", "int8")):
                per_stream = stream_bytes(cfg, act_bytes, kv_dtype)["total"]
                fit = max(0, math.floor((spec["memory_bytes"] - resident - reserve_bytes) / per_stream))
                parts = frame_bytes(cfg, 1, cfg.context, 1, act_bytes, wbytes, kv_dtype)
                weights_read = sum(v for k, v in parts.items() if k.endswith(("weights", "head")))
                per_stream_read = parts["self_attention_kv"] + parts["image_kv"]
                budget_bytes = spec["bandwidth_bytes_per_s"] * FRAME_BUDGET_MS / 1e3
                by_bandwidth = max(0, math.floor((budget_bytes - weights_read) / per_stream_read))
                rows.append({"preset": preset_name, "device": device, "weights": weights, "kv": kv_label,
                             "source": "model", "memory_bytes": spec["memory_bytes"], "weights_bytes": resident,
                             "bytes_per_stream": per_stream,
                             "kv_bytes_allocated_per_stream": allocated_kv_bytes(cfg, torch.bfloat16, kv_dtype),
                             "streams_fit_memory": fit, "streams_fit_bandwidth": by_bandwidth,
                             "streams_fit": min(fit, by_bandwidth),
                             "frame_ms_at_fit": (weights_read + min(fit, by_bandwidth) * per_stream_read)
                             / spec["bandwidth_bytes_per_s"] * 1e3})
    return rows


def default_streams(device: torch.device, fit: int | None) -> list[int]:
    if device.type != "cuda":
        return CPU_STREAMS
    return sorted({b for b in GPU_STREAMS if b <= fit} | ({fit} if fit else set())) or [1]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(args, weights: dict | None = None, log=print) -> tuple[dict, list[dict], dict]:
    """(env, rows, capacity) for `args` (parsed by `parser()`)."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = preset(args.preset)
    env = environment(device)
    act_bytes = torch.empty((), dtype=dtype).element_size()
    weight_bytes = 1 if args.weights == "int8" else act_bytes
    position = cfg.context if args.position is None else args.position
    per = stream_bytes(cfg, act_bytes, args.kv_dtype)
    reserve = args.reserve_gb * GIB
    weights_label = "int8 weights" if args.weights == "int8" else f"dense weights in {dtype}"
    log(f"# concurrency: preset {args.preset}, backend {args.backend}, {weights_label}, KV cache {args.kv_dtype}, "
        f"on {env['device']} ({'GPU' if device.type == 'cuda' else 'CPU figures, not GPU'}); commit {env['commit']}")
    kv_element = "1 B + a 4 B scale per head vector" if args.kv_dtype == "int8" else f"{act_bytes} B"
    log(f"# memory per stream: self-attention KV at full context ({cfg.num_layers} layers x K,V x {cfg.context} "
        f"x {cfg.dim} x {kv_element}) {per['self_attention_kv'] / 1e6:.1f} MB + image K/V ({cfg.num_image_tokens} "
        f"x K,V x {cfg.dim} x {act_bytes} B) {per['image_kv'] / 1e6:.2f} MB = {per['total'] / 1e6:.1f} MB")
    if weights is None:
        weights = model_weights(cfg, dtype, device, args.weights, args.seed)
    capacity = {"bytes_per_stream": per["total"], "bytes_per_stream_by_part": per, "reserve_bytes": reserve,
                "start_position": position, "budget_ms": FRAME_BUDGET_MS}
    fit = None
    if device.type == "cuda":
        release(device)
        free, total = torch.cuda.mem_get_info(device)
        fit = max(0, math.floor((free - reserve) / per["total"]))
        capacity.update(source="measured: torch.cuda.mem_get_info after loading the weights", free_bytes=free,
                        total_bytes=total, streams_fit_memory=fit)
        log(f"# device memory (measured): {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB after the weights; "
            f"less {args.reserve_gb:g} GiB reserve -> {fit} streams fit")
    else:
        capacity.update(source="none measured on CPU: see the capacity model (H100/H200, not a measurement)",
                        streams_fit_memory=None)
        log("# no GPU: device-memory capacity is not measured here; the model below describes an H100 80 GB and "
            "an H200 141 GB")
    bandwidth = copy_bandwidth(device)
    env["copy_bandwidth_bytes_per_s"] = bandwidth
    streams = args.streams or default_streams(device, fit)
    log(f"# streams at position {position} (window {min(position + 1, cfg.context)} of {cfg.context}), "
        f"{args.warmup} warm-up + {args.frames} timed frames per count; budget {FRAME_BUDGET_MS:.0f} ms")
    rows = []
    for b in streams:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            r = run_config(cfg, weights, args.backend, b, args.frames, args.warmup, device, bandwidth, weight_bytes,
                           args.seed, position, kv_dtype=args.kv_dtype)
        except torch.OutOfMemoryError as e:
            rows.append({"streams": b, "batch": b, "backend": args.backend, "oom": True, "timed": False,
                         "error": str(e).splitlines()[0]})
            log(f"# {b} streams: out of memory")
            release(device)
            break
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        r.pop("times_ms", None)
        r.update(streams=b, oom=False, miss_rate=r["deadline_misses"] / r["frames"],
                 holds_budget=r["p99_ms"] <= FRAME_BUDGET_MS, peak_memory_bytes=peak,
                 peak_gib=peak / GIB if peak else None, preset=args.preset,
                 weights=args.weights, dtype=str(dtype).removeprefix("torch."), device_type=device.type)
        rows.append(r)
        release(device)
        if not r["holds_budget"]:
            break
    held = [r["streams"] for r in rows if r.get("holds_budget")]
    capacity["max_streams_p99_within_budget"] = max(held) if held else 0
    last = rows[-1] if rows else {}
    if last.get("oom"):
        capacity["limited_by"] = "out of memory"
    elif rows and not last.get("holds_budget"):
        capacity["limited_by"] = "latency (p99 over budget)"
    elif fit is not None and held and max(held) >= fit:
        capacity["limited_by"] = "memory (the largest count that fits)"
    else:
        capacity["limited_by"] = "the sweep's end (no count over budget)"
    # the model describes the released model's sizes (a smaller preset would fit millions of streams)
    capacity["model"] = capacity_model(preset("moshika-vis"), "moshika-vis", reserve)
    return env, rows, capacity


def report(rows: list[dict], capacity: dict, env: dict, log=print) -> None:
    log(table(rows, [("streams", "streams", "d"), ("p50 ms", "p50_ms", ".2f"), ("p90 ms", "p90_ms", ".2f"),
                     ("p99 ms", "p99_ms", ".2f"), ("max ms", "max_ms", ".2f"), ("misses", "deadline_misses", "d"),
                     ("miss %", "miss_rate", ".1%"), ("stream-frames/s", "stream_frames_per_s", ".1f"),
                     ("p99 <= 80 ms", "holds_budget", ""), ("peak GiB", "peak_gib", ".1f"), ("OOM", "oom", "")]))
    where = "GPU" if env["device_type"] == "cuda" else "CPU figures, not GPU"
    log(f"largest stream count holding p99 <= {FRAME_BUDGET_MS:.0f} ms: {capacity['max_streams_p99_within_budget']}"
        f" (measured on {env['device']}, {where}; limited by {capacity['limited_by']})")
    log("\n# capacity model (NOT measured): moshika-vis sizes, image K/V in bf16, self-attention KV (\"KV\") in bf16 "
        f"or int8, full context, distinct images, reserve {capacity['reserve_bytes'] / GIB:g} GiB, vendor peak "
        "bandwidth; \"KV MB allocated\": a slot's cache tensors as allocated (meta device)")
    model = [r | {"weights_gib": r["weights_bytes"] / GIB, "mb_per_stream": r["bytes_per_stream"] / 1e6,
                  "kv_mb_allocated": r["kv_bytes_allocated_per_stream"] / 1e6} for r in capacity["model"]]
    log(table(model, [("preset", "preset", ""), ("device (model)", "device", ""), ("weights", "weights", ""),
                      ("KV", "kv", ""), ("weights GiB", "weights_gib", ".1f"),
                      ("KV MB allocated", "kv_mb_allocated", ".1f"), ("MB/stream", "mb_per_stream", ".1f"),
                      ("fit by memory", "streams_fit_memory", "d"), ("fit by bandwidth @80ms", "streams_fit_bandwidth", "d"),
                      ("streams", "streams_fit", "d"), ("roofline ms at that", "frame_ms_at_fit", ".1f")]))


def parser() -> cli.ArgumentParser:
    ap = cli.ArgumentParser(prog="python -m bench.concurrency", description=__doc__)
    cuda = torch.cuda.is_available()
    ap.add_argument("--preset", type=cli.preset_name, default="moshika-vis" if cuda else "small")
    ap.add_argument("--backend", default="triton" if cuda else "torch", choices=["torch", "triton"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "int8"])
    add_kv_dtype_arg(ap)
    ap.add_argument("--streams", type=cli.positive_int, nargs="+", default=None,
                    help=f"stream counts (default on GPU: {GPU_STREAMS} up to the memory fit, and the fit; "
                         f"on CPU: {CPU_STREAMS})")
    ap.add_argument("--frames", type=cli.positive_int, default=30)
    ap.add_argument("--warmup", type=cli.non_negative_int, default=3)
    ap.add_argument("--position", type=cli.non_negative_int, default=None,
                    help="frames already spoken by every stream (default: the context: a full window)")
    ap.add_argument("--reserve-gb", type=float, default=3.0,
                    help="GiB kept free for activations and allocator slack when counting streams that fit")
    ap.add_argument("--device", type=cli.device_name, default="cuda" if cuda else "cpu")
    add_common_args(ap)
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.backend == "triton" and args.device != "cuda":
        ap.error("--backend triton needs a GPU (its kernels would run in the Triton interpreter)")
    set_threads(args.threads)
    env, rows, capacity = measure(args)
    report(rows, capacity, env)
    write_json(args.json, "concurrency", env, rows, capacity=capacity)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
