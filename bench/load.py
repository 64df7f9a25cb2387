"""Load generator for the streaming server: N real WebSocket clients over localhost.

python -m bench.load --streams N --duration S [--preset small] [--backend torch|triton]
       [--mode realtime|lockstep] [--tick-ms 80] [--images distinct|shared|none] [--threads T]
       [--host H --port P] [--json PATH]

Without --port a server is started in this process (same event loop; the engine steps on its own
thread) around seeded random weights of --preset. With --host/--port the clients drive that server
instead. Each client opens a stream (seed = its index, Kyutai's default sampling, its own image
unless --images says otherwise) and sends random user tokens: in realtime mode one frame per tick
on its own clock (phases staggered across the tick, like independent microphones); in lockstep mode
the next frame as soon as the previous one is answered (the server's maximum throughput).

Reported: the server's frame latency (due time to tokens, from each `frame` reply) p50/p99/max and
its engine step alone p50/p99; the client-observed latency (audio sent to its tokens received:
waiting for the next tick + the frame + the network) p50/p99; deadline misses, frames and skipped
ticks from the server's /metrics; stream-frames per second received and the real-time factor
(stream-frames per second over N x 1000 / tick_ms); inputs late at their tick and stream-frames caught
up (from /metrics), inputs dropped because the server's queue was full (it is behind real time),
refusals and errors.
"""
from __future__ import annotations

import asyncio
import contextlib
import time

import torch
from websockets.exceptions import ConnectionClosed, InvalidStatus

from moshivis import cli
from moshivis.checkpoint import CheckpointError
from moshivis.client import Client, ServerError, image_key, refusal
from moshivis.config import ConfigError
from moshivis.serve import Server
from moshivis.serve.options import add_engine_args, add_server_args, build_engine, server_config

from .common import environment, percentile, write_json


