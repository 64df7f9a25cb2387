"""The streaming server, its wire protocol, client and load generator, on the tiny preset.

Everything runs over loopback (127.0.0.1) with every wait bounded. The oracle for tokens is a plain
`Engine` running each stream alone with the same seed, inputs and image changes: the server's
`frame` replies say which input (or silence) each frame consumed and `image_set` from which frame
an image applies, so the exact sequence the engine saw can be replayed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import gc
import json
import os
import queue
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from moshivis import Engine, SamplingParams, preset, random_init
from moshivis import protocol as P
from moshivis.client import Client, ServerError
from moshivis.client import main as client_main
from moshivis.serve import MediaError, Server, ServerConfig
from moshivis.serve.options import add_engine_args, build_engine, build_media, max_streams_for_budget, memory_model
from test_e2e import make_chat_folder, tone

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]


async def expect_errors(client, cases):
    """Send each (message, code, pattern): the server answers with that non-fatal error."""
    for data, code, pattern in cases:
        await client.ws.send(data)
        msg = await client.recv()
        assert msg.type == "error", msg.header
        assert msg.header["code"] == code and re.search(pattern, msg.header["message"]), msg.header
        assert msg.header["fatal"] is False


pytestmark = pytest.mark.usefixtures("one_thread")  # the engine thread and the event loop share 2 cores


@pytest.fixture(scope="module")
def cfg():
    return preset("tiny")


@pytest.fixture(scope="module")
def weights(cfg):
    return random_init(cfg, seed=0)


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(engine: Engine, media=None, ssl=None, **config):
    config = {"mode": "lockstep", "tick_ms": 2000.0, **config}
    server = await Server(engine, ServerConfig(host=HOST, port=0, **config), media, ssl=ssl).start()
    try:
        yield server
    finally:
        await server.shutdown("test finished")


def features(cfg, gen) -> torch.Tensor:
    return torch.randn(cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen)


async def talk(port: int, seed: int, user: torch.Tensor, sampling: SamplingParams | None = None,
               image: torch.Tensor | None = None, image_changes: dict | None = None, ahead: int = 2,
               start_delay: float = 0.0, xa_start: int = 0) -> dict:
    """One conversation: `user` [8, T] with at most `ahead` frames in flight; `image_changes`
    {input index: features or None} sends an image message just before that input."""
    await asyncio.sleep(start_delay)
    image_changes = image_changes or {}
    async with await Client.connect(HOST, port) as c:
        await c.open(seed, sampling, image, xa_start=xa_start)
        T = user.shape[1]
        sent = answered = 0
        frames, events, pending = {}, [], {}

        async def send_next():
            nonlocal sent
            if sent in image_changes:
                pending[f"img{sent}"] = image_changes[sent]
                await c.set_image(image_changes[sent], ref=f"img{sent}")
            await c.audio(user[:, sent], ref=sent)
            sent += 1

        for _ in range(min(ahead, T)):
            await send_next()
        while answered < T:
            msg = await c.recv()
            assert msg is not None, "server closed the connection"
            if msg.type == "frame":
                h = msg.header
                frames[h["frame"]] = (h["seq"], msg.tensors["tokens"].to(torch.int64))
                if h["seq"] is not None:
                    assert h["ref"] == h["seq"]
                    answered += 1
                    if sent < T:
                        await send_next()
            elif msg.type == "image_set":
                events.append((msg.header["from_frame"], pending.pop(msg.header["ref"])))
            else:
                raise AssertionError(f"unexpected reply {msg.header}")
        await c.close()
        while (msg := await c.recv()) is not None:
            if msg.type == "closed":
                assert msg.header["frames"] >= len(frames)
    return {"frames": frames, "images": events}


def replay_alone(engine: Engine, cfg, seed: int, sampling, image, user: torch.Tensor, record: dict,
                 xa_start: int = 0) -> tuple:
    """The same stream through `engine` alone: (server tokens, engine tokens), both [9, F]."""
    frames = record["frames"]
    assert sorted(frames) == list(range(len(frames))), "frames must be numbered 0, 1, ... without gaps"
    sid = engine.open_stream(seed=seed, image=image, sampling=sampling, xa_start=xa_start)
    silence = torch.full((cfg.num_audio_in,), -1)
    want = []
    for f in range(len(frames)):
        for from_frame, img in record["images"]:
            if from_frame == f:
                engine.set_image(sid, img)
        seq = frames[f][0]
        want.append(engine.step((silence if seq is None else user[:, seq])[None], [sid])[0])
    engine.close_stream(sid)
    return torch.stack([frames[f][1] for f in range(len(frames))], 1), torch.stack(want, 1)


# ---- protocol -------------------------------------------------------------------------------------
def test_protocol_round_trip_and_limits(cfg, gen):
    limits = P.Limits.for_config(cfg)
    tensors = {
        "a": torch.randint(-2, 2000, (3, 5), generator=gen, dtype=torch.int64),
        "b": torch.randint(-30000, 30000, (7,), generator=gen).to(torch.int16),
        "c": torch.randn(2, 3, 4, generator=gen).to(torch.bfloat16),
        "d": torch.randn(5, generator=gen).to(torch.float16)[::2],  # not contiguous
    }
    header = {"type": "frame", "frame": 3, "ref": "x", "nested": {"k": [1, 2.5, None]}}
    data = P.encode(header, tensors, limits)
    msg = P.decode(data, limits)
    assert msg.header == header and list(msg.tensors) == list(tensors)
    for k, t in tensors.items():
        assert msg.tensors[k].dtype == t.dtype and torch.equal(msg.tensors[k], t)
    # The layout: u32 LE header length, JSON header, raw little-endian bytes.
    (hlen,) = struct.unpack_from("<I", data)
    assert json.loads(data[4:4 + hlen])["tensors"][0] == {"name": "a", "dtype": "int64", "shape": [3, 5]}
    assert data[4 + hlen:4 + hlen + 8] == int(tensors["a"][0, 0]).to_bytes(8, "little", signed=True)
    empty = P.decode(P.encode({"type": "close"}, {"z": torch.zeros(0, 4)}), limits)
    assert empty.tensors["z"].shape == (0, 4)

    def bad(data, code, pattern):
        with pytest.raises(P.ProtocolError, match=pattern) as e:
            P.decode(data, limits)
        assert e.value.code == code

    good_head = json.dumps({"type": "audio", "tensors": [{"name": "tokens", "dtype": "int32", "shape": [8]}]}).encode()
    bad("hello", "bad_message", "text WebSocket messages are not accepted")
    bad(b"\x01\x02", "bad_message", "shorter than its 4-byte header length")
    bad(struct.pack("<I", 10 ** 6) + b"{}", "too_large", "header of 1000000 bytes is over the limit of 4096")
    bad(struct.pack("<I", 100) + b"{}", "bad_message", "runs past the end")
    bad(struct.pack("<I", 5) + b"{abc}", "bad_message", "not UTF-8 JSON")
    bad(struct.pack("<I", 4) + b"\xff\xfe{}", "bad_message", "not UTF-8 JSON")
    bad(struct.pack("<I", 3) + b"[1]", "bad_message", "must be a JSON object")
    bad(struct.pack("<I", 15) + b'{"type": NaN}  ', "bad_message", "NaN")
    bad(struct.pack("<I", 4000) + b"[" * 2000 + b"]" * 2000, "bad_message", "nested too deeply")
    bad(struct.pack("<I", 2) + b"{}", "bad_message", "no string field 'type'")
    bad(struct.pack("<I", len(good_head)) + good_head + b"\0" * 31, "bad_message", "needs 32 bytes")
    bad(struct.pack("<I", len(good_head)) + good_head + b"\0" * 33, "bad_message", "1 bytes after the last")
    bad(struct.pack("<I", len(good_head)) + good_head + b"\0" * (limits.max_payload_bytes + 1), "too_large",
        f"payload of {limits.max_payload_bytes + 1} bytes is over the limit")
    for spec, pattern in [({"name": "t", "dtype": "float64", "shape": [1]}, "dtype 'float64' is not one of"),
                          ({"name": "t", "dtype": "int32", "shape": [-1]}, "non-negative integers"),
                          ({"name": "t", "dtype": "int32", "shape": [1, 1, 1, 1, 1]}, "at most 4"),
                          ({"name": "t", "dtype": "int32"}, "exactly name, dtype, shape"),
                          ({"name": "", "dtype": "int32", "shape": [1]}, "1 to 32 characters")]:
        head = json.dumps({"type": "audio", "tensors": [spec]}).encode()
        bad(struct.pack("<I", len(head)) + head + b"\0" * 4, "bad_message", pattern)
    head = json.dumps({"type": "x", "tensors": [{"name": "t", "dtype": "float32", "shape": [1 << 30]}]}).encode()
    bad(struct.pack("<I", len(head)) + head, "too_large", "over the payload limit")
    head = json.dumps({"type": "x", "tensors": [{"name": "t", "dtype": "int32", "shape": [1]}] * 2}).encode()
    bad(struct.pack("<I", len(head)) + head + b"\0" * 8, "bad_message", "listed twice")
    with pytest.raises(P.ProtocolError, match="payload of .* over the limit"):
        P.encode({"type": "x"}, {"t": torch.zeros(limits.max_payload_bytes // 4 + 1)}, limits)
    with pytest.raises(P.ProtocolError, match="cannot be sent"):
        P.encode({"type": "x"}, {"t": torch.zeros(2, dtype=torch.float64)})


def test_protocol_requests_checked_against_config(cfg, gen):
    limits = P.Limits.for_config(cfg)
    n, c, q, card = cfg.num_image_tokens, cfg.image_encoder_dim, cfg.num_audio_in, cfg.audio_card
    image = features(cfg, gen)

    def parse(data):
        return P.parse_request(P.decode(data, limits), cfg)

    req = parse(P.open_message(7, SamplingParams(0.5, 3, 0.9, 11), image.to(torch.bfloat16), ref="r"))
    assert (req.seed, req.sampling, req.ref) == (7, SamplingParams(0.5, 3, 0.9, 11), "r")
    assert torch.equal(req.image, image.to(torch.bfloat16))
    assert parse(P.open_message()).sampling == SamplingParams() and parse(P.open_message()).image is None
    tokens = torch.randint(-1, card, (q,), generator=gen)
    assert torch.equal(parse(P.audio_message(tokens, ref=3)).tokens, tokens)
    assert parse(P.image_message(None)).image is None
    assert isinstance(parse(P.close_message()), P.Close)

    def bad(data, code, pattern):
        with pytest.raises(P.ProtocolError, match=pattern) as e:
            parse(data)
        assert e.value.code == code

    tok = torch.zeros(q, dtype=torch.int32)
    bad(P.encode({"type": "dance"}), "bad_message", "unknown message type 'dance'")
    bad(P.encode({"type": "audio", "foo": 1}, {"tokens": tok}), "bad_message", r"unknown header fields \['foo'\]")
    bad(P.encode({"type": "audio"}, {"tokens": tok, "x": tok}), "bad_message", r"unexpected tensors \['x'\]")
    bad(P.encode({"type": "audio"}), "bad_message", "tensor 'tokens' is missing")
    bad(P.encode({"type": "close", "ref": "x" * 65}), "bad_message", "ref must be")
    bad(P.encode({"type": "close", "ref": True}), "bad_message", "ref must be")
    bad(P.encode({"type": "open", "seed": -1}), "bad_message", r"seed must be an integer in \[0, 2\*\*63\)")
    bad(P.encode({"type": "open", "seed": 1.5}), "bad_message", "seed must be an integer")
    bad(P.encode({"type": "open", "sampling": {"temperature_text": -1}}), "bad_message", "temperature_text must be")
    bad(P.encode({"type": "open", "sampling": {"top_p": 1}}), "bad_message", "sampling must be an object with keys")
    bad(P.audio_message(torch.zeros(q - 1)), "bad_tokens",
        rf"shape \[{q}\] \(one frame of user codebooks\), got \[{q - 1}\]")
    bad(P.encode({"type": "audio"}, {"tokens": torch.zeros(q)}), "bad_tokens", "integer tensor, got torch.float32")
    bad(P.audio_message(tok.index_fill(0, torch.tensor([3]), card)), "bad_tokens",
        rf"audio token {card} at codebook 3 is out of range \[-1, {card}\)")
    bad(P.audio_message(tok.index_fill(0, torch.tensor([0]), -2)), "bad_tokens", "audio token -2 at codebook 0")
    bad(P.open_message(image=image[:, :-1]), "bad_image", rf"shape \[{n}, {c}\] .* got \[{n}, {c - 1}\]")
    bad(P.image_message(image.to(torch.int32)), "bad_image", "floating point")
    bad(P.image_message(image.index_fill(0, torch.tensor([2]), float("nan"))), "bad_image", "NaN")


def test_server_config_refuses_what_no_schedule_can_follow():
    for kwargs, pattern in [(dict(tick_ms=float("inf")), "tick_ms must be a finite number > 0, got inf"),
                            (dict(input_timeout_s=float("nan")), "input_timeout_s must be a finite number > 0"),
                            (dict(open_timeout_s=0), "open_timeout_s must be a finite number > 0, got 0"),
                            (dict(max_catchup_per_tick=-1), "max_catchup_per_tick must be an integer >= 0, got -1"),
                            (dict(max_pending=0), "max_pending must be an integer >= 1, got 0")]:
        with pytest.raises(ValueError, match=pattern):
            ServerConfig(**kwargs)
    assert ServerConfig(max_catchup_per_tick=0).max_catchup_per_tick == 0


# ---- the server -----------------------------------------------------------------------------------
def test_32_concurrent_clients_match_each_stream_run_alone(cfg, weights, gen):
    """32 clients joining at different times, sampling on, images attached, replaced, removed and
    shared: every token equals the stream run alone through a plain Engine with the same seed."""
    B = 32
    engine = Engine(cfg, weights, max_streams=B)
    shared = features(cfg, gen)
    specs = []
    for i in range(B):
        T = 6 + i % 7
        user = torch.randint(-1, cfg.audio_card, (cfg.num_audio_in, T), generator=gen)
        sampling = [SamplingParams(), SamplingParams(1.0, 5, 1.2, 7), SamplingParams(0.7, 0, 0.8, 0)][i % 3]
        image = [None, features(cfg, gen), shared][i % 3]
        changes = {}
        if i % 4 == 1:
            changes = {T // 2: [features(cfg, gen), None, shared][i % 3]}
        specs.append(dict(seed=1000 + i, user=user, sampling=sampling, image=image, image_changes=changes,
                          start_delay=0.02 * (i % 9)))

    async def scenario():
        async with serving(engine) as server:
            records = await asyncio.gather(*[talk(server.port, **s) for s in specs])
            metrics = server.metrics
            assert metrics.stream_frames == sum(len(r["frames"]) for r in records)
            assert metrics.frames < metrics.stream_frames  # streams were batched together
            return records

    records = run(scenario())
    assert engine.streams == [] and engine.pool.used == 0
    alone = Engine(cfg, weights, max_streams=1)
    for i, (s, record) in enumerate(zip(specs, records)):
        assert sum(seq is not None for seq, _ in record["frames"].values()) == s["user"].shape[1]
        assert len(record["images"]) == len(s["image_changes"])
        got, want = replay_alone(alone, cfg, s["seed"], s["sampling"], s["image"], s["user"], record)
        assert torch.equal(got, want), f"client {i}: tokens differ from the stream run alone"
    # Sampling is on: the same stream greedy gives other tokens.
    s, record = specs[0], records[0]
    got, greedy = replay_alone(alone, cfg, s["seed"], SamplingParams.greedy(), s["image"], s["user"], record)
    assert not torch.equal(got, greedy)


def test_native_sessions_carry_xa_start_and_the_repetition_penalty(tiny_cfg, tiny_weights, golden_streams):
    """An open's xa_start and repetition penalty reach the stream: its tokens equal the engine's with the
    same options (the engine is checked against moshivis.reference in test_engine) and differ without
    them (the golden model, whose image and text matter)."""
    cfg, stream = tiny_cfg, golden_streams["stream_image_b2"]
    user, image = stream["user_audio_tokens"][0], stream["image_features"][0]
    sampling = dataclasses.replace(SamplingParams.greedy(), repetition_penalty=1.5, repetition_penalty_context=8)

    async def scenario():
        async with serving(Engine(cfg, tiny_weights, max_streams=1)) as server:
            return await talk(server.port, seed=4, user=user, sampling=sampling, image=image, xa_start=10)

    record = run(scenario())
    got, want = replay_alone(Engine(cfg, tiny_weights), cfg, 4, sampling, image, user, record, xa_start=10)
    assert torch.equal(got, want)
    _, plain = replay_alone(Engine(cfg, tiny_weights), cfg, 4, SamplingParams.greedy(), image, user, record,
                            xa_start=10)
    _, early = replay_alone(Engine(cfg, tiny_weights), cfg, 4, sampling, image, user, record)
    assert not torch.equal(got, plain) and not torch.equal(got, early)


def test_bad_messages_get_an_error_for_that_client_only(cfg, weights, gen):
    engine = Engine(cfg, weights, max_streams=4)
    limits = P.Limits.for_config(cfg)
    q, card, n, c = cfg.num_audio_in, cfg.audio_card, cfg.num_image_tokens, cfg.image_encoder_dim
    image = features(cfg, gen)
    nan_image = image.index_fill(1, torch.tensor([5]), float("nan"))
    tok = torch.zeros(q, dtype=torch.int32)
    good = [dict(seed=i, user=torch.randint(-1, card, (q, 24), generator=gen), image=image if i else None)
            for i in range(2)]
    head = json.dumps({"type": "audio", "tensors": [{"name": "tokens", "dtype": "int32", "shape": [q]}]}).encode()
    before_open = [
        ("text", "bad_message", "text WebSocket messages are not accepted"),
        (b"\x01\x02", "bad_message", "shorter than its 4-byte header"),
        (struct.pack("<I", 10 ** 6) + b"{}", "too_large", "header of 1000000 bytes"),
        (P.encode({"type": "audio"}, {"tokens": torch.zeros(limits.max_payload_bytes // 4 + 8, dtype=torch.int32)}),
         "too_large", "payload of .* over the limit"),
        (struct.pack("<I", 5) + b"{abc}", "bad_message", "not UTF-8 JSON"),
        (P.encode({"type": "dance", "ref": 9}), "bad_message", "unknown message type 'dance'"),
        (P.audio_message(tok), "out_of_order", "audio: before open"),
        (P.image_message(image), "out_of_order", "image: before open"),
        (P.close_message(), "out_of_order", "close: before open"),
        (P.open_message(image=image[:-1]), "bad_image", rf"shape \[{n}, {c}\]"),
        (P.encode({"type": "open", "sampling": {"temperature_text": -1}}), "bad_message", "temperature_text"),
    ]
    after_open = [
        (P.open_message(), "out_of_order", "already opened a stream"),
        (P.audio_message(torch.zeros(q + 1)), "bad_tokens", rf"shape \[{q}\]"),
        (P.audio_message(tok.index_fill(0, torch.tensor([5]), card + 3)), "bad_tokens",
         rf"audio token {card + 3} at codebook 5 is out of range"),
        (P.encode({"type": "audio"}, {"tokens": tok.float()}), "bad_tokens", "integer tensor"),
        (struct.pack("<I", len(head)) + head + b"\0" * 5, "bad_message", "needs 32 bytes"),
        (P.encode({"type": "audio", "foo": 1}, {"tokens": tok}), "bad_message", "unknown header fields"),
        (P.image_message(image[:, :3]), "bad_image", rf"shape \[{n}, {c}\]"),
        (P.image_message(nan_image), "bad_image", "NaN"),
    ]

    async def scenario():
        async with serving(engine) as server:
            talks = [asyncio.create_task(talk(server.port, **g)) for g in good]
            async with await Client.connect(HOST, server.port) as bad:
                await expect_errors(bad, before_open)
                assert (await bad.open(seed=5))["stream"] is not None
                await expect_errors(bad, after_open)
                await bad.audio(tok, ref="ok")  # still served
                msg = await bad.recv()
                assert (msg.type, msg.header["frame"], msg.header["seq"], msg.header["ref"]) == ("frame", 0, 0, "ok")
            # Beyond the transport limit (2x the largest valid message) only that connection is cut.
            async with await Client.connect(HOST, server.port, limits=P.Limits(max_payload_bytes=1 << 24)) as huge:
                await huge.ws.send(b"\0" * (2 * limits.max_message_bytes + 1))
                assert await huge.recv() is None
                assert huge.ws.close_code == 1009
            records = await asyncio.gather(*talks)
            assert server.metrics.errors["bad_tokens"] == 3 and server.metrics.errors["out_of_order"] == 4
            return records

    records = run(scenario())
    alone = Engine(cfg, weights, max_streams=1)
    for g, record in zip(good, records):
        got, want = replay_alone(alone, cfg, g["seed"], None, g["image"], g["user"], record)
        assert torch.equal(got, want)


def test_admission_control_and_metrics(cfg, weights, gen):
    """max_streams=2, one image slot: refusals are clear, counted, and lifted when room is made."""
    engine = Engine(cfg, weights, max_streams=2, max_images=1)
    x, y = features(cfg, gen), features(cfg, gen)
    async def refused(port, code, pattern, **kw):
        async with await Client.connect(HOST, port) as c:
            with pytest.raises(ServerError, match=pattern) as e:
                await c.open(**kw)
            assert e.value.code == code
            assert await c.recv() is None and c.ws.close_code == 1013

    async def scenario():
        async with serving(engine, max_connections=4, budget_ms=60e3) as server:  # no deadline miss on a busy CPU
            a = await Client.connect(HOST, server.port)
            await a.open(seed=1, image=x)
            await refused(server.port, "image_pool_full", "image pool full", seed=2, image=y)
            b = await Client.connect(HOST, server.port)
            await b.open(seed=2, image=x.clone())  # the same image shares the slot
            await refused(server.port, "server_full", "server full: all 2 streams are in use", seed=3)
            await settle(server, sessions=2)
            idle = [await Client.connect(HOST, server.port) for _ in range(2)]  # 4 connections: the limit
            newest = await Client.connect(HOST, server.port)  # room is made by evicting the oldest idle one
            msg = await idle[0].recv()
            assert (msg.type, msg.header["code"], msg.header["fatal"]) == ("error", "evicted", True)
            assert await idle[0].recv() is None and idle[0].ws.close_code == 1013
            for c in idle[1:] + [newest]:
                await c.aclose()
            await settle(server, sessions=2)
            await b.set_image(y)
            msg = await b.recv()
            assert msg.type == "error" and msg.header["code"] == "image_pool_full"
            await a.audio(torch.zeros(cfg.num_audio_in, dtype=torch.int32))
            assert (await a.recv()).type == "frame"
            text = await metrics_text(server.port)
            await a.close()
            assert (await a.recv()).header == {"type": "closed", "frames": 1, "ref": None}
            async with await Client.connect(HOST, server.port) as c:  # room again
                await c.open(seed=3)
            await b.aclose()
            await a.aclose()
            return text

    text = run(scenario())
    types, samples = parse_metrics(text)
    assert samples['moshivis_refusals_total{reason="image_pool_full"}'] == 1
    assert samples['moshivis_refusals_total{reason="server_full"}'] == 1
    assert samples["moshivis_active_streams"] == 2 and samples["moshivis_max_streams"] == 2
    assert samples["moshivis_image_pool_used"] == 1 and samples["moshivis_image_pool_capacity"] == 1
    assert samples["moshivis_frames_total"] == 1 and samples["moshivis_deadline_misses_total"] == 0
    assert samples['moshivis_frame_seconds_bucket{le="+Inf"}'] == 1 == samples["moshivis_frame_seconds_count"]
    assert samples['moshivis_errors_total{code="image_pool_full"}'] == 1
    assert samples['moshivis_closes_total{reason="evicted"}'] == 1
    assert types["moshivis_frame_seconds"] == "histogram"
    assert engine.streams == [] and engine.pool.used == 0


def test_connection_limit_refuses_when_every_connection_holds_a_stream(cfg, weights):
    engine = Engine(cfg, weights, max_streams=2)
    from websockets.exceptions import InvalidStatus

    async def scenario():
        async with serving(engine, max_connections=2) as server:
            held = [await Client.connect(HOST, server.port) for _ in range(2)]
            for i, c in enumerate(held):
                await c.open(seed=i)
            with pytest.raises(InvalidStatus, match="503"):
                await Client.connect(HOST, server.port)
            for c in held:
                await c.aclose()
            return await metrics_text(server.port)

    _, samples = parse_metrics(run(scenario()))
    assert samples['moshivis_refusals_total{reason="too_many_connections"}'] == 1


def test_vanishing_client_mid_frame_frees_its_slot_and_image(cfg, weights, gen):
    engine = Engine(cfg, weights, max_streams=2, max_images=2)
    in_step = threading.Event()
    step = engine.step

    def slow_step(*args, **kwargs):
        in_step.set()
        time.sleep(0.15)
        return step(*args, **kwargs)

    engine.step = slow_step
    other = dict(seed=1, user=torch.randint(0, cfg.audio_card, (cfg.num_audio_in, 12), generator=gen),
                 image=features(cfg, gen))

    async def scenario():
        loop = asyncio.get_running_loop()
        async with serving(engine, tick_ms=300) as server:
            v = await Client.connect(HOST, server.port)
            await v.open(seed=2, image=features(cfg, gen))
            for _ in range(3):
                await v.audio(torch.zeros(cfg.num_audio_in, dtype=torch.int32))
            assert (await v.recv()).type == "frame"
            talker = asyncio.create_task(talk(server.port, **other))
            in_step.clear()
            assert await loop.run_in_executor(None, in_step.wait, 10)
            v.ws.transport.abort()  # gone in the middle of a frame that includes it
            record = await talker
            await settle(server)
            assert engine.streams == [] and engine.pool.used == 0
            assert server.scheduler._reserved == 0 and server.sessions == {}
            async with await Client.connect(HOST, server.port) as w:  # its slot and image slot are free again
                await w.open(seed=3, image=features(cfg, gen))
                assert engine.pool.used == 1
            return record

    record = run(scenario())
    engine.step = step
    got, want = replay_alone(Engine(cfg, weights, max_streams=1), cfg, other["seed"], None, other["image"],
                             other["user"], record)
    assert torch.equal(got, want)


def test_graceful_shutdown_finishes_the_frame_and_tells_clients(cfg, weights, gen):
    engine = Engine(cfg, weights, max_streams=2)
    in_step = threading.Event()
    step = engine.step

    def slow_step(*args, **kwargs):
        in_step.set()
        time.sleep(0.2)
        return step(*args, **kwargs)

    async def scenario():
        loop = asyncio.get_running_loop()
        server = await Server(engine, ServerConfig(host=HOST, port=0, mode="realtime", tick_ms=40)).start()
        clients = [await Client.connect(HOST, server.port) for _ in range(2)]
        for i, c in enumerate(clients):
            await c.open(seed=i)
            for _ in range(10):  # streams are stepped while they have input
                await c.audio(torch.zeros(cfg.num_audio_in, dtype=torch.int32))
        ticks = [[(await c.recv()).header["tick"]] for c in clients]
        engine.step = slow_step
        in_step.clear()
        assert await loop.run_in_executor(None, in_step.wait, 10)
        await server.shutdown("maintenance")  # while a frame is in flight
        in_flight = server.scheduler._tick - 1
        for c, got in zip(clients, ticks):
            while (msg := await c.recv()).type == "frame":
                got.append(msg.header["tick"])
            assert got[-1] == in_flight  # the frame in flight was delivered, and nothing after it
            assert msg.header == {"type": "shutdown", "reason": "maintenance", "frames": len(got)}
            assert await c.recv() is None and c.ws.close_code == 1001
        with pytest.raises(OSError):
            await Client.connect(HOST, server.port)

    run(scenario())
    assert engine.streams == [] and engine.pool.used == 0


@pytest.mark.xdist_group("real_time")  # measures the RSS: one at a time with the other real-time tests
def test_soak_with_churn_does_not_grow(cfg, weights):
    """A few hundred frames of clients joining, leaving (cleanly or by vanishing), changing and
    sharing images, some refused for lack of room: no stream, image slot, session or memory left."""
    engine = Engine(cfg, weights, max_streams=5, max_images=4)
    images = [features(cfg, torch.Generator().manual_seed(i)) for i in range(6)]

    async def churner(port, rng, stop):
        while not stop():
            T = rng.randint(3, 20)
            image = rng.choice([None, *images])
            vanish_at = rng.randint(1, T) if rng.random() < 0.3 else None
            try:
                c = await Client.connect(HOST, port)
            except OSError:
                return
            async with c:
                try:
                    await c.open(seed=rng.randrange(1 << 40), image=image)
                except ServerError as e:
                    assert e.code in ("server_full", "image_pool_full"), e
                    await asyncio.sleep(0.05 + rng.random() * 0.1)
                    continue
                sent = answered = 0
                image_pending = False
                for _ in range(2):
                    await c.audio(torch.full((cfg.num_audio_in,), rng.randrange(cfg.audio_card)))
                    sent += 1
                while answered < T:
                    msg = await c.recv()
                    assert msg is not None
                    if msg.type == "error":
                        assert msg.header["code"] in ("image_pool_full", "rate_limited"), msg.header
                    image_pending &= msg.type not in ("error", "image_set")
                    if msg.type != "frame" or msg.header["seq"] is None:
                        continue
                    answered += 1
                    if answered == vanish_at:
                        c.ws.transport.abort()
                        break
                    if not image_pending and rng.random() < 0.15:
                        await c.set_image(rng.choice([None, *images]))
                        image_pending = True
                    if sent < T:
                        await c.audio(torch.full((cfg.num_audio_in,), rng.randrange(cfg.audio_card)))
                        sent += 1
                else:
                    await c.close()
                    while (msg := await c.recv()) is not None:
                        pass

    async def phase(server, frames, seed):
        target = server.metrics.frames + frames
        rng = random.Random(seed)
        def stop():
            return server.metrics.frames >= target

        await asyncio.gather(*[churner(server.port, random.Random(rng.random()), stop) for _ in range(7)])
        await settle(server)

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    ours = [tracemalloc.Filter(True, f"*{m}") for m in ("serve/*", "protocol.py", "client.py", "websockets/*")]

    async def quiet_snapshot(server) -> tracemalloc.Snapshot:
        """Once every connection's close handshake is over (they are not leaks while it runs)."""
        for _ in range(100):
            if not server._ws_server.connections:
                break
            await asyncio.sleep(0.02)
        gc.collect()
        return tracemalloc.take_snapshot()

    async def scenario():
        async with serving(engine, tick_ms=500) as server:
            await phase(server, 80, 1)
            gc.collect()
            rss0 = rss()
            tracemalloc.start()
            await phase(server, 250, 2)
            before = await quiet_snapshot(server)
            await phase(server, 250, 3)
            after = await quiet_snapshot(server)
            tracemalloc.stop()
            traced = sum(st.size for st in after.statistics("filename"))
            # What the server, protocol and client still hold grows with nothing: the bounded windows (the
            # last 250 frame times, ...) are full after the first phases, so a second 250 frames adds only
            # what leaks (a few objects per session or per frame would be kilobytes).
            growth = after.filter_traces(ours).compare_to(before.filter_traces(ours), "lineno")
            grown = sum(st.size_diff for st in growth)
            assert grown < 8 << 10, f"{grown} more bytes held by the server, protocol, client after 250 frames: " + \
                "; ".join(str(st) for st in growth[:8])
            assert engine.streams == [] and engine.pool.used == 0 and sum(engine.pool.refcount) == 0
            assert server.sessions == {} and server.scheduler._reserved == 0 and server.scheduler._commands == []
            m = server.metrics
            return traced, rss() - rss0, m.frames, m.sessions, sum(m.refusals.values())

    traced, rss_growth, frames, sessions, refusals = run(scenario(), timeout=120)
    assert frames >= 580 and sessions > 60
    assert refusals > 0  # the churn did hit admission control
    assert traced < 512 << 10, f"{traced} bytes of Python memory still held after the churn"
    assert rss_growth < 48 << 20, f"RSS grew by {rss_growth >> 20} MiB"


