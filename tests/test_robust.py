"""The server under jitter, stalls and floods (issue [robust]); every wait bounded.

Real-time clients here keep their own clock (one input per tick, like a microphone) and measure the
delay from each input sent to the reply that consumed it. The oracles: the delays before a stall,
the policy's promises (back within 2 frames within 2 s, nothing lost silently, others not delayed),
the metrics' counts, and the server process's own RSS.
"""
from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time

import pytest
import torch

from moshivis import Engine
from moshivis import protocol as P
from moshivis.client import Client
from test_serve import cfg, HOST, metrics_text, parse_metrics, run, server_process, serving, weights  # noqa: F401

# Measures delays and memory in real time: under `make test`'s two xdist workers these tests run in one of
# them, one after the other (the other worker runs the rest of the suite beside them).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("real_time")]

TICK_MS = 80.0


async def paced_client(port: int, cfg, frames: int, stall: tuple[int, float] | None = None, seed: int = 0,
                       phase: float = 0.0) -> list[tuple[float, float]]:
    """Opens a stream and sends one input per tick on its own clock; `stall` (at input i, seconds): holds
    its inputs that long, then sends the backlog at once (a network stall). Returns, per input, (time sent
    relative to the first, delay to its reply in seconds)."""
    loop = asyncio.get_running_loop()
    async with await Client.connect(HOST, port) as c:
        await c.open(seed=seed)
        sent_at: dict[int, float] = {}
        delays: dict[int, float] = {}
        start = loop.time() + phase

        async def sender():
            for i in range(frames):
                due = start + i * TICK_MS / 1e3
                if stall is not None and stall[0] <= i and due < start + stall[0] * TICK_MS / 1e3 + stall[1]:
                    continue  # held back: sent with the burst below
                await asyncio.sleep(max(0.0, due - loop.time()))
                if stall is not None and i == stall[0] + int(stall[1] * 1e3 / TICK_MS) + 1:
                    for j in range(stall[0], i):  # the burst
                        sent_at[j] = loop.time()
                        await c.audio(torch.full((cfg.num_audio_in,), j % cfg.audio_card), ref=j)
                sent_at[i] = loop.time()
                await c.audio(torch.full((cfg.num_audio_in,), i % cfg.audio_card), ref=i)

        task = asyncio.create_task(sender())
        while len(delays) < frames:
            msg = await asyncio.wait_for(c.recv(), 10)
            assert msg is not None and msg.type == "frame", msg
            assert msg.header["seq"] == len(delays) == msg.header["ref"]  # every input answered, in order
            delays[msg.header["ref"]] = loop.time() - sent_at[msg.header["ref"]]
        await task
    t0 = sent_at[0]
    return [(sent_at[i] - t0, delays[i]) for i in range(frames)]


def window(trace, lo: float, hi: float) -> list[float]:
    return [d for t, d in trace if lo <= t < hi]


def test_delay_returns_after_a_client_stall_and_others_are_not_delayed(cfg, weights):
    """One client stalls 600 ms then bursts: its delay is back within 2 frames of its pre-stall value
    within 2 s; the other client's delays do not move; catch-up frames are counted."""
    engine = Engine(cfg, weights, max_streams=2)
    stall_at, stall_s, frames = 25, 0.6, 70

    async def scenario():
        async with serving(engine, mode="realtime", tick_ms=TICK_MS) as server:
            a, b = await asyncio.gather(paced_client(server.port, cfg, frames, (stall_at, stall_s), seed=1),
                                        paced_client(server.port, cfg, frames, seed=2, phase=0.03))
            return a, b, parse_metrics(await metrics_text(server.port))[1]

    a, b, samples = run(scenario(), timeout=60)
    stall_t, back_t = stall_at * TICK_MS / 1e3, (stall_at * TICK_MS / 1e3 + stall_s)
    before = statistics.median(window(a, 0.4, stall_t))
    after = window(a, back_t + 2.0, 99)
    print(f"client stall: delay {before * 1e3:.0f} ms before, at most {max(window(a, stall_t, back_t + 0.5)) * 1e3:.0f}"
          f" ms in it, {statistics.median(after) * 1e3:.0f} ms (max {max(after) * 1e3:.0f}) from 2 s after it")
    assert len(after) >= 10 and max(after) <= before + 2 * TICK_MS / 1e3, (before, after)
    b_before, b_during = statistics.median(window(b, 0.4, stall_t)), window(b, stall_t, back_t + 2.0)
    assert max(b_during) <= b_before + 2 * TICK_MS / 1e3, (b_before, b_during)
    assert samples["moshivis_catchup_stream_frames_total"] >= int(stall_s * 1e3 / TICK_MS) - 2
    # each catch-up frame holds the stalled stream, at most both: frames and stream-frames both counted
    catchup = samples["moshivis_catchup_frames_total"]
    assert 0 < catchup <= samples["moshivis_catchup_stream_frames_total"] <= 2 * catchup
    assert samples["moshivis_dropped_inputs_total"] == 0
    assert samples["moshivis_stream_frames_total"] == 2 * frames  # nothing invented, nothing lost


