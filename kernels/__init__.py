"""moshivis_kernels: Triton kernels for MoshiVis inference (the public ops only)."""
from . import _runtime  # noqa: F401  (sets the interpreter switch before any kernel is defined)
from ._runtime import count_launches

__all__ = ["count_launches"]