async def settle(server: Server, sessions: int = 0) -> None:
    """Wait (at most 2 s) until the last closes are applied and the handlers are done."""
    for _ in range(100):
        if len(server.sessions) <= sessions and not server.scheduler._commands:
            return
        await asyncio.sleep(0.02)


# ---- metrics text --------------------------------------------------------------------------------
async def metrics_text(port: int) -> str:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    data = (await reader.read()).decode()
    writer.close()
    head, _, body = data.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "Content-Type: text/plain; version=0.0.4" in head, head
    return body


_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_]\w*="[^"\\\n]*"(?:,[a-zA-Z_]\w*="[^"\\\n]*")*\})? '
                     r'([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))')


def parse_metrics(text: str) -> tuple[dict, dict]:
    """A strict reader of the Prometheus text format: every sample declared, histograms consistent."""
    types, samples = {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types
            types[name] = kind
            continue
        m = _SAMPLE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name = base = m[1]
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[:-len(suffix)]) == "histogram":
                base = name[:-len(suffix)]
        assert base in types, f"sample {name} has no TYPE"
        assert types[base] != "counter" or name.endswith("_total")
        samples[name + (m[2] or "")] = float(m[3])
    for name, kind in types.items():
        if kind == "histogram":  # per label set (a family may be labelled, e.g. by stage): cumulative buckets
            series: dict[str, list] = {}
            for k, v in samples.items():
                if k.startswith(name + "_bucket{"):
                    labels = re.sub(r',?le="[^"]*"', "", k[len(name + "_bucket"):])
                    series.setdefault(labels.replace("{,", "{"), []).append((k, v))
            assert series, f"histogram {name} has no buckets"
            for labels, buckets in series.items():
                values = [v for _, v in buckets]
                assert values == sorted(values) and buckets[-1][0].endswith('le="+Inf"}')
                assert values[-1] == samples[name + "_count" + ("" if labels == "{}" else labels)]
    return types, samples


