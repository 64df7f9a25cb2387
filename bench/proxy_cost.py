"""What Ray Serve's proxy adds per frame: `bench.load` against one server and against the cluster, one run.

python -m bench.proxy_cost [--preset small] [--streams 1,4] [--duration 10] [--mode lockstep|realtime]
       [--replicas 1] [--threads 1] [--num-gpus G] [--json PATH]

Starts `python -m moshivis.server` (direct: the client's WebSocket ends at the engine's process), runs
`bench.load --port P` against it for each stream count, stops it; then `python -m moshivis.cluster`
with the same engine options (--replicas replicas behind Serve's proxy and the image-affinity router;
on a machine without GPUs, logical ones), runs the same loads, stops it. The two never run at once.

Reported per stream count: the client-observed per-frame latency (input sent -> its tokens back) p50
and p99 of each, the proxy's added latency (cluster - direct, p50 and p99), the servers' own frame
latency (due time -> tokens, which the proxy does not see) and the transport's share alone (client
latency less frame latency, cluster - direct): on a small machine Ray's processes also slow the
engine itself, which the first difference includes and the last one does not. CPU figures are
labelled as such.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import torch

from moshivis import cli

from . import load
from .common import environment, write_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(argv: list[str], ready: str, timeout: float, env: dict | None = None):
    """`python -m ARGV` started, and stopped on the way out (SIGTERM, then kill after 90 s): yields
    (process, the match of `ready` in its output) once a line matches; `process.output` holds the lines."""
    proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})
    lines: queue.Queue = queue.Queue()
    proc.output = []
    reader = threading.Thread(target=lambda: [(lines.put(x), proc.output.append(x)) for x in proc.stdout],
                              daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + timeout
        match = None
        while match is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start:\n" + "".join(proc.output[-20:]))
            with contextlib.suppress(queue.Empty):
                match = re.search(ready, lines.get(timeout=1))
        yield proc, match
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)


def _loads(port: int, args, label: str) -> list[dict]:
    out = []
    for n in args.streams:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "load.json")
            print(f"## {label}, {n} streams", flush=True)
            load.main(["--host", "127.0.0.1", "--port", str(port), "--streams", str(n), "--duration",
                       str(args.duration), "--mode", args.mode, "--images", args.images, "--json", path])
            out.append({**json.load(open(path))["results"][0], "target": label})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m bench.proxy_cost", description=__doc__)
    ap.add_argument("--preset", default="small", type=cli.preset_name)
    ap.add_argument("--streams", default="1,4", help="stream counts, comma-separated")
    ap.add_argument("--duration", type=cli.positive_float, default=10.0)
    ap.add_argument("--mode", default="lockstep", choices=["lockstep", "realtime"])
    ap.add_argument("--images", default="distinct", choices=["distinct", "shared", "none"])
    ap.add_argument("--replicas", type=cli.positive_int, default=1)
    ap.add_argument("--threads", type=cli.positive_int, default=1)
    ap.add_argument("--num-gpus", type=cli.non_negative_int,
                    help="GPUs for Ray (default: detected, else --replicas logical ones)")
    ap.add_argument("--json", help="also write the results here as JSON")
    args = ap.parse_args(argv)
    try:
        args.streams = [cli.positive_int(x) for x in args.streams.split(",")]
    except argparse.ArgumentTypeError:
        ap.error(f"argument --streams: must be comma-separated positive integers, got {args.streams!r}")
    max_streams = max(args.streams)
    engine = ["--preset", args.preset, "--threads", str(args.threads), "--mode", args.mode,
              "--max-streams", str(max_streams)]
    port = _free_port()
    with started(["moshivis.server", *engine, "--port", str(port), "--log-level", "WARNING"],
                 r"ws://127\.0\.0\.1:\d+/", 120):
        direct = _loads(port, args, "direct")
    gpus = args.num_gpus if args.num_gpus is not None else (torch.cuda.device_count() or args.replicas)
    cluster = ["moshivis.cluster", *engine, "--replicas", str(args.replicas), "--num-gpus", str(gpus),
               "--cpus-per-replica", "0", "--port", str(port), "--log-level", "ERROR"]
    with started(cluster, r"replicas ready", 300, env={"RAY_AUTH_MODE": "disabled"}):
        served = _loads(port, args, "cluster")
    env = environment(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    label = "CPU figures, not GPU" if env["device_type"] == "cpu" else env["device"]
    print(f"\n# proxy cost: preset {args.preset}, mode {args.mode}, {args.duration:g} s per run, cluster of "
          f"{args.replicas} replica(s), on {env['device']} ({label}); commit {env['commit']}")
    print("| streams | direct p50 / p99 ms | cluster p50 / p99 ms | proxy adds p50 / p99 ms | server frame p50 "
          "direct / cluster ms | proxy adds beyond the frame, p50 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for d, c in zip(direct, served):
        row = {"streams": d["streams"], "direct_p50_ms": d["client_p50_ms"], "direct_p99_ms": d["client_p99_ms"],
               "cluster_p50_ms": c["client_p50_ms"], "cluster_p99_ms": c["client_p99_ms"],
               "proxy_p50_ms": c["client_p50_ms"] - d["client_p50_ms"],
               "proxy_p99_ms": c["client_p99_ms"] - d["client_p99_ms"],
               "frame_p50_direct_ms": d["frame_p50_ms"], "frame_p50_cluster_ms": c["frame_p50_ms"],
               # the transport alone: client latency less the server's own frame latency, cluster - direct
               "transport_p50_ms": (c["client_p50_ms"] - c["frame_p50_ms"]) - (d["client_p50_ms"] - d["frame_p50_ms"]),
               "errors": d["errors"] + c["errors"] + d["refusals"] + c["refusals"]}
        rows.append(row)
        print(f"| {row['streams']} | {row['direct_p50_ms']:.1f} / {row['direct_p99_ms']:.1f} | "
              f"{row['cluster_p50_ms']:.1f} / {row['cluster_p99_ms']:.1f} | {row['proxy_p50_ms']:+.1f} / "
              f"{row['proxy_p99_ms']:+.1f} | {row['frame_p50_direct_ms']:.1f} / {row['frame_p50_cluster_ms']:.1f} | "
              f"{row['transport_p50_ms']:+.1f} | {row['errors']} |")
    write_json(args.json, "proxy_cost", env, rows, runs=direct + served, preset=args.preset, mode=args.mode,
               replicas=args.replicas)
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
