"""Weight-only linear: y = norm(x) @ W^T (+ bias) (gate) (+ residual), for dense or INT8 weights.

Weights are either dense fp32/bf16/fp16 [N, K], or bitsandbytes' row-wise INT8
(`bitsandbytes.functional.int8_vectorwise_quant`): `CB` int8 [N, K] plus `SCB` fp32 [N], the absolute
maximum of each row, so that `W ~= CB * SCB / 127`. Weights are converted in registers and multiplied
in fp32 (GEMV path, M <= _GEMV_MAX_M) or fed to `tl.dot` (larger M; int8 -> bf16 is exact);
accumulation is fp32 and the INT8 row scale is applied once, in the epilogue.

Prologue (optional), so a norm fuses into the projection that follows it (SPEC.md §3):
  "rms": x * alpha * rsqrt(mean(x^2) + eps)            (temporal norms)
  "var": x * alpha * rsqrt(var_unbiased(x) + eps)      (depformer norms; the output is not centred)
computed in fp32 and rounded to x's dtype before the matmul, as the model does. The row statistics
come from a pass over x: inside each GEMV program (M <= 2: x is a few KB, read from L2, next to the
program's hundreds of KB of weights; no extra launch), but from a separate one-program-per-row
launch on the tl.dot path, where an [M, K] pass per program would read as many bytes as the
program's weight tile (M = 64) and wait on tens of serial load round trips before its first dot.
Epilogues: bias, SwiGLU's gate (`silu(u[:, :h]) * u[:, h:]`) and a residual add (`out` may alias
`residual`).

Split-K (shapes with too few output tiles to fill the GPU): each program stores its fp32 partial sums,
and the last program to finish an output tile (an arrival counter per tile, `_arrival.last_arrival`) adds
the tile's partials in split order and applies the epilogue, so a linear is one launch (two on the tl.dot
path with a norm) and its results do not depend on which program finishes last.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ._arrival import last_arrival, shared_counters
from ._runtime import cdiv, check_tensor, next_pow2, record_launch

import triton  # noqa: E402  (after _runtime: it sets TRITON_INTERPRET when there is no GPU)
import triton.language as tl  # noqa: E402

EPILOGUES = ("none", "silu_gate")
NORMS = (None, "rms", "var")


@triton.jit
def _row_rstd(x_ptr, stride_xm, stride_xk, offs_m, M, K, eps, VAR: tl.constexpr, BLOCK_K: tl.constexpr):
    """rsqrt(s + eps) in fp32 for rows offs_m of x [M, K]: s = mean(x^2), or with VAR the unbiased
    variance in two passes (the mean first, so no large sums cancel). Per-lane partial sums are
    reduced across threads once, after each pass; a wide tile (BLOCK_K) keeps the passes to a few
    iterations, each of which waits for its loads."""
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    mask_m = (offs_m < M)[:, None]
    if VAR:
        total = tl.zeros([offs_m.shape[0], BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            total += tl.load(ptrs + k * stride_xk, mask=mask_m & (k + offs_k < K)[None, :], other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=1) / K
    squares = tl.zeros([offs_m.shape[0], BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask = mask_m & (k + offs_k < K)[None, :]
        v = tl.load(ptrs + k * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if VAR:
            v = tl.where(mask, v - mean[:, None], 0.0)
        squares += v * v
    if VAR:
        s = tl.sum(squares, axis=1) / (K - 1)
    else:
        s = tl.sum(squares, axis=1) / K
    return tl.math.rsqrt(s + eps)


@triton.jit
def _normed(x, alpha, rstd):
    """(x * alpha * rstd) in fp32, rounded to x's dtype: the reference norm's order and rounding."""
    return (x.to(tl.float32) * alpha * rstd).to(x.dtype)


@triton.jit
def _epilogue(acc_a, acc_b, offs_m, offs_n, M, N, scale_ptr, bias_ptr, res_ptr, out_ptr,
              stride_rm, stride_rn, stride_om, stride_on,
              HAS_SCALE: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """INT8 row scale, bias, gate and residual for an [BLOCK_M, BLOCK_N] tile of fp32 dot products.

    acc_a holds x . W[n] for output column n; with GATE, acc_b holds x . W[N + n] (the second half
    of the weight's rows) and the result is silu(u_a) * u_b. Each output element is read (residual)
    and written by this program only, which is what makes `out` aliasing `residual` safe.
    """
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    y = acc_a
    if HAS_SCALE:
        y = y * (tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0) / 127.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATE:
        g = acc_b
        if HAS_SCALE:
            g = g * (tl.load(scale_ptr + N + offs_n, mask=mask_n, other=0.0) / 127.0)[None, :]
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
def _sum_partials(part_ptr, offs_m, offs_n, M, N, stride_pk, stride_pm, GATE: tl.constexpr):
    """part[0] + part[1] + ... (split order, so the same bits whichever program adds them) for the
    tile's outputs, and their gate halves with GATE."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    ptrs = part_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
    acc_a = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.float32)
    acc_b = tl.zeros([offs_m.shape[0], offs_n.shape[0]], dtype=tl.float32)
    for s in range(tl.num_programs(2)):
        acc_a += tl.load(ptrs + s * stride_pk, mask=mask, other=0.0)
        if GATE:
            acc_b += tl.load(ptrs + s * stride_pk + N, mask=mask, other=0.0)
    return acc_a, acc_b


