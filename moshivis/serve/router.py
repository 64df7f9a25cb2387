"""What `ray_app` runs inside Serve's proxy: the request router, and a middleware for lost replicas.

The router: a WebSocket is routed once, at its handshake, to one replica.

Policy, per connection (its affinity key is Serve's session id: the `x-session-id` header, which
`moshivis.client` sets to the hash of the stream's image):
  1. a key already placed on a replica that has room (fewer open streams than its engine's
     `max_streams`): that replica, so streams sharing an image share its K/V slot;
  2. otherwise the replica with the fewest open streams (ties broken at random), which then holds
     the key;
  3. every replica full: all of them, fewest streams first; Serve picks one whose queue is not at
     `max_ongoing_requests` (= max_streams + headroom) and its engine answers `refused server_full`.
The choice is recorded inside `choose_replicas`, before Serve sends the request, so opens of one image
arriving together see it and do not split the image. Serve falls back to the second rank (every
other replica, fewest streams first) when the chosen one turns out full.

Counts are this router's own (one router per proxy, i.e. per node): a placement is reserved when
chosen, confirmed by `on_request_routed`, freed by `on_request_completed` (or after RESERVATION_S if
never confirmed, e.g. a client gone while queued). With several proxies each sees only its own
connections, so the replicas' own reports (`routing_stats`: open streams, the keys they hold, a
period late) are merged in: a replica is full if either count says so, a key held by any replica
counts, and replicas are ordered by this router's count first (exact, where the reports lag), then
by the reported one.

The middleware (`proxy_middlewares`, named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH` in the
proxy's environment; `python -m moshivis.cluster` sets it): when the replica holding a WebSocket
dies, the proxy alone drops the client's TCP connection (1006, no reason); with it, the client gets a
close frame, 1011 and LOST_REASON.
"""
from __future__ import annotations

import collections
import contextlib
import random
import time

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

RESERVATION_S = 30.0
LOST_REASON = "the engine replica serving this stream died; open a new stream"


class ImageAffinityRouter(RequestRouter):
    def initialize_state(self, headroom: int = 2, **_) -> None:
        self.headroom = headroom
        # internal request id -> (replica, key, reserved at (monotonic) or None once routed)
        self.placed: dict[str, tuple[ReplicaID, str, float | None]] = {}
        self.streams: collections.Counter[ReplicaID] = collections.Counter()
        self.keys: dict[str, collections.Counter[ReplicaID]] = {}

    # ---- bookkeeping -----------------------------------------------------------------------------
    def _place(self, request: str, replica: ReplicaID, key: str, reserved: float | None) -> None:
        self._free(request)
        self.placed[request] = (replica, key, reserved)
        self.streams[replica] += 1
        if key:
            self.keys.setdefault(key, collections.Counter())[replica] += 1

    def _free(self, request: str, replica: ReplicaID | None = None) -> None:
        old = self.placed.get(request)
        if old is None or (replica is not None and old[0] != replica):
            return
        del self.placed[request]
        self.streams[old[0]] -= 1
        if self.streams[old[0]] <= 0:
            del self.streams[old[0]]
        if old[1]:
            holders = self.keys[old[1]]
            holders[old[0]] -= 1
            if holders[old[0]] <= 0:
                del holders[old[0]]
            if not holders:
                del self.keys[old[1]]

    def _expire(self, live: set[ReplicaID]) -> None:
        now = time.monotonic()
        for request, (replica, _, reserved) in list(self.placed.items()):
            if replica not in live or (reserved is not None and now - reserved > RESERVATION_S):
                self._free(request)

    def _load(self, r: RunningReplica) -> int:
        """Open streams, for the room check: the larger of this router's count and the replica's last report."""
        return max(self.streams[r.replica_id], int(r.routing_stats.get("streams", 0)))

    def _capacity(self, r: RunningReplica) -> int:
        return int(r.routing_stats.get("max_streams", r.max_ongoing_requests - self.headroom))

    # ---- Serve's interface -----------------------------------------------------------------------
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas]
        request = pending_request.metadata.internal_request_id
        key = pending_request.metadata.session_id or ""
        self._free(request)  # asked again: the previous choice was full or refused it
        self._expire({r.replica_id for r in candidate_replicas})
        ties = {r.replica_id: random.random() for r in candidate_replicas}

        def order(r):  # this router's own count first: exact for its connections, while reports lag a period
            return self.streams[r.replica_id], int(r.routing_stats.get("streams", 0)), ties[r.replica_id]

        room = [r for r in candidate_replicas if self._load(r) < self._capacity(r)]
        holders = self.keys.get(key, {}) if key else {}
        held = [r for r in room if r.replica_id in holders or key in r.routing_stats.get("images", ())] if key else []
        chosen = min(held or room, key=order, default=None)
        if chosen is None:
            return [sorted(candidate_replicas, key=order)]
        self._place(request, chosen.replica_id, key, time.monotonic())
        return [[chosen], sorted((r for r in candidate_replicas if r is not chosen), key=order)]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """Serve sent it (maybe to another replica than reserved, when that one was full): confirmed there."""
        self._place(pending_request.metadata.internal_request_id, replica_id,
                    pending_request.metadata.session_id or "", None)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._free(internal_request_id, replica_id)


class CloseLostWebSockets:
    """ASGI middleware (Serve's proxy): a WebSocket that the replica side ended without a close is closed
    with 1011 and LOST_REASON instead of being dropped."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "websocket":
            return await self.app(scope, receive, send)
        state = {"open": False}

        async def watch_send(message):
            if message["type"] == "websocket.accept":
                state["open"] = True
            elif message["type"] == "websocket.close":
                state["open"] = False
            await send(message)

        async def watch_receive():
            message = await receive()
            if message["type"] == "websocket.disconnect":
                state["open"] = False
            return message

        try:
            await self.app(scope, watch_receive, watch_send)
        finally:
            if state["open"]:
                with contextlib.suppress(Exception):  # the client may be gone too
                    await send({"type": "websocket.close", "code": 1011, "reason": LOST_REASON})


def proxy_middlewares() -> list:
    """Serve's HTTP proxy callback (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=moshivis.serve.router:proxy_middlewares)."""
    from starlette.middleware import Middleware
    return [Middleware(CloseLostWebSockets)]
