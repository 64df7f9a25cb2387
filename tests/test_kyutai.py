"""Kyutai's wire protocol on /api/chat (issue [kyutai-api]), against a client written here from
Kyutai's protocol (kind byte + payload; Ogg/Opus through sphn, as `moshi.client` does), not ours.

Oracles: a native PCM session (our protocol, another path through the server) fed exactly the PCM the
server decoded from the client's Opus (sphn's decoder is deterministic, so the test decodes the same
pages itself), `chat.converse` alone, and sphn's own encoder for the audio sent back.
"""
from __future__ import annotations

import asyncio
import math
import re
import urllib.parse

import numpy as np
import pytest
import sphn
import torch
import websockets.asyncio.client as wsc

from moshivis import Engine, SamplingParams
from moshivis import protocol as P
from moshivis.serve.kyutai import parse_query
from test_serve import HOST, chat_answer, chat_files, metrics_text, parse_metrics, run, serving  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

SR, FRAME = 24000, 1920
HANDSHAKE, AUDIO, TEXT, ERROR, PING, COLORED, IMAGE = 0x00, 0x01, 0x02, 0x05, 0x06, 0x07, 0x08


def opus_pages(pcm: torch.Tensor) -> list[bytes]:
    """The user's audio as moshi.client sends it: 1920-sample blocks through one OpusStreamWriter."""
    w = sphn.OpusStreamWriter(SR)
    x = torch.nn.functional.pad(pcm, (0, -len(pcm) % FRAME)).numpy().astype(np.float32)
    return [w.append_pcm(x[i:i + FRAME]) for i in range(0, len(x), FRAME)]


def decode_opus(data: bytes) -> np.ndarray:
    """An Ogg/Opus stream decoded by sphn, fed in pieces (sphn fails on one call of more than ~5 s)."""
    r = sphn.OpusStreamReader(SR)
    return np.concatenate([r.append_bytes(data[i:i + 4096]) for i in range(0, len(data), 4096)])


class KyutaiClient:
    """Kyutai's protocol, from its spec: every message binary, first byte the kind."""

    def __init__(self, ws):
        self.ws = ws
        self.reader = sphn.OpusStreamReader(SR)
        self.pcm: list[np.ndarray] = []
        self.text: list[tuple[int | None, str]] = []  # (colour or None for plain text, piece)
        self.errors: list[str] = []
        self.kinds: list[int] = []
        self.ogg = bytearray()  # every audio payload, as received

    @classmethod
    async def connect(cls, port: int, **query) -> "KyutaiClient":
        q = urllib.parse.urlencode({k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items()})
        return cls(await wsc.connect(f"ws://{HOST}:{port}/api/chat" + (f"?{q}" if q else ""), max_size=None))

    async def recv(self, timeout: float = 30) -> int | None:
        """The next message's kind (None once closed), its content filed."""
        try:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
        except Exception:  # noqa: BLE001 - closed
            return None
        assert isinstance(data, bytes) and data, data
        kind = data[0]
        self.kinds.append(kind)
        if kind == AUDIO:
            self.ogg += data[1:]
            self.pcm.append(self.reader.append_bytes(data[1:]))
        elif kind == COLORED:
            assert 0 <= data[1] <= 10
            self.text.append((data[1], data[2:].decode()))
        elif kind == TEXT:
            self.text.append((None, data[1:].decode()))
        elif kind == ERROR:
            self.errors.append(data[1:].decode())
        else:
            assert kind in (HANDSHAKE, PING), f"a kind Kyutai's clients do not know: {kind}"
        return kind

    async def handshake(self) -> None:
        while (kind := await self.recv()) != HANDSHAKE:
            assert kind is not None, f"closed before the handshake: {self.errors}"

    @property
    def audio(self) -> np.ndarray:
        return np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.float32)


async def converse_kyutai(port: int, question: torch.Tensor, image: bytes | None, ahead: int = 4,
                          **query) -> KyutaiClient:
    """Image first (if any), handshake, then the question's Opus pages (one 80 ms frame each), at most
    `ahead` frames ahead of the audio received (the test servers run in lockstep: as fast as that), then
    every reply until the audio received covers the audio sent."""
    c = await KyutaiClient.connect(port, **query)
    if image is not None:
        await c.ws.send(bytes([IMAGE]) + image)  # without waiting, as the MoshiVis web client does
    pages = opus_pages(question)
    if image is None:
        await c.ws.send(bytes([AUDIO]) + pages[0])  # Moshi's clients send audio at once
    await c.handshake()
    for i in range(image is None, len(pages)):
        while i - len(c.audio) // FRAME >= ahead:
            assert await c.recv() is not None, f"closed early: {c.errors}"
        await c.ws.send(bytes([AUDIO]) + pages[i])
    sent = len(pages) * FRAME
    while len(c.audio) < sent:
        assert await c.recv() is not None, f"closed early: {c.errors}"
    await c.ws.close()
    return c