@triton.jit
def _finish_tile(acc_a, acc_b, offs_m, offs_n, M, N, counter_ptr, part_ptr, stride_pk, stride_pm, scale_ptr,
                 bias_ptr, res_ptr, out_ptr, stride_rm, stride_rn, stride_om, stride_on,
                 HAS_SCALE: tl.constexpr, GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 SPLIT: tl.constexpr):
    """The tile's epilogue: at once, or with split-K by the last split to arrive at the tile's counter,
    once it has summed every split's partials."""
    if SPLIT:
        _store_partial(acc_a, acc_b, offs_m, offs_n, M, N, part_ptr, stride_pk, stride_pm, GATE)
        if last_arrival(counter_ptr, tl.num_programs(2)):
            acc_a, acc_b = _sum_partials(part_ptr, offs_m, offs_n, M, N, stride_pk, stride_pm, GATE)
            _epilogue(acc_a, acc_b, offs_m, offs_n, M, N, scale_ptr, bias_ptr, res_ptr, out_ptr,
                      stride_rm, stride_rn, stride_om, stride_on, HAS_SCALE, GATE, HAS_BIAS, HAS_RESIDUAL)
    else:
        _epilogue(acc_a, acc_b, offs_m, offs_n, M, N, scale_ptr, bias_ptr, res_ptr, out_ptr,
                  stride_rm, stride_rn, stride_om, stride_on, HAS_SCALE, GATE, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def _to_f32(w):
    """Weight tile to fp32. Int8 goes through an integer add and an fp32 subtract instead of an I2F
    conversion (a fraction of the ALU throughput, enough to cap a GEMV near DRAM speed): the bits of
    1.5 * 2^23 plus a small integer v are the float 1.5 * 2^23 + v, exactly."""
    if w.dtype == tl.int8:
        return (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    return w.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, alpha_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, k_per_split, eps,
    stride_xm, stride_xk, stride_wn,
    stride_rm, stride_rn, stride_om, stride_on, stride_pk, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM: tl.constexpr, NORM_BLOCK_K: tl.constexpr, HAS_SCALE: tl.constexpr,
    GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
):
    """Small-M GEMV: out[m, n] = sum_k norm(x)[m, k] * W[n, k] (* scale[n] / 127), then the epilogue.

    x [M, K] (M <= BLOCK_M); W [N_w, K] int8/fp32/bf16/fp16 with unit stride along K (row stride
    stride_wn); scale [N_w] fp32 (HAS_SCALE, int8 W); alpha [K] (NORM "rms"/"var", else unused);
    N = output columns (N_w = N, or 2N with GATE). Grid (cdiv(N, BLOCK_N), 1, SPLIT_K): program
    (n, 0, s) owns output columns [n*BLOCK_N, +BLOCK_N) for ALL rows m, so each weight byte is read
    once, over K range [s*k_per_split, +k_per_split); with NORM it first takes its rows' statistics
    over all of K. A [BLOCK_N, BLOCK_K] weight tile is loaded 128 bits per thread along K (16 int8,
    8 bf16), widened to fp32 once and used for every row m; each x row tile (BLOCK_K < number of
    threads) is loaded straight into the weight tile's layout, so no shared-memory shuffles happen
    in the loop. Sums are kept transposed, [BLOCK_N, BLOCK_M], so per-row results land in that same
    layout. With SPLIT the unscaled sums go to part[s] [SPLIT_K, M, N_w] fp32, and the last of the
    tile's SPLIT_K programs to arrive at count[n] adds them up and applies the epilogue.
    """
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = (offs_n < N)[:, None]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]
    if NORM != "none":
        rstd = _row_rstd(x_ptr, stride_xm, stride_xk, offs_m, M, K, eps, NORM == "var", NORM_BLOCK_K)
    acc_a = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k in range(k_lo, k_hi, BLOCK_K):
        mask_k = k + offs_k < K
        w_a = _to_f32(tl.load(w_ptrs + k, mask=mask_n & mask_k[None, :], other=0))
        if GATE:
            w_b = _to_f32(tl.load(w_ptrs + N * stride_wn + k, mask=mask_n & mask_k[None, :], other=0))
        if NORM != "none":
            alpha = tl.load(alpha_ptr + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            x = tl.load(x_ptr + m * stride_xm + (k + offs_k) * stride_xk, mask=mask_k & (m < M), other=0.0)
            if NORM != "none":  # rstd[m], picked out of the [BLOCK_M] vector
                x = _normed(x, alpha, tl.sum(tl.where(offs_m == m, rstd, 0.0), axis=0))
            x = x.to(tl.float32)[None, :]
            row = offs_m[None, :] == m
            acc_a += tl.where(row, tl.sum(w_a * x, axis=1)[:, None], 0.0)
            if GATE:
                acc_b += tl.where(row, tl.sum(w_b * x, axis=1)[:, None], 0.0)
    acc_a = tl.trans(acc_a)
    acc_b = tl.trans(acc_b)
    _finish_tile(acc_a, acc_b, offs_m, offs_n, M, N, count_ptr + pid_n, part_ptr, stride_pk, stride_pm,
                 scale_ptr, bias_ptr, res_ptr, out_ptr, stride_rm, stride_rn, stride_om, stride_on,
                 HAS_SCALE, GATE, HAS_BIAS, HAS_RESIDUAL, SPLIT)


@triton.jit
def _dot(a, w, acc, DOT_FP32: tl.constexpr):
    """acc + a @ w. DOT_FP32 (fp32 activations, or float weights of another dtype than x): IEEE fp32
    products, not TF32; otherwise in a's 16-bit dtype (int8 weights convert to it exactly)."""
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, w.to(a.dtype), acc)
    return acc


