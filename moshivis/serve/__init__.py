"""Serving: one frame scheduler (`scheduler`) behind two wire protocols (`native`: ours, `kyutai`:
Kyutai's /api/chat), media off the frame path (`media`), and deployments: one process (`local`, the
`python -m moshivis.server` command in `cli`) or Ray Serve replicas (`ray_app`)."""
from .config import ServerConfig
from .local import Server
from .media import Media, MediaError
from .scheduler import FrameOut, OpenRequest, Scheduler

__all__ = ["FrameOut", "Media", "MediaError", "OpenRequest", "Scheduler", "Server", "ServerConfig"]
