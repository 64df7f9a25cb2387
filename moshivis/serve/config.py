"""The server's settings: scheduling, per-client bounds and connection limits (every one a CLI option)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

MODES = ("realtime", "lockstep")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8998  # 0: any free port (see `Server.port`)
    mode: str = "realtime"
    tick_ms: float = 80.0
    budget_ms: float = 80.0
    max_lag_ms: float = 1000.0  # realtime: further behind schedule than this, skip ticks
    # Per stream: inputs queued ahead (2 s); beyond, new inputs are refused (queue_full) and counted.
    max_queued_frames: int = 25
    # Extra frames per tick for streams behind their input (catch-up), run only while they fit before the
    # next tick so on-time streams never wait for them.
    max_catchup_per_tick: int = 4
    max_outbox: int = 250  # replies waiting for a client that does not read: then it is dropped
    # Connections: at most `max_connections` in all; of those not yet holding a stream ("pending"), at most
    # `max_pending` overall and `max_pending_per_ip` per client address: a new one evicts the oldest pending
    # one beyond either, so idle connections can never lock real sessions out.
    max_connections: int = 512
    max_pending: int = 64
    max_pending_per_ip: int = 16
    open_timeout_s: float = 5.0  # a connection must open its stream within this
    input_timeout_s: float = 10.0  # an open stream that sends nothing for this long is closed
    drain_timeout_s: float = 5.0  # for final messages to reach a client on close/shutdown
    # Images: files up to this size (PNG, JPEG, WebP, GIF, BMP); at most one per `image_interval_s` per
    # stream; at most `max_pending_images` waiting for the encoder; large messages (images) being received
    # at once hold at most `max_upload_bytes` (others wait, their sockets paused).
    max_image_file_bytes: int = 16 << 20
    image_interval_s: float = 1.0
    max_pending_images: int = 16
    max_upload_bytes: int = 64 << 20

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith(("_ms", "_s")) and not (isinstance(value, (int, float)) and math.isfinite(value)
                                                        and value > 0):
                raise ValueError(f"{f.name} must be a finite number > 0, got {value!r}")
            least = 0 if f.name == "max_catchup_per_tick" else 1
            if f.type == "int" and f.name != "port" and not (isinstance(value, int) and not isinstance(value, bool)
                                                              and value >= least):
                raise ValueError(f"{f.name} must be an integer >= {least}, got {value!r}")
        if not (isinstance(self.port, int) and 0 <= self.port < 65536):
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