@triton.jit
def _mm_kernel(
    x_ptr, w_ptr, scale_ptr, alpha_ptr, rstd_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, count_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn,
    stride_rm, stride_rn, stride_om, stride_on, stride_pk, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_SCALE: tl.constexpr,
    GATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """Tiled GEMM for larger M: same math and arguments as `_gemv_kernel`, except that with HAS_NORM
    the rows' rsqrt(s + eps) come precomputed in rstd [M] fp32 (`_norm_stats_kernel`).

    Grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K). Weight tiles [BLOCK_K, BLOCK_N] (a
    transposed view of W rows) go to `tl.dot` with fp32 accumulation (see `_dot` for the operand
    dtype); with HAS_NORM the x tile is normalised in registers first. With SPLIT, output tile
    (n, m) counts its arrivals at count[m * cdiv(N, BLOCK_N) + n].
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = (offs_m < M)[:, None]
    mask_n = (offs_n < N)[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]
    if HAS_NORM:
        rstd = tl.load(rstd_ptr + offs_m, mask=offs_m < M, other=0.0)
    acc_a = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k in range(k_lo, k_hi, BLOCK_K):
        mask_k = k + offs_k < K
        x = tl.load(x_ptrs + k * stride_xk, mask=mask_m & mask_k[None, :], other=0.0)
        if HAS_NORM:
            alpha = tl.load(alpha_ptr + k + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            x = _normed(x, alpha[None, :], rstd[:, None])
        w = tl.load(w_ptrs + k, mask=mask_k[:, None] & mask_n, other=0)
        acc_a = _dot(x, w, acc_a, DOT_FP32)
        if GATE:
            w = tl.load(w_ptrs + N * stride_wn + k, mask=mask_k[:, None] & mask_n, other=0)
            acc_b = _dot(x, w, acc_b, DOT_FP32)
    tile = pid_m * tl.num_programs(0) + pid_n
    _finish_tile(acc_a, acc_b, offs_m, offs_n, M, N, count_ptr + tile, part_ptr, stride_pk, stride_pm,
                 scale_ptr, bias_ptr, res_ptr, out_ptr, stride_rm, stride_rn, stride_om, stride_on,
                 HAS_SCALE, GATE, HAS_BIAS, HAS_RESIDUAL, SPLIT)


@triton.jit
def _norm_stats_kernel(x_ptr, rstd_ptr, M, K, eps, stride_xm, stride_xk,
                       NORM: tl.constexpr, NORM_BLOCK_K: tl.constexpr):
    """rstd[m] = rsqrt(s + eps) of row m of x [M, K] (`_row_rstd`, NORM "rms"/"var") for `_mm_kernel`.
    Grid (M,): one row per program, so the rows' loads are all in flight at once."""
    offs_m = tl.program_id(0) + tl.arange(0, 1)
    rstd = _row_rstd(x_ptr, stride_xm, stride_xk, offs_m, M, K, eps, NORM == "var", NORM_BLOCK_K)
    tl.store(rstd_ptr + offs_m, rstd, mask=offs_m < M)


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------

# Up to this many rows the GEMV kernel is used. Its instructions per weight element grow with M (sm_90
# PTX of the int8 loop: ~175 warp instructions per KB of weights at M = 1, ~280 at M = 2, ~440 at
# M = 4, i.e. at most ~23, ~15, ~9 B/clock/SM at 4 issues per clock, against the ~13 (H100) to ~18
# (H200) B/clock/SM that DRAM delivers), while the tl.dot kernel's 16-row tile costs the same for any
# M <= 16. 16-bit weights halve the instructions per byte, so they could stay on the GEMV a little
# longer; not measured on a GPU yet, so both use the same limit.
_GEMV_MAX_M = 2
_DEFAULT_SMS = 132  # H100 SXM; used when no GPU is visible (interpreter, static audit)
# Elements of x per norm-statistics tile (32 per thread of 4 warps): one iteration over K = 4096 per
# row, since each iteration waits for its loads.
_NORM_TILE = 4096
_NORM_NUM_WARPS = 4


@dataclass(frozen=True)
class LaunchConfig:
    gemv: bool
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int
    norm_block_k: int  # statistics tile width along K (GEMV programs, or the stats launch); 0: no norm
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
    are in flight. Each split costs an fp32 partial write and its read by the tile's last program.
    Splitting only below num_sms tiles also bounds the arrival counters a call needs (< num_sms)."""
    split = 1
    if tiles >= num_sms:
        return split
    while tiles * split < min_programs and split * 2 <= min(k_blocks, 16):
        split *= 2
    return split


def launch_config(M: int, N: int, K: int, *, gate: bool, weight_dtype: torch.dtype, dot_fp32: bool,
                  norm: bool, num_sms: int = _DEFAULT_SMS) -> LaunchConfig:
    """Tile sizes and split-K for an [M, K] x [K, N] product (N = output columns, after the gate).
    dot_fp32: the tl.dot path multiplies in fp32 (see `_dot`)."""
    if M <= _GEMV_MAX_M:
        # 128 bits per thread along K and 4 lanes across it: BLOCK_K = 64 int8 / 32 bf16 / 16 fp32 (an
        # x row tile smaller than the 128 threads, which Triton then loads directly in the weight
        # layout), 8 lanes x 4 warps span 32 rows. 64 weights per thread per step at M = 1 (4 x 16 B
        # loads for int8, 8 for bf16), 32 at M = 2: sm_90 needs 56 registers with int8 weights, 80
        # with bf16 (96 with a norm), no spills.
        vec = 16 // weight_dtype.itemsize
        block_m, block_k = M, 4 * vec
        block_n = (8192 if M == 1 else 4096) // block_k // (2 if gate else 1)
        num_warps, num_stages = 4, 1
        min_programs = 2 * num_sms  # no software pipelining: loads in flight come from programs
    elif dot_fp32:
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
    norm_block_k = min(next_pow2(K), _NORM_TILE // (block_m if M <= _GEMV_MAX_M else 1)) if norm else 0
    return LaunchConfig(M <= _GEMV_MAX_M, block_m, block_n, block_k, split, k_per_split, norm_block_k,
                        num_warps, num_stages)


def _dot_fp32(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """tl.dot in fp32: fp32 activations, or float weights of another dtype than x."""
    return x_dtype == torch.float32 or (weight_dtype != torch.int8 and weight_dtype != x_dtype)


def _config(M: int, N: int, K: int, x_dtype: torch.dtype, weight_dtype: torch.dtype, gate: bool, norm: bool,
            device: torch.device) -> LaunchConfig:
    return launch_config(M, N, K, gate=gate, weight_dtype=weight_dtype, dot_fp32=_dot_fp32(x_dtype, weight_dtype),
                         norm=norm, num_sms=_num_sms(device.index if device.type == "cuda" else None))


def _split_needs(cfg: LaunchConfig, M: int, N: int, n_w: int) -> tuple[int, int]:
    """(fp32 partials, arrival counters) a split-K call uses: part [SPLIT_K, M, N_w], one counter per tile."""
    return cfg.split_k * M * n_w, cdiv(N, cfg.block_n) * cdiv(M, cfg.block_m)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class LinearWorkspace:
    """Scratch for `linear`, reusable by every call it is large enough for (one can serve all the linears
    of a frame, e.g. captured in a CUDA graph): partials, fp32 (any content), and counters, int32 arrival
    counters that must be zero when made (split-K; every call leaves them at zero); rstd, fp32 (any
    content), the rows' norm statistics on the tl.dot path (None: allocated per call). Calls sharing one
    must run in stream order."""
    partials: torch.Tensor
    counters: torch.Tensor
    rstd: torch.Tensor | None = None

    @staticmethod
    def covering(workspaces, device) -> "LinearWorkspace | None":
        """One new workspace as large as each of `workspaces` (None entries: calls that need none)."""
        ws = [w for w in workspaces if w is not None]
        if not ws:
            return None

        def size(name: str) -> int:
            return max((getattr(w, name).numel() for w in ws if getattr(w, name) is not None), default=0)

        rstd = size("rstd")
        return LinearWorkspace(torch.empty(size("partials"), dtype=torch.float32, device=device),
                               torch.zeros(size("counters"), dtype=torch.int32, device=device),
                               torch.empty(rstd, dtype=torch.float32, device=device) if rstd else None)


def linear_workspace(x: torch.Tensor, weight: torch.Tensor, *, epilogue: str = "none", norm: str | None = None
                     ) -> LinearWorkspace | None:
    """The scratch `linear(x, weight, ..., epilogue=epilogue, norm=norm)` needs, allocated on x's device, or
    None when that call needs none (no split-K, no norm on the tl.dot path). Only x's shape, dtype and
    device matter."""
    gate = epilogue == "silu_gate"
    (M, K), n_w = x.shape, weight.shape[0]
    N = n_w // 2 if gate else n_w
    cfg = _config(M, N, K, x.dtype, weight.dtype, gate, norm is not None, x.device)
    split, stats = cfg.split_k > 1, norm is not None and not cfg.gemv
    if M == 0 or N == 0 or not (split or stats):
        return None
    partials, counters = _split_needs(cfg, M, N, n_w) if split else (0, 0)
    return LinearWorkspace(torch.empty(partials, dtype=torch.float32, device=x.device),
                           torch.zeros(counters, dtype=torch.int32, device=x.device),
                           torch.empty(M, dtype=torch.float32, device=x.device) if stats else None)


def _split_scratch(workspace, cfg: LaunchConfig, M: int, N: int, n_w: int, device):
    """(part [SPLIT_K, M, N_w] fp32, counters) for a split-K call: views of the workspace, or new partials
    and the shared per-device counters."""
    need, tiles = _split_needs(cfg, M, N, n_w)
    if workspace is None:
        return torch.empty((cfg.split_k, M, n_w), device=device, dtype=torch.float32), shared_counters(device, tiles)
    for name, t, dtype, n in (("partials", workspace.partials, torch.float32, need),
                              ("counters", workspace.counters, torch.int32, tiles)):
        check_tensor(t, f"workspace.{name}", 1, (dtype,), device)
        if t.numel() < n or t.stride(0) != 1:
            raise ValueError(f"workspace.{name} must be contiguous with at least {n} elements for this call, got "
                             f"shape {list(t.shape)} (see linear_workspace)")
    return workspace.partials[:need].view(cfg.split_k, M, n_w), workspace.counters[:tiles]


def _rstd_scratch(workspace, M: int, device) -> torch.Tensor:
    """rstd [M] fp32 for the statistics launch: a view of the workspace's, or a new tensor."""
    if workspace is None or workspace.rstd is None:
        return torch.empty(M, device=device, dtype=torch.float32)
    check_tensor(workspace.rstd, "workspace.rstd", 1, (torch.float32,), device)
    if workspace.rstd.numel() < M or workspace.rstd.stride(0) != 1:
        raise ValueError(f"workspace.rstd must be contiguous with at least {M} elements for this call, got shape "
                         f"{list(workspace.rstd.shape)} (see linear_workspace)")
    return workspace.rstd[:M]


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


def _check_vector(t: torch.Tensor, name: str, n: int, dtypes, device, what: str) -> None:
    check_tensor(t, name, 1, dtypes, device)
    if t.shape[0] != n or (n > 1 and t.stride(0) != 1):
        raise ValueError(f"{name} must be a contiguous [{n}] vector ({what}), got shape {list(t.shape)} "
                         f"strides {t.stride()}")


def _check_norm(norm, alpha, K: int, device) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if norm is None:
        if alpha is not None:
            raise ValueError("norm_alpha given without a norm (norm=None)")
        return
    if alpha is None:
        raise ValueError(f"norm={norm!r} needs norm_alpha, the norm's weight of shape [{K}]")
    if not isinstance(alpha, torch.Tensor):
        raise TypeError(f"norm_alpha must be a torch.Tensor, got {type(alpha).__name__}")
    if alpha.dtype not in _FLOATS:
        raise ValueError(f"norm_alpha must have dtype in {[str(d) for d in _FLOATS]}, got {alpha.dtype}")
    if alpha.device != device:
        raise ValueError(f"norm_alpha is on {alpha.device}, expected {device}")
    if alpha.dim() == 0 or alpha.shape[-1] != K or alpha.numel() != K or (K > 1 and alpha.stride(-1) != 1):
        raise ValueError(f"norm_alpha must have shape [{K}] (or [1, 1, {K}]) with unit stride, to match x's "
                         f"K = {K}, got shape {list(alpha.shape)} strides {alpha.stride()}")
    min_k = 2 if norm == "var" else 1
    if K < min_k:
        raise ValueError(f"norm={norm!r} needs x with K >= {min_k} columns, got K = {K}")


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


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, *, norm: str | None = None, norm_alpha: torch.Tensor | None = None,
           norm_eps: float = 1e-8, residual: torch.Tensor | None = None, epilogue: str = "none",
           out: torch.Tensor | None = None, workspace: LinearWorkspace | None = None) -> torch.Tensor:
    """y = norm(x) @ W^T (+ bias) (gate) (+ residual), in x.dtype.

    x [M, K] fp32/bf16/fp16. weight [N_w, K] with unit stride along K (a row slice of a bigger
    tensor is fine): int8 with `scale` [N_w] fp32 (bitsandbytes' CB and SCB, W = CB * scale / 127),
    or dense fp32/bf16/fp16 with scale=None. bias [N_w].
    norm None, "rms" or "var" (module docstring) with norm_alpha [K] (or [1, 1, K]) and norm_eps.
    epilogue "none": y [M, N_w]. epilogue "silu_gate" (SwiGLU's linear_in, N_w = 2h): with
    u = norm(x) @ W^T (+ bias), y [M, h] = silu(u[:, :h]) * u[:, h:]. residual [M, N] is added last;
    `out` [M, N] may be `residual` itself (in place) but must not overlap any other input.
    workspace: scratch (`linear_workspace`); without it, split-K partials and norm statistics are allocated
    per call and the arrival counters come from a per-device buffer of zeros. One launch (two on the tl.dot path with
    a norm), no host synchronisation.
    """
    check_tensor(x, "x", 2, _FLOATS)
    device = x.device
    check_tensor(weight, "weight", 2, (torch.int8, *_FLOATS), device)
    M, K = x.shape
    n_w = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"weight must have shape [N, {K}] to match x {list(x.shape)}, got {list(weight.shape)}")
    if weight.stride(1) != 1 and n_w > 0 and K > 1:
        raise ValueError(f"weight must be contiguous along K (stride(1) == 1), got strides {weight.stride()}")
    quantized = weight.dtype == torch.int8
    if quantized:
        if scale is None:
            raise ValueError("int8 weight needs scale, its fp32 [N] row scales (bitsandbytes' SCB)")
        _check_vector(scale, "scale", n_w, (torch.float32,), device, "one scale per row of weight")
    elif scale is not None:
        raise ValueError(f"scale is only for int8 weight, got a {weight.dtype} weight")
    if bias is not None:
        _check_vector(bias, "bias", n_w, _FLOATS, device, "one per row of weight")
    _check_norm(norm, norm_alpha, K, device)
    if epilogue not in EPILOGUES:
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    gate = epilogue == "silu_gate"
    if gate and n_w % 2:
        raise ValueError(f"epilogue='silu_gate' needs an even number of weight rows (2 * hidden), got {n_w}")
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
        inputs = {"x": x, "weight": weight, "scale": scale, "bias": bias, "norm_alpha": norm_alpha}
        for name, t in inputs.items():
            if t is not None and _overlaps(out, t):
                raise ValueError(f"out must not overlap {name}")
        if residual is not None and _overlaps(out, residual) and (
                out.data_ptr() != residual.data_ptr() or out.stride() != residual.stride()
                or out.dtype != residual.dtype):
            raise ValueError("out may alias residual only exactly (same data pointer, strides and dtype), "
                             "not partially overlap it")
    if workspace is not None and not isinstance(workspace, LinearWorkspace):
        raise TypeError(f"workspace must be a LinearWorkspace (see linear_workspace), got {type(workspace).__name__}")
    if M == 0 or N == 0:
        return out

    cfg = _config(M, N, K, x.dtype, weight.dtype, gate, norm is not None, device)
    split = cfg.split_k > 1
    part, counters = _split_scratch(workspace, cfg, M, N, n_w, device) if split else (out, out)
    res = residual if residual is not None else out
    # absent scale / alpha / rstd / bias pointers are never dereferenced: x stands in for them
    scale_arg = scale if quantized else x
    alpha_arg = norm_alpha if norm is not None else x
    bias_arg = bias if bias is not None else x
    strides = (x.stride(0), x.stride(1), weight.stride(0), res.stride(0), res.stride(1), out.stride(0),
               out.stride(1), part.stride(0) if split else 0, part.stride(1) if split else 0)
    flags = dict(HAS_SCALE=quantized, GATE=gate, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None)
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split, **flags,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.gemv:
        _gemv_kernel[(cdiv(N, cfg.block_n), 1, cfg.split_k)](
            x, weight, scale_arg, alpha_arg, bias_arg, res, out, part, counters, M, N, K, cfg.k_per_split,
            float(norm_eps),
            *strides, NORM=norm or "none", NORM_BLOCK_K=cfg.norm_block_k, **meta)
        record_launch("linear.gemv")
    else:
        rstd = x
        if norm is not None:
            rstd = _rstd_scratch(workspace, M, device)
            _norm_stats_kernel[(M,)](x, rstd, M, K, float(norm_eps), x.stride(0), x.stride(1),
                                     NORM=norm, NORM_BLOCK_K=cfg.norm_block_k, num_warps=_NORM_NUM_WARPS)
            record_launch("linear.norm_stats")
        grid = (cdiv(N, cfg.block_n), cdiv(M, cfg.block_m), cfg.split_k)
        _mm_kernel[grid](x, weight, scale_arg, alpha_arg, rstd, bias_arg, res, out, part, counters, M, N, K,
                         cfg.k_per_split, *strides, HAS_NORM=norm is not None,
                         DOT_FP32=_dot_fp32(x.dtype, weight.dtype), **meta)
        record_launch("linear.mm")
    return out


def linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None, *, norm: str | None = None,
                     norm_alpha: torch.Tensor | None = None, norm_eps: float = 1e-8,
                     residual: torch.Tensor | None = None, epilogue: str = "none") -> torch.Tensor:
    """Plain PyTorch in fp32: the norm (rounded to x.dtype, as the model rounds it before its
    matmul), F.linear on the dequantised (CB * SCB / 127) or dense weight, bias, gate, residual;
    cast to x.dtype."""
    h = x.float()
    if norm is not None:
        s = h.pow(2).mean(-1, keepdim=True) if norm == "rms" else h.var(-1, unbiased=True, keepdim=True)
        h = (h * norm_alpha.float().reshape(-1) * torch.rsqrt(s + norm_eps)).to(x.dtype).float()
    w = weight.float() if scale is None else weight.float() * (scale.float() / 127)[:, None]
    u = F.linear(h, w, None if bias is None else bias.float())
    if epilogue == "silu_gate":
        a, b = u.chunk(2, dim=1)
        u = F.silu(a) * b
    if residual is not None:
        u = u + residual.float()
    return u.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Static audit: how each kernel is compiled at the real moshika-vis shapes (bf16 activations)
# ----------------------------------------------------------------------------------------------------

# (name, K, N_w, norm before it, epilogue, has_residual)
_AUDIT_SHAPES = [
    ("attn_in_proj", 4096, 12288, "rms", "none", False),
    ("attn_out_proj", 4096, 4096, None, "none", True),
    ("ffn_linear_in", 4096, 22528, "rms", "silu_gate", False),
    ("ffn_linear_out", 11264, 4096, None, "none", True),
    ("gate_alpha0", 4096, 512, None, "none", False),
    ("gate_alpha2", 512, 4096, None, "none", False),
    ("depformer_in", 4096, 1024, None, "none", False),
    ("dep_in_proj", 1024, 3072, "var", "none", False),
    ("dep_out_proj", 1024, 1024, None, "none", True),
    ("dep_linear_in", 1024, 5632, "var", "silu_gate", False),
    ("dep_linear_out", 2816, 1024, None, "none", True),
    ("audio_head", 1024, 2048, None, "none", False),
    ("text_head", 4096, 32000, "rms", "none", False),
]


