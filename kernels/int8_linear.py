"""Weight-only INT8 linear: y = x @ (CB * SCB / 127)^T (+ bias) (+ residual), activations fp32/bf16.

Weights use bitsandbytes' row-wise format (`bitsandbytes.functional.int8_vectorwise_quant`): `CB` int8
[N, K] and `SCB` fp32 [N], the absolute maximum of each row, so that `W ~= CB * SCB / 127`.
The int8 values are converted in registers and multiplied in fp32 (GEMV path, M <= _GEMV_MAX_M) or in
the activation dtype with `tl.dot` (larger M; int8 -> bf16 is exact); accumulation is fp32 and the
per-row scale is applied once, in the epilogue. Epilogues: bias, residual add (`out` may alias
`residual`) and SwiGLU's gate (`silu(u[:, :h]) * u[:, h:]`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ._runtime import cdiv, check_tensor, next_pow2, record_launch

import triton  # noqa: E402  (after _runtime: it sets TRITON_INTERPRET when there is no GPU)
import triton.language as tl  # noqa: E402

EPILOGUES = ("none", "silu_gate")


@triton.jit
def _epilogue(acc_a, acc_b, offs_m, offs_n, M, N, scb_ptr, bias_ptr, res_ptr, out_ptr,
              stride_rm, stride_rn, stride_om, stride_on,
              GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Scale, bias, gate and residual for an [BLOCK_M, BLOCK_N] tile of fp32 dot products.

    acc_a holds x . CB[n] for output column n; with GATE, acc_b holds x . CB[N + n] (the second half
    of the weight's rows) and the result is silu(u_a) * u_b. Each output element is read (residual)
    and written by this program only, which is what makes `out` aliasing `residual` safe.
    """
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    y = acc_a * (tl.load(scb_ptr + offs_n, mask=mask_n, other=0.0) / 127.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATE:
        g = acc_b * (tl.load(scb_ptr + N + offs_n, mask=mask_n, other=0.0) / 127.0)[None, :]
        if HAS_BIAS:
            g += tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = y * tl.sigmoid(y) * g
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
        y += res.to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_partial(acc_a, acc_b, offs_m, offs_n, M, N, part_ptr, stride_pk, stride_pm, GATE: tl.constexpr):
    """Unscaled split-K partial sums: part[pid_k, m, n] (and part[pid_k, m, N + n] with GATE)."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + tl.program_id(2) * stride_pk + offs_m[:, None] * stride_pm + offs_n[None, :]
    tl.store(ptrs, acc_a, mask=mask)
    if GATE:
        tl.store(ptrs + N, acc_b, mask=mask)


@triton.jit
def _i8_to_f32(w):
    """Exact int8 -> fp32 with an integer add and an fp32 subtract instead of an I2F conversion (a
    fraction of the ALU throughput, enough to cap a GEMV near DRAM speed): the bits of 1.5 * 2^23
    plus a small integer v are the float 1.5 * 2^23 + v."""
    return (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _int8_gemv_kernel(
    x_ptr, cb_ptr, scb_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_cbn,
    stride_rm, stride_rn, stride_om, stride_on, stride_pk, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
):
    """Small-M GEMV: out[m, n] = sum_k x[m, k] * CB[n, k] * SCB[n] / 127, then the epilogue.

    x [M, K] (M <= BLOCK_M), CB [N_w, K] int8 with unit stride along K, SCB [N_w] fp32;
    N = output columns (N_w = N, or 2N with GATE). Grid (cdiv(N, BLOCK_N), 1, SPLIT_K): program
    (n, 0, s) owns output columns [n*BLOCK_N, +BLOCK_N) for ALL rows m, so each weight byte is read
    once, over K range [s*k_per_split, +k_per_split). A [BLOCK_N, BLOCK_K] weight tile is loaded
    16 int8 (128 bits) per thread along K, widened to fp32 once and used for every row m; each
    x row tile (BLOCK_K < number of threads) is loaded straight into the weight tile's layout, so
    no shared-memory shuffles happen in the loop. Sums are kept transposed, [BLOCK_N, BLOCK_M],
    so per-row results land in that same layout. With SPLIT the unscaled sums go to part[s] for
    `_splitk_reduce_kernel`; otherwise the epilogue runs here.
    """
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = (offs_n < N)[:, None]
    w_ptrs = cb_ptr + offs_n[:, None] * stride_cbn + offs_k[None, :]
    acc_a = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k in range(k_lo, k_hi, BLOCK_K):
        mask_k = k + offs_k < K
        w_a = _i8_to_f32(tl.load(w_ptrs + k, mask=mask_n & mask_k[None, :], other=0))
        if GATE:
            w_b = _i8_to_f32(tl.load(w_ptrs + N * stride_cbn + k, mask=mask_n & mask_k[None, :], other=0))
        for m in tl.static_range(BLOCK_M):
            x = tl.load(x_ptr + m * stride_xm + (k + offs_k) * stride_xk, mask=mask_k & (m < M), other=0.0)
            x = x.to(tl.float32)[None, :]
            row = offs_m[None, :] == m
            acc_a += tl.where(row, tl.sum(w_a * x, axis=1)[:, None], 0.0)
            if GATE:
                acc_b += tl.where(row, tl.sum(w_b * x, axis=1)[:, None], 0.0)
    acc_a = tl.trans(acc_a)
    acc_b = tl.trans(acc_b)
    if SPLIT:
        _store_partial(acc_a, acc_b, offs_m, offs_n, M, N, part_ptr, stride_pk, stride_pm, GATE)
    else:
        _epilogue(acc_a, acc_b, offs_m, offs_n, M, N, scb_ptr, bias_ptr, res_ptr, out_ptr,
                  stride_rm, stride_rn, stride_om, stride_on, GATE, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def _int8_mm_kernel(
    x_ptr, cb_ptr, scb_ptr, bias_ptr, res_ptr, out_ptr, part_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_cbn,
    stride_rm, stride_rn, stride_om, stride_on, stride_pk, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Tiled GEMM for larger M: same math and arguments as `_int8_gemv_kernel`.

    Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K). Int8 weight tiles [BLOCK_K, BLOCK_N] (a
    transposed view of CB rows) are converted to the activation dtype in registers (exact: |CB| <= 127)
    and fed to `tl.dot` with fp32 accumulation; fp32 activations use IEEE fp32 products, not TF32.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = (offs_m < M)[:, None]
    mask_n = (offs_n < N)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = cb_ptr + offs_n[None, :] * stride_cbn + offs_k[:, None]
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k in range(k_lo, k_hi, BLOCK_K):
        mask_k = k + offs_k < K
        x = tl.load(x_ptrs + k * stride_xk, mask=mask_m & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + k, mask=mask_k[:, None] & mask_n, other=0)
        acc_a = tl.dot(x, w.to(x.dtype), acc_a, input_precision=DOT_PRECISION)
        if GATE:
            w = tl.load(w_ptrs + N * stride_cbn + k, mask=mask_k[:, None] & mask_n, other=0)
            acc_b = tl.dot(x, w.to(x.dtype), acc_b, input_precision=DOT_PRECISION)
    if SPLIT:
        _store_partial(acc_a, acc_b, offs_m, offs_n, M, N, part_ptr, stride_pk, stride_pm, GATE)
    else:
        _epilogue(acc_a, acc_b, offs_m, offs_n, M, N, scb_ptr, bias_ptr, res_ptr, out_ptr,
                  stride_rm, stride_rn, stride_om, stride_on, GATE, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr, scb_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, SPLIT_K,
    stride_pk, stride_pm, stride_rm, stride_rn, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    """Sums part[0..SPLIT_K) [SPLIT_K, M, N_w] fp32 in a fixed order (deterministic, no atomics),
    then applies the epilogue. Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M))."""
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc_a += tl.load(ptrs + s * stride_pk, mask=mask, other=0.0)
        if GATE:
            acc_b += tl.load(ptrs + s * stride_pk + N, mask=mask, other=0.0)
    _epilogue(acc_a, acc_b, offs_m, offs_n, M, N, scb_ptr, bias_ptr, res_ptr, out_ptr,
              stride_rm, stride_rn, stride_om, stride_on, GATE, HAS_BIAS, HAS_RESIDUAL)


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------

# Up to this many rows the GEMV kernel is used. Its instructions per weight byte grow with M (sm_90
# PTX of the loop: ~175 warp instructions per KB of weights at M = 1, ~280 at M = 2, ~440 at M = 4,
# i.e. at most ~23, ~15, ~9 B/clock/SM at 4 issues per clock, against the ~13 (H100) to ~18 (H200)
# B/clock/SM that DRAM delivers), while the tl.dot kernel's 16-row tile costs the same for any M <= 16.
# Not measured on a GPU yet.
_GEMV_MAX_M = 2
_DEFAULT_SMS = 132  # H100 SXM; used when no GPU is visible (interpreter, static audit)
_REDUCE_BLOCK_M = 16
_REDUCE_BLOCK_N = 128


@dataclass(frozen=True)
class LaunchConfig:
    gemv: bool
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int
    num_warps: int
    num_stages: int


@lru_cache(maxsize=None)
def _num_sms(device_index: int | None) -> int:
    if device_index is None:
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(tiles: int, k_blocks: int, num_sms: int, min_programs: int) -> int:
    """Split of K for shapes whose output tiles leave SMs idle (tiles < num_sms): the smallest power
    of 2 (<= 16, >= 1 K block per split) giving >= min_programs programs, so that enough weight loads
    are in flight. Each split costs an fp32 partial write and the reduce launch."""
    split = 1
    if tiles >= num_sms:
        return split
    while tiles * split < min_programs and split * 2 <= min(k_blocks, 16):
        split *= 2
    return split


def launch_config(M: int, N: int, K: int, *, gate: bool, dtype: torch.dtype,
                  num_sms: int = _DEFAULT_SMS) -> LaunchConfig:
    """Tile sizes and split-K for an [M, K] x [K, N] product (N = output columns, after the gate)."""
    if M <= _GEMV_MAX_M:
        # 16 int8 (128 bits) per thread: 4 lanes span BLOCK_K = 64 (an x row tile smaller than the
        # 128 threads, which Triton then loads directly in the weight layout), 8 lanes x 4 warps
        # span 32 rows. 128 weight rows per program at M = 1 (4 x 16 B loads per thread per step),
        # 64 at M = 2 to stay near 60 registers.
        block_m, block_k = M, 64
        block_n = (128 if M == 1 else 64) // (2 if gate else 1)
        num_warps, num_stages = 4, 1
        min_programs = 2 * num_sms  # no software pipelining: loads in flight come from programs
    elif dtype == torch.float32:
        # IEEE fp32 tl.dot runs on FMAs with operands in registers: small tiles avoid spills.
        block_m, block_n, block_k = min(max(16, next_pow2(M)), 32), 32, 32
        num_warps, num_stages = 4, 2
        min_programs = num_sms
    else:
        block_m, block_n, block_k = min(max(16, next_pow2(M)), 128), 64, 128
        num_warps, num_stages = (4 if block_m <= 64 else 8), 3
        min_programs = num_sms  # the 3-stage cp.async pipeline keeps each program's loads in flight
    k_blocks = max(1, cdiv(K, block_k))
    split = _split_k(cdiv(N, block_n) * cdiv(M, block_m), k_blocks, num_sms, min_programs)
    k_per_split = cdiv(k_blocks, split) * block_k
    split = max(1, cdiv(K, k_per_split))  # no empty splits after rounding
    return LaunchConfig(M <= _GEMV_MAX_M, block_m, block_n, block_k, split, k_per_split, num_warps, num_stages)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses a strided tensor can touch."""
    start = t.data_ptr()
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def quantize_rowwise(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric int8 quantization, identical to bitsandbytes' `int8_vectorwise_quant(w)`.

    SCB[n] = max_k |w[n, k]| (fp32), CB[n, k] = round(w[n, k] * 127 / SCB[n]) (round half to even,
    computed in fp32), so w ~= CB * SCB / 127 with |w - CB * SCB / 127| <= SCB / 254 per row.
    All-zero rows give SCB = 0 and CB = 0 (bitsandbytes would divide by zero there).
    """
    check_tensor(w, "w", 2, _FLOATS)
    scb = w.abs().amax(dim=1).float()
    inv = 127.0 / torch.where(scb > 0, scb, torch.ones_like(scb))
    cb = torch.round(w.float() * inv[:, None]).to(torch.int8)
    return cb, scb


def int8_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None, *,
                residual: torch.Tensor | None = None, epilogue: str = "none",
                out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (cb * scb / 127)^T (+ bias) (+ residual), in x.dtype.

    x [M, K] fp32/bf16; cb [N_w, K] int8 (unit stride along K); scb [N_w] fp32; bias [N_w].
    epilogue "none": y [M, N_w]. epilogue "silu_gate" (SwiGLU's linear_in, N_w = 2h): with
    u = x @ W^T (+ bias), y [M, h] = silu(u[:, :h]) * u[:, h:]. residual [M, N] is added last;
    `out` [M, N] may be `residual` itself (in place) but must not overlap any other input.
    """
    check_tensor(x, "x", 2, (torch.float32, torch.bfloat16))
    device = x.device
    check_tensor(cb, "cb", 2, (torch.int8,), device)
    check_tensor(scb, "scb", 1, (torch.float32,), device)
    M, K = x.shape
    n_w = cb.shape[0]
    if cb.shape[1] != K:
        raise ValueError(f"cb must have shape [N, {K}] to match x {list(x.shape)}, got {list(cb.shape)}")
    if cb.stride(1) != 1 and n_w > 0 and K > 1:
        raise ValueError(f"cb must be contiguous along K (stride(1) == 1), got strides {cb.stride()}")
    if scb.shape[0] != n_w or (n_w > 1 and scb.stride(0) != 1):
        raise ValueError(f"scb must be a contiguous [{n_w}] vector (one scale per row of cb), got shape "
                         f"{list(scb.shape)} strides {scb.stride()}")
    if bias is not None:
        check_tensor(bias, "bias", 1, _FLOATS, device)
        if bias.shape[0] != n_w or (n_w > 1 and bias.stride(0) != 1):
            raise ValueError(f"bias must be a contiguous [{n_w}] vector, got shape {list(bias.shape)} "
                             f"strides {bias.stride()}")
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    gate = epilogue == "silu_gate"
    if gate and n_w % 2:
        raise ValueError(f"epilogue='silu_gate' needs an even number of cb rows (2 * hidden), got {n_w}")
    N = n_w // 2 if gate else n_w
    if residual is not None:
        check_tensor(residual, "residual", 2, _FLOATS, device)
        if tuple(residual.shape) != (M, N):
            raise ValueError(f"residual must have shape {[M, N]}, got {list(residual.shape)}")
    if out is None:
        out = torch.empty((M, N), device=device, dtype=x.dtype)
    else:
        check_tensor(out, "out", 2, (x.dtype,), device)
        if tuple(out.shape) != (M, N):
            raise ValueError(f"out must have shape {[M, N]}, got {list(out.shape)}")
        inputs = {"x": x, "cb": cb, "scb": scb, "bias": bias}
        for name, t in inputs.items():
            if t is not None and _overlaps(out, t):
                raise ValueError(f"out must not overlap {name}")
        if residual is not None and _overlaps(out, residual) and (
                out.data_ptr() != residual.data_ptr() or out.stride() != residual.stride()
                or out.dtype != residual.dtype):
            raise ValueError("out may alias residual only exactly (same data pointer, strides and dtype), "
                             "not partially overlap it")
    if M == 0 or N == 0:
        return out

    cfg = launch_config(M, N, K, gate=gate, dtype=x.dtype,
                        num_sms=_num_sms(device.index if device.type == "cuda" else None))
    split = cfg.split_k > 1
    part = torch.empty((cfg.split_k, M, n_w), device=device, dtype=torch.float32) if split else out
    dummy = scb  # stands in for absent bias / residual pointers (never dereferenced)
    res = residual if residual is not None else out
    args = (x, cb, scb, bias if bias is not None else dummy, res, out, part,
            M, N, K, cfg.k_per_split,
            x.stride(0), x.stride(1), cb.stride(0),
            res.stride(0), res.stride(1), out.stride(0), out.stride(1),
            part.stride(0) if split else 0, part.stride(1) if split else 0)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GATE=gate,
                HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, SPLIT=split,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.gemv:
        _int8_gemv_kernel[(cdiv(N, cfg.block_n), 1, cfg.split_k)](*args, **meta)
        record_launch("int8_linear.gemv")
    else:
        grid = (cdiv(N, cfg.block_n), cdiv(M, cfg.block_m), cfg.split_k)
        _int8_mm_kernel[grid](*args, **meta, DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
        record_launch("int8_linear.mm")
    if split:
        grid = (cdiv(N, _REDUCE_BLOCK_N), cdiv(M, _REDUCE_BLOCK_M))
        _splitk_reduce_kernel[grid](
            part, scb, bias if bias is not None else dummy, res, out,
            M, N, cfg.split_k,
            part.stride(0), part.stride(1), res.stride(0), res.stride(1), out.stride(0), out.stride(1),
            BLOCK_M=_REDUCE_BLOCK_M, BLOCK_N=_REDUCE_BLOCK_N, GATE=gate,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, num_warps=4)
        record_launch("int8_linear.splitk_reduce")
    return out


def int8_linear_reference(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None, *,
                          residual: torch.Tensor | None = None, epilogue: str = "none") -> torch.Tensor:
    """Plain PyTorch in fp32: F.linear(x, CB) * (SCB / 127) (+ bias) (gate) (+ residual), cast to x.dtype."""
    u = torch.nn.functional.linear(x.float(), cb.float()) * (scb.float() / 127)
    if bias is not None:
        u = u + bias.float()
    if epilogue == "silu_gate":
        h = u.shape[1] // 2
        u = torch.nn.functional.silu(u[:, :h]) * u[:, h:]
    if residual is not None:
        u = u + residual.float()
    return u.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Static audit: how each kernel is compiled at the real moshika-vis shapes (bf16 activations)
# ----------------------------------------------------------------------------------------------------

# (name, K, N_w, epilogue, has_residual)
_AUDIT_SHAPES = [
    ("attn_in_proj", 4096, 12288, "none", False),
    ("attn_out_proj", 4096, 4096, "none", True),
    ("ffn_linear_in", 4096, 22528, "silu_gate", False),
    ("ffn_linear_out", 11264, 4096, "none", True),
    ("gate_alpha0", 4096, 512, "none", False),
    ("gate_alpha2", 512, 4096, "none", False),
    ("depformer_in", 4096, 1024, "none", False),
    ("dep_in_proj", 1024, 3072, "none", False),
    ("dep_out_proj", 1024, 1024, "none", True),
    ("dep_linear_in", 1024, 5632, "silu_gate", False),
    ("dep_linear_out", 2816, 1024, "none", True),
    ("audio_head", 1024, 2048, "none", False),
    ("text_head", 4096, 32000, "none", False),
]


def _case(name: str, fn, args: dict, meta: dict, num_warps: int, num_stages: int) -> dict:
    """An audit case: pointer args given as their type ("*bf16"), integer args by value (`int_values`,
    which the audit specializes as a launch would: 1 -> constant, multiples of 16 -> divisibility)."""
    signature = {k: (v if isinstance(v, str) else "i32") for k, v in args.items()}
    signature.update({k: "constexpr" for k in meta})
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(meta),
            "int_values": {k: v for k, v in args.items() if not isinstance(v, str)},
            "num_warps": num_warps, "num_stages": num_stages}


def audit_cases() -> list[dict]:
    """Kernel compilations at the real shapes for M = 1 (GEMV) and M = 64 (tl.dot), bf16 activations,
    contiguous tensors, with the configs `launch_config` picks for an H100 (132 SMs)."""
    cases = []
    for name, K, n_w, epilogue, has_res in _AUDIT_SHAPES:
        gate = epilogue == "silu_gate"
        N = n_w // 2 if gate else n_w
        for M in (1, 64):
            cfg = launch_config(M, N, K, gate=gate, dtype=torch.bfloat16)
            split = cfg.split_k > 1
            args = {"x_ptr": "*bf16", "cb_ptr": "*i8", "scb_ptr": "*fp32", "bias_ptr": "*fp32",
                    "res_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32" if split else "*bf16",
                    "M": M, "N": N, "K": K, "k_per_split": cfg.k_per_split,
                    "stride_xm": K, "stride_xk": 1, "stride_cbn": K, "stride_rm": N, "stride_rn": 1,
                    "stride_om": N, "stride_on": 1, "stride_pk": M * n_w if split else 0,
                    "stride_pm": n_w if split else 0}
            meta = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GATE": gate,
                    "HAS_BIAS": False, "HAS_RESIDUAL": has_res, "SPLIT": split}
            fn = _int8_gemv_kernel if cfg.gemv else _int8_mm_kernel
            if not cfg.gemv:
                meta["DOT_PRECISION"] = "tf32"
            tag = f"{name}.M{M}.{K}x{n_w}" + (f".split{cfg.split_k}" if split else "")
            cases.append(_case(f"int8_linear.{'gemv' if cfg.gemv else 'mm'}.{tag}", fn, args, meta,
                               cfg.num_warps, cfg.num_stages))
            if split:
                args = {"part_ptr": "*fp32", "scb_ptr": "*fp32", "bias_ptr": "*fp32", "res_ptr": "*bf16",
                        "out_ptr": "*bf16", "M": M, "N": N, "SPLIT_K": cfg.split_k,
                        "stride_pk": M * n_w, "stride_pm": n_w, "stride_rm": N, "stride_rn": 1,
                        "stride_om": N, "stride_on": 1}
                meta = {"BLOCK_M": _REDUCE_BLOCK_M, "BLOCK_N": _REDUCE_BLOCK_N, "GATE": gate,
                        "HAS_BIAS": False, "HAS_RESIDUAL": has_res}
                cases.append(_case(f"int8_linear.splitk_reduce.{tag}", _splitk_reduce_kernel, args, meta, 4, 1))
    return cases