def snr(x: np.ndarray, ref: np.ndarray) -> float:
    """Signal-to-noise ratio of x against ref, in dB."""
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((x - ref).astype(np.float64) ** 2)))


def transcript(files, text_tokens) -> str:
    """What a stream's text pieces join to for these text tokens (SentencePiece, streamed)."""
    stream = files["media"].tokenizer.stream()
    return "".join(stream.push(t) for t in text_tokens)


def seed_of(text_seed: int, audio_seed: int) -> int:
    return (text_seed * 1_000_003 + audio_seed) % 2 ** 63


def test_image_first_opus_in_opus_and_coloured_text_out(chat_files):
    """5 s of speech: the client receives 5 s of audio (Opus) and coloured text; both equal a native
    PCM session fed the PCM the server decoded, and `chat.converse` alone."""
    f, cfg = chat_files, chat_files["cfg"]
    gen = torch.Generator().manual_seed(11)
    question = 0.3 * torch.sin(2 * math.pi * 220 * torch.arange(5 * SR) / SR) + 0.05 * torch.randn(5 * SR, generator=gen)
    query = dict(text_temperature=0.7, text_topk=25, audio_temperature=0.8, audio_topk=250, text_seed=12,
                 audio_seed=34, xa_start=0)

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=2), media=f["media"]) as server:
            return await converse_kyutai(server.port, question, f["png"], **query)

    c = run(scenario(), timeout=120)
    decoded = decode_opus(b"".join(opus_pages(question)))
    assert abs(len(c.audio) - 5 * SR) <= FRAME and abs(len(decoded) - 5 * SR) <= FRAME  # 5 s in, 5 s out
    assert c.errors == [] and c.kinds[0] == HANDSHAKE and all(k != TEXT for k in c.kinds)  # vision: coloured text
    # an Ogg/Opus stream from its first byte (RFC 7845): a BOS page holding OpusHead (mono), then a page
    # holding OpusTags, then the audio pages, one serial number (decoders such as opus-recorder need the head)
    head_len = 27 + c.ogg[26]
    assert c.ogg[:4] == b"OggS" and c.ogg[5] & 0x02 and c.ogg[head_len:head_len + 8] == b"OpusHead"
    assert c.ogg[head_len + 9] == 1  # channels
    tags = head_len + sum(c.ogg[27:head_len])
    assert c.ogg[tags:tags + 4] == b"OggS" and c.ogg[tags + 27 + c.ogg[tags + 26]:][:8] == b"OpusTags"
    assert c.ogg[14:18] == c.ogg[tags + 14:tags + 18]  # the same logical stream
    # The oracle: the same decoded PCM through `chat.converse` alone (same seed), then through sphn's
    # encoder frame by frame as the server does, and sphn's decoder.
    colours = []
    answer, _ = chat_answer(f, torch.from_numpy(decoded), seed_of(12, 34), image=True, colours=colours)
    # chat also steps `max_delay` frames of silence after the question; the session stops with it
    frames = len(decoded) // FRAME
    assert "".join(piece for _, piece in c.text) == transcript(f, answer.text_tokens[:frames - cfg.max_delay])
    # each piece's colour byte: that of the frame whose step handed out its token (Kyutai's PyTorch server)
    stream = f["media"].tokenizer.stream()
    pieces = [(colours[t], stream.push(answer.text_tokens[t - cfg.max_delay])) for t in range(cfg.max_delay, frames)]
    want_colours = [colour for colour, piece in pieces if piece]
    assert [colour for colour, _ in c.text] == want_colours and max(want_colours) > 0
    w = sphn.OpusStreamWriter(SR)
    silence = np.zeros(cfg.max_delay * FRAME, np.float32)  # the warm-up frames' silence comes first
    full = np.concatenate([silence, answer.pcm.numpy()])
    want = decode_opus(b"".join(w.append_pcm(full[i:i + FRAME]) for i in range(0, len(full), FRAME)))
    n = min(len(want), len(c.audio))
    assert n >= len(decoded) - FRAME
    # Opus is lossy (and chaotic: the server's PCM differs from chat's by ~3e-7, the bits then differ):
    # what the client hears must be as close to the model's speech as Opus itself gets, at its delay.
    lag = max(range(400), key=lambda k: snr(want[k:n], full[:n - k]))  # Opus's look-ahead: 156 samples
    assert snr(c.audio[lag:n], full[:n - lag]) >= snr(want[lag:n], full[:n - lag]) - 0.5


