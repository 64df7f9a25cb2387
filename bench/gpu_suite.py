"""Everything that needs a GPU, in one command, into at most 8 files. Sized for under 8 minutes on an
H100: the kernels section gets whatever time --budget-min (default 7.5) leaves and skips the rest.

python -m bench.gpu_suite --out DIR [--allow-cpu] [--quick] [--skip SECTION ...] [--budget-min M]
                          [--kv-dtype auto|int8]

Runs, on seeded random weights at the real moshika-vis sizes in bf16:
  frame_latency  backends torch and triton, B = 1, 8, 32 (fresh streams); triton at B = 1 also without
                 its CUDA graph (--eager), and triton with INT8 weights
  concurrency    the triton backend at full context, streams swept up to what fits in memory
  kernels        every kernel against its baselines (bench.kernels; self-attention with a bf16 and an int8
                 KV cache), within the time left
  audit          the sm_90a static audit (bench.audit, a subprocess running beside the GPU work)
--kv-dtype sets the engines' self-attention cache in the frame_latency and concurrency sections.
Writes DIR/results.json (each section as its own command writes it, plus the environment),
DIR/summary.md (the tables) and DIR/frame_latency.png, DIR/concurrency.png, DIR/kernels.png.
The pytest GPU-only tests are separate (`pytest tests/test_kernels.py tests/test_engine.py` on the GPU
machine: bf16 kernels, CUDA graph replay, the sync-free frame).

Without CUDA it refuses to run unless --allow-cpu: then the small preset in fp32 on the CPU, one
thread, every figure labelled CPU (the triton backend's launches are counted on one interpreted
frame at B = 1; kernels: baselines timed on tiny shapes, ours checked in the interpreter, not timed).
--quick (smoke tests): the tiny preset, two frames, torch backend only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moshivis import cli, preset
from moshivis.state import add_kv_dtype_arg

from . import concurrency, frame_latency, kernels
from .common import FRAME_BUDGET_MS, document, environment, set_threads, table

SECTIONS = ("frame_latency", "concurrency", "kernels", "audit")
ROOT = Path(__file__).resolve().parents[1]


def plan(args, cuda: bool) -> dict:
    """The settings of every section for this device (and --quick)."""
    if args.quick:
        return {"preset": "tiny", "dtype": "float32", "fl_backends": ["torch"], "fl_batch": [1, 2], "fl_frames": 2,
                "fl_warmup": 1, "triton_batch": [], "cc_backend": "torch", "cc_streams": [1, 2], "cc_frames": 2,
                "cc_warmup": 1, "kernels_preset": "tiny", "kernels_only": ["embedding", "linear"]}
    if cuda:
        return {"preset": "moshika-vis", "dtype": "bfloat16", "fl_backends": ["torch", "triton"],
                "fl_batch": [1, 8, 32], "fl_frames": 40, "fl_warmup": 5, "triton_batch": [1, 8, 32],
                "cc_backend": "triton", "cc_streams": None, "cc_frames": 20, "cc_warmup": 3,
                "kernels_preset": "moshika-vis", "kernels_only": None}
    return {"preset": "small", "dtype": "float32", "fl_backends": ["torch", "triton"], "fl_batch": [1, 8, 32],
            "fl_frames": 20, "fl_warmup": 3, "triton_batch": [1], "cc_backend": "torch", "cc_streams": None,
            "cc_frames": 10, "cc_warmup": 2, "kernels_preset": "tiny", "kernels_only": None}


def start_audit(out: Path) -> subprocess.Popen:
    """bench.audit in a subprocess (it compiles for sm_90a: TRITON_INTERPRET must be unset there)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.Popen([sys.executable, "-m", "bench.audit", "--arch", "sm_90a", "--json", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_audit(proc: subprocess.Popen, json_path: Path, timeout: float) -> dict:
    try:
        output, _ = proc.communicate(timeout=max(timeout, 60))
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return {"benchmark": "audit", "status": "timed out", "returncode": None, "output": output[-4000:]}
    doc = json.loads(json_path.read_text()) if json_path.exists() else {"benchmark": "audit", "results": []}
    return doc | {"returncode": proc.returncode, "status": "ok" if proc.returncode == 0 else "failed",
                  "output": output[-4000:]}


# ---- plots --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_frame_latency(rows: list[dict], label: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=80)
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = [r for r in rows if r["backend"] == backend and r.get("timed")]
        if pts:
            b = [r["batch"] for r in pts]
            ax.plot(b, [r["p50_ms"] for r in pts], "o-", label=f"{backend} p50")
            ax.plot(b, [r["p99_ms"] for r in pts], "x--", label=f"{backend} p99")
    roof = [r for r in rows if r.get("roofline_ms") is not None and r["backend"] == rows[0]["backend"]]
    if roof:
        ax.plot([r["batch"] for r in roof], [r["roofline_ms"] for r in roof], ":", color="gray",
                label="memory roofline")
    ax.axhline(FRAME_BUDGET_MS, color="red", lw=0.8, label="80 ms budget")
    ax.set(xlabel="streams in the batch (B)", ylabel="frame latency (ms)", title=f"Frame latency ({label})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_concurrency(rows: list[dict], capacity: dict, label: str, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=80)
    pts = [r for r in rows if r.get("timed")]
    if pts:
        s = [r["streams"] for r in pts]
        ax.plot(s, [r["p50_ms"] for r in pts], "o-", label="p50")
        ax.plot(s, [r["p99_ms"] for r in pts], "x--", label="p99")
    ax.axhline(FRAME_BUDGET_MS, color="red", lw=0.8, label="80 ms budget")
    if capacity.get("streams_fit_memory"):
        ax.axvline(capacity["streams_fit_memory"], color="gray", ls=":", label="fits in memory (measured)")
    ax.set(xlabel="concurrent streams at full context", ylabel="frame latency (ms)", title=f"Concurrency ({label})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_kernels(rows: list[dict], label: str, path: Path) -> None:
    """One panel per kernel (per shape for the linears): microseconds against the batch, log-log."""
    plt = _pyplot()
    from matplotlib import ticker
    panels = {}
    for r in rows:
        if not r.get("us") or "impl" not in r:
            continue
        if r["kernel"] == "linear":
            key, x = f"linear {r['shape']} {r['K']}->{r['N']}", r["M"]
        elif r["kernel"] == "sampling":
            key, x = f"sampling V={r['V']}", r["B"]
        else:
            key, x = r["kernel"], r["B"]
        name = r["impl"] + (" (graph)" if r["cuda_graph"] else "")
        panels.setdefault(key, {}).setdefault(name, []).append((x, r["us"]))
    if not panels:
        return
    cols = 3
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 3.1 * nrows), dpi=72, squeeze=False)
    for ax, (key, series) in zip(axes.flat, panels.items()):
        for name, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "--" if "graph" in name else "-", marker=".",
                    label=name, lw=2.2 if name.startswith("triton") else 1.0)
        ax.set(xscale="log", yscale="log", title=key, xlabel="M" if key.startswith("linear") else "B", ylabel="us")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.ScalarFormatter())
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"Kernels vs baselines ({label})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the suite ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__)
    ap.add_argument("--out", required=True, help="folder for results.json, summary.md and the plots")
    ap.add_argument("--allow-cpu", action="store_true", help="run without CUDA (small preset, labelled CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, a few frames (smoke tests)")
    ap.add_argument("--skip", nargs="+", choices=SECTIONS, default=[])
    ap.add_argument("--budget-min", type=float, default=7.5, help="wall-clock budget; kernels get what is left")
    ap.add_argument("--threads", type=cli.positive_int, default=None, help="CPU threads for torch (default: 1 on CPU)")
    add_kv_dtype_arg(ap)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench.gpu_suite: no CUDA device. This suite measures a GPU; run it on one, or pass --allow-cpu "
              "for a CPU run (small preset, every figure labelled CPU).", file=sys.stderr)
        return 2
    start = time.monotonic()
    deadline = start + args.budget_min * 60
    device = torch.device("cuda" if cuda else "cpu")
    set_threads(args.threads or (None if cuda else 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    p = plan(args, cuda)
    env = environment(device)
    where = f"{env['device']}, " + ("GPU" if cuda else "CPU figures, not GPU")
    summary: list[str] = []

    def log(text: str = "") -> None:
        print(text, flush=True)
        summary.append(text)

    def note(text: str) -> None:
        """A section's own output: its '# ' notes become list items in the markdown."""
        print(text, flush=True)
        if text.lstrip("\n").startswith("# "):
            summary.append("\n- " + text.lstrip("\n")[2:] if text.startswith("\n") else "- " + text[2:])
        else:
            if summary and summary[-1].lstrip("\n").startswith("- ") and text.startswith("|"):
                summary.append("")
            summary.append(text)

    log(f"# MoshiVis benchmark suite: {where}")
    log(f"\ncommit {env['commit']}, {env['time']}; torch {env['torch']}, triton {env['triton']}, "
        f"python {env['python']}, {env['threads']} CPU threads; preset {p['preset']} ({p['dtype']}), "
        f"seeded random weights.")
    if not cuda:
        log("\n**CPU run: every figure below is a CPU figure, not a GPU one.** Kernels in the Triton interpreter "
            "are not timed; GPU timings need `python -m bench.gpu_suite --out DIR` on a GPU.")
    results = {"benchmark": "gpu_suite", "env": env, "plan": p}
    tmp = Path(tempfile.mkdtemp())
    audit = None
    if "audit" not in args.skip and cuda:  # beside the GPU work; on a CPU run afterwards, not to skew timings
        audit = start_audit(tmp / "audit.json")
    seconds = {}

    weights = None
    if "frame_latency" not in args.skip or "concurrency" not in args.skip:
        weights = frame_latency.model_weights(preset(p["preset"]), frame_latency.DTYPES[p["dtype"]], device)

    if "frame_latency" not in args.skip:
        t0 = time.monotonic()
        log("\n## Frame latency (fresh streams, one image each)\n")
        fl_args = frame_latency.parser().parse_args(
            ["--preset", p["preset"], "--backend", *p["fl_backends"], "--dtype", p["dtype"],
             "--batch", *map(str, p["fl_batch"]), "--frames", str(p["fl_frames"]), "--warmup", str(p["fl_warmup"]),
             "--device", device.type, "--kv-dtype", args.kv_dtype])
        fl_env, rows = frame_latency.measure(fl_args, weights, note, batches={"triton": p["triton_batch"]})
        if cuda and "triton" in p["fl_backends"]:  # what the CUDA graph buys: the same frames launched eagerly
            eager_args = frame_latency.parser().parse_args(
                ["--preset", p["preset"], "--backend", "triton", "--dtype", p["dtype"], "--batch", "1", "--eager",
                 "--frames", str(p["fl_frames"]), "--warmup", str(p["fl_warmup"]), "--device", device.type,
                 "--kv-dtype", args.kv_dtype])
            for r in frame_latency.measure(eager_args, weights, note)[1]:
                rows.append(r | {"backend": "triton (eager)"})
            # INT8 weights: half the bytes of a frame (a second random model, quantized)
            int8_args = frame_latency.parser().parse_args(
                ["--preset", p["preset"], "--backend", "triton", "--dtype", p["dtype"], "--weights", "int8",
                 "--batch", *map(str, p["triton_batch"]), "--frames", str(p["fl_frames"]),
                 "--warmup", str(p["fl_warmup"]), "--device", device.type, "--kv-dtype", args.kv_dtype])
            for r in frame_latency.measure(int8_args, None, note)[1]:
                rows.append(r | {"backend": "triton (int8)"})
        for r in rows:
            r.pop("times_ms", None)
        frame_latency.report(rows, note)
        results["frame_latency"] = document("frame_latency", fl_env, rows)
        plot_frame_latency(rows, where, out / "frame_latency.png")
        seconds["frame_latency"] = time.monotonic() - t0

    if "concurrency" not in args.skip:
        t0 = time.monotonic()
        log(f"\n## Concurrency (streams at full context, {p['cc_backend']} backend)\n")
        argv_cc = ["--preset", p["preset"], "--backend", p["cc_backend"], "--dtype", p["dtype"], "--frames",
                   str(p["cc_frames"]), "--warmup", str(p["cc_warmup"]), "--device", device.type,
                   "--kv-dtype", args.kv_dtype]
        if p["cc_streams"]:
            argv_cc += ["--streams", *map(str, p["cc_streams"])]
        cc_env, cc_rows, capacity = concurrency.measure(concurrency.parser().parse_args(argv_cc), weights, log=note)
        concurrency.report(cc_rows, capacity, cc_env, note)
        results["concurrency"] = document("concurrency", cc_env, cc_rows, capacity=capacity)
        plot_concurrency(cc_rows, capacity, where, out / "concurrency.png")
        seconds["concurrency"] = time.monotonic() - t0
    del weights
    concurrency.release(device)

    if "kernels" not in args.skip:
        t0 = time.monotonic()
        log("\n## Kernels vs baselines\n")
        reserve = 60 if audit is not None else 0  # leave time to collect the audit
        argv_k = ["--preset", p["kernels_preset"], "--device", device.type,
                  "--budget-s", str(max(30.0, deadline - time.monotonic() - reserve))]
        if p["kernels_only"]:
            argv_k += ["--only", *p["kernels_only"]]
        k_env, k_rows = kernels.measure(kernels.parser().parse_args(argv_k), log=note)
        results["kernels"] = document("kernels", k_env, k_rows)
        plot_kernels(k_rows, where, out / "kernels.png")
        seconds["kernels"] = time.monotonic() - t0

    if "audit" not in args.skip:
        t0 = time.monotonic()
        if audit is None:
            audit = start_audit(tmp / "audit.json")
        doc = finish_audit(audit, tmp / "audit.json", deadline - time.monotonic() if cuda else 900)
        results["audit"] = doc
        log(f"\n## Static audit (sm_90a, compiled without a GPU): {doc['status']}\n")
        if doc.get("results"):
            log(table(doc["results"], [("file", "file", ""), ("case", "case", ""), ("regs", "registers", "d"),
                                       ("spills B", "spills", "d"), ("smem B", "shared_bytes", "d"),
                                       ("global loads (count x bits)", "loads", ""), ("error", "error", "")]))
        seconds["audit"] = time.monotonic() - t0

    seconds["total"] = time.monotonic() - start
    results["seconds"] = seconds
    log(f"\nWall time: {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}.")
    log("\nFiles: results.json (every row, stable field names), summary.md (this), frame_latency.png, "
        "concurrency.png, kernels.png.")
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    failed = results.get("audit", {}).get("status") not in (None, "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
