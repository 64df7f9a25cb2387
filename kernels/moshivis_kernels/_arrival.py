"""Arrival counters: the last program of a group finishes the group's work, so a split reduction needs no
second launch.

Each program of a group stores its partial result, then counts itself in with `last_arrival`; the one that
arrives last (and only it) sees every partial and combines them, in a fixed order, so results stay
deterministic. Memory ordering on the GPU, as in CUTLASS's split-K semaphore: a CTA barrier orders every
thread's partial stores before the arrival; the arrival is one acq_rel atomic at GPU scope (Triton issues a
scalar atomic from one thread and broadcasts its result through shared memory behind a second barrier), so
the last program's later loads see every earlier program's stores. The last program also resets the counter
to zero: counters are zero before and after every launch, which is what lets one buffer of counters serve
every call (and every replay of a CUDA graph) without a memset. In the interpreter, programs run one after
the other and the same code holds trivially.
"""
from __future__ import annotations

import torch

from . import _runtime  # noqa: F401  (sets the interpreter switch before any kernel is defined)

import triton  # noqa: E402  (after _runtime, which picks the interpreter)
import triton.language as tl  # noqa: E402


@triton.jit
def last_arrival(counter_ptr, group_size):
    """True in the last of `group_size` programs to call this on counter_ptr (int32, zero before the first),
    which also sets the counter back to zero. Call it after the program's partial stores."""
    tl.debug_barrier()  # every thread's partial is stored before the program counts itself in
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == group_size - 1
    if last:
        tl.store(counter_ptr, 0)
    return last


_MIN_COUNTERS = 4096
_SHARED: dict[tuple[str, int | None], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown buffers, kept alive: a CUDA graph may have captured them


def shared_counters(device: torch.device | str, n: int) -> torch.Tensor:
    """n int32 counters at zero on `device`: the first n of a per-device buffer, zeroed once and left at zero
    by every kernel that uses it. Kernels on one device must then run in stream order (the engine's do);
    concurrent streams pass their own workspace instead. Grown outside CUDA graph capture only: a kernel's
    first call must come before capture (as it must anyway, to compile it)."""
    device = torch.device(device)
    key = (device.type, device.index if device.type != "cuda" or device.index is not None
           else torch.cuda.current_device())
    buf = _SHARED.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"arrival counters: {n} needed on {device} during CUDA graph capture; run the call "
                               "once before capture or pass a workspace")
        if buf is not None:
            _RETIRED.append(buf)
        buf = _SHARED[key] = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
    return buf[:n]

