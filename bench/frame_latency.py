"""Per-frame latency of the streaming runtime: the main benchmark (`make bench`).

python -m bench.frame_latency [--preset small|moshika-vis|tiny] [--backend torch triton]
       [--dtype float32|bfloat16] [--weights bf16|int8] [--kv-dtype auto|int8] [--batch 1 4 ...] [--frames N]
       [--warmup N] [--device cpu|cuda] [--eager] [--threads N] [--json PATH]

Defaults (`defaults`): on a machine with CUDA, both backends at the released model's sizes
(`moshika-vis`, random weights, bf16), batches 1 8 32; on a CPU, the torch backend on the `small`
preset, batches 1 4.

For each backend and batch size: B streams, each with its own image and seed, on seeded random
weights, stepped frame by frame with Kyutai's default sampling. A frame is timed from the call to
the tokens on the host (the triton backend replays one CUDA graph per frame on a GPU unless --eager).
Prints p50/p90/p99/max, stream-frames per second, the memory roofline of a
frame (bytes it must move over the measured copy bandwidth), kernel launches per frame and a
per-phase breakdown (a separate pass that synchronises at phase boundaries).

Without a GPU the triton backend's kernels run in the Triton interpreter (seconds per frame): its
launches per frame are counted on one frame, its latency is not measured (null in the JSON).
"""
from __future__ import annotations

import gc
import time

import torch

from moshivis import Engine, cli, preset, random_init
from moshivis.profiling import PhaseTimer
from moshivis.state import add_kv_dtype_arg

from .common import (FRAME_BUDGET_MS, add_common_args, copy_bandwidth, count_launches, environment, frame_bytes,
                     percentile, set_threads, sync, table, write_json)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PHASES = ("temporal", "cross_attention", "depformer", "sampling")


def model_weights(cfg, dtype: torch.dtype, device: torch.device, weights: str = "bf16", seed: int = 0) -> dict:
    """Seeded random weights in `dtype` on `device`; weights="int8": the checkpoint's INT8 linears."""
    w = random_init(cfg, seed=seed, dtype=dtype, device=device)
    if weights == "int8":
        from moshivis.quantize import quantize_weights
        quantize_weights(w, cfg)
    return w


def open_streams(engine: Engine, batch: int, gen: torch.Generator) -> list[int]:
    """B streams, each with its own image (distinct features) and seed."""
    cfg = engine.cfg
    return [engine.open_stream(seed=b, image=torch.randn(cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen))
            for b in range(batch)]


def run_config(cfg, weights, backend: str, batch: int, frames: int, warmup: int, device: torch.device,
               bandwidth: float, weight_bytes: float, seed: int = 0, position: int = 0,
               cuda_graphs: bool = True, kv_dtype: str = "auto") -> dict:
    """Latency of `frames` frames after `warmup` for B fresh streams (or streams fast-forwarded to
    `position`: the state's frame counters are set there, so attention reads that many cached
    positions; the cache contents do not change the work). With frames=0 only launches are counted.
    cuda_graphs=False keeps the triton backend's frames eager (no graph replay). kv_dtype: the engine's
    self-attention cache ("auto" or "int8"); the row records its allocated bytes per stream."""
    engine = Engine(cfg, weights, max_streams=batch, backend=backend, kv_dtype=kv_dtype)
    if backend == "triton":
        engine.backend.use_cuda_graphs = cuda_graphs
    gen = torch.Generator().manual_seed(seed)
    streams = open_streams(engine, batch, gen)
    user = torch.randint(0, cfg.audio_card, (warmup + frames + 2, batch, cfg.num_audio_in), generator=gen)
    if position:
        engine.state.t[:batch] = position

    out = torch.empty(batch, 1 + cfg.dep_q, dtype=torch.long)

    def frame(t):
        return engine.step(user[t], streams, out=out)

    engine.warmup()  # buffers, compilation and (on a GPU) each bucket's CUDA graph: never in a counted frame
    for t in range(warmup):
        frame(t)
    sync(device)
    times_ms = []
    for t in range(warmup, warmup + frames):
        t0 = time.perf_counter()
        frame(t)
        times_ms.append((time.perf_counter() - t0) * 1e3)
    launches = count_launches(lambda: frame(warmup + frames))
    graphs = backend == "triton" and device.type == "cuda" and cuda_graphs
    row = {"backend": backend, "batch": batch, "frames": frames, "start_position": position, "kv_dtype": kv_dtype,
           "kv_bytes_per_stream": engine.state.kv_bytes_allocated() // batch,
           "launches_per_frame": launches["total"], "launches": launches,
           "cuda_graphs": graphs and engine.backend.graph_error is None,
           "graph_error": engine.backend.graph_error if graphs else None}
    if not frames:
        return row | {"timed": False}
    with PhaseTimer(device) as timer:
        frame(warmup + frames + 1)
    phases = {p: timer.seconds.get(p, 0.0) * 1e3 for p in PHASES}

    # The visible self-attention window during the timed frames, for the roofline.
    window = sum(min(position + t + 1, cfg.context) for t in range(warmup, warmup + frames)) / frames
    act_bytes = weights["llm.text_emb.weight"].element_size()
    parts = frame_bytes(cfg, batch, window, batch, act_bytes, weight_bytes, kv_dtype)
    total = sum(parts.values())
    p50 = percentile(times_ms, 50)
    return row | {
        "timed": True, "p50_ms": p50, "p90_ms": percentile(times_ms, 90), "p99_ms": percentile(times_ms, 99),
        "max_ms": max(times_ms), "mean_ms": sum(times_ms) / frames, "times_ms": times_ms,
        "stream_frames_per_s": batch * 1e3 / p50, "deadline_misses": sum(t > FRAME_BUDGET_MS for t in times_ms),
        "bytes_per_frame": total, "bytes_by_part": parts, "roofline_ms": total / bandwidth * 1e3,
        "roofline_ratio": p50 / (total / bandwidth * 1e3),
        "phases_ms": phases, **{f"{p}_ms": v for p, v in phases.items()},
    }


