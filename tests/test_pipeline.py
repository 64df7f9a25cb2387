"""The frame pipeline (issue [codec]): images are encoded off the frame path, speech streams keep
their schedule meanwhile, and every stream's speech and text equal `chat.converse` run alone."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from moshivis import Engine
from moshivis.client import Client, converse_pcm
from test_serve import (HOST, SEED_A, assert_same_as_chat, chat_answer, chat_files, metrics_text,  # noqa: F401
                        parse_metrics, run, serving)

# Measures delays and memory in real time: under `make test`'s two xdist workers these tests run in one of
# them, one after the other (the other worker runs the rest of the suite beside them).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("real_time")]

TICK_MS = 80.0


async def speak(port: int, question: torch.Tensor, seed: int, image_file: bytes | None = None) -> dict:
    """A real-time speech client: opens, then one 1920-sample frame per tick on its own clock (after a
    one-frame head start), as `client.converse_pcm` sends them. Returns what `converse_pcm` returns plus
    `opened_after` (seconds from open to opened), `arrivals` (loop time of every frame reply) and
    `frame_ms` (the server's time from each frame's due time to its tokens)."""
    loop = asyncio.get_running_loop()
    async with await Client.connect(HOST, port) as c:
        t0 = loop.time()
        opened = await c.open(seed, image_file=image_file, audio="pcm")
        opened_after = loop.time() - t0
        frame, n = opened["frame_size"], question.shape[0]
        T = -(-n // frame) + opened["config"]["max_delay"]
        padded = torch.cat([question, question.new_zeros(T * frame - n)])
        start = loop.time()

        async def sender():
            for t in range(T):
                await asyncio.sleep(max(0.0, start + (t - 1) * TICK_MS / 1e3 - loop.time()))
                await c.pcm(padded[t * frame:(t + 1) * frame], ref=t)

        task = asyncio.create_task(sender())
        frames, arrivals = [], []
        while len(frames) < T:
            msg = await asyncio.wait_for(c.recv(), 30)
            assert msg is not None and msg.type == "frame", msg
            frames.append(msg)
            arrivals.append(loop.time())
        await task
    tokens = torch.stack([m.tensors["tokens"].to(torch.int64) for m in frames], 1)
    spoken = [m.tensors["pcm"] for m in frames if int(m.tensors["tokens"][0]) != -2]
    return {"tokens": tokens, "pcm": torch.cat(spoken)[:n], "transcript": "".join(m.header["text"] for m in frames),
            "opened_after": opened_after, "arrivals": arrivals, "frame_ms": [m.header["frame_ms"] for m in frames]}


def test_running_streams_keep_their_schedule_while_a_slow_image_is_encoded(chat_files):
    """8 speech streams in real time; meanwhile two streams open with image files and the image encoder
    takes 1 s per image. No running stream's replies stop for more than 2 frame periods, the new streams
    start once their image is ready, and every stream's speech and text equal `chat.converse` alone."""
    f, cfg = chat_files, chat_files["cfg"]
    vision = f["media"].vision
    encode = vision.encode_batch

    def slow_encode(images, *args, **kwargs):
        time.sleep(1.0 * len(images))
        return encode(images, *args, **kwargs)

    async def scenario():
        vision.encode_batch = slow_encode
        try:
            async with serving(Engine(cfg, f["weights"], max_streams=10), media=f["media"], mode="realtime",
                               tick_ms=TICK_MS) as server:
                running = [asyncio.create_task(speak(server.port, f["question"], SEED_A + i)) for i in range(8)]
                await asyncio.sleep(0.3)
                late = [asyncio.create_task(speak(server.port, f["question"], SEED_A + 8 + i, f["png"]))
                        for i in range(2)]
                return await asyncio.gather(*running), await asyncio.gather(*late)
        finally:
            vision.encode_batch = encode

    running, late = run(scenario(), timeout=120)
    for r in running:
        # Server side: every frame computed within 2 periods of its due time (an image on the frame path
        # would hold one for 1 s). Client side (its loop shares this process with the server's): replies
        # keep coming, no gap over 2 periods plus 40 ms of this machine's scheduling noise.
        assert max(r["frame_ms"]) <= 2 * TICK_MS, f"a frame took {max(r['frame_ms']):.0f} ms after its due time"
        gaps = [b - a for a, b in zip(r["arrivals"], r["arrivals"][1:])]
        assert max(gaps) <= 2 * TICK_MS / 1e3 + 0.04, f"a running stream waited {max(gaps) * 1e3:.0f} ms"
    assert all(r["opened_after"] >= 1.0 for r in late)  # each started once its (slow) image was encoded
    for i, r in enumerate(running):
        assert_same_as_chat(r, *chat_answer(f, f["question"], SEED_A + i, image=False), cfg.max_delay)
    for i, r in enumerate(late):
        assert_same_as_chat(r, *chat_answer(f, f["question"], SEED_A + 8 + i, image=True), cfg.max_delay)


def test_a_frames_decode_overlaps_the_next_step_and_every_stage_is_in_the_metrics(chat_files):
    """One speech stream with a PNG, its frames sent 4 ahead (lockstep), the Mimi decoder made slow
    (0.2 s a call): the engine steps frame t+1 while frame t is decoded on the output thread (a step starts
    inside a decode), the answer still equals `chat.converse` alone, and /metrics holds a latency histogram
    per stage (image, encode, step, decode) counting what ran: the image once, every frame's encode, step
    and decode, the decode's sum at least its sleeps."""
    f, cfg = chat_files, chat_files["cfg"]
    spans = {"decode": [], "step": []}

    def timed(name, fn, pause=0.0):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            time.sleep(pause)
            result = fn(*args, **kwargs)
            spans[name].append((t0, time.perf_counter()))
            return result
        return call

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=2), media=f["media"]) as server:
            speech = server.scheduler.speech
            speech.decode = timed("decode", speech.decode, pause=0.2)
            server.engine.step = timed("step", server.engine.step)
            got = await converse_pcm(HOST, server.port, f["question"], image_file=f["png"], seed=SEED_A, ahead=4)
            return got, await metrics_text(server.port)

    got, text = run(scenario())
    assert_same_as_chat(got, *chat_answer(f, f["question"], SEED_A, image=True), cfg.max_delay)
    frames = got["tokens"].shape[1]
    talking = frames - cfg.max_delay
    assert len(spans["step"]) == frames and len(spans["decode"]) == talking
    overlapped = [s0 for s0, _ in spans["step"] if any(d0 < s0 < d1 for d0, d1 in spans["decode"])]
    print(f"{len(overlapped)} of {frames} steps began during a decode")
    assert len(overlapped) >= talking // 2, f"{len(overlapped)} of {frames} steps ran beside a decode"
    _, samples = parse_metrics(text)
    count = {s: samples[f'moshivis_stage_seconds_count{{stage="{s}"}}'] for s in ("image", "encode", "step", "decode")}
    assert count == {"image": 1, "encode": frames, "step": frames, "decode": frames}, count
    assert samples['moshivis_stage_seconds_sum{stage="decode"}'] >= 0.2 * talking