def test_delay_returns_after_a_server_stall(cfg, weights):
    """The engine thread stalls 1.6 s once (as a large image on it did): both streams fall 20 frames
    behind and are back within 2 frames of their delay within 2 s."""
    engine = Engine(cfg, weights, max_streams=2)
    step, stalled = engine.step, threading.Event()
    stall_after, stall_s, frames = 20, 1.6, 75

    def step_once_slow(*args, **kwargs):
        if engine_frames[0] == stall_after and not stalled.is_set():
            stalled.set()
            time.sleep(stall_s)
        engine_frames[0] += 1
        return step(*args, **kwargs)

    engine_frames = [0]
    engine.step = step_once_slow

    async def scenario():
        async with serving(engine, mode="realtime", tick_ms=TICK_MS) as server:
            return await asyncio.gather(paced_client(server.port, cfg, frames, seed=1),
                                        paced_client(server.port, cfg, frames, seed=2, phase=0.04))

    traces = run(scenario(), timeout=60)
    assert stalled.is_set()
    for trace in traces:
        stall_t = next(t for t, d in trace if d > 1.0)  # the first input caught in the stall
        before = statistics.median(window(trace, 0.4, stall_t))
        after = window(trace, stall_t + stall_s + 2.0, 99)
        print(f"server stall: delay {before * 1e3:.0f} ms before, {statistics.median(after) * 1e3:.0f} ms (max "
              f"{max(after) * 1e3:.0f}) from 2 s after it")
        assert len(after) >= 5 and max(after) <= before + 2 * TICK_MS / 1e3, (before, after)


def test_silent_client_is_closed_with_a_reason_and_counted(cfg, weights):
    engine = Engine(cfg, weights, max_streams=1)

    async def scenario():
        async with serving(engine, mode="realtime", tick_ms=TICK_MS, input_timeout_s=0.5) as server:
            async with await Client.connect(HOST, server.port) as c:
                await c.open(seed=1)
                await c.audio(torch.zeros(cfg.num_audio_in, dtype=torch.int32))
                assert (await c.recv()).type == "frame"
                t0 = time.monotonic()
                msg = await asyncio.wait_for(c.recv(), 5)  # then silence from the client
                waited = time.monotonic() - t0
                assert (msg.type, msg.header["code"], msg.header["fatal"]) == ("error", "input_timeout", True)
                assert await c.recv() is None and c.ws.close_code == 1008
            async with await Client.connect(HOST, server.port) as c:  # its slot is free again
                await c.open(seed=2)
            return waited, parse_metrics(await metrics_text(server.port))[1]

    waited, samples = run(scenario())
    assert 0.4 < waited < 2.0
    assert samples['moshivis_closes_total{reason="input_timeout"}'] == 1


def test_a_stream_with_queued_input_is_not_timed_out(cfg, weights):
    """A burst of 10 inputs, then silence, on a server stepping 0.15 s per frame with a 0.5 s input timeout:
    the stream is not silent while its input waits (1.5 s of work), so every input is answered by a frame
    before the input timeout closes it."""
    engine = Engine(cfg, weights, max_streams=1)
    step = engine.step

    def slow_step(*args, **kwargs):
        time.sleep(0.15)
        return step(*args, **kwargs)

    engine.step = slow_step

    async def scenario():
        async with serving(engine, mode="realtime", tick_ms=TICK_MS, input_timeout_s=0.5,
                           max_catchup_per_tick=0) as server:
            async with await Client.connect(HOST, server.port) as c:
                await c.open(seed=1)
                for i in range(10):
                    await c.audio(torch.full((cfg.num_audio_in,), i % cfg.audio_card), ref=i)
                got = []
                while (msg := await asyncio.wait_for(c.recv(), 10)) is not None:
                    got.append(msg.header["ref"] if msg.type == "frame" else msg.header["code"])
                return got

    assert run(scenario()) == [*range(10), "input_timeout"]


