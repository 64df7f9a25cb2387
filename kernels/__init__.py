"""moshivis_kernels: Triton kernels for MoshiVis inference (the public ops only)."""
from . import _runtime  # noqa: F401  (sets the interpreter switch before any kernel is defined)
from ._runtime import count_launches
from .embedding import embed_tokens
from .sampling import greedy_tokens, sample_tokens
from .self_attention import self_attention_decode, self_attention_workspace

__all__ = ["count_launches", "embed_tokens", "greedy_tokens", "sample_tokens", "self_attention_decode",
           "self_attention_workspace"]
