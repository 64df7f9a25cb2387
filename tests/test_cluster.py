"""The server on Ray Serve (`python -m moshivis.cluster`, `moshivis.serve.ray_app`, `.router`): 2 replicas
of the small preset (seeded random weights) on 2 logical GPUs of a local Ray instance bound to 127.0.0.1.

One cluster for the module, started through the command line and stopped at the end; the test process
joins it as a second Ray driver to read replica states, kill a replica and apply a config update, and
checks that no Ray process outlives the cluster. The oracle for tokens is a plain `Engine` with the
same weights running each stream alone (`replay_alone`); placement is read from each stream's `opened`
(`replica`) and from the per-replica metrics. Every wait is bounded.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

# As `moshivis.cluster` does, before Ray is imported: this process joins a 127.0.0.1-only instance.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="needs ray[serve] (pip install -e '.[cluster]' or -r requirements-cluster.txt)")

import torch  # noqa: E402
from websockets.exceptions import InvalidStatus  # noqa: E402

from moshivis import Engine, preset, random_init  # noqa: E402
from moshivis.client import Client, ServerError, image_key, refusal  # noqa: E402
from moshivis.serve.ray_app import DEPLOYMENT, HEADROOM  # noqa: E402
from moshivis.serve.router import LOST_REASON  # noqa: E402
from test_serve import HOST, features, parse_metrics, replay_alone, run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_STREAMS, GRACE_S, MAX_QUEUED = 3, 8.0, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cli_args(port: int, replicas: int = 2) -> list[str]:
    return ["--replicas", str(replicas), "--preset", "small", "--max-streams", str(MAX_STREAMS), "--threads", "1",
            "--num-gpus", "2", "--cpus-per-replica", "0", "--mode", "lockstep", "--tick-ms", "100",
            "--input-timeout-s", "30", "--grace-s", str(GRACE_S), "--max-queued", str(MAX_QUEUED),
            "--object-store-mb", "128", "--port", str(port), "--log-level", "ERROR"]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def with_cmdline(text: str) -> set[int]:
    found = set()
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmd.read_bytes().decode(errors="replace"):
                found.add(int(cmd.parent.name))
        except OSError:
            continue
    return found


class Cluster:
    def __init__(self, port: int):
        self.port = port

    def replicas(self) -> dict[str, tuple[str, int]]:
        """The engine replicas as the Serve controller sees them: {id: (state, pid)}."""
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
        d = details["applications"]["moshivis"]["deployments"][DEPLOYMENT]
        return {r["replica_id"]: (str(getattr(r["state"], "value", r["state"])), r.get("pid")) for r in d["replicas"]}

    def wait_running(self, n: int, timeout: float = 120.0, gone: int | None = None) -> dict[str, tuple[str, int]]:
        """Until exactly `n` replicas are RUNNING (none of them in process `gone`)."""
        deadline = time.monotonic() + timeout
        while True:
            reps = self.replicas()
            if len(reps) == n and all(s == "RUNNING" and pid != gone for s, pid in reps.values()):
                return reps
            assert time.monotonic() < deadline, f"not {n} RUNNING replicas after {timeout:g} s: {reps}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    from bench.proxy_cost import started
    # No token auth for this throwaway instance (else it writes ~/.ray/auth_token and this driver needs it).
    env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    port = free_port()
    with started(["moshivis.cluster", *cli_args(port)], r"replicas ready; .* Ray at (\S+)", 240, env) as (proc, m):
        ray.init(address=m[1], log_to_driver=False, logging_level="ERROR")
        try:
            session = ray._private.worker.global_worker.node.get_session_dir_path()
            ray_processes = descendants(proc.pid) | with_cmdline(session)
            yield Cluster(port)
        finally:
            ray.shutdown()
    deadline, left = time.monotonic() + 30, ray_processes
    while left and time.monotonic() < deadline:
        left = {p for p in left if Path(f"/proc/{p}").exists()} | with_cmdline(session)
        time.sleep(0.5)
    for p in left:  # ours: stopped before the test fails, so nothing outlives it
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert proc.returncode == 0, "the cluster command did not exit cleanly:\n" + "".join(proc.output[-30:])
    assert not left, f"Ray processes left after the cluster stopped: {sorted(left)}"


@pytest.fixture(scope="module")
def cfg():
    return preset("small")


@pytest.fixture(scope="module")
def engine(cfg):
    """The oracle: the cluster's weights (`--seed 0` random init) in one engine, one stream at a time."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Engine(cfg, random_init(cfg, seed=0), max_streams=1)
    torch.set_num_threads(n)