def test_a_moshi_client_without_an_image_gets_plain_text(chat_files):
    f, cfg = chat_files, chat_files["cfg"]
    question = f["question"]

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=1), media=f["media"]) as server:
            return await converse_kyutai(server.port, question, None, text_temperature=0, audio_temperature=0)

    c = run(scenario(), timeout=60)
    decoded = decode_opus(b"".join(opus_pages(question)))
    answer, _ = chat_answer(f, torch.from_numpy(decoded), 0, image=False, sampling=SamplingParams.greedy())
    assert c.errors == [] and all(k != COLORED for k in c.kinds)
    assert "".join(p for _, p in c.text) == transcript(f, answer.text_tokens[:len(decoded) // FRAME - cfg.max_delay])


def test_moshis_web_client_gets_the_handshake_without_sending_anything(chat_files, gen):
    """Moshi's web client sends nothing before the handshake (its microphone starts on 0x00): a client
    whose query asks for no image gets a session without one; one whose query does (MoshiVis' web client
    sends `xa_start` with its picture) is waited for, and gets the open timeout's 0x05 if nothing comes.
    The audio goes in messages cut anywhere in the Ogg pages (page boundaries are not message boundaries),
    and the transcript still equals `chat.converse` alone."""
    f, cfg = chat_files, chat_files["cfg"]
    moshi_web = dict(text_temperature=0, text_topk=25, audio_temperature=0, audio_topk=250, pad_mult=0,
                     text_seed=1, audio_seed=2, repetition_penalty_context=64, repetition_penalty=1.0)

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=2), media=f["media"], open_timeout_s=3.0) as server:
            c = await KyutaiClient.connect(server.port, **moshi_web)
            await c.handshake()
            ogg = b"".join(opus_pages(f["question"]))
            cuts = sorted(set(torch.randint(1, len(ogg), (len(ogg) // 60,), generator=gen).tolist()))
            for a, b in zip([0, *cuts], [*cuts, len(ogg)]):
                await c.ws.send(bytes([AUDIO]) + ogg[a:b])
            while len(c.audio) < len(opus_pages(f["question"])) * FRAME:
                assert await c.recv() is not None, f"closed early: {c.errors}"
            await c.ws.close()
            vis = await KyutaiClient.connect(server.port, **moshi_web, xa_start=16)
            while await vis.recv(10) is not None:
                pass
            return c, vis

    c, vis = run(scenario(), timeout=60)
    assert c.errors == [] and c.kinds[0] == HANDSHAKE and all(k != COLORED for k in c.kinds) and c.text
    decoded = decode_opus(b"".join(opus_pages(f["question"])))
    answer, _ = chat_answer(f, torch.from_numpy(decoded), 0, image=False, sampling=SamplingParams.greedy())
    assert "".join(p for _, p in c.text) == transcript(f, answer.text_tokens[:len(decoded) // FRAME - cfg.max_delay])
    assert HANDSHAKE not in vis.kinds and "no stream opened" in " ".join(vis.errors)


def test_full_server_bad_messages_and_bad_queries_fail_alone(chat_files):
    """Every bad request is answered 0x05 (and a close where the session cannot go on), for that client
    only: a good session running meanwhile equals its run alone."""
    f, cfg = chat_files, chat_files["cfg"]
    question = f["question"]

    async def bad(port, first: bytes | None = None, expect_close: bool = True, **query):
        c = await KyutaiClient.connect(port, **query)
        if first is not None:
            await c.ws.send(first)
        kind = await c.recv(10)
        if kind is None and c.ws.close_code == 1009:  # over the transport's message limit: closed at once
            return f"closed: {c.ws.close_reason}"
        assert kind == ERROR, (kind, c.errors, first[:4] if first else query)
        if expect_close:
            assert await c.recv(10) is None
        else:
            await c.ws.close()
        return c.errors[0]

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=2), media=f["media"],
                           max_image_file_bytes=1 << 20) as server:
            good = asyncio.create_task(converse_kyutai(server.port, question, f["png"], text_temperature=0,
                                                       audio_temperature=0))
            errors = {
                "unknown kind": await bad(server.port, bytes([0x09, 1, 2]), expect_close=False),
                "bad ogg": await bad(server.port, bytes([AUDIO]) + b"this is not an ogg stream"),
                "not an image": await bad(server.port, bytes([IMAGE]) + b"GIF89a nonsense"),
                "huge image": await bad(server.port, bytes([IMAGE]) + bytes(2 << 20), expect_close=False),
                "bad temperature": await bad(server.port, text_temperature="hot"),
                "bad topk": await bad(server.port, audio_topk=0),
                "bad penalty": await bad(server.port, repetition_penalty=0),
                "bad xa_start": await bad(server.port, xa_start=-3),
                "bad crop": await bad(server.port, center_crop="maybe"),
            }
            c = await good
            holders = []  # both streams taken: the server is full
            for _ in range(2):
                holders.append(await KyutaiClient.connect(server.port))
                await holders[-1].ws.send(bytes([AUDIO]) + opus_pages(question)[0])
                await holders[-1].handshake()
            errors["full"] = await bad(server.port, bytes([AUDIO]) + opus_pages(question)[0])
            for h in holders:
                await h.ws.close()
            text = await metrics_text(server.port)
            return errors, c, text

    errors, c, text = run(scenario(), timeout=120)
    assert "unknown message kind 0x09" in errors["unknown kind"]
    assert "Ogg" in errors["bad ogg"]
    assert "image" in errors["not an image"]
    assert re.search("over the limit|exceeds limit", errors["huge image"])
    assert "text_temperature" in errors["bad temperature"] and "audio_topk" in errors["bad topk"]
    assert "repetition_penalty" in errors["bad penalty"]
    assert "xa_start" in errors["bad xa_start"] and "center_crop" in errors["bad crop"]
    assert "server full" in errors["full"]
    assert c.errors == []
    decoded = decode_opus(b"".join(opus_pages(question)))
    answer, _ = chat_answer(f, torch.from_numpy(decoded), 0, image=True, sampling=SamplingParams.greedy())
    assert "".join(p for _, p in c.text) == transcript(f, answer.text_tokens[:len(decoded) // FRAME - cfg.max_delay])
    _, samples = parse_metrics(text)
    assert samples['moshivis_refusals_total{reason="server_full"}'] == 1


def test_ping_is_answered(chat_files):
    f, cfg = chat_files, chat_files["cfg"]

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=1), media=f["media"]) as server:
            c = await KyutaiClient.connect(server.port)
            await c.ws.send(bytes([PING]))
            kind = await c.recv(5)
            await c.ws.close()
            return kind

    assert run(scenario()) == PING


def test_query_parameters_map_onto_the_stream():
    req, max_steps = parse_query({"text_temperature": "0.45", "text_topk": "25", "audio_temperature": "0.7",
                                  "audio_topk": "250", "text_seed": "12", "audio_seed": "34",
                                  "repetition_penalty": "1.15", "repetition_penalty_context": "64", "pad_mult": "0",
                                  "image_resolution": "500", "center_crop": "true", "xa_start": "16",
                                  "max_steps": "100", "email": "x@y", "unknown": "ignored"})
    s = req.sampling
    assert (s.temperature_text, s.top_k_text, s.temperature_audio, s.top_k_audio) == (0.45, 25, 0.7, 250)
    assert (s.repetition_penalty, s.repetition_penalty_context) == (1.15, 64)
    assert req.seed == seed_of(12, 34) and req.xa_start == 16 and max_steps == 100 and req.audio == "pcm"
    assert req.image_options == {"resolution": 500, "center_crop": True}
    assert parse_query({})[0].seed != parse_query({})[0].seed  # random without seeds
    assert parse_query({})[0].xa_start == 16 and parse_query({"xa_start": "0"})[0].xa_start == 0  # the web client's


@pytest.mark.parametrize("name, value", [
    ("text_temperature", "nan"), ("audio_temperature", "-0.1"), ("text_topk", "1.5"), ("audio_topk", "0"),
    ("text_seed", "-1"), ("audio_seed", "x"), ("repetition_penalty", "0"), ("repetition_penalty_context", "257"),
    ("pad_mult", "many"), ("image_resolution", "0"), ("center_crop", "yes please"), ("xa_start", "2.5"),
    ("max_steps", "0")])
def test_every_bad_query_value_is_refused_naming_its_parameter(name, value):
    with pytest.raises(P.ProtocolError, match=rf"\b{name}\b") as e:
        parse_query({"text_temperature": "0.45", name: value})
    assert e.value.code == "bad_query"


def test_wss_and_https_with_a_certificate(chat_files, tmp_path):
    """--ssl-cert/--ssl-key: the page over https and /api/chat over wss (moshi-cli speaks only wss)."""
    import ssl
    import subprocess
    import urllib.request

    from moshivis.serve.main import ssl_context
    f, cfg = chat_files, chat_files["cfg"]
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True, timeout=60)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    client_ctx.check_hostname = False

    async def scenario():
        async with serving(Engine(cfg, f["weights"], max_streams=1), media=f["media"],
                           ssl=ssl_context(str(cert), str(key))) as server:
            loop = asyncio.get_running_loop()
            page = await loop.run_in_executor(None, lambda: urllib.request.urlopen(
                f"https://{HOST}:{server.port}/", context=client_ctx, timeout=10).read())
            async with wsc.connect(f"wss://{HOST}:{server.port}/api/chat", ssl=client_ctx) as ws:
                await ws.send(bytes([AUDIO]) + opus_pages(f["question"])[0])
                first = await asyncio.wait_for(ws.recv(), 30)
            return page, first

    page, first = run(scenario())
    assert b"<title>" in page and first[:1] == bytes([HANDSHAKE])
