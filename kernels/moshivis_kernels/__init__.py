"""moshivis_kernels: Triton kernels for MoshiVis inference (the public ops only)."""
from . import _runtime  # noqa: F401  (sets the interpreter switch before any kernel is defined)
from ._runtime import count_launches
from .cross_attention import CrossAttentionWorkspace, cross_attention_workspace, gated_cross_attention
from .depformer import DepformerWeights, DepformerWorkspace, depformer_frame, depformer_step, depformer_workspace
from .embedding import embed_tokens
from .linear import LinearWorkspace, linear, linear_workspace, quantize_rowwise
from .rms_norm import rms_norm
from .sampling import greedy_tokens, sample_tokens
from .self_attention import self_attention_decode, self_attention_workspace

__all__ = ["CrossAttentionWorkspace", "DepformerWeights", "DepformerWorkspace", "LinearWorkspace", "count_launches",
           "cross_attention_workspace", "depformer_frame", "depformer_step", "depformer_workspace", "embed_tokens",
           "gated_cross_attention", "greedy_tokens", "linear", "linear_workspace", "quantize_rowwise", "rms_norm", "sample_tokens", "self_attention_decode",
           "self_attention_workspace"]