class Conversation:
    """One stream through the cluster: opens with its image's key, sends its inputs (`pace` s apart, else at
    most 2 in flight) while a reader records every reply. Optionally pauses before input `pause_after`
    (once the previous ones are answered) until `resume`, stops sending when `stop` is set, and stays open
    until `release` when `hold`. `end`: "closed" (closed normally), "shutdown: <reason>", "lost: ..." (the
    connection ended without either) or the refusal."""

    def __init__(self, port: int, seed: int, user: torch.Tensor, image=None, hold: bool = False,
                 pause_after: int | None = None, pace: float = 0.0):
        self.port, self.seed, self.user, self.image = port, seed, user, image
        self.hold, self.pause_after, self.pace = hold, pause_after, pace
        self.opened, self.paused, self.resume = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.answered_all, self.release, self.stop = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._progress = asyncio.Event()
        self.frames: dict[int, tuple] = {}
        self.sent = self.answered = 0
        self.replica = None
        self.end: str | None = None
        self.close_code: int | None = None

    async def run(self) -> "Conversation":
        try:
            async with await Client.connect(HOST, self.port, session_id=image_key(self.image), open_timeout=30) as c:
                self.replica = (await c.open(self.seed, None, self.image))["replica"]
                self.opened.set()
                reader = asyncio.create_task(self._read(c))
                sender = asyncio.create_task(self._send(c))
                await reader  # until the connection ends
                sender.cancel()
                await asyncio.gather(sender, return_exceptions=True)
        except ServerError as e:
            self.end = f"{e.code}: {e}"
        except InvalidStatus as e:
            self.end = f"refused: {refusal(e)}"
        finally:
            self.opened.set()
        return self

    async def _read(self, c: Client) -> None:
        while (msg := await c.recv()) is not None:
            if msg.type == "frame":
                h = msg.header
                self.frames[h["frame"]] = (h["seq"], msg.tensors["tokens"].to(torch.int64))
                self.answered += h["seq"] is not None
                self._progress.set()
            elif msg.type == "shutdown":
                self.end = f"shutdown: {msg.header['reason']}"
            elif msg.type == "closed":
                self.end = "closed"
            else:
                self.end = f"unexpected reply {msg.header}"
        self.close_code = c.ws.close_code
        if self.end is None:
            self.end = f"lost: {c.closed_why}"

    async def _until(self, n: int) -> None:
        while self.answered < n:
            self._progress.clear()
            await self._progress.wait()

    async def _send(self, c: Client) -> None:
        for t in range(self.user.shape[1]):
            if t == self.pause_after:
                await self._until(t)
                self.paused.set()
                await self.resume.wait()
            if self.pace and t:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), self.pace)
            elif not self.pace:
                await self._until(t - 1)  # at most 2 in flight
            if self.stop.is_set():
                break
            await c.audio(self.user[:, t], ref=t)
            self.sent = t + 1
        await self._until(self.sent)
        self.answered_all.set()
        if self.hold:
            await self.release.wait()
        await c.close()

    def check_tokens(self, engine: Engine, cfg) -> int:
        """The frames received so far equal the same stream run alone; returns how many."""
        got, want = replay_alone(engine, cfg, self.seed, None, self.image, self.user,
                                 {"frames": self.frames, "images": []})
        assert torch.equal(got, want), f"stream {self.seed}: tokens differ from the engine run alone"
        return got.shape[1]


def user_tokens(cfg, gen, T: int) -> torch.Tensor:
    return torch.randint(0, cfg.audio_card, (cfg.num_audio_in, T), generator=gen)


async def scrape(port: int, path: str) -> tuple[dict, dict]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
    data = (await reader.read()).decode()
    writer.close()
    head, _, body = data.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "text/plain; version=0.0.4" in head.lower(), head
    if "transfer-encoding: chunked" in head.lower():
        body = _unchunk(body)
    return parse_metrics(body)


