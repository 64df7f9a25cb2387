"""One process, one engine: the WebSocket server (`websockets`), its HTTP routes and connection limits.

Routes on one port: `/api/chat` (Kyutai's protocol, `kyutai`), any other WebSocket path (ours,
`native`), `GET /metrics` (Prometheus text), `GET /api/stats` (recent frame latency, JSON) and, for
plain GET requests, the web page and its files (`moshivis/serve/web/`). `ssl` makes it https/wss.

Bounds, so floods cannot take the server down or lock real sessions out (see `ServerConfig`):
  * connections: `max_connections` in all; a connection without a stream is "pending" for at most
    `open_timeout_s`, and beyond `max_pending` pending connections (or `max_pending_per_ip` from one
    address) the oldest pending one is evicted to make room: idle connections never lock others out;
  * messages: each connection's largest message is what its protocol can need (an image file for the
    first message and image changes; Ogg pages and tensors otherwise); large messages being received at
    once share `max_upload_bytes`: a connection whose message would go past it is paused (its socket
    not read) until another's upload completes, so memory stays bounded whatever the clients send;
    large buffers are returned to the OS once freed (glibc's mmap threshold pinned).
"""
from __future__ import annotations

import asyncio
import collections
import ctypes
import json
import logging
import mimetypes
import ssl as ssl_module
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from .. import protocol as P
from ..engine import Engine
from .config import ServerConfig
from .kyutai import PATH as KYUTAI_PATH
from .kyutai import KyutaiSession
from .media import Media
from .native import NativeSession
from .scheduler import Scheduler
from .session import Connection, Session

log = logging.getLogger("moshivis.server")

WEB_ROOT = Path(__file__).parent / "web"
SMALL_MESSAGE = 1 << 18  # buffered bytes a connection may hold without an upload permit
# Buffers at least this large get their own mapping, returned to the OS when freed (large messages);
# smaller ones come from the heap (a lower threshold made every frame's PyTorch temporaries page-fault).
MMAP_THRESHOLD = 4 << 20


class WsConnection(Connection):
    """A `websockets` server connection as a session's `Connection`."""

    def __init__(self, ws: ServerConnection):
        self.ws = ws
        self.remote = str(ws.remote_address[0]) if ws.remote_address else ""
        url = urlsplit(ws.request.path)
        self.path, self.query = url.path, dict(parse_qsl(url.query, keep_blank_values=True))

    async def recv(self):
        try:
            data = await self.ws.recv()
        except ConnectionClosed:
            return None
        self.ws.last_taken = len(data)
        self.ws.budget.update(self.ws)
        return data

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code, reason)

    def abort(self) -> None:
        self.ws.transport.abort()


class UploadBudget:
    """At most `slots` connections may hold more than SMALL_MESSAGE received bytes at once (a partial
    message or whole ones their session has not taken yet); the others are paused (their sockets unread)
    in arrival order until a slot frees."""

    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self.holders: set = set()
        self.waiting: collections.deque = collections.deque()

    def update(self, conn: "_BudgetedConnection") -> None:
        """After bytes came in or a message went out to the session: what the connection holds now (its
        partial frame; its whole messages not yet taken by the session, else the last one it took, which
        websockets' parser keeps until the next frame arrives)."""
        queued = conn.recv_messages.frames.queue
        buffered = len(conn.protocol.reader.buffer) + (sum(len(f.data) for f in queued) if queued else conn.last_taken)
        if conn in self.holders:
            if buffered <= SMALL_MESSAGE:
                self.release(conn)
        elif buffered > SMALL_MESSAGE:
            if len(self.holders) < self.slots and not self.waiting:
                self.holders.add(conn)
            elif conn not in self.waiting:
                self.waiting.append(conn)
                conn.transport.pause_reading()
            else:
                conn.transport.pause_reading()  # resumed by websockets' own flow control: wait on

    def release(self, conn) -> None:
        self.holders.discard(conn)
        if conn in self.waiting:
            self.waiting.remove(conn)
        while self.waiting and len(self.holders) < self.slots:
            nxt = self.waiting.popleft()
            if nxt.transport is not None and not nxt.transport.is_closing():
                self.holders.add(nxt)
                nxt.transport.resume_reading()


class _BudgetedConnection(ServerConnection):
    budget: UploadBudget  # set on the subclass made per server
    last_taken = 0  # bytes of the last message the session took

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.budget.update(self)

    def connection_lost(self, exc) -> None:
        self.budget.release(self)
        super().connection_lost(exc)