def test_metrics_endpoint_parses(cfg, weights):
    engine = Engine(cfg, weights, max_streams=3)

    async def scenario():
        async with serving(engine, mode="realtime", tick_ms=20, budget_ms=1e-3) as server:
            empty = await metrics_text(server.port)
            await talk(server.port, seed=1, user=torch.zeros(cfg.num_audio_in, 5, dtype=torch.long))
            return empty, await metrics_text(server.port)

    empty, text = run(scenario())
    _, samples = parse_metrics(empty)
    assert samples["moshivis_frames_total"] == 0
    types, samples = parse_metrics(text)
    assert samples["moshivis_frames_total"] >= 5 and samples["moshivis_stream_frames_total"] >= 5
    assert samples["moshivis_deadline_misses_total"] == samples["moshivis_frames_total"]  # a 1 us budget
    assert samples["moshivis_max_streams"] == 3 and samples["moshivis_tick_seconds"] == 0.02
    assert set(types) >= {"moshivis_frame_seconds", "moshivis_deadline_misses_total", "moshivis_active_streams",
                          "moshivis_image_pool_used", "moshivis_refusals_total"}


@contextlib.contextmanager
def server_process(*args):
    """`python -m moshivis.server ARGS` in a subprocess: yields (process, port) once it listens; killed
    on the way out if it is still running."""
    proc = subprocess.Popen([sys.executable, "-m", "moshivis.server", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        port, deadline = None, time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                m = re.search(r"ws://127\.0\.0\.1:(\d+)/", lines.get(timeout=1))
                port = int(m[1]) if m else None
        assert port, "the server did not start"
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        proc.stdout.close()


# ---- command lines --------------------------------------------------------------------------------
def test_server_and_client_command_lines(cfg, weights, gen, tmp_path):
    """`python -m moshivis.server` (seeded random tiny weights), a conversation from files with
    `python -m moshivis.client`, then SIGTERM: a clean exit."""
    user = torch.randint(-1, cfg.audio_card, (cfg.num_audio_in, 9), generator=gen)
    image = features(cfg, gen)
    save_file({"user_audio_tokens": user}, str(tmp_path / "user.safetensors"))
    save_file({"image_features": image}, str(tmp_path / "image.safetensors"))
    with server_process("--preset", "tiny", "--port", "0", "--max-streams", "2", "--threads", "1",
                        "--log-level", "WARNING") as (proc, port):
        out = tmp_path / "out.safetensors"
        assert client_main(["--port", str(port), "--tokens", str(tmp_path / "user.safetensors"),
                            "--image", str(tmp_path / "image.safetensors"), "--out", str(out), "--seed", "4"]) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    result = load_file(str(out))
    assert result["tokens"].shape == (cfg.num_codebooks_out, 9)
    assert torch.equal(result["input_frames"], torch.arange(9))
    engine = Engine(cfg, weights, max_streams=1)
    sid = engine.open_stream(seed=4, image=image)
    want = torch.stack([engine.step(user[:, t][None], [sid])[0] for t in range(9)], 1)
    assert torch.equal(result["tokens"], want)


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_memory_model_and_budget_know_the_kv_dtype(cfg, kv_dtype):
    """`--kv-dtype` reaches the engine; the memory model counts the bytes the engine allocates (an int8
    cache with its scales, tiny sizes: 2 layers x K,V x 6 positions x (64 int8 + 4 heads x 4 B) = 1920 B
    per stream, fp32: 6144 B) and --memory-budget-mb admits as many streams as fit beside an image slot
    each (6144 B of fp32 image K/V)."""
    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    budget = 10 * 2 ** 20
    args = ap.parse_args(["--preset", "tiny", "--kv-dtype", kv_dtype, "--max-streams", "100000",
                          "--memory-budget-mb", "10", "--device", "cpu"])
    per_stream = {"auto": 6144, "int8": 1920}[kv_dtype] + 6144
    assert max_streams_for_budget(cfg, torch.float32, budget, kv_dtype) == budget // per_stream
    engine = build_engine(args)
    assert engine.kv_dtype == kv_dtype and engine.max_streams == budget // per_stream
    mem = memory_model(cfg, engine.dtype, engine.max_streams, engine.pool.capacity, kv_dtype)
    assert mem["kv_bytes"] == engine.state.kv_bytes_allocated() and mem["image_bytes"] == engine.pool.kv.nbytes


def test_load_generator_runs(tmp_path):
    from bench import load
    path = tmp_path / "load.json"
    assert load.main(["--preset", "tiny", "--streams", "3", "--duration", "1", "--threads", "1",
                      "--mode", "lockstep", "--json", str(path)]) == 0
    r = json.loads(path.read_text())["results"][0]
    assert r["streams"] == 3 and r["refusals"] == 0 and r["errors"] == 0 and r["frames"] > 0
    assert r["stream_frames"] >= r["frames"] and r["frame_p50_ms"] > 0 and r["client_p99_ms"] >= r["client_p50_ms"]


# ---- PCM and image files (the chat pipeline over the server) ---------------------------------------
# Tiny random Mimi, SigLIP and SentencePiece built exactly as tests/test_e2e.py builds them; the
# oracle is `moshivis.chat.converse` on the same question, image and seed, run alone.
SEED_A, SEED_B = 5, 6


@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    gen = torch.Generator().manual_seed(4321)
    f = make_chat_folder(tmp_path_factory.mktemp("serve_chat"), gen)
    d, cfg = f["dir"], f["cfg"]
    args = argparse.Namespace(mimi=str(d / "mimi"), mimi_config=None, siglip=None,
                              checkpoint=str(d / "model.safetensors"), vision_config=str(d / "vision_config.json"),
                              tokenizer=str(d / "tokenizer_spm_32k_3.model"))
    media = build_media(args, cfg, torch.float32, "cpu")
    assert media.codec and media.vision and media.tokenizer
    question = tone(0.9, 24000, gen)  # 21600 samples: 11.25 frames
    return dict(f, media=media, args=args, question=question, png=(d / "photo.png").read_bytes())


def chat_answer(files, question, seed, image: bool, sampling: SamplingParams | None = None,
                colours: list | None = None):
    """moshivis.chat.converse alone: (answer, the transcript pieces it printed); `colours` gets Kyutai's
    text colour of every frame (`Engine.text_colors`, read after each step)."""
    from moshivis.chat import converse
    m, pieces = files["media"], []
    feats = m.vision.encode(files["dir"] / "photo.png") if image else None
    engine = Engine(files["cfg"], files["weights"])
    on_frame = None if colours is None else lambda t, total: colours.append(engine.text_colors(engine.streams)[0])
    answer = converse(engine, m.codec, m.tokenizer, feats, question, seed=seed, sampling=sampling,
                      on_text=pieces.append, on_frame=on_frame)
    return answer, "".join(pieces)


def assert_same_as_chat(got: dict, answer, printed: str, max_delay: int):
    tokens = got["tokens"]
    assert (tokens[:, :max_delay] == -2).all()
    assert tokens[0, max_delay:].tolist() == answer.text_tokens
    assert torch.equal(tokens[1:, max_delay:].T, answer.audio_tokens)
    assert got["pcm"].shape == answer.pcm.shape
    torch.testing.assert_close(got["pcm"], answer.pcm, atol=1e-5, rtol=0)  # batched vs per-stream Mimi: ~3e-7
    assert got["transcript"] == printed == answer.transcript and printed, "the random model should say something"


def test_pcm_and_png_sessions_match_chat_converse(chat_files):
    """Two PCM sessions at once (float32 + a PNG; int16, no image) in the same frames, and a token
    session: each equals `chat.converse` run alone, so the streams share no codec state."""
    from moshivis.client import converse_pcm
    f, cfg = chat_files, chat_files["cfg"]
    q = f["question"]
    q16 = torch.round(q * 32767).to(torch.int16)
    gen = torch.Generator().manual_seed(9)
    user = torch.randint(0, cfg.audio_card, (cfg.num_audio_in, 5), generator=gen)

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=3), media=f["media"]) as server:
            a, b, t = await asyncio.gather(
                converse_pcm(HOST, server.port, q, image_file=f["png"], seed=SEED_A, ahead=3),
                converse_pcm(HOST, server.port, q16, seed=SEED_B, ahead=3),
                talk(server.port, seed=2, user=user, ahead=2))
            assert server.metrics.frames < server.metrics.stream_frames  # batched together
            return a, b, t

    a, b, t = run(scenario())
    assert_same_as_chat(a, *chat_answer(f, q, SEED_A, image=True), cfg.max_delay)
    assert_same_as_chat(b, *chat_answer(f, q16.float() / 32768, SEED_B, image=False), cfg.max_delay)
    got, want = replay_alone(Engine(cfg, f["weights"]), cfg, 2, None, None, user, t)
    assert torch.equal(got, want)