def _case(name: str, fn, args: dict, meta: dict, num_warps: int, num_stages: int) -> dict:
    """An audit case: pointer and float args given as their type ("*bf16", "fp32"), integer args by
    value (`int_values`, which the audit specializes as a launch would: 1 -> constant, multiples of
    16 -> divisibility)."""
    signature = {k: (v if isinstance(v, str) else "i32") for k, v in args.items()}
    signature.update({k: "constexpr" for k in meta})
    return {"name": name, "fn": fn, "signature": signature, "constexprs": dict(meta),
            "int_values": {k: v for k, v in args.items() if not isinstance(v, str)},
            "num_warps": num_warps, "num_stages": num_stages}


def audit_cases() -> list[dict]:
    """Kernel compilations at the real shapes for M = 1 (GEMV) and M = 64 (tl.dot), bf16 activations,
    dense bf16 and int8 weights, contiguous tensors, with the configs `launch_config` picks for an
    H100 (132 SMs)."""
    cases = []
    for wname, wtype, quantized in (("bf16", "*bf16", False), ("int8", "*i8", True)):
        for name, K, n_w, norm, epilogue, has_res in _AUDIT_SHAPES:
            gate = epilogue == "silu_gate"
            N = n_w // 2 if gate else n_w
            for M in (1, 64):
                cfg = launch_config(M, N, K, gate=gate, weight_dtype=torch.int8 if quantized else torch.bfloat16,
                                    dot_fp32=False, norm=norm is not None)
                split = cfg.split_k > 1
                args = {"x_ptr": "*bf16", "w_ptr": wtype, "scale_ptr": "*fp32" if quantized else "*bf16",
                        "alpha_ptr": "*bf16", "rstd_ptr": "*fp32" if norm else "*bf16", "bias_ptr": "*bf16",
                        "res_ptr": "*bf16", "out_ptr": "*bf16", "part_ptr": "*fp32" if split else "*bf16",
                        "count_ptr": "*i32" if split else "*bf16",
                        "M": M, "N": N, "K": K, "k_per_split": cfg.k_per_split, "eps": "fp32",
                        "stride_xm": K, "stride_xk": 1, "stride_wn": K, "stride_rm": N, "stride_rn": 1,
                        "stride_om": N, "stride_on": 1, "stride_pk": M * n_w if split else 0,
                        "stride_pm": n_w if split else 0}
                flags = {"HAS_SCALE": quantized, "GATE": gate, "HAS_BIAS": False, "HAS_RESIDUAL": has_res}
                meta = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "SPLIT": split,
                        **flags}
                if cfg.gemv:
                    del args["rstd_ptr"]
                    meta.update(NORM=norm or "none", NORM_BLOCK_K=cfg.norm_block_k)
                else:
                    del args["eps"]
                    meta.update(HAS_NORM=norm is not None, DOT_FP32=False)
                kernel = "gemv" if cfg.gemv else "mm"
                tag = (f"{wname}.{name}.M{M}.{K}x{n_w}" + (f".{norm}" if norm else "")
                       + (f".split{cfg.split_k}" if split else ""))
                cases.append(_case(f"linear.{kernel}.{tag}", _gemv_kernel if cfg.gemv else _mm_kernel, args, meta,
                                   cfg.num_warps, cfg.num_stages))
                if norm and not cfg.gemv and quantized:  # the stats launch does not depend on the weights
                    args = {"x_ptr": "*bf16", "rstd_ptr": "*fp32", "M": M, "K": K, "eps": "fp32",
                            "stride_xm": K, "stride_xk": 1}
                    cases.append(_case(f"linear.norm_stats.{name}.M{M}.K{K}.{norm}", _norm_stats_kernel, args,
                                       {"NORM": norm, "NORM_BLOCK_K": cfg.norm_block_k}, _NORM_NUM_WARPS, 1))
    return cases
