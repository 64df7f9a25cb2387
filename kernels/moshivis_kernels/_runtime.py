"""Interpreter switch, launch counter and block-size helpers shared by every kernel file.

Imported before any `@triton.jit` function is defined: without a CUDA device, Triton kernels can only
run in the interpreter, so `TRITON_INTERPRET=1` is set here unless the caller chose otherwise.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_launches: dict[str, int] = {}


def record_launch(name: str, n: int = 1) -> None:
    """Called by every public wrapper once per kernel launch it makes."""
    _launches[name] = _launches.get(name, 0) + n


@contextmanager
def count_launches():
    """Counts the kernel launches made inside the block: yields a dict name -> launches."""
    counts: dict[str, int] = {}
    before = dict(_launches)
    try:
        yield counts
    finally:
        counts.update({k: v - before.get(k, 0) for k, v in _launches.items() if v != before.get(k, 0)})


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_tensor(t, name: str, dims: int, dtypes=None, device=None) -> None:
    """A clear error naming the argument when a kernel input has the wrong rank, dtype or device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
