"""The server on Ray Serve: one replica per GPU, each owning one engine behind FastAPI WebSocket routes.

Application `moshivis` (`build_app`, a Serve application builder, so `serve deploy` config files name
it as `import_path: moshivis.serve.ray_app:build_app` with the server's options as `args`):

* deployment `MoshiVis` (`Replica`): each replica builds one Engine (and its codec, image encoder,
  tokenizer) from the options and serves it through the same scheduler and protocol sessions as
  `python -m moshivis.server` (a `local.Server` without a socket of its own: Starlette's WebSocket
  is wrapped in a `Connection`). Routes: `/api/chat` (Kyutai's protocol), any other WebSocket path
  (ours), `GET /metrics`, `/metrics/replicas`, `/api/stats` and the web page.
  A WebSocket is one ongoing Serve request for its whole life, so it is routed once, at the
  handshake, by `router.ImageAffinityRouter`; `max_ongoing_requests` = max_streams + HEADROOM, so
  a replica at `max_streams` still takes the next opens and answers them with the protocol's
  `refused server_full` instead of Serve queueing them silently.
* deployment `MoshiVisMetrics` (`MetricsCollector`, one replica, no GPU): behind the proxy an HTTP
  request lands on one replica, so each replica reports its Prometheus text to the collector (every
  second, and at once when a scrape asks), and any replica answers `GET /metrics` with the sum over
  live replicas (the same names as one server: `bench.load` and dashboards work unchanged) and
  `GET /metrics/replicas` with every replica's samples labelled `replica="<id>"`. The collector also
  watches the Serve controller: a replica being removed (STOPPING) learns it from its next report
  and drains (see `Replica._drain_streams`).

Serve's own metrics (requests, queue lengths, replica health) are on each Ray node's Prometheus
endpoint (`ray start --metrics-export-port`), not here.
"""
# No `from __future__ import annotations`: FastAPI must see the route parameters' real types (Serve copies
# the methods' signatures, and string annotations would then not resolve: WebSocket routes would fail 1008).
import argparse
import asyncio
import collections
import logging
import re
import time

from fastapi import FastAPI, WebSocket
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocketDisconnect

from .session import Connection

log = logging.getLogger("moshivis.server")

APP = "moshivis"
DEPLOYMENT = "MoshiVis"
COLLECTOR = "MoshiVisMetrics"
SESSION_HEADER = "x-session-id"  # Serve's session-id header: the router's affinity key (the image's hash)
HEADROOM = 2  # connections a replica accepts beyond max_streams, answered by the engine's admission
REPORT_PERIOD_S = 1.0
PROMETHEUS = "text/plain; version=0.0.4; charset=utf-8"
DRAIN_MARGIN_S = 3.0  # a draining replica ends its streams this long before Serve's force-kill
# Gauges that are settings (the same on every replica): the cluster's value is the largest, not the sum.
SETTING_GAUGES = ("moshivis_frame_budget_seconds", "moshivis_tick_seconds")

api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


# ---- options --------------------------------------------------------------------------------------
def option_parser() -> argparse.ArgumentParser:
    """The engine, media and server options of `python -m moshivis.server` (defaults resolved on the
    replica, so e.g. --device defaults to the replica's GPU, not the builder's)."""
    from .options import add_engine_args, add_media_args, add_server_args
    ap = argparse.ArgumentParser(prog="moshivis.serve.ray_app", add_help=False, exit_on_error=False)
    add_engine_args(ap)
    add_server_args(ap)
    add_media_args(ap)
    return ap


def option_argv(options: dict) -> list[str]:
    """{"max_streams": 8, ...} (a config file's `args`) -> ["--max-streams", "8", ...], checked: an unknown
    name or a bad value raises ValueError naming it."""
    ap = option_parser()
    known = {a.dest for a in ap._actions}
    argv = []
    for name, value in options.items():
        if name not in known:
            raise ValueError(f"unknown option {name!r} in the application's args; known: {sorted(known)}")
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    try:
        parsed = ap.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as e:
        raise ValueError(f"bad option in the application's args {options}: {e}") from None
    if parsed.max_streams < 1:
        raise ValueError(f"max_streams must be at least 1, got {parsed.max_streams}")
    return argv