def test_a_pcm_session_on_a_reused_slot_starts_with_a_fresh_codec(chat_files):
    """One slot, two PCM sessions one after the other: the second (another question, another seed) equals
    `chat.converse` alone, so nothing of the first one's Mimi encoder or decoder state is carried over."""
    from moshivis.client import converse_pcm
    f, cfg = chat_files, chat_files["cfg"]
    q = f["question"]
    other = 0.5 * q.flip(0)

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=1), media=f["media"]) as server:
            first = await converse_pcm(HOST, server.port, q, seed=SEED_A, ahead=3)
            second = await converse_pcm(HOST, server.port, other, image_file=f["png"], seed=SEED_B, ahead=3)
            return first, second

    first, second = run(scenario())
    assert_same_as_chat(first, *chat_answer(f, q, SEED_A, image=False), cfg.max_delay)
    assert_same_as_chat(second, *chat_answer(f, other, SEED_B, image=True), cfg.max_delay)


def test_bad_image_files_and_pcm_frames_get_errors_for_that_client_only(chat_files):
    from moshivis.client import converse_pcm
    f, cfg = chat_files, chat_files["cfg"]
    truncated, text = f["png"][:200], b"not a picture at all"
    huge = io.BytesIO()
    Image.new("RGB", (5000, 5000), (90, 120, 200)).save(huge, format="PNG")  # 25 Mpixels in a small file
    frame = torch.zeros(P.PCM_FRAME)
    before_open = [
        (P.open_message(image_file=truncated, audio="pcm"), "bad_image", r"open: image file is corrupt or truncated"),
        (P.open_message(image_file=huge.getvalue()), "bad_image", r"5000x5000 pixels, over the limit of 16777216"),
        (P.open_message(image_file=text), "bad_image", r"open: image file is not an image Pillow can read"),
        (P.open_message(image_file=f["png"], image=torch.zeros(16, 24)), "bad_message", "not both"),
        (P.open_message(audio="wav"), "bad_message", r"audio must be one of \['tokens', 'pcm'\]"),
    ]
    after_open = [
        (P.pcm_message(torch.zeros(1000)), "bad_audio", r"pcm must have shape \[1920\] .*got \[1000\]"),
        (P.encode({"type": "audio"}, {"pcm": torch.zeros(P.PCM_FRAME, dtype=torch.float64).half()}), "bad_audio",
         "float32 or int16"),
        (P.pcm_message(frame.index_fill(0, torch.tensor([7]), float("nan"))), "bad_audio", "NaN"),
        (P.audio_message(torch.zeros(cfg.num_audio_in)), "bad_message", "this session speaks pcm"),
        (P.image_message(None, image_file=truncated), "bad_image", "image: image file is corrupt or truncated"),
        (P.open_message(), "out_of_order", "already opened"),
    ]

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=2), media=f["media"]) as server:
            good = asyncio.create_task(converse_pcm(HOST, server.port, f["question"], image_file=f["png"],
                                                    seed=SEED_A, ahead=2))
            async with await Client.connect(HOST, server.port) as bad:
                await expect_errors(bad, before_open)
                opened = await bad.open(seed=1, audio="pcm", image_file=f["png"])  # the same client, again
                assert (opened["audio"], opened["sample_rate"], opened["frame_size"], opened["text"]) == \
                    ("pcm", 24000, 1920, True)
                await expect_errors(bad, after_open)
                await bad.pcm(frame.to(torch.int16), ref="ok")  # still served
                msg = await bad.recv()
                assert (msg.type, msg.header["seq"], msg.header["ref"], msg.header["text"]) == ("frame", 0, "ok", "")
                assert msg.tensors["pcm"].shape == (1920,) and not msg.tensors["pcm"].any()  # warm-up: silence
            result = await good
            assert server.metrics.errors["bad_image"] == 4 and server.metrics.errors["bad_audio"] == 3
            return result

    assert_same_as_chat(run(scenario()), *chat_answer(f, f["question"], SEED_A, image=True), cfg.max_delay)