def _unchunk(body: str) -> str:
    out, rest = [], body
    while rest:
        size, _, rest = rest.partition("\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out.append(rest[:n])
        rest = rest[n + 2:]
    return "".join(out)


# ---- the command line (no cluster) ----------------------------------------------------------------
def test_command_line_prints_a_valid_serve_config_and_rejects_bad_options(capsys):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from moshivis import cluster as cli
    assert cli.main(["--replicas", "3", "--max-streams", "6", "--checkpoint", "/models/m.safetensors",
                     "--grace-s", "900", "--host", "0.0.0.0", "--print-config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    ServeDeploySchema(**config)  # Serve's own validator: what `serve deploy` would check
    app = config["applications"][0]
    engines = next(d for d in app["deployments"] if d["name"] == DEPLOYMENT)
    assert app["import_path"] == "moshivis.serve.ray_app:build_app"
    assert app["args"] == {"max_streams": 6, "checkpoint": "/models/m.safetensors"}  # only what was given
    assert engines["num_replicas"] == 3 and engines["max_ongoing_requests"] == 6 + HEADROOM
    assert engines["graceful_shutdown_timeout_s"] == 900 and engines["ray_actor_options"]["num_gpus"] == 1
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    for argv, pattern in [(["--replicas", "0"], "--replicas: must be a positive integer, got 0"),
                          (["--max-streams", "0", "--print-config"], "--max-streams: must be a positive integer, got 0"),
                          (["--grace-s", "0"], "--grace-s: must be a finite number > 0, got 0")]:
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse's own checks exit (one line, status 2)
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and pattern in err, err


# ---- the router's policy alone (no cluster) --------------------------------------------------------
def test_router_policy_image_affinity_with_room_else_fewest_streams():
    """`ImageAffinityRouter.choose_replicas` on stand-in replicas (what Serve hands it: id, routing stats,
    max_ongoing_requests) against the policy by hand: an image's opens go to the replica holding it while it
    has room, also when they arrive before any is routed; once it is full, to the replica with the fewest
    streams; no key, the fewest; every replica full, all of them, fewest first; a completed stream frees its
    place; an image another proxy's streams hold (the replica's report) counts."""
    from types import SimpleNamespace

    from moshivis.serve.router import ImageAffinityRouter
    router = ImageAffinityRouter.__new__(ImageAffinityRouter)  # its Serve plumbing is not what is tested
    router.initialize_state(headroom=HEADROOM)
    cap = 3
    a, b = (SimpleNamespace(replica_id=name, routing_stats={"streams": 0, "max_streams": cap, "images": []},
                            max_ongoing_requests=cap + HEADROOM) for name in ("A", "B"))
    ids = iter(range(100))

    def open_(key: str | None, routed: bool = True):
        request = f"r{next(ids)}"
        pending = SimpleNamespace(metadata=SimpleNamespace(internal_request_id=request, session_id=key))
        ranks = run(router.choose_replicas([a, b], pending))
        if routed and len(ranks[0]) == 1:
            router.on_request_routed(pending, ranks[0][0].replica_id, None)
        return request, [[r.replica_id for r in rank] for rank in ranks]

    # Three opens of one image before any is routed (concurrent handshakes): the reservations alone keep
    # them together (without them each would be a fresh tie between two empty replicas).
    _, first = open_("img1", routed=False)
    x = first[0][0]
    y = "B" if x == "A" else "A"
    assert first == [[x], [y]]
    assert open_("img1", routed=False)[1][0] == [x]
    done, third = open_("img1", routed=False)
    assert third[0] == [x] and router.streams[x] == 3
    assert open_("img1")[1] == [[y], [x]]                              # x full: the image goes elsewhere
    assert open_(None)[1][0] == [y]                                    # x 3, y 1: the fewest
    assert open_("img2")[1][0] == [y]
    ranks = open_("img3")[1]                                           # both full: every replica, one rank
    assert len(ranks) == 1 and sorted(ranks[0]) == ["A", "B"]
    router.on_request_completed(x, done)
    assert open_("img1")[1][0] == [x]                                  # room again where the image is
    # A replica's report: another proxy's stream holds img9 on A, which has room; B has fewer streams.
    router = ImageAffinityRouter.__new__(ImageAffinityRouter)
    router.initialize_state(headroom=HEADROOM)
    a.routing_stats = {"streams": 2, "max_streams": cap, "images": ["img9"]}
    b.routing_stats = {"streams": 0, "max_streams": cap, "images": []}
    assert open_("img9")[1][0] == ["A"] and open_("img8")[1][0] == ["B"]
    a.routing_stats["streams"] = cap                                   # A reports itself full
    assert open_("img9")[1][0] == ["B"]


# ---- routing, parity, metrics, refusals ------------------------------------------------------------
def test_streams_match_one_engine_share_images_spread_and_full_cluster_refuses(cluster, engine, cfg, gen):
    """6 streams (2 images x 2, 2 without) fill both replicas: each image's streams land together even
    though they open at once, the rest spread by load, the metrics show 3 + 3 streams, every further
    open is refused (the engine's `server_full` or, past Serve's queue, HTTP 503) without hanging, and
    every stream's tokens equal the same stream on one engine."""
    a, b = features(cfg, gen), features(cfg, gen)
    T = 5
    convs = [Conversation(cluster.port, seed, user_tokens(cfg, gen, T), image, hold=True)
             for seed, image in [(11, a), (12, a), (13, b), (14, b), (15, None), (16, None)]]

    async def scenario():
        tasks = [asyncio.create_task(c.run()) for c in convs[:4]]
        await asyncio.gather(*(c.opened.wait() for c in convs[:4]))
        tasks += [asyncio.create_task(c.run()) for c in convs[4:]]
        await asyncio.gather(*(asyncio.wait([asyncio.ensure_future(c.answered_all.wait()), t],
                                            return_when=asyncio.FIRST_COMPLETED) for c, t in zip(convs, tasks)))
        assert all(c.answered_all.is_set() for c in convs), [c.end for c in convs]
        _, per_replica = await scrape(cluster.port, "/metrics/replicas")
        _, total = await scrape(cluster.port, "/metrics")

        async def extra(image=None):
            try:
                async with await Client.connect(HOST, cluster.port, session_id=image_key(image), open_timeout=20) as c:
                    await c.open(99, None, image)
            except ServerError as e:
                return e.code, str(e)
            except InvalidStatus as e:
                return "refused", refusal(e)
            return "opened", ""

        one_more = await extra(a)
        flood = await asyncio.gather(*(extra() for _ in range(2 * HEADROOM + MAX_QUEUED + 4)))
        for c in convs:
            c.release.set()
        await asyncio.gather(*tasks)
        return per_replica, total, one_more, flood

    per_replica, total, one_more, flood = run(scenario(), timeout=150)
    assert all(c.end == "closed" and c.close_code == 1000 for c in convs), [c.end for c in convs]
    placed = {c.seed: c.replica for c in convs}
    assert placed[11] == placed[12] and placed[13] == placed[14] and placed[11] != placed[13], placed
    assert sorted(collections.Counter(placed.values()).values()) == [MAX_STREAMS, MAX_STREAMS], placed
    for r in set(placed.values()):
        assert per_replica[f'moshivis_active_streams{{replica="{r}"}}'] == MAX_STREAMS
    assert total["moshivis_active_streams"] == 2 * MAX_STREAMS and total["moshivis_replicas"] == 2
    assert total["moshivis_max_streams"] == 2 * MAX_STREAMS
    for key, value in total.items():  # the cluster view is the sum of the replicas' own samples
        if key.startswith(("moshivis_replicas", "moshivis_tick_seconds", "moshivis_frame_budget_seconds")):
            continue
        name, _, labels = key.partition("{")
        mine = [v for k, v in per_replica.items() if k.startswith(name + "{replica=")
                and re.sub(r'replica="[^"]*",?', "", k[len(name):]).replace("{}", "") == ("{" + labels if labels else "")]
        assert len(mine) == 2 and sum(mine) == value, (key, value, mine)
    assert one_more[0] == "server_full" and "server full" in one_more[1], one_more
    # Each one refused at once: by an engine (within a replica's headroom) or, past Serve's queue, by the proxy.
    assert all(code == "server_full" or (code == "refused" and "HTTP 5" in msg) for code, msg in flood), flood
    assert any(code == "server_full" for code, _ in flood), flood
    for c in convs:
        assert c.check_tokens(engine, cfg) == T


def test_load_generator_against_the_cluster(cluster, tmp_path):
    """`bench.load --port P` drives the cluster as one server: its /metrics deltas are the cluster's."""
    from bench import load
    path = tmp_path / "load.json"
    assert load.main(["--host", HOST, "--port", str(cluster.port), "--streams", "2", "--duration", "1",
                      "--mode", "lockstep", "--json", str(path)]) == 0
    r = json.loads(path.read_text())["results"][0]
    assert r["refusals"] == 0 and r["errors"] == 0, r["error_messages"]
    assert 0 < r["frames"] <= r["stream_frames"] and r["client_p99_ms"] >= r["client_p50_ms"] > 0


def test_web_page_stats_and_kyutai_path_through_the_proxy(cluster):
    """The replica's other routes: the web page (the files on disk), /api/stats (the answering replica's),
    and Kyutai's /api/chat (its session: a bad query parameter gets its error message and a close 1008)."""
    from websockets.asyncio.client import connect

    async def get(path: str) -> tuple[str, bytes]:
        reader, writer = await asyncio.open_connection(HOST, cluster.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        head = head.decode()
        return head, _unchunk(body.decode(errors="replace")).encode() if "chunked" in head.lower() else body

    async def scenario():
        page = await get("/")
        stats = await get("/api/stats")
        missing = await get("/no/such/file.js")
        async with connect(f"ws://{HOST}:{cluster.port}/api/chat?text_temperature=hot") as ws:
            first = await ws.recv()
            with contextlib.suppress(Exception):
                await ws.recv()
            return page, stats, missing, first, ws.close_code

    page, stats, missing, first, code = run(scenario(), timeout=30)
    web = REPO / "moshivis" / "serve" / "web" / "index.html"
    assert page[0].startswith("HTTP/1.1 200") and page[1] == web.read_bytes()
    assert missing[0].startswith("HTTP/1.1 404")
    figures = json.loads(stats[1])
    assert stats[0].startswith("HTTP/1.1 200") and figures["max_streams"] == MAX_STREAMS
    assert figures["replica"] in cluster.replicas()
    assert first[0] == 0x05 and b"text_temperature" in first and code == 1008, (first, code)


def listening(pids: set[int]) -> dict[int, list[str]]:
    """{pid: ["addr:port", ...]} of the TCP sockets these processes listen on (IPv4 and IPv6)."""
    addrs = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                host, port = f[1].split(":")
                loopback = ("0100007F", "0" * 24 + "01000000", "0" * 16 + "FFFF0000" + "0100007F")  # v4, v6, v4 in v6
                ip = "0.0.0.0" if int(host, 16) == 0 else "127.0.0.1" if host in loopback else host
                addrs[f[9]] = f"{ip}:{int(port, 16)}"
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            inodes = [os.readlink(fd)[8:-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
                      if os.readlink(fd).startswith("socket:[")]
            out[pid] = [addrs[i] for i in inodes if i in addrs]
    return out


def test_ray_listens_on_the_loopback_only_and_runs_no_dashboard(cluster):
    """`moshivis.cluster`'s Ray instance: node address 127.0.0.1, and every socket its processes listen on
    is on 127.0.0.1, except at most one port per Serve replica (its inter-deployment gRPC port, which Serve
    2.60 binds on every interface whatever the node address: README, "Limits"); no dashboard (Ray's API
    server runs without its web frontend and modules)."""
    assert [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]] == ["127.0.0.1"]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=30)
    replicas = {r.get("pid") for d in details["applications"]["moshivis"]["deployments"].values()
                for r in d["replicas"]}  # the engines' and the metrics collector's
    session = ray._private.worker.global_worker.node.get_session_dir_path()
    ours = with_cmdline(session) | replicas
    ours = (ours | {c for p in ours for c in descendants(p)}) - {os.getpid()}
    sockets = listening(ours)
    assert sum(map(len, sockets.values())) >= 3, sockets  # the probe sees Ray's servers (GCS, raylet, proxy)
    exposed = {pid: [a for a in addrs if not a.startswith("127.0.0.1:")] for pid, addrs in sockets.items()}
    exposed = {pid: addrs for pid, addrs in exposed.items() if addrs}
    print(f"Ray: {sum(map(len, sockets.values()))} listening sockets; beyond 127.0.0.1: {exposed} (replicas {replicas})")
    assert set(exposed) <= replicas and all(len(a) == 1 for a in exposed.values()), (exposed, replicas)
    # Ray always runs its API server (dashboard.py); without --dashboard, without the web UI or its modules.
    for pid in with_cmdline("dashboard/dashboard.py") & ours:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        assert "--disable-frontend" in argv and "--modules-to-load=UsageStatsHead" in argv, argv


# ---- faults and scaling ---------------------------------------------------------------------------
def test_killed_replica_ends_its_streams_others_go_on_and_serve_replaces_it(cluster, engine, cfg, gen):
    T, half = 8, 4
    x = Conversation(cluster.port, 21, user_tokens(cfg, gen, T), features(cfg, gen), pause_after=half)
    y = Conversation(cluster.port, 22, user_tokens(cfg, gen, T), features(cfg, gen), pause_after=half)
    before = cluster.wait_running(2)
    victim = None

    async def scenario():
        tasks = [asyncio.create_task(c.run()) for c in (x, y)]
        await asyncio.gather(x.paused.wait(), y.paused.wait())
        assert x.replica != y.replica, "two images on an empty cluster go to different replicas"
        nonlocal victim
        victim = before[x.replica][1]
        os.kill(victim, signal.SIGKILL)
        await asyncio.wait_for(tasks[0], 20)
        z = Conversation(cluster.port, 23, user_tokens(cfg, gen, 2))  # opened right after the kill
        await z.run()
        y.resume.set()
        await tasks[1]
        return z

    z = run(scenario(), timeout=90)
    assert x.end == f"lost: connection closed by the server (1011: {LOST_REASON})", x.end
    assert x.check_tokens(engine, cfg) == half  # what it got before the kill was right
    assert y.end == "closed" and y.check_tokens(engine, cfg) == T
    assert z.end == "closed" and z.replica == y.replica and z.check_tokens(engine, cfg) == 2
    t0 = time.monotonic()
    after = cluster.wait_running(2, timeout=180, gone=victim)
    print(f"killed replica: its client saw {x.end!r}; replaced {time.monotonic() - t0:.1f} s later: {before} -> {after}")
    assert y.replica in after and after[y.replica] == before[y.replica]
    new = Conversation(cluster.port, 24, user_tokens(cfg, gen, 2), features(cfg, gen))
    run(new.run(), timeout=60)
    assert new.end == "closed" and new.check_tokens(engine, cfg) == 2


def test_config_update_removing_a_replica_drains_it(cluster, engine, cfg, gen):
    """`serve deploy` of the same config with num_replicas 1: one replica stops taking streams; its open
    streams go on (one finishes normally), those still open near the grace period's end get the
    protocol's `shutdown` and a close 1001; the other replica's streams are untouched."""
    from moshivis import cluster as cli
    cluster.wait_running(2)
    T = 60
    convs = [Conversation(cluster.port, 31 + i, user_tokens(cfg, gen, T), features(cfg, gen), pace=0.2)
             for i in range(4)]  # 2 images per replica: 2 streams each
    config = cli.serve_config(cli.parser().parse_args(cli_args(cluster.port, replicas=1)))

    async def scenario():
        tasks = [asyncio.create_task(c.run()) for c in convs]
        await asyncio.gather(*(c.opened.wait() for c in convs))
        started = time.monotonic()
        update = asyncio.get_running_loop().run_in_executor(None, cli.deploy, config, 60.0)
        stopping = None
        while stopping is None:
            states = await asyncio.get_running_loop().run_in_executor(None, cluster.replicas)
            stopping = next((r for r, (s, _) in states.items() if s == "STOPPING"), None)
            assert time.monotonic() - started < 20, f"no replica draining: {states}"
            await asyncio.sleep(0.2)
        doomed = [c for c in convs if c.replica == stopping]
        kept = [c for c in convs if c.replica != stopping]
        doomed[0].stop.set()  # finishes its conversation normally during the drain
        late = Conversation(cluster.port, 39, user_tokens(cfg, gen, 2))  # a new stream during the drain
        await late.run()
        await asyncio.wait_for(tasks[convs.index(doomed[1])], GRACE_S + 10)
        cut_after = time.monotonic() - started
        await asyncio.sleep(1.0)  # the other replica's streams go on
        for c in kept:
            c.stop.set()
        await asyncio.gather(*tasks)
        await update
        return stopping, doomed, kept, late, cut_after

    stopping, doomed, kept, late, cut_after = run(scenario(), timeout=120)
    assert len(doomed) == 2 and len(kept) == 2, [c.replica for c in convs]
    assert doomed[0].end == "closed", doomed[0].end
    assert doomed[1].end.startswith("shutdown: replica removed") and doomed[1].close_code == 1001, doomed[1].end
    assert cut_after < GRACE_S + 2, cut_after  # before Serve's force-kill
    assert all(c.end == "closed" for c in kept), [c.end for c in kept]
    assert late.end == "closed" and late.replica == kept[0].replica
    for c in convs + [late]:
        assert c.check_tokens(engine, cfg) >= 2
    assert len(doomed[1].frames) > 5 and len(kept[0].frames) > len(doomed[1].frames)  # went on, then went on longer
    assert set(cluster.wait_running(1, timeout=30)) == {kept[0].replica}