def test_inputs_beyond_the_queue_bound_are_refused_and_counted(cfg, weights):
    """60 inputs at once while the engine is held inside the frame of input 0: exactly max_queued_frames (5)
    of them are queued, the other 54 are each answered queue_full and counted as dropped; once the engine
    goes on, the queued ones are answered by frames, in order (nothing lost silently)."""
    engine = Engine(cfg, weights, max_streams=1)
    step, entered, release = engine.step, threading.Event(), threading.Event()

    def held_step(*args, **kwargs):
        entered.set()
        assert release.wait(20), "the test never released the engine"
        return step(*args, **kwargs)

    engine.step = held_step

    async def scenario():
        async with serving(engine, mode="realtime", tick_ms=TICK_MS, max_queued_frames=5) as server:
            async with await Client.connect(HOST, server.port) as c:
                await c.open(seed=1)
                await c.audio(torch.full((cfg.num_audio_in,), 0), ref=0)
                assert await asyncio.to_thread(entered.wait, 10)  # input 0 is in the engine: the queue is empty
                for i in range(1, 60):
                    await c.audio(torch.full((cfg.num_audio_in,), i % cfg.audio_card), ref=i)
                refused = []
                while len(refused) < 54:
                    msg = await asyncio.wait_for(c.recv(), 10)
                    assert msg.type == "error" and msg.header["code"] == "queue_full", msg.header
                    refused.append(msg.header["ref"])
                release.set()
                frames = []
                while len(frames) < 6:
                    msg = await asyncio.wait_for(c.recv(), 10)
                    assert msg.type == "frame", msg.header
                    frames.append(msg.header["ref"])
            return frames, refused, parse_metrics(await metrics_text(server.port))[1]

    try:
        frames, refused, samples = run(scenario())
    finally:
        release.set()
    assert frames == list(range(6)) and refused == list(range(6, 60))
    assert samples["moshivis_dropped_inputs_total"] == 54
    assert samples["moshivis_stream_frames_total"] == 6


def test_images_are_rate_limited_per_stream(cfg, weights):
    engine = Engine(cfg, weights, max_streams=1, max_images=2)
    gen = torch.Generator().manual_seed(3)
    images = [torch.randn(cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen) for _ in range(2)]

    async def scenario():
        async with serving(engine, image_interval_s=30.0) as server:
            async with await Client.connect(HOST, server.port) as c:
                await c.open(seed=1, image=images[0])  # the open's image is the first of a burst of 3
                answers = []
                for i in range(4):
                    await c.set_image(None if i == 0 else images[i % 2], ref=i)  # a removal costs nothing
                    answers.append((await c.recv()).header)
                return answers

    answers = run(scenario())
    assert [a["type"] for a in answers[:3]] == ["image_set"] * 3
    assert (answers[3]["type"], answers[3]["code"]) == ("error", "rate_limited") and "try again in" in \
        answers[3]["message"]


def test_idle_connections_never_lock_out_a_real_session(cfg, weights):
    """256 connections that never open: the oldest idle ones are evicted to make room (and the rest
    closed after the open timeout), so a new client gets a session at once."""
    engine = Engine(cfg, weights, max_streams=2)

    async def scenario():
        async with serving(engine, open_timeout_s=3.0) as server:
            idle = []
            for _ in range(256):
                idle.append(await Client.connect(HOST, server.port))
            t0 = time.monotonic()
            async with await Client.connect(HOST, server.port) as c:
                await c.open(seed=1)
                took = time.monotonic() - t0
            alive = sum(c.ws.close_code is None for c in idle)
            for c in idle:
                await c.aclose()
            return took, alive, parse_metrics(await metrics_text(server.port))[1]

    took, alive, samples = run(scenario(), timeout=120)
    print(f"idle flood: a session opened {took * 1e3:.0f} ms after connecting, {alive} idle connections left")
    assert took < 5.0
    assert alive <= 16  # max_pending_per_ip
    assert samples['moshivis_closes_total{reason="evicted"}'] >= 256 - 16