def test_server_without_codec_or_siglip_refuses_pcm_and_image_files(chat_files, tmp_path):
    from moshivis import checkpoint
    f, cfg = chat_files, chat_files["cfg"]
    # --checkpoint without the tower: image files off (no error); a SigLIP that does not fit: an error.
    checkpoint.save(f["weights"], tmp_path / "llm.safetensors")
    args = argparse.Namespace(mimi=None, mimi_config=None, siglip=None, checkpoint=str(tmp_path / "llm.safetensors"),
                              vision_config=None, tokenizer=None)
    media = build_media(args, cfg, torch.float32, "cpu")
    assert media.codec is None and media.vision is None and media.tokenizer is None
    with pytest.raises(MediaError, match=r"missing \(\d+\)"):
        build_media(argparse.Namespace(**{**vars(f["args"]), "vision_config": None, "mimi": None}), cfg,
                    torch.float32, "cpu")

    async def scenario():
        async with serving(Engine(cfg, f["weights"]), media=media) as server:
            async with await Client.connect(HOST, server.port) as c:
                for kw, pattern in [(dict(audio="pcm"), r"audio 'pcm' needs the Mimi codec; .* without --mimi"),
                                    (dict(image_file=f["png"]), r"image files need .* without --siglip")]:
                    with pytest.raises(ServerError, match=pattern) as e:
                        await c.open(seed=1, **kw)
                    assert e.value.code == "unsupported"
                opened = await c.open(seed=1)  # tokens still work
                assert opened["audio"] == "tokens" and opened["text"] is False
                await c.ws.send(P.pcm_message(torch.zeros(P.PCM_FRAME)))
                msg = await c.recv()
                assert msg.header["code"] == "bad_message" and "this session speaks tokens" in msg.header["message"]
                await c.audio(torch.zeros(cfg.num_audio_in, dtype=torch.int32))
                msg = await c.recv()
                assert msg.type == "frame" and set(msg.tensors) == {"tokens"} and "text" not in msg.header

    run(scenario())