def pin_mmap_threshold() -> None:
    """glibc raises its mmap threshold after large frees, so later large buffers come from the heap and
    are never given back; pinning it keeps every buffer over MMAP_THRESHOLD in its own mapping."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class Server:
    """The server around one engine. `await start()`, then `await wait_closed()` or `await shutdown()`."""

    def __init__(self, engine: Engine, config: ServerConfig | None = None, media: Media | None = None,
                 ssl: ssl_module.SSLContext | None = None, web_root: Path | None = WEB_ROOT):
        self.scheduler = Scheduler(engine, config, media)
        self.engine, self.config, self.cfg = engine, self.scheduler.config, engine.cfg
        self.media, self.metrics = self.scheduler.media, self.scheduler.metrics
        self.ssl, self.web_root = ssl, web_root
        image_bytes = self.config.max_image_file_bytes if self.media.vision is not None else 0
        self.limits = P.Limits.for_config(self.cfg, image_bytes)
        self.port: int | None = None
        self.sessions: dict[int, Session] = {}
        self._ws_server = None

    async def start(self) -> "Server":
        pin_mmap_threshold()
        await self.scheduler.start()
        c = self.config
        budget = UploadBudget(c.max_upload_bytes // max(self.limits.max_message_bytes, SMALL_MESSAGE))
        conn_class = type("BudgetedConnection", (_BudgetedConnection,), {"budget": budget})
        self._ws_server = await serve(
            self._handle, c.host, c.port, process_request=self._http, compression=None, ssl=self.ssl,
            max_size=self.limits.max_message_bytes, max_queue=2, close_timeout=c.drain_timeout_s,
            open_timeout=c.open_timeout_s, create_connection=conn_class)
        self.port = self._ws_server.sockets[0].getsockname()[1]
        return self

    async def wait_closed(self) -> None:
        await self.scheduler.wait_closed()

    async def shutdown(self, reason: str = "server shutting down") -> None:
        """Refuse new opens, finish the frame in flight, tell every client, close everything."""
        if self.scheduler.stopping:
            await self.scheduler.wait_closed()
            return
        await self.scheduler.shutdown(reason)
        for s in list(self.sessions.values()):  # those without a stream
            s.ended(None, "shutdown", reason)
        await asyncio.sleep(0)
        deadline = asyncio.get_running_loop().time() + self.config.drain_timeout_s
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if self._ws_server is not None:  # None: a Ray Serve replica, whose transport is not ours
            self._ws_server.close()
            await self._ws_server.wait_closed()

    # ---- HTTP -------------------------------------------------------------------------------------
    def _http(self, connection: ServerConnection, request):
        path = urlsplit(request.path).path
        if path == "/metrics":
            return _response(200, self.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
        if path == "/api/stats":
            return _response(200, json.dumps(self.scheduler.stats()).encode(), "application/json")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return self._static(path)
        if self.scheduler.stopping:
            self.metrics.refusals["shutting_down"] += 1
            return _response(503, b"shutting down\n")
        return self._admit(connection)

    def _admit(self, connection: ServerConnection):
        """Room for one more connection: evict the oldest pending connection where a bound is reached."""
        c = self.config
        ip = str(connection.remote_address[0]) if connection.remote_address else ""
        pending = sorted((s for s in self.sessions.values() if s.pending), key=lambda s: s.started_at)
        mine = [s for s in pending if s.conn.remote == ip]
        if len(mine) >= c.max_pending_per_ip:
            mine[0].expire("evicted", f"evicted: {len(mine)} connections from {ip} without a stream")
        elif len(pending) >= c.max_pending:
            pending[0].expire("evicted", f"evicted: {len(pending)} connections without a stream")
        elif len(self.sessions) >= c.max_connections:
            if not pending:
                self.metrics.refusals["too_many_connections"] += 1
                return _response(503, b"too many connections\n")
            pending[0].expire("evicted", f"evicted: {len(self.sessions)} connections, the limit")
        return None

    def _static(self, path: str):
        found = static_file(self.web_root, path)
        return _response(404, b"not found\n") if found is None else _response(200, *found)

    # ---- WebSocket sessions -----------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        await self.serve_connection(WsConnection(ws))

    async def serve_connection(self, conn: Connection) -> None:
        """One client's session, its protocol picked by its path, run to its end (any transport's entry)."""
        if conn.path == KYUTAI_PATH:
            session = KyutaiSession(conn, self.scheduler, self.limits.max_image_file_bytes, on_done=self._done)
        else:
            session = NativeSession(conn, self.scheduler, self.limits, on_done=self._done)
        self.sessions[id(session)] = session
        await session.run()

    def _done(self, session: Session) -> None:
        self.sessions.pop(id(session), None)

    def metrics_text(self) -> str:
        gauges = self.scheduler.gauges()
        gauges["moshivis_connections"] = ("Open WebSocket connections.", len(self.sessions))
        gauges["moshivis_pending_connections"] = ("Connections without a stream.",
                                                  sum(s.pending for s in self.sessions.values()))
        return self.metrics.render(gauges)


def static_file(web_root: Path | None, path: str) -> tuple[bytes, str] | None:
    """(bytes, content type) of the web page's file at URL `path`; None if there is none (or it lies outside)."""
    if web_root is None:
        return None
    root = web_root.resolve()
    file = (root / path.lstrip("/")).resolve()
    if file.is_dir():  # a folder's index.html (`/`, and a web client's sub-folders)
        file = file / "index.html"
    if root not in file.parents or not file.is_file():
        return None
    kind = {".js": "text/javascript", ".mjs": "text/javascript"}.get(file.suffix) or \
        mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    if kind.startswith("text/") and "charset" not in kind:
        kind += "; charset=utf-8"
    return file.read_bytes(), kind


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> Response:
    reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-cache"), ("Connection", "close")])
    return Response(status, reason, headers, body)
