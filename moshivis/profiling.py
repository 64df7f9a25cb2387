"""Phases of a frame: NVTX ranges for profiler timelines, and optional per-phase wall-clock timing.

`phase(name)` marks a part of the frame (temporal, cross_attention, depformer, sampling). It always
pushes an NVTX range on CUDA; inside `PhaseTimer()` it also accumulates the phase's exclusive time
(a nested phase pauses its parent). Timing synchronises the device at every phase boundary, so it
is for breakdowns only, never for the latency figures themselves.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch

_active: "PhaseTimer | None" = None


class PhaseTimer:
    """Exclusive seconds per phase name, summed over every frame run inside the `with` block."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [name, start of the current uninterrupted stretch]

    def __enter__(self):
        global _active
        if _active is not None:
            raise RuntimeError("PhaseTimer blocks cannot be nested")
        _active = self
        return self

    def __exit__(self, *exc):
        global _active
        _active = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _push(self, name: str) -> None:
        now = self._now()
        if self._stack:
            parent = self._stack[-1]
            self.seconds[parent[0]] = self.seconds.get(parent[0], 0.0) + now - parent[1]
        self._stack.append([name, now])

    def _pop(self) -> None:
        now = self._now()
        name, start = self._stack.pop()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - start
        if self._stack:
            self._stack[-1][1] = now


def timing_active() -> bool:
    """True inside a `PhaseTimer` block (a backend then runs frames eagerly, so phases can be timed)."""
    return _active is not None


@contextmanager
def phase(name: str):
    nvtx = torch.cuda.is_available()
    if nvtx:
        torch.cuda.nvtx.range_push(name)
    timer = _active
    if timer is not None:
        timer._push(name)
    try:
        yield
    finally:
        if timer is not None:
            timer._pop()
        if nvtx:
            torch.cuda.nvtx.range_pop()