def test_server_and_client_command_lines_with_wav_and_png(chat_files, tmp_path):
    """`python -m moshivis.server --mimi --tokenizer --checkpoint (with the tower)`, then
    `python -m moshivis.client --audio question.wav --image photo.png --out answer.wav`."""
    from moshivis.audio import load_audio, write_wav
    f, cfg = chat_files, chat_files["cfg"]
    d, a = f["dir"], f["args"]
    write_wav(tmp_path / "question.wav", f["question"], 24000)
    question = load_audio(tmp_path / "question.wav", 24000)
    with server_process("--config", str(d / "config.json"), "--checkpoint", a.checkpoint,
                        "--vision-config", a.vision_config, "--mimi", a.mimi, "--tokenizer", a.tokenizer,
                        "--port", "0", "--max-streams", "1", "--threads", "1", "--mode", "lockstep",
                        "--log-level", "WARNING") as (proc, port):
        out = tmp_path / "answer.wav"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc = client_main(["--port", str(port), "--audio", str(tmp_path / "question.wav"),
                              "--image", str(d / "photo.png"), "--out", str(out), "--seed", str(SEED_A)])
        assert rc == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    answer, printed = chat_answer(f, question, SEED_A, image=True)
    assert stdout.getvalue() == printed + "\n"
    got = load_audio(out, 24000)
    assert got.shape == answer.pcm.shape
    # One 16-bit step: the server's batched Mimi decoder differs from chat's per-stream one by ~3e-7
    # (tests/test_codec.py), enough to move a few samples across a rounding boundary.
    torch.testing.assert_close(got, torch.round(answer.pcm.clamp(-1, 1) * 32767) / 32768, atol=1 / 32767 + 1e-6,
                               rtol=0)