async def scrape(host: str, port: int) -> dict[str, float]:
    """`GET /metrics`, parsed to {sample name with labels: value}."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    if " 200 " not in head.splitlines()[0]:
        raise RuntimeError(f"GET /metrics: {head.splitlines()[0]}")
    samples = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def run_client(i: int, host: str, port: int, cfg_image: tuple[int, int], images: str, mode: str,
                     duration: float, stats: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed * 100003 + i)
    image = None
    if images != "none":
        image = torch.randn(*cfg_image, generator=torch.Generator().manual_seed(
            seed if images == "shared" else seed * 100003 + i))
    loop = asyncio.get_running_loop()
    try:
        c = await Client.connect(host, port, session_id=image_key(image))  # a cluster routes by the image
    except OSError as e:
        stats["errors"].append(f"client {i}: connect: {e}")
        return
    except InvalidStatus as e:  # refused at the handshake (too many connections, a full cluster)
        stats["refusals"].append(f"client {i}: {refusal(e)}")
        return
    async with c:
        try:
            opened = await c.open(seed=i, image=image)
        except ServerError as e:
            stats["refusals"].append(f"client {i}: {e}")
            return
        n_audio, card, tick = opened["config"]["num_audio_in"], opened["config"]["audio_card"], opened["tick_ms"] / 1e3
        sent_at: dict[int, float] = {}  # ref -> when sent, until answered or dropped
        end = loop.time() + duration
        sent = 0

        async def send():
            nonlocal sent
            sent_at[sent] = loop.time()
            await c.audio(torch.randint(0, card, (n_audio,), generator=gen), ref=sent)
            sent += 1

        async def sender():
            if mode == "lockstep":
                for _ in range(2):
                    await send()
                return
            start = loop.time() + tick * i / max(1, stats["streams"])
            while (t := start + sent * tick) < end:
                await asyncio.sleep(max(0.0, t - loop.time()))
                await send()

        sending = asyncio.create_task(sender())
        try:
            while not (sending.done() and not sent_at and loop.time() >= end):
                msg = await c.recv()
                if msg is None:
                    stats["errors"].append(f"client {i}: connection closed")
                    return
                now, h = loop.time(), msg.header
                if msg.type == "frame":
                    stats["frame_ms"][h["tick"]] = h["frame_ms"], h["step_ms"]
                    stats["stream_frames"] += 1
                    stats["client_ms"].append((now - sent_at.pop(h["ref"])) * 1e3)
                    if mode == "lockstep" and now < end:
                        await send()
                elif msg.type == "error" and h["code"] == "queue_full":  # the server is behind: input dropped
                    sent_at.pop(h["ref"])
                    stats["dropped"] += 1
                elif msg.type in ("error", "shutdown"):
                    stats["errors"].append(f"client {i}: {h}")
                    if h.get("fatal", True):
                        return
            await c.close()
            while (msg := await c.recv()) is not None and msg.type != "closed":
                pass
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await sending


async def run(args) -> dict:
    server = None
    host, port = args.host, args.port
    if port is None:
        if args.threads:
            torch.set_num_threads(args.threads)
        args.max_streams = max(args.max_streams or 0, args.streams)
        engine = build_engine(args)
        server = await Server(engine, server_config(args, host, 0)).start()
        port = server.port
        cfg = engine.cfg
        env = environment(engine.device)
        image_shape = (cfg.num_image_tokens, cfg.image_encoder_dim)
    else:
        env = {**environment(torch.device("cpu")), "device": f"remote server {host}:{port}"}
        image_shape = None
    try:
        if image_shape is None:  # ask the server for its sizes
            async with await Client.connect(host, port) as c:
                opened = await c.open(seed=0)
                image_shape = (opened["config"]["num_image_tokens"], opened["config"]["image_encoder_dim"])
                await c.close()
        before = await scrape(host, port)
        stats = {"streams": args.streams, "frame_ms": {}, "client_ms": [], "stream_frames": 0,
                 "dropped": 0, "refusals": [], "errors": []}
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[
            run_client(i, host, port, image_shape, args.images, args.mode, args.duration, stats, args.seed)
            for i in range(args.streams)]), args.duration + 120)
        wall = time.perf_counter() - t0
        after = await scrape(host, port)
    finally:
        if server is not None:
            await server.shutdown("load test finished")
    frame_ms = [f for f, _ in stats["frame_ms"].values()]
    step_ms = [s for _, s in stats["frame_ms"].values()]
    tick_ms = after.get("moshivis_tick_seconds", args.tick_ms / 1e3) * 1e3

    def delta(name):
        return after.get(name, 0.0) - before.get(name, 0.0)

    def pct(samples, q):
        return percentile(samples, q) if samples else None

    stream_frames_per_s = stats["stream_frames"] / wall
    return {
        "env": env, "streams": args.streams, "duration_s": args.duration, "wall_s": wall, "mode": args.mode,
        "preset": args.preset if server else None, "backend": args.backend if server else None,
        "images": args.images, "tick_ms": tick_ms, "threads": torch.get_num_threads() if server else None,
        "frames": int(delta("moshivis_frames_total")),
        "deadline_misses": int(delta("moshivis_deadline_misses_total")),
        "budget_ms": after.get("moshivis_frame_budget_seconds", 0.08) * 1e3,
        "frame_p50_ms": pct(frame_ms, 50), "frame_p99_ms": pct(frame_ms, 99),
        "frame_max_ms": max(frame_ms) if frame_ms else None,
        "step_p50_ms": pct(step_ms, 50), "step_p99_ms": pct(step_ms, 99),
        "skipped_ticks": int(delta("moshivis_skipped_ticks_total")),
        "client_p50_ms": pct(stats["client_ms"], 50), "client_p99_ms": pct(stats["client_ms"], 99),
        "stream_frames": stats["stream_frames"], "stream_frames_per_s": stream_frames_per_s,
        "realtime_factor": stream_frames_per_s / (args.streams * 1e3 / tick_ms),
        "late_inputs": int(delta("moshivis_late_inputs_total")),
        "catchup_stream_frames": int(delta("moshivis_catchup_stream_frames_total")),
        "dropped_inputs": stats["dropped"],
        "refusals": len(stats["refusals"]), "errors": len(stats["errors"]),
        "error_messages": (stats["refusals"] + stats["errors"])[:10],
    }


def report(r: dict) -> str:
    label = "CPU figures, not GPU" if r["env"]["device_type"] == "cpu" and r["preset"] else r["env"]["device"]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return "\n".join([
        f"# load: {r['streams']} streams, {r['duration_s']} s, mode {r['mode']}, tick {r['tick_ms']:.0f} ms, "
        f"preset {r['preset']}, backend {r['backend']}, images {r['images']}, on {r['env']['device']} ({label}); "
        f"commit {r['env']['commit']}",
        f"server frame latency (due time -> tokens): p50 {f(r['frame_p50_ms'])} ms, p99 {f(r['frame_p99_ms'])} ms, "
        f"max {f(r['frame_max_ms'])} ms; engine step p50 {f(r['step_p50_ms'])} ms, p99 {f(r['step_p99_ms'])} ms",
        f"client latency (audio sent -> tokens received): p50 {f(r['client_p50_ms'])} ms, "
        f"p99 {f(r['client_p99_ms'])} ms",
        f"deadline misses: {r['deadline_misses']} of {r['frames']} frames (budget {r['budget_ms']:.0f} ms); "
        f"ticks skipped: {r['skipped_ticks']}",
        f"throughput: {r['stream_frames_per_s']:.1f} stream-frames/s ({r['stream_frames']} in {r['wall_s']:.1f} s), "
        f"real-time factor {r['realtime_factor']:.2f}",
        f"inputs late at their tick: {r['late_inputs']}, stream-frames caught up: {r['catchup_stream_frames']}; "
        f"inputs dropped (server queue full): {r['dropped_inputs']}; refusals: {r['refusals']}; errors: {r['errors']}",
        *[f"  {m}" for m in r["error_messages"]],
    ])


@cli.guard(ConfigError, CheckpointError, ValueError)
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m bench.load", description=__doc__)
    ap.add_argument("--streams", type=cli.positive_int, default=8)
    ap.add_argument("--duration", type=cli.positive_float, default=20.0, help="seconds of audio each client sends")
    ap.add_argument("--images", default="distinct", choices=["distinct", "shared", "none"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=cli.port_number, help="drive this server instead of starting one in-process")
    ap.add_argument("--json", help="also write the result here as JSON")
    add_server_args(ap)
    add_engine_args(ap)
    ap.set_defaults(max_streams=None)
    args = ap.parse_args(argv)
    r = asyncio.run(run(args))
    print(report(r))
    write_json(args.json, "load", r.pop("env"), [r])
    return 1 if r["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
