"""python -m moshivis.server: many conversations over WebSocket, batched through ONE engine.

python -m moshivis.server [--demo | --preset small | --config CONFIG.json] [--checkpoint PATH]
       [--backend torch|triton] [--max-streams N] [--max-images N] [--memory-budget-mb MB]
       [--host 127.0.0.1] [--port 8998] [--ssl-cert PEM --ssl-key PEM] [--mode realtime|lockstep]
       [--mimi FILE|DIR] [--siglip FILE] [--tokenizer FILE] [...limits, see --help]

One port serves: the web page (`GET /`), Kyutai's protocol (`/api/chat`: Kyutai's web clients,
`moshi.client`, `moshi-cli`), our own protocol (`moshivis.protocol`, any other WebSocket path),
Prometheus metrics (`GET /metrics`) and recent figures (`GET /api/stats`). Without --checkpoint the
weights are seeded random (`random_init`), for load tests; `--demo` runs a tiny random model with
Mimi, SigLIP and a tokenizer made on the fly, so the whole speech + image path works with no files.
Speech (PCM sessions and /api/chat) needs --mimi, image files --siglip (or a --checkpoint holding the
tower), the transcript --tokenizer. Scheduling and bounds: `moshivis.serve.scheduler`, `.local`.
Bad options or files: one line on stderr, exit status 2.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import signal
import ssl
from pathlib import Path

import torch

from .. import cli
from ..checkpoint import CheckpointError
from ..config import ConfigError
from .local import WEB_ROOT, Server
from .media import MediaError
from .options import (add_engine_args, add_media_args, add_server_args, build_engine, build_media,
                      memory_model, server_config)

log = logging.getLogger("moshivis.server")


def ssl_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("--ssl-cert and --ssl-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"--ssl-cert {cert} / --ssl-key {key}: {e}") from None
    return ctx


async def _serve(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    tls = ssl_context(args.ssl_cert, args.ssl_key)
    if args.demo:
        cli.require_extras("--demo")
        from ..demo import demo_bundle
        print("moshivis server --demo: a TINY RANDOM model, Mimi, SigLIP and tokenizer made on the fly; its "
              "speech is noise and its words random (no downloaded weights)", flush=True)
        cfg, weights, media = demo_bundle(args.seed)
        engine = build_engine(args, cfg, weights)
        media.codec.model.to(engine.device)
        media.vision.model.to(engine.device)
    else:
        engine = build_engine(args)
        media = build_media(args, engine.cfg, engine.dtype, str(engine.device))
    config = server_config(args, args.host, args.port)
    server = await Server(engine, config, media, ssl=tls, web_root=args.web_root).start()
    mem = memory_model(engine.cfg, engine.dtype, engine.max_streams, engine.pool.capacity, engine.kv_dtype)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: asyncio.ensure_future(server.shutdown(f"signal {s.name}")))
    http, ws = ("https", "wss") if tls else ("http", "ws")
    print(f"moshivis server: {http}://{args.host}:{server.port}/ (web page), {ws}://{args.host}:{server.port}"
          f"/api/chat (Kyutai's protocol), {ws}://{args.host}:{server.port}/ (ours), "
          f"{http}://{args.host}:{server.port}/metrics\n"
          f"  {engine.max_streams} streams x {mem['kv_bytes_per_stream'] / 2**20:.1f} MiB K/V, "
          f"{engine.pool.capacity} image slots x {mem['image_bytes_per_slot'] / 2**20:.1f} MiB; "
          f"mode {args.mode}, tick {args.tick_ms} ms, backend {args.backend}, {engine.device}\n"
          f"  speech: {'yes' if media.codec else 'no (--mimi)'}, image files: "
          f"{'yes' if media.vision else 'no (--siglip)'}, text: {'yes' if media.tokenizer else 'no (--tokenizer)'}",
          flush=True)
    await server.wait_closed()


@cli.guard(ConfigError, CheckpointError, MediaError, ValueError, ImportError)
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m moshivis.server", description=__doc__)
    add_engine_args(ap)
    add_server_args(ap)
    add_media_args(ap)
    ap.add_argument("--demo", action="store_true", help="a tiny random model with Mimi, SigLIP and a tokenizer made "
                                                        "on the fly (ignores --config/--checkpoint/--mimi/...)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=cli.port_number, default=8998, help="0: any free port")
    ap.add_argument("--ssl-cert", help="PEM certificate: serve https/wss (browsers need it for the microphone "
                                       "anywhere but localhost)")
    ap.add_argument("--ssl-key", help="PEM private key of --ssl-cert")
    ap.add_argument("--web-root", type=Path, default=WEB_ROOT,
                    help="folder served at / (default: our page; e.g. Kyutai's built web client)")
    ap.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = ap.parse_args(argv)
    if not args.web_root.is_dir():
        raise cli.UsageError(f"--web-root {args.web_root} is not a folder")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.log_level != "DEBUG":  # websockets logs every HTTP request and connection at INFO
        logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        asyncio.run(_serve(args))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise cli.UsageError(f"port {args.port} on {args.host} is already in use (pick another with --port)") \
                from None
        raise
    except KeyboardInterrupt:
        pass
    return 0