def test_image_worker_encodes_images_pending_together_in_one_batch():
    """The image worker, its encoder held inside the first image: three more images of one kind and one
    with other options arrive meanwhile. Then: one encoder call for the three (a batch), one for the other,
    and each request gets the features of its own file (the stand-in encoder returns each image's mean
    pixel value, so a mix-up would show)."""
    import io
    import threading

    import numpy as np
    from PIL import Image

    from moshivis.serve.media import ImageWorker
    entered, release, calls = threading.Event(), threading.Event(), []

    class Encoder:
        model = torch.nn.Linear(1, 1)

        def encode_batch(self, images, resolution=None, center_crop=False):
            calls.append((len(images), resolution))
            entered.set()
            assert release.wait(10)
            return torch.tensor([[float(np.asarray(im, dtype=np.float64).mean())] for im in images])

    def png(value: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (5, 3), (value, value, value)).save(buf, format="PNG")
        return buf.getvalue()

    async def scenario():
        worker = ImageWorker(Encoder(), max_pending=8, max_pending_bytes=1 << 20)
        first = asyncio.ensure_future(worker.encode(png(10)))
        assert await asyncio.to_thread(entered.wait, 10)
        rest = [asyncio.ensure_future(worker.encode(png(v))) for v in (20, 30, 40)]
        other = asyncio.ensure_future(worker.encode(png(50), resolution=224))
        await asyncio.sleep(0.05)
        release.set()
        return [await f for f in (first, *rest, other)]

    try:
        features = run(scenario(), timeout=20)
    finally:
        release.set()
    assert calls == [(1, None), (3, None), (1, 224)]
    assert [float(f[0]) for f in features] == [10.0, 20.0, 30.0, 40.0, 50.0]