def max_streams(argv: list[str]) -> int:
    """The engine's stream slots these options ask for (a memory budget may lower it on the replica)."""
    return option_parser().parse_args(argv).max_streams


# ---- the transport --------------------------------------------------------------------------------
class StarletteConnection(Connection):
    """A Starlette (FastAPI) WebSocket, as Serve's proxy relays it, as a session's `Connection`."""

    def __init__(self, ws: WebSocket, max_bytes: int):
        self.ws, self.max_bytes = ws, max_bytes
        self.remote = ws.client.host if ws.client else ""
        self.path, self.query = ws.url.path, dict(ws.query_params)
        self.gone = False

    async def recv(self):
        if self.gone:
            return None
        try:
            msg = await self.ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            msg = {"type": "websocket.disconnect"}
        if msg["type"] == "websocket.disconnect":
            self.gone = True
            return None
        data = msg["bytes"] if msg.get("bytes") is not None else msg.get("text")
        if data is not None and len(data) > self.max_bytes:  # the proxy relays whole messages: checked here
            await self.close(1009, f"message of {len(data)} bytes is over the limit of {self.max_bytes}")
            return None
        return data

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.gone = True
        try:
            await self.ws.close(code, reason)
        except Exception:  # noqa: BLE001 - already closed by either side
            pass

    def abort(self) -> None:
        """Serve's proxy owns the socket: the closest thing to dropping it is a close without waiting."""
        asyncio.ensure_future(self.close(1011, "dropped"))


# ---- metrics across replicas (`@serve.ingress` pickles the class at once: what it calls comes first) ----
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)")


def _families(text: str) -> dict[str, dict]:
    """Prometheus text (as `Metrics.render` writes it) -> {family: {"head": [# lines], "samples": {key: value}}}."""
    out: dict[str, dict] = {}
    family = None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            family = line.split(" ")[2]
            out.setdefault(family, {"head": [], "samples": {}})["head"].append(line)
        elif line and family is not None and (m := _SAMPLE.fullmatch(line)):
            out[family]["samples"][m[1] + (m[2] or "")] = float(m[3])
    return out


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def aggregate(texts: dict[str, str]) -> str:
    """The replicas' metrics as one server's: each sample summed over replicas (settings: the largest),
    plus `moshivis_replicas`."""
    merged: dict[str, dict] = {}
    for text in texts.values():
        for name, fam in _families(text).items():
            m = merged.setdefault(name, {"head": fam["head"], "samples": {}})
            for key, v in fam["samples"].items():
                old = m["samples"].get(key)
                m["samples"][key] = v if old is None else (max(old, v) if name in SETTING_GAUGES else old + v)
    lines = []
    for fam in merged.values():
        lines += fam["head"] + [f"{k} {_num(v)}" for k, v in fam["samples"].items()]
    lines += ["# HELP moshivis_replicas Engine replicas whose metrics are summed here.",
              "# TYPE moshivis_replicas gauge", f"moshivis_replicas {len(texts)}"]
    return "\n".join(lines) + "\n"


def label_replicas(texts: dict[str, str]) -> str:
    """Every replica's samples with a `replica` label, family by family."""
    merged: dict[str, dict] = {}
    for replica, text in sorted(texts.items()):
        for name, fam in _families(text).items():
            m = merged.setdefault(name, {"head": fam["head"], "samples": []})
            for key, v in fam["samples"].items():
                base, _, rest = key.partition("{")
                labels = f'replica="{replica}"' + ("," + rest[:-1] if rest else "")
                m["samples"].append(f"{base}{{{labels}}} {_num(v)}")
    lines = []
    for fam in merged.values():
        lines += fam["head"] + fam["samples"]
    return "\n".join(lines) + "\n"


# ---- the engine replica ---------------------------------------------------------------------------
@serve.deployment(name=DEPLOYMENT, ray_actor_options={"num_gpus": 1}, max_ongoing_requests=8 + HEADROOM,
                  max_queued_requests=32, graceful_shutdown_timeout_s=600, health_check_period_s=5)
