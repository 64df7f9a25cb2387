"""Per-frame latency of the streaming runtime: the main benchmark (`make bench`).

python -m bench.frame_latency [--preset small|moshika-vis|tiny] [--backend torch triton]
       [--dtype float32|bfloat16] [--weights bf16|int8] [--batch 1 4 ...] [--frames N]
       [--warmup N] [--device cpu|cuda] [--json PATH]

For each backend and batch size: B streams, each with its own image and seed, on seeded random
weights, stepped frame by frame with Kyutai's default sampling. A frame is timed from the call to
the tokens on the host. Prints p50/p90/p99/max, stream-frames per second, the memory roofline of a
frame (bytes it must move over the measured copy bandwidth) and a per-phase breakdown (a separate
pass that synchronises at phase boundaries).
"""
from __future__ import annotations

import argparse
import time

import torch

from moshivis import Engine, preset, random_init
from moshivis.profiling import PhaseTimer

from .common import (FRAME_BUDGET_MS, copy_bandwidth, count_launches, environment, frame_bytes, percentile,
                     sync, table, write_json)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PHASES = ("temporal", "cross_attention", "depformer", "sampling")


def run_config(cfg, weights, backend: str, batch: int, frames: int, warmup: int, device: torch.device,
               bandwidth: float, weight_bytes: float, seed: int = 0) -> dict:
    engine = Engine(cfg, weights, max_streams=batch, backend=backend)
    gen = torch.Generator().manual_seed(seed)
    streams = [engine.open_stream(seed=seed + b, image=torch.randn(cfg.num_image_tokens, cfg.image_encoder_dim,
                                                                    generator=gen))
               for b in range(batch)]
    user = torch.randint(0, cfg.audio_card, (warmup + frames + 2, batch, cfg.num_audio_in), generator=gen)
    user = user.to(device)

    def frame(t):
        return engine.step(user[t], streams).cpu()

    for t in range(warmup):
        frame(t)
    sync(device)
    times_ms = []
    for t in range(warmup, warmup + frames):
        t0 = time.perf_counter()
        frame(t)
        times_ms.append((time.perf_counter() - t0) * 1e3)
    launches = count_launches(lambda: frame(warmup + frames))
    with PhaseTimer(device) as timer:
        frame(warmup + frames + 1)
    phases = {p: timer.seconds.get(p, 0.0) * 1e3 for p in PHASES}

    # The visible self-attention window during the timed frames, for the roofline.
    window = sum(min(t + 1, cfg.context) for t in range(warmup, warmup + frames)) / frames
    act_bytes = weights["llm.text_emb.weight"].element_size()
    parts = frame_bytes(cfg, batch, window, batch, act_bytes, weight_bytes)
    total = sum(parts.values())
    p50 = percentile(times_ms, 50)
    return {
        "backend": backend, "batch": batch, "frames": frames,
        "p50_ms": p50, "p90_ms": percentile(times_ms, 90), "p99_ms": percentile(times_ms, 99),
        "max_ms": max(times_ms), "mean_ms": sum(times_ms) / frames,
        "stream_frames_per_s": batch * 1e3 / p50, "deadline_misses": sum(t > FRAME_BUDGET_MS for t in times_ms),
        "bytes_per_frame": total, "bytes_by_part": parts, "roofline_ms": total / bandwidth * 1e3,
        "roofline_ratio": p50 / (total / bandwidth * 1e3),
        "launches_per_frame": launches["total"], "launches": launches,
        "phases_ms": phases, **{f"{p}_ms": v for p, v in phases.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--backend", nargs="+", default=["torch"], choices=["torch", "triton"])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "int8"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here as JSON")
    args = ap.parse_args(argv)
    if args.weights != "bf16":
        ap.error("--weights int8 needs the int8 weight path (issue [int8]), not built yet")
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    cfg = preset(args.preset)
    env = environment(device)
    weights_label = "int8 weights" if args.weights == "int8" else f"dense weights in {dtype}"
    print(f"# frame latency: preset {args.preset}, {weights_label}, on {env['device']}"
          f" ({'CPU figures, not GPU' if device.type == 'cpu' else 'GPU'}); commit {env['commit']}")
    weights = random_init(cfg, seed=args.seed, dtype=dtype, device=device)
    bandwidth = copy_bandwidth(device)
    weight_bytes = torch.empty((), dtype=dtype).element_size()
    print(f"# measured copy bandwidth {bandwidth / 1e9:.1f} GB/s; {args.warmup} warm-up frames, "
          f"{args.frames} timed; frame budget {FRAME_BUDGET_MS:.0f} ms")
    results = []
    for backend in args.backend:
        for batch in args.batch:
            r = run_config(cfg, weights, backend, batch, args.frames, args.warmup, device, bandwidth,
                           weight_bytes, args.seed)
            r.update(preset=args.preset, dtype=str(dtype).removeprefix("torch."), weights=args.weights)
            results.append(r)
    print(table(results, [("backend", "backend", ""), ("B", "batch", "d"), ("p50 ms", "p50_ms", ".2f"),
                          ("p90 ms", "p90_ms", ".2f"), ("p99 ms", "p99_ms", ".2f"), ("max ms", "max_ms", ".2f"),
                          ("stream-frames/s", "stream_frames_per_s", ".1f"),
                          ("roofline ms", "roofline_ms", ".3f"), ("p50/roofline", "roofline_ratio", ".1f"),
                          ("launches/frame", "launches_per_frame", "d"), ("misses", "deadline_misses", "d")]))
    print("\n# per-phase breakdown (ms, one frame, synchronised at phase boundaries)")
    print(table(results, [("backend", "backend", ""), ("B", "batch", "d")]
                + [(p, f"{p}_ms", ".2f") for p in PHASES]))
    write_json(args.json, "frame_latency", env, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
