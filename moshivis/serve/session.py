"""What every protocol's session shares: the connection, a bounded outbox, timeouts, the stream's end.

A transport (the websockets server in `local`, FastAPI/Starlette in `ray_app`) wraps each client in a
`Connection`; a protocol adapter subclasses `Session` and is the scheduler's sink for its stream.
"""
from __future__ import annotations

import asyncio
import logging


log = logging.getLogger("moshivis.server")


class Connection:
    """One client's WebSocket, whatever library carries it.

    remote: the client's address; path, query (name -> last value) of the handshake request.
    `recv()` returns bytes or str, or None once the client has gone.
    """
    remote: str = ""
    path: str = "/"
    query: dict[str, str] = {}

    async def recv(self) -> bytes | str | None:
        raise NotImplementedError

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self, code: int = 1000, reason: str = "") -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Drop the connection at once (a client that reads nothing cannot take part in a close)."""
        raise NotImplementedError


class Session:
    """A client: its outbox (bounded: a client that leaves `max_outbox` replies unread is dropped),
    the open timeout (no stream within `open_timeout_s`: closed) and, once opened, its stream, whose
    events (`opened`, `frame`, ...) the scheduler sends here."""

    def __init__(self, conn: Connection, scheduler, on_done=None):
        self.conn, self.scheduler, self.on_done = conn, scheduler, on_done
        self.config, self.metrics = scheduler.config, scheduler.metrics
        self.stream = None
        self.ending = False
        self.started_at = asyncio.get_running_loop().time()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._writer: asyncio.Task | None = None

    @property
    def pending(self) -> bool:
        """Connected without a stream (yet): what the connection limits evict first."""
        return self.stream is None and not self.ending

    async def run(self) -> None:
        self.metrics.sessions += 1
        self._writer = asyncio.create_task(self._write())
        loop = asyncio.get_running_loop()
        try:
            while True:
                timeout = None
                if self.pending:
                    timeout = self.started_at + self.config.open_timeout_s - loop.time()
                    if timeout <= 0:
                        self.expire("open_timeout", f"no stream opened within {self.config.open_timeout_s:g} s")
                        continue
                try:
                    data = await asyncio.wait_for(self.conn.recv(), timeout)
                except asyncio.TimeoutError:
                    continue
                if data is None:
                    break
                if not self.ending:
                    self.on_message(data)
                del data  # not held while the next message is awaited (it may be megabytes)
        finally:
            self.end()  # a vanished client: its stream is closed before the next frame
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), self.config.drain_timeout_s)
            except asyncio.TimeoutError:
                self.conn.abort()
            finally:
                self._writer.cancel()
                if self.on_done is not None:
                    self.on_done(self)

    def on_message(self, data: bytes | str) -> None:
        raise NotImplementedError

    async def _write(self) -> None:
        """Sends the outbox in order; a (code, reason) tuple closes the connection."""
        try:
            while True:
                item = await self._outbox.get()
                if isinstance(item, tuple):
                    await self.conn.close(*item)
                    return
                await self.conn.send(item)
        except Exception:  # noqa: BLE001 - the client went away; the reader side sees it too
            pass

    def send(self, data: bytes) -> None:
        if self.ending:
            return
        if self._outbox.qsize() >= self.config.max_outbox:
            log.warning("%s: dropped, %d replies unread", self.conn.remote, self._outbox.qsize())
            self.metrics.closes["slow_client"] += 1
            self.end()
            self.conn.abort()
            return
        self._outbox.put_nowait(data)

    def end(self, final: bytes | None = None, code: int = 1000, reason: str = "") -> None:
        """Queue `final` and the close; give the stream back (before the next frame)."""
        if not self.ending:
            if final is not None:
                self._outbox.put_nowait(final)
            self.ending = True
            self._outbox.put_nowait((code, reason[:120]))
        if self.stream is not None:
            self.scheduler.close(self.stream, reply=False)

    def expire(self, reason: str, message: str) -> None:
        """Closed by the server's limits (open timeout, eviction): said in the protocol, then closed."""
        self.metrics.closes[reason] += 1
        log.info("%s: %s", self.conn.remote, message)
        self.end(self.farewell(reason, message), 1008 if reason != "evicted" else 1013, message)

    def farewell(self, code: str, message: str) -> bytes | None:
        """The protocol's last message before the server closes (None: just the close)."""
        return None

    # ---- scheduler events (the sink) --------------------------------------------------------------
    def prepare(self, stream, out):
        """Output thread: the protocol's per-frame work (encoding), kept off the event loop."""
        return None

    def ended(self, stream, reason: str, message: str) -> None:
        """The server ended the stream (shutdown, input timeout, internal error)."""
        code = {"shutdown": 1001, "internal": 1011}.get(reason, 1008)
        self.end(self.farewell(reason, message), code, message if reason != "shutdown" else "server shutting down")