def measure(args, weights: dict | None = None, log=print, batches: dict | None = None) -> tuple[dict, list[dict]]:
    """(env, rows) for every backend x batch of `args` (parsed by `parser()`); `weights` reuses a
    dict from `model_weights` (same preset, dtype and device); batches: backend -> batch sizes, to
    override args.batch for some backends."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = preset(args.preset)
    env = environment(device)
    weights_label = "int8 weights" if args.weights == "int8" else f"dense weights in {dtype}"
    log(f"# frame latency: preset {args.preset}, {weights_label}, KV cache {args.kv_dtype}, on {env['device']}"
        f" ({'CPU figures, not GPU' if device.type == 'cpu' else 'GPU'}); commit {env['commit']}")
    if weights is None:
        weights = model_weights(cfg, dtype, device, args.weights, args.seed)
    bandwidth = copy_bandwidth(device)
    weight_bytes = 1 if args.weights == "int8" else torch.empty((), dtype=dtype).element_size()
    log(f"# measured copy bandwidth {bandwidth / 1e9:.1f} GB/s; {args.warmup} warm-up frames, "
        f"{args.frames} timed; frame budget {FRAME_BUDGET_MS:.0f} ms")
    rows = []
    for backend in args.backend:
        interpreted = backend == "triton" and device.type != "cuda"
        if interpreted:
            log("# triton backend without a GPU: kernels run in the Triton interpreter, so only its launches "
                "per frame are counted (one frame); its latency needs a GPU")
        for batch in (batches or {}).get(backend, args.batch):
            frames, warmup = (0, 1) if interpreted else (args.frames, args.warmup)  # counted: a steady frame
            try:
                r = run_config(cfg, weights, backend, batch, frames, warmup, device, bandwidth, weight_bytes,
                               args.seed, cuda_graphs=not args.eager, kv_dtype=args.kv_dtype)
            except torch.OutOfMemoryError as e:
                r = {"backend": backend, "batch": batch, "timed": False, "oom": True, "error": str(e).splitlines()[0]}
                log(f"# {backend} B={batch}: out of memory")
            r.update(preset=args.preset, dtype=str(dtype).removeprefix("torch."), weights=args.weights,
                     device_type=device.type, interpreted=interpreted)
            rows.append(r)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    env["copy_bandwidth_bytes_per_s"] = bandwidth
    return env, rows


def report(rows: list[dict], log=print) -> None:
    log(table(rows, [("backend", "backend", ""), ("B", "batch", "d"), ("p50 ms", "p50_ms", ".2f"),
                     ("p90 ms", "p90_ms", ".2f"), ("p99 ms", "p99_ms", ".2f"), ("max ms", "max_ms", ".2f"),
                     ("stream-frames/s", "stream_frames_per_s", ".1f"),
                     ("roofline ms", "roofline_ms", ".3f"), ("p50/roofline", "roofline_ratio", ".1f"),
                     ("launches/frame", "launches_per_frame", "d"), ("misses", "deadline_misses", "d")]))
    timed = [r for r in rows if r.get("timed")]
    if timed:
        log("\n# per-phase breakdown (ms, one frame, synchronised at phase boundaries)")
        log(table(timed, [("backend", "backend", ""), ("B", "batch", "d")] + [(p, f"{p}_ms", ".2f") for p in PHASES]))


def defaults(cuda: bool) -> dict:
    """What a run without arguments measures. With CUDA: both backends at the released model's sizes
    (random weights, bf16, the --dtype default there); without: the torch backend on the CPU-sized
    `small` preset (the triton backend would run in the interpreter, where only launches are counted)."""
    if cuda:
        return {"preset": "moshika-vis", "backend": ["torch", "triton"], "batch": [1, 8, 32], "device": "cuda"}
    return {"preset": "small", "backend": ["torch"], "batch": [1, 4], "device": "cpu"}


def parser(cuda: bool | None = None) -> cli.ArgumentParser:
    """The command's arguments; defaults from `defaults(cuda)` (default: whether torch sees a GPU)."""
    d = defaults(torch.cuda.is_available() if cuda is None else cuda)
    ap = cli.ArgumentParser(prog="python -m bench.frame_latency", description=__doc__)
    ap.add_argument("--preset", type=cli.preset_name, default=d["preset"])
    ap.add_argument("--backend", nargs="+", default=d["backend"], choices=["torch", "triton"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "int8"],
                    help="bf16: dense weights in --dtype; int8: the INT8 checkpoint layout (linears int8)")
    add_kv_dtype_arg(ap)
    ap.add_argument("--batch", type=cli.positive_int, nargs="+", default=d["batch"])
    ap.add_argument("--frames", type=cli.positive_int, default=40)
    ap.add_argument("--warmup", type=cli.non_negative_int, default=5)
    ap.add_argument("--device", type=cli.device_name, default=d["device"])
    ap.add_argument("--eager", action="store_true",
                    help="triton backend: launch every kernel each frame instead of replaying a CUDA graph")
    add_common_args(ap)
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    set_threads(args.threads)
    env, rows = measure(args)
    report(rows)
    write_json(args.json, "frame_latency", env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
