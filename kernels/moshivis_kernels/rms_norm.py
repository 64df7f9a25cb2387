"""Helium's RMSNorm over rows (SPEC.md §3, the temporal norm): y = x * alpha * rsqrt(mean(x^2) + eps).

Statistics and product in fp32, stored in x's dtype. Used where the normed rows themselves are needed
(h = out_norm(x) feeds both the text head and the depformer); elsewhere the norm is fused into the
following projection (`linear`'s norm prologue).
"""
from __future__ import annotations

import torch

from ._runtime import check_tensor, next_pow2, record_launch

import triton  # noqa: E402  (after _runtime, which picks the interpreter)
import triton.language as tl  # noqa: E402

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _rms_norm_kernel(x_ptr, stride_xb, alpha_ptr, out_ptr, stride_ob, dim, eps, BLOCK_D: tl.constexpr):
    """Program b: out[b] = x[b] * alpha * rsqrt(mean(x[b]^2) + eps); x, out [B, dim], alpha [dim]."""
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + b * stride_xb + cols, mask=cols < dim, other=0.0).to(tl.float32)
        acc += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / dim + eps)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        ok = cols < dim
        x = tl.load(x_ptr + b * stride_xb + cols, mask=ok, other=0.0).to(tl.float32)
        a = tl.load(alpha_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * stride_ob + cols, (x * a * rstd).to(out_ptr.dtype.element_ty), mask=ok)


def _launch_config(dim: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): the whole row in one or two passes of 16-byte loads (4096 -> 2048 x 4 warps)."""
    block_d = min(next_pow2(dim), 2048)
    return block_d, max(1, min(4, block_d // 256))


def rms_norm(x: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-8, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, dim] (unit column stride), alpha [dim] or [1, 1, dim] -> [B, dim] in x's dtype. One launch."""
    check_tensor(x, "x", 2, _FLOAT_DTYPES)
    if x.stride(1) != 1:
        raise ValueError(f"x must have unit stride along dim, got strides {x.stride()}")
    B, dim = x.shape
    if alpha.numel() != dim or alpha.device != x.device:
        raise ValueError(f"alpha must hold dim={dim} values on {x.device}, got shape {list(alpha.shape)} on {alpha.device}")
    alpha = alpha.reshape(dim)
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.dtype != x.dtype or out.device != x.device or out.stride(1) != 1:
        raise ValueError(f"out must be a {x.dtype} tensor of shape {list(x.shape)} on {x.device} with unit column stride")
    if B:
        block_d, num_warps = _launch_config(dim)
        _rms_norm_kernel[(B,)](x, x.stride(0), alpha, out, out.stride(0), dim, eps, BLOCK_D=block_d,
                               num_warps=num_warps)
        record_launch("rms_norm")
    return out


def rms_norm_reference(x: torch.Tensor, alpha: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    xf = x.float()
    return (xf * alpha.float().reshape(-1) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def audit_cases() -> list[dict]:
    block_d, num_warps = _launch_config(4096)
    return [{"name": "rms_norm.out_norm.4096", "fn": _rms_norm_kernel,
             "signature": {"x_ptr": "*bf16", "stride_xb": "i32", "alpha_ptr": "*bf16", "out_ptr": "*bf16",
                           "stride_ob": "i32", "dim": "i32", "eps": "fp32"},
             "constexprs": {"BLOCK_D": block_d}, "int_values": {"stride_xb": 4096, "stride_ob": 4096, "dim": 4096},
             "num_warps": num_warps, "num_stages": 1}]