def test_connections_that_never_open_are_closed_after_the_open_timeout(cfg, weights):
    engine = Engine(cfg, weights, max_streams=1)

    async def scenario():
        async with serving(engine, open_timeout_s=0.5) as server:
            async with await Client.connect(HOST, server.port) as c:
                msg = await asyncio.wait_for(c.recv(), 5)
                assert (msg.type, msg.header["code"]) == ("error", "open_timeout")
                assert await c.recv() is None and c.ws.close_code == 1008
            return parse_metrics(await metrics_text(server.port))[1]

    assert run(scenario())['moshivis_closes_total{reason="open_timeout"}'] == 1


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_memory_stays_bounded_under_a_flood_of_large_messages():
    """32 connections x 4 messages of 8.5 MB (the demo server takes image files of up to 16 MB), on both
    protocols: the server's RSS stays within +300 MB of its idle size, during and after."""
    import websockets.asyncio.client as wsc
    with server_process("--demo", "--max-streams", "4", "--port", "0") as (proc, port):
        time.sleep(0.5)
        base = rss_mb(proc.pid)
        peak = [base]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_mb(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        blob = os.urandom(int(8.5 * 2 ** 20))
        native = P.encode({"type": "open", "seed": 0}, {"image_file": torch.frombuffer(bytearray(blob), dtype=torch.uint8)})
        kyutai = bytes([0x08]) + blob

        async def flood(i):
            path, data = ("/api/chat", kyutai) if i % 2 else ("/", native)
            try:
                async with wsc.connect(f"ws://{HOST}:{port}{path}", max_size=None, open_timeout=30) as ws:
                    for _ in range(4):
                        await ws.send(data)
                    await asyncio.wait_for(ws.recv(), 30)
            except Exception:  # noqa: BLE001 - refused or closed: what matters is the server's memory
                pass

        async def all_floods():
            await asyncio.gather(*[flood(i) for i in range(32)])

        try:
            run(all_floods(), timeout=240)
            time.sleep(1.0)
            after = rss_mb(proc.pid)
        finally:
            stop.set()
            sampler.join()
        assert proc.poll() is None, "the server died"
    print(f"server RSS: {base:.0f} MB idle, {peak[0]:.0f} MB at the peak, {after:.0f} MB after the flood")
    assert peak[0] - base < 300, f"RSS {base:.0f} MB idle, {peak[0]:.0f} MB at the peak"
    assert after - base < 100, f"RSS {base:.0f} MB idle, {after:.0f} MB after the flood"


def test_a_client_that_stops_reading_is_dropped_and_counted(cfg, weights):
    """A client that keeps sending but reads nothing (its socket's receive buffer 4 KiB, its websockets
    queue 1 message): once `max_outbox` replies wait for it, the server drops it, counts it (slow_client)
    and frees its slot; a client beside it is answered throughout, and a new one can take the slot."""
    import socket

    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed
    engine = Engine(cfg, weights, max_streams=2)

    async def deaf(port: int) -> float:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window stays small
        sock.connect((HOST, port))
        ws = await connect(f"ws://{HOST}:{port}/", sock=sock, max_queue=1, compression=None)
        t0 = time.monotonic()
        try:
            await ws.send(P.open_message(seed=1))
            for i in range(100_000):  # every input is answered (a frame or queue_full): the replies pile up
                await asyncio.wait_for(ws.send(P.audio_message(torch.full((cfg.num_audio_in,), 5), ref=i)), 5)
                await asyncio.sleep(0.001)
                if time.monotonic() - t0 > 30:
                    raise AssertionError("a client that reads nothing was not dropped within 30 s")
        except (ConnectionClosed, OSError, asyncio.TimeoutError):
            return time.monotonic() - t0
        finally:
            ws.transport.abort()

    async def attentive(port: int, frames: int) -> list[int]:
        async with await Client.connect(HOST, port) as c:
            await c.open(seed=2)
            got = []
            for i in range(frames):
                await c.audio(torch.full((cfg.num_audio_in,), i % cfg.audio_card), ref=i)
                msg = await asyncio.wait_for(c.recv(), 10)
                assert msg is not None and msg.type == "frame", msg
                got.append(msg.header["ref"])
                await asyncio.sleep(0.01)
            return got

    async def scenario():
        async with serving(engine, mode="realtime", tick_ms=20.0, max_outbox=16) as server:
            dropped_after, answered = await asyncio.gather(deaf(server.port), attentive(server.port, 60))
            deadline = time.monotonic() + 5
            while len(engine.streams) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            left = len(engine.streams)
            async with await Client.connect(HOST, server.port) as c:  # the slot is free again
                await c.open(seed=3)
            return dropped_after, answered, left, parse_metrics(await metrics_text(server.port))[1]

    dropped_after, answered, left, samples = run(scenario(), timeout=60)
    print(f"a client reading nothing dropped after {dropped_after:.1f} s")
    assert answered == list(range(60)) and left == 0
    assert samples['moshivis_closes_total{reason="slow_client"}'] == 1