@serve.ingress(api)
class Replica:
    """One engine on one GPU, with the sessions of the streams routed to it."""

    async def __init__(self, argv: list[str], collector=None):
        import torch

        from .local import Server, pin_mmap_threshold
        from .options import build_engine, build_media, server_config
        args = option_parser().parse_args(argv)
        logging.getLogger("moshivis").setLevel(logging.INFO)  # stream events in the replica's log, as on one server
        if args.threads:
            torch.set_num_threads(args.threads)
        engine = build_engine(args)
        media = build_media(args, engine.cfg, engine.dtype, str(engine.device))
        self.server = Server(engine, server_config(args, "127.0.0.1", 0), media)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.server.scheduler.replica = self.id
        pin_mmap_threshold()
        await self.server.scheduler.start()
        self.images = collections.Counter()  # affinity keys of open connections
        self.collector = collector
        self._drain: asyncio.Task | None = None
        self._reporter = asyncio.create_task(self._report()) if collector is not None else None
        log.info("replica %s: engine ready, %d streams", self.id, engine.max_streams)

    # ---- WebSockets -------------------------------------------------------------------------------
    @api.websocket("/api/chat")
    async def kyutai(self, websocket: WebSocket) -> None:
        await self._serve(websocket)

    @api.websocket("/{path:path}")
    async def native(self, websocket: WebSocket) -> None:
        await self._serve(websocket)

    async def _serve(self, websocket: WebSocket) -> None:
        key = websocket.headers.get(SESSION_HEADER, "")[:128]
        await websocket.accept()
        if key:
            self.images[key] += 1
        try:
            await self.server.serve_connection(StarletteConnection(websocket, self.server.limits.max_message_bytes))
        finally:
            if key:
                self.images[key] -= 1
                if self.images[key] <= 0:
                    del self.images[key]

    # ---- HTTP -------------------------------------------------------------------------------------
    @api.get("/metrics")
    async def metrics(self) -> Response:
        """The cluster: every live replica's counters and gauges summed (the names of one server)."""
        return Response(aggregate(await self._scrape()), media_type=PROMETHEUS)

    @api.get("/metrics/replicas")
    async def metrics_per_replica(self) -> Response:
        """Every live replica's own samples, labelled replica="<id>"."""
        return Response(label_replicas(await self._scrape()), media_type=PROMETHEUS)

    @api.get("/api/stats")
    async def stats(self) -> JSONResponse:
        """The answering replica's recent figures (the page shows one engine's)."""
        return JSONResponse({**self.server.scheduler.stats(), "replica": self.id})

    @api.get("/{path:path}")
    async def static(self, path: str) -> Response:
        from .local import static_file
        found = static_file(self.server.web_root, path)
        if found is None:
            return Response(b"not found\n", 404, media_type="text/plain; charset=utf-8")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "no-cache"})

    async def _scrape(self) -> dict[str, str]:
        texts = {} if self.collector is None else await self.collector.scrape.remote()
        return {**texts, self.id: self.server.metrics_text()}  # its own, fresh

    # ---- Serve's hooks ----------------------------------------------------------------------------
    def record_routing_stats(self) -> dict:
        """Published to the routers every `request_routing_stats_period_s`."""
        return {"streams": self.server.scheduler.admitted, "max_streams": self.server.engine.max_streams,
                "images": list(self.images)}

    def check_health(self) -> None:
        """A stopped scheduler (internal error) fails the check: Serve replaces the replica."""
        if self.server.scheduler.stopping and self._drain is None:
            raise RuntimeError("the frame scheduler has stopped")

    async def __del__(self):
        if self._reporter is not None:
            self._reporter.cancel()
        await self.server.shutdown("replica stopping")

    # ---- metrics reports and draining ---------------------------------------------------------------
    async def _report(self) -> None:
        gen = 0
        while True:
            try:
                answer = await self.collector.report.remote(self.id, gen, self.server.metrics_text())
                gen = answer["gen"]
                if answer["draining"] and self._drain is None:
                    self._drain = asyncio.create_task(self._drain_streams(answer["grace_s"]))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the collector is being replaced: try again
                log.warning("replica %s: metrics report failed: %s", self.id, e)
                await asyncio.sleep(REPORT_PERIOD_S)

    async def _drain_streams(self, grace_s: float) -> None:
        """Serve removed this replica: it gets no new connections and is force-killed `grace_s` after the
        drain began. Open streams go on; those still open shortly before the kill are ended with the
        protocol's `shutdown` message and a close (1001), not cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, grace_s - REPORT_PERIOD_S - DRAIN_MARGIN_S)
        log.info("replica %s: draining %d streams (grace %.0f s)", self.id, len(self.server.sessions), grace_s)
        while self.server.sessions and loop.time() < deadline:
            await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))
        if self.server.sessions:
            await self.server.shutdown(f"replica removed: its drain period of {grace_s:g} s is over")


@serve.deployment(name=COLLECTOR, num_replicas=1, max_ongoing_requests=10_000, ray_actor_options={"num_cpus": 0})
class MetricsCollector:
    """The latest Prometheus text of every engine replica, and the controller's view of their states."""

    async def __init__(self, deployment: str = DEPLOYMENT):
        self.deployment = deployment
        self.app = serve.get_replica_context().app_name
        self.texts: dict[str, tuple[int, str, float]] = {}  # replica -> (generation, text, when)
        self.states: dict[str, str] | None = None  # replica -> state, from the controller
        self.grace_s = 20.0
        self.gen = 0
        self.changed = asyncio.Condition()
        self._watcher = asyncio.create_task(self._watch())

    async def report(self, replica: str, gen: int, text: str) -> dict:
        """A replica's text for generation `gen`; returns once a scrape wants a newer one, or after the
        report period, with what the replica must know."""
        self.texts[replica] = (gen, text, time.monotonic())
        async with self.changed:
            self.changed.notify_all()
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: self.gen > gen), REPORT_PERIOD_S)
            except asyncio.TimeoutError:
                pass
        draining = self.states is not None and self.states.get(replica) == "STOPPING"
        return {"gen": self.gen, "draining": draining, "grace_s": self.grace_s}

    async def scrape(self) -> dict[str, str]:
        """Fresh texts of the live replicas (each asked to report now; at most 2 s)."""
        async with self.changed:
            self.gen += 1
            gen = self.gen
            self.changed.notify_all()
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: all(
                    self.texts.get(r, (-1,))[0] >= gen for r in self._live())), 2.0)
            except asyncio.TimeoutError:
                pass
        return {r: self.texts[r][1] for r in self._live() if r in self.texts}

    def _live(self) -> list[str]:
        """Replicas reporting lately and not known dead (RUNNING or STOPPING, i.e. still serving streams)."""
        now = time.monotonic()
        return [r for r, (_, _, when) in self.texts.items()
                if now - when < 3 * REPORT_PERIOD_S + 2.0
                and (self.states is None or self.states.get(r) in ("RUNNING", "STOPPING"))]

    async def _watch(self) -> None:
        """The controller's replica states (as `serve status` shows them), every report period."""
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        while True:
            try:
                details = await controller.get_serve_instance_details.remote()
                d = details["applications"][self.app]["deployments"][self.deployment]
                self.states = {r["replica_id"]: str(getattr(r["state"], "value", r["state"])) for r in d["replicas"]}
                self.grace_s = float(d["deployment_config"]["graceful_shutdown_timeout_s"])
                for r in [r for r in self.texts if r not in self.states]:
                    del self.texts[r]
            except Exception as e:  # noqa: BLE001 - e.g. while the application is being deployed
                log.debug("replica states unavailable: %s", e)
            await asyncio.sleep(REPORT_PERIOD_S)


# ---- the application --------------------------------------------------------------------------------
def build_app(args: dict | None = None) -> serve.Application:
    """The application for `serve run` / `serve deploy` (`args`: the server's options by their snake_case
    names, e.g. {"preset": "small", "max_streams": 8}; `replicas` sets num_replicas, `threads` the torch
    threads per replica). A config file's `deployments:` entries override what is set here."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 1))
    argv = option_argv(args)
    router = RequestRouterConfig(request_router_class="moshivis.serve.router:ImageAffinityRouter",
                                 request_router_kwargs={"headroom": HEADROOM}, request_routing_stats_period_s=1.0)
    replica = Replica.options(num_replicas=replicas, max_ongoing_requests=max_streams(argv) + HEADROOM,
                              request_router_config=router)
    return replica.bind(argv, MetricsCollector.bind(DEPLOYMENT))
