"""The web page in a real browser (issue [web]): Debian's chromium, headless, driven by Playwright,
with a fake microphone (a WAV) and camera, against `python -m moshivis.server --demo`.

The oracles: the server's own /metrics (the stream was stepped, the slot freed), the page's counters
(`window.moshivisStats`: audio decoded and played), the transcript in the DOM, and the errors the page
shows. CI installs chromium (`.ci/run`); without it this test fails, saying how to install it.
"""
from __future__ import annotations

import base64
import math
import os
import shutil
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from test_serve import HOST, run, server_process, serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream"]


def metrics(port: int) -> dict[str, float]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
            if line and not line.startswith("#")}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def media_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("web")
    t = np.arange(48000 * 4) / 48000  # 4 s at 48 kHz, looped by chromium: a tone that comes and goes
    pcm = (0.3 * np.sin(2 * math.pi * 220 * t) * (np.sin(2 * math.pi * 0.5 * t) > 0) * 32767).astype("<i2")
    with wave.open(str(d / "mic.wav"), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(48000)
        f.writeframes(pcm.tobytes())
    im = Image.new("RGB", (320, 240), (40, 70, 160))  # "a red square on a blue background"
    ImageDraw.Draw(im).rectangle((110, 70, 210, 170), fill=(200, 40, 40))
    im.save(d / "picture.png")
    return d / "mic.wav", d / "picture.png"


@pytest.mark.xdist_group("real_time")  # a real-time conversation: one at a time with the other real-time tests
def test_a_conversation_in_a_real_browser(media_files, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail("this test needs Debian's chromium: apt-get install -y chromium (CI's .ci/run installs it)")
    from playwright.sync_api import sync_playwright
    wav, picture = media_files
    with server_process("--demo", "--max-streams", "1", "--port", "0") as (proc, port), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=FLAGS + [f"--use-file-for-fake-audio-capture={wav}"])
        try:
            page = browser.new_page()
            console = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(f"http://127.0.0.1:{port}/")
            # a picture from the camera (chromium's fake one), then one dropped on the page, then the file's
            info = "document.getElementById('image-info').textContent.startsWith"
            page.click("#camera-open")
            page.wait_for_function("document.getElementById('camera').videoWidth > 0", timeout=20000)
            page.click("#camera-snap")
            page.wait_for_function(f"{info}('Camera:')", timeout=20000)
            page.evaluate("""async (b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, cancelable: true }));
            }""", base64.b64encode(picture.read_bytes()).decode())
            page.wait_for_function(f"{info}('dropped.png:')", timeout=20000)
            page.set_input_files("#file", str(picture))
            page.wait_for_function(f"{info}('picture.png:')", timeout=20000)
            page.click("#connect")
            page.wait_for_function("window.moshivisStats.state === 'live'", timeout=60000)
            before = metrics(port)["moshivis_stream_frames_total"]
            wait_for(lambda: metrics(port)["moshivis_stream_frames_total"] - before >= 3 * 12.5, 30,
                     "3 s of frames stepped on the server")
            page.wait_for_function("document.querySelectorAll('#transcript span[data-color]').length > 0",
                                   timeout=30000)
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            stats = page.evaluate("window.moshivisStats")
            assert stats["decodedSamples"] > 48000 and stats["playedSamples"] > 24000, stats
            assert stats["imageBytesSent"] == picture.stat().st_size and stats["audioMessagesSent"] > 30, stats
            assert stats["errors"] == [], stats["errors"]
            # the live figures: a ping's round trip and the server's frame latency (GET /api/stats)
            assert stats["rttMs"] is not None and stats["frameMsP50"] is not None, stats
            assert page.inner_text("#fig-rtt").endswith("ms)") and page.inner_text("#fig-frame").endswith(" ms")
            assert metrics(port)["moshivis_active_streams"] == 1

            # a second page while the only slot is taken: the server's reason shows on the page
            other = browser.new_page()
            other.on("pageerror", lambda e: console.append(f"pageerror (second page): {e}"))
            other.goto(f"http://127.0.0.1:{port}/")
            other.set_input_files("#file", str(picture))
            other.click("#connect")
            other.wait_for_function("window.moshivisStats.errors.length > 0", timeout=30000)
            assert "server full" in " ".join(other.evaluate("window.moshivisStats.errors"))
            assert "server full" in other.inner_text("#errors")

            page.click("#disconnect")
            wait_for(lambda: metrics(port)["moshivis_active_streams"] == 0, 10, "the slot to be freed")
            assert page.evaluate("window.moshivisStats.state") != "live"
        finally:
            browser.close()
    assert [c for c in console if c.startswith(("error", "pageerror"))] == [], console
    shot = tmp_path / "page.png"
    assert shot.stat().st_size > 10000
    if os.environ.get("MOSHIVIS_SCREENSHOT"):  # how docs/screenshot.png (the README's picture) is made
        shutil.copy(shot, os.environ["MOSHIVIS_SCREENSHOT"])


def test_static_files_stay_inside_the_page_folder(tmp_path):
    """GET / is the page, modules come as JavaScript, nothing outside the folder is served."""
    import asyncio

    from moshivis import Engine, preset, random_init
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "index.html").write_text("<!doctype html><title>t</title>")
    (tmp_path / "web" / "app.js").write_text("export const x = 1;")
    (tmp_path / "secret.txt").write_text("not for you")
    cfg = preset("tiny")

    async def get(port, path):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return head.decode(), body

    async def scenario():
        async with serving(Engine(cfg, random_init(cfg, seed=0))) as server:
            server.web_root = tmp_path / "web"
            return [await get(server.port, p) for p in ("/", "/app.js", "/../secret.txt", "/%2e%2e/secret.txt",
                                                        "/nope.js", "/api/stats")]

    (root, body), (js, js_body), (up, _), (up2, _), (missing, _), (stats, stats_body) = run(scenario())
    assert root.startswith("HTTP/1.1 200") and "text/html" in root and body.startswith(b"<!doctype html>")
    assert js.startswith("HTTP/1.1 200") and "Content-Type: text/javascript" in js and js_body == b"export const x = 1;"
    assert all(h.startswith("HTTP/1.1 404") for h in (up, up2, missing))
    assert stats.startswith("HTTP/1.1 200") and b'"max_streams": 1' in stats_body
