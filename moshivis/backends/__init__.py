"""Backends compute one frame for a batch of streams on the shared state (see `torch.py`)."""
from __future__ import annotations


def get_backend(name: str):
    """The backend class for `name` ('torch' or 'triton')."""
    if name == "torch":
        from .torch import TorchBackend
        return TorchBackend
    if name == "triton":
        from .triton import TritonBackend
        return TritonBackend
    raise ValueError(f"unknown backend {name!r}; known: 'torch', 'triton'")
