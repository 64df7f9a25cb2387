"""One depformer codebook step for B streams in ONE persistent launch (SPEC.md §3, §6).

Step k of the 8 (k is a kernel argument, so all steps share one compiled kernel and one CUDA graph):
  x = depformer_in[k] h + E_k(prev)            E_0 = text table, E_k = audio table k-1; ids outside
                                               [0, rows) (the zero token -1) embed as zeros
  per layer l = 0..L-1:
    y = var_norm(x, norm1[l]);  q, K_k, V_k = y Wqkv[l, k]^T     (K_k, V_k written to cache entry k)
    x += attention(q, K_0..k, V_0..k) Wo[l, k]^T                 (causal over this frame's entries)
    y = var_norm(x, norm2[l]);  x += (silu(y Wg[l, k]^T) * y Wu[l, k]^T) Wd[l, k]^T
  logits = x Wa[k]^T                                            (no final norm)
var_norm(x, a) = x * a * rsqrt(var(x, unbiased) + 1e-8) per row, in fp32. Attention: softmax(q.K / sqrt(D)).

The step is 4L + 2 phases, each a tiled matmul with its prologue and epilogue fused:
  0       input: h Win^T + embedding                        -> x
  1 + 4l  norm1 stats + QKV                                  -> q, cache K/V entry k
  2 + 4l  attention (per head, online softmax) + out-proj + residual -> x
  3 + 4l  norm2 stats + linear_in + silu gate                -> g
  4 + 4l  linear_out + residual                              -> x
  4L + 1  audio head                                         -> logits
A phase reads whole rows of what the previous one wrote, so phases are separated by a device-wide
barrier. FUSED: one launch of a persistent grid (one program per SM, a cooperative launch so all
programs are resident) runs every phase, with a self-resetting grid barrier (atomic counter + spin)
between them. Not FUSED: one launch per phase, the same code. The Triton interpreter runs programs one
after another, so there a fused launch must have a single program (a spin would never end).

Stacked weight layout (contiguous; S steps = 8, L layers):
  depformer_in [S, dd, dim]            depformer_in.{s}.weight stacked over s
  text_emb     [text_rows, dd]         depformer_text_emb.weight
  audio_emb    [S - 1, audio_rows, dd] depformer_emb.{s}.weight stacked over s
  norm1, norm2 [L, dd]                 depformer.layers.{l}.norm{1,2}.alpha reshaped, stacked over l
  in_proj      [L, S * 3 * dd, dd]     self_attn.in_proj_weight stacked over l (step k: rows 3dd*k..)
  out_proj     [L, S * dd, dd]         self_attn.out_proj.weight stacked over l (step k: rows dd*k..)
  linear_in    [L, S, 2 * hidden, dd]  gating.{s}.linear_in.weight stacked over l then s
  linear_out   [L, S, dd, hidden]      gating.{s}.linear_out.weight stacked over l then s
  audio_linears [S, card, dd]          audio_linears.{s}.weight stacked over s
Dense: all bf16, fp16 or fp32, one dtype (norms: any float). INT8 (bitsandbytes row-wise): the six
projections are int8 CB, each with `<name>_scale`, its fp32 SCB stacked the same way (the weight's shape
without K), W = CB * SCB / 127; the tables and norms stay float. Int8 is converted in registers (exactly,
to fp32 for the FMA path, to the compute dtype for tl.dot) and the row scales multiply the fp32 sums once,
in each phase's epilogue, before residual and gate: (a CB^T) * SCB / 127, the model's INT8 linear.
Activations between phases live in an fp32 workspace (x [B, dd], q [B, dd], g [B, hidden]) and the
frame's K/V cache [L, 2, B, S, dd] (fp32 or 16-bit); matmul inputs are rounded to the compute dtype, the
tables' (= the float weights'), what the 16-bit model does; products are accumulated in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ._runtime import INTERPRET, cdiv, check_tensor, next_pow2, record_launch
from .linear import _to_f32
from .sampling import greedy_tokens, greedy_tokens_reference, sample_tokens, sample_tokens_reference

import triton  # noqa: E402  (after _runtime: it sets TRITON_INTERPRET when there is no GPU)
import triton.language as tl  # noqa: E402

EPS = 1e-8


# ---- device helpers ------------------------------------------------------------------------------
@triton.jit
def _grid_barrier(sync_ptr, nprog):
    """Generation-counter barrier over the whole grid: sync[0] counts arrivals, sync[1] is the generation.

    The last program to arrive resets the count, then bumps the generation (release); the others spin
    until they see it change (acquire). It leaves sync[0] == 0, so the buffer stays valid across launches
    and CUDA-graph replays. Scalar atomics run once per program; debug_barrier orders the program's
    other threads around them.
    """
    tl.debug_barrier()
    gen = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == nprog - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        while tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu") == gen:
            pass
    tl.debug_barrier()


@triton.jit
def _tile(t, B, N, BM: tl.constexpr, BN: tl.constexpr):
    """Rows and columns of tile t of a [B, N] output; the row block varies fastest, so programs
    running at the same time share weight columns (read from HBM once, then from L2)."""
    n_m = tl.cdiv(B, BM)
    offs_m = (t % n_m) * BM + tl.arange(0, BM)
    offs_n = (t // n_m) * BN + tl.arange(0, BN)
    return offs_m, offs_m < B, offs_n, offs_n < N


@triton.jit
def _mac(acc, a, w_ptr, stride_wn, offs_n, mask_n, offs_k, mask_k, CDT: tl.constexpr, USE_DOT: tl.constexpr,
         DOT_PRECISION: tl.constexpr):
    """acc[m, n] += sum_k a[m, k] * w[n, k] for an fp32 chunk a [BM, BK]; a is rounded to the compute dtype
    CDT first. w is float (CDT) or int8 (unscaled: the caller applies the row scales to the sum), converted
    in registers: int8 -> CDT is exact for a 16-bit or fp32 CDT. USE_DOT: tensor cores (BM >= 16); else
    broadcast FMAs, cheaper for a handful of rows."""
    if USE_DOT:
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a.to(CDT), w.to(CDT), acc, input_precision=DOT_PRECISION)
    else:
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0)
        a = a.to(CDT).to(tl.float32)
        acc += tl.sum(a[:, None, :] * _to_f32(w)[None, :, :], axis=2)
    return acc


@triton.jit
def _scaled(acc, scale_ptr, offs_n, mask_n, HAS_SCALE: tl.constexpr):
    """With INT8 weights, acc [BM, BN] times the rows' scales / 127 (W = CB * SCB / 127, applied once,
    to the fp32 sums); else acc."""
    if HAS_SCALE:
        acc = acc * (tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0) / 127.0)[None, :]
    return acc


@triton.jit
def _row_stats(a_ptr, stride_am, offs_m, mask_m, K, eps, BK: tl.constexpr):
    """Mean and rsqrt(unbiased variance + eps) of rows offs_m of a [*, K] fp32, in two passes."""
    total = tl.zeros([offs_m.shape[0]], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        total += tl.sum(tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=mask,
                                other=0.0, cache_modifier=".cg"), axis=1)
    mean = total / K
    m2 = tl.zeros([offs_m.shape[0]], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask = mask_m[:, None] & (offs_k < K)[None, :]
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=mask, other=0.0,
                    cache_modifier=".cg")
        d = tl.where(mask, a - mean[:, None], 0.0)
        m2 += tl.sum(d * d, axis=1)
    return mean, tl.math.rsqrt(m2 / (K - 1) + eps)


@triton.jit
def _linear(a_ptr, stride_am, w_ptr, scale_ptr, stride_wn, gate_rows, offs_m, mask_m, offs_n, mask_n, K,
            alpha_ptr, eps, NORM: tl.constexpr, GATE: tl.constexpr, BK: tl.constexpr, CDT: tl.constexpr,
            HAS_SCALE: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A [BM, BN] tile of a W^T (and, with GATE, of a W2^T where W2 = the rows gate_rows + n of w), with
    HAS_SCALE the int8 rows' scales (scale_ptr + n, and + gate_rows + n) applied.

    a [*, K] is read with .cg (it was written by other programs of this launch, so not from L1);
    NORM: a = var_norm(a, alpha) first (its statistics need a pass over the whole row).
    """
    if NORM:
        mean, rstd = _row_stats(a_ptr, stride_am, offs_m, mask_m, K, eps, BK)
    acc = tl.zeros([offs_m.shape[0], offs_n.shape[0]], tl.float32)
    acc2 = tl.zeros([offs_m.shape[0], offs_n.shape[0]], tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
        if NORM:
            alpha = tl.load(alpha_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            a = a * alpha[None, :] * rstd[:, None]
        acc = _mac(acc, a, w_ptr, stride_wn, offs_n, mask_n, offs_k, mask_k, CDT, USE_DOT, DOT_PRECISION)
        if GATE:
            acc2 = _mac(acc2, a, w_ptr + gate_rows * stride_wn, stride_wn, offs_n, mask_n, offs_k, mask_k,
                        CDT, USE_DOT, DOT_PRECISION)
    acc = _scaled(acc, scale_ptr, offs_n, mask_n, HAS_SCALE)
    if GATE:
        acc2 = _scaled(acc2, scale_ptr + gate_rows, offs_n, mask_n, HAS_SCALE)
    return acc, acc2


@triton.jit
def _attention_heads(q_ptr, k_ptr, v_ptr, stride_cb, offs_m, mask_m, head0, step, sm_scale,
                     DD: tl.constexpr, HEAD_DIM: tl.constexpr, BD: tl.constexpr, HB: tl.constexpr):
    """softmax(q.K_j * sm_scale) over cache entries j = 0..step, times V, for the HB heads head0.. :
    [BM, HB * BD] fp32, head head0 + i in columns i * BD .. (i + 1) * BD (zeros past HEAD_DIM).

    q [B, DD] fp32; K/V rows b at k_ptr/v_ptr + b * stride_cb + j * DD (entry j). Online softmax over
    the <= 8 entries keeps one entry in registers at a time.
    """
    offs_d = tl.arange(0, BD)
    cols = (head0 + tl.arange(0, HB))[:, None] * HEAD_DIM + offs_d[None, :]  # [HB, BD]
    mask = mask_m[:, None, None] & (offs_d < HEAD_DIM)[None, None, :]
    q = tl.load(q_ptr + offs_m[:, None, None] * DD + cols[None, :, :], mask=mask, other=0.0, cache_modifier=".cg")
    row = offs_m.to(tl.int64)[:, None, None] * stride_cb + cols[None, :, :]
    m_i = tl.full([offs_m.shape[0], HB], float("-inf"), tl.float32)
    l_i = tl.zeros([offs_m.shape[0], HB], tl.float32)
    acc = tl.zeros([offs_m.shape[0], HB, BD], tl.float32)
    for j in range(0, step + 1):
        kj = tl.load(k_ptr + row + j * DD, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        s = tl.sum(q * kj, axis=2) * sm_scale
        m_new = tl.maximum(m_i, s)
        c = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        vj = tl.load(v_ptr + row + j * DD, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
        acc = acc * c[:, :, None] + p[:, :, None] * vj
        l_i = l_i * c + p
        m_i = m_new
    return tl.reshape(acc / l_i[:, :, None], [offs_m.shape[0], HB * BD])


# ---- the kernel ----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["stride_pb", "step", "num_layers", "phase_lo", "phase_hi"])
def _depformer_step_kernel(
    h_ptr, stride_hb, prev_ptr, stride_pb,
    w_in_ptr, text_emb_ptr, text_rows, audio_emb_ptr, audio_rows,
    norm1_ptr, norm2_ptr, w_qkv_ptr, w_o_ptr, w_lin_in_ptr, w_lin_out_ptr, w_head_ptr,
    s_in_ptr, s_qkv_ptr, s_o_ptr, s_lin_in_ptr, s_lin_out_ptr, s_head_ptr,
    x_ptr, q_ptr, g_ptr, cache_ptr, logits_ptr, stride_lb, sync_ptr,
    B, step, num_layers, phase_lo, phase_hi, eps, sm_scale,
    DIM: tl.constexpr, DD: tl.constexpr, HID: tl.constexpr, CARD: tl.constexpr, STEPS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BD: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr,
    BN_IN: tl.constexpr, BN_QKV: tl.constexpr, BN_O: tl.constexpr, BN_FI: tl.constexpr,
    BN_FO: tl.constexpr, BN_HEAD: tl.constexpr, BK_IN: tl.constexpr, BK_QKV: tl.constexpr,
    BK_FI: tl.constexpr, BK_FO: tl.constexpr, BK_HEAD: tl.constexpr, HAS_SCALE: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, FUSED: tl.constexpr,
):
    """Phases [phase_lo, phase_hi) of codebook step `step` for B streams (phases: module docstring).

    h [B, DIM] (row stride stride_hb), prev [B] int tokens; weights in the stacked layout of the module
    docstring (contiguous, selected by `step` and the layer here, on the device): float, or with HAS_SCALE
    the six projections int8 and s_* their fp32 row scales (the weight's shape minus K); matmul inputs are
    rounded to the tables' dtype. Workspace x, q [B, DD], g [B, HID] fp32, cache [L, 2, B, STEPS, DD];
    logits [B, CARD] (row stride stride_lb); sync int32 [2].
    Every program walks the tiles of each phase with stride num_programs (a persistent grid).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_m = tl.cdiv(B, BM)
    k64 = step.to(tl.int64)
    cache_layer = 2 * B * STEPS * DD  # elements per layer of the cache
    cdt = text_emb_ptr.dtype.element_ty  # the compute dtype: the weights' own when they are float
    for p in range(phase_lo, phase_hi):
        if p == 0:  # x = h Win[k]^T + E_k(prev)
            w = w_in_ptr + k64 * DD * DIM
            if step == 0:
                table = text_emb_ptr
                rows = text_rows
            else:
                table = audio_emb_ptr + (k64 - 1) * audio_rows * DD
                rows = audio_rows
            for t in range(pid, n_m * tl.cdiv(DD, BN_IN), nprog):
                offs_m, mask_m, offs_n, mask_n = _tile(t, B, DD, BM, BN_IN)
                acc, _ = _linear(h_ptr, stride_hb, w, s_in_ptr + k64 * DD, DIM, 0, offs_m, mask_m, offs_n, mask_n,
                                 DIM, norm1_ptr, eps, False, False, BK_IN, cdt, HAS_SCALE, USE_DOT, DOT_PRECISION)
                tok = tl.load(prev_ptr + offs_m * stride_pb, mask=mask_m, other=-1).to(tl.int64)
                valid = mask_m & (tok >= 0) & (tok < rows)
                mask = mask_m[:, None] & mask_n[None, :]
                e = tl.load(table + tok[:, None] * DD + offs_n[None, :], mask=valid[:, None] & mask_n[None, :],
                            other=0.0)
                tl.store(x_ptr + offs_m[:, None] * DD + offs_n[None, :], acc + e.to(tl.float32), mask=mask)
        elif p == 4 * num_layers + 1:  # logits = x Wa[k]^T
            w = w_head_ptr + k64 * CARD * DD
            for t in range(pid, n_m * tl.cdiv(CARD, BN_HEAD), nprog):
                offs_m, mask_m, offs_n, mask_n = _tile(t, B, CARD, BM, BN_HEAD)
                acc, _ = _linear(x_ptr, DD, w, s_head_ptr + k64 * CARD, DD, 0, offs_m, mask_m, offs_n, mask_n, DD,
                                 norm1_ptr, eps, False, False, BK_HEAD, cdt, HAS_SCALE, USE_DOT, DOT_PRECISION)
                tl.store(logits_ptr + offs_m[:, None] * stride_lb + offs_n[None, :],
                         acc.to(logits_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
        else:
            l64 = tl.cast((p - 1) // 4, tl.int64)  # the layer
            kind = (p - 1) % 4
            k_cache = cache_ptr + l64 * cache_layer
            v_cache = k_cache + B * STEPS * DD
            ls = l64 * STEPS + k64  # (layer, step): the weights' matrix index
            if kind == 0:  # q, K_k, V_k = var_norm(x, norm1) Wqkv^T
                w = w_qkv_ptr + ls * 3 * DD * DD
                for t in range(pid, n_m * tl.cdiv(3 * DD, BN_QKV), nprog):
                    offs_m, mask_m, offs_n, mask_n = _tile(t, B, 3 * DD, BM, BN_QKV)
                    acc, _ = _linear(x_ptr, DD, w, s_qkv_ptr + ls * 3 * DD, DD, 0, offs_m, mask_m, offs_n, mask_n,
                                     DD, norm1_ptr + l64 * DD, eps, True, False, BK_QKV, cdt, HAS_SCALE, USE_DOT,
                                     DOT_PRECISION)
                    mask = mask_m[:, None] & mask_n[None, :]
                    which = offs_n // DD  # 0 q, 1 k, 2 v
                    tl.store(q_ptr + offs_m[:, None] * DD + offs_n[None, :], acc,
                             mask=mask & (which == 0)[None, :])
                    # K and V are DD columns apart in the workspace, as in the weight rows
                    kv = (k_cache + (which - 1)[None, :] * (B * STEPS * DD) + offs_m.to(tl.int64)[:, None]
                          * (STEPS * DD) + k64 * DD + (offs_n - which * DD)[None, :])
                    tl.store(kv, acc.to(cache_ptr.dtype.element_ty), mask=mask & (which > 0)[None, :])
            elif kind == 1:  # x += attention Wo^T
                w = w_o_ptr + ls * DD * DD
                for t in range(pid, n_m * tl.cdiv(DD, BN_O), nprog):
                    offs_m, mask_m, offs_n, mask_n = _tile(t, B, DD, BM, BN_O)
                    acc = tl.zeros([BM, BN_O], tl.float32)
                    # the Wo columns of HB heads at a time: head0 * HEAD_DIM + offs_k
                    hk = tl.arange(0, HB * BD)
                    if BD == HEAD_DIM:  # contiguous, which lets the weight loads be wide
                        offs_k, mask_k = hk, hk < HB * HEAD_DIM
                    else:
                        offs_k, mask_k = (hk // BD) * HEAD_DIM + hk % BD, hk % BD < HEAD_DIM
                    for head0 in range(0, DD // HEAD_DIM, HB):
                        attn = _attention_heads(q_ptr, k_cache, v_cache, STEPS * DD, offs_m, mask_m, head0, step,
                                                sm_scale, DD, HEAD_DIM, BD, HB)
                        acc = _mac(acc, attn, w + head0 * HEAD_DIM, DD, offs_n, mask_n, offs_k, mask_k, cdt,
                                   USE_DOT, DOT_PRECISION)
                    acc = _scaled(acc, s_o_ptr + ls * DD, offs_n, mask_n, HAS_SCALE)
                    ptrs = x_ptr + offs_m[:, None] * DD + offs_n[None, :]
                    mask = mask_m[:, None] & mask_n[None, :]
                    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg") + acc, mask=mask)
            elif kind == 2:  # g = silu(y Wg^T) * (y Wu^T), y = var_norm(x, norm2)
                w = w_lin_in_ptr + ls * 2 * HID * DD
                for t in range(pid, n_m * tl.cdiv(HID, BN_FI), nprog):
                    offs_m, mask_m, offs_n, mask_n = _tile(t, B, HID, BM, BN_FI)
                    a, b = _linear(x_ptr, DD, w, s_lin_in_ptr + ls * 2 * HID, DD, HID, offs_m, mask_m, offs_n,
                                   mask_n, DD, norm2_ptr + l64 * DD, eps, True, True, BK_FI, cdt, HAS_SCALE, USE_DOT,
                                   DOT_PRECISION)
                    tl.store(g_ptr + offs_m[:, None] * HID + offs_n[None, :], a * tl.sigmoid(a) * b,
                             mask=mask_m[:, None] & mask_n[None, :])
            else:  # x += g Wd^T
                w = w_lin_out_ptr + ls * DD * HID
                for t in range(pid, n_m * tl.cdiv(DD, BN_FO), nprog):
                    offs_m, mask_m, offs_n, mask_n = _tile(t, B, DD, BM, BN_FO)
                    acc, _ = _linear(g_ptr, HID, w, s_lin_out_ptr + ls * DD, HID, 0, offs_m, mask_m, offs_n, mask_n,
                                     HID, norm2_ptr, eps, False, False, BK_FO, cdt, HAS_SCALE, USE_DOT, DOT_PRECISION)
                    ptrs = x_ptr + offs_m[:, None] * DD + offs_n[None, :]
                    mask = mask_m[:, None] & mask_n[None, :]
                    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg") + acc, mask=mask)
        if FUSED:
            if p + 1 < phase_hi:
                _grid_barrier(sync_ptr, nprog)


# ---- launch configuration ------------------------------------------------------------------------
_GEMV_MAX_B = 8  # up to here broadcast FMAs; beyond, tl.dot with >= 16-row tiles
_GEMV_PRODUCTS = 8192  # BM * BN * BK per K-iteration of the FMA path (64 fp32 per thread at 4 warps)
_DEFAULT_SMS = 132  # H100 SXM, for the static audit


@dataclass(frozen=True)
class StepConfig:
    use_dot: bool
    bm: int
    bn: dict  # phase name -> BN
    bk: dict  # phase name -> BK (not "o": its K chunks are hb heads of bd columns)
    bd: int
    hb: int
    num_warps: int
    num_stages: int


def _pick_bn(n: int, m_tiles: int, nprog: int, lo: int, hi: int) -> int:
    """The BN in [lo, hi] (powers of two) that minimises the columns the busiest program computes,
    cdiv(tiles, nprog) * BN; larger BN on ties (fewer, wider weight reads)."""
    best, best_cost = lo, None
    bn = lo
    while bn <= hi:
        cost = cdiv(m_tiles * cdiv(n, bn), nprog) * bn
        if best_cost is None or cost <= best_cost:
            best, best_cost = bn, cost
        bn *= 2
    return best


@lru_cache(maxsize=None)
def _step_config(B: int, dim: int, dd: int, hidden: int, card: int, head_dim: int, nprog: int,
                 int8: bool = False) -> StepConfig:
    """Block sizes for every phase from the shapes and the grid size (no autotuning on the hot path).

    Small B is weight-read-bound: BN is chosen per phase so the weight rows spread over all programs.
    Dense weights: one BK for the phases that share a K. INT8 weights: BK per phase, at least 16 int8
    (128 bits) per thread along K in each weight tile, and as many bytes per FMA-path tile as bf16's;
    the out-projection takes hb heads per K chunk for the same reason.
    """
    use_dot = B > _GEMV_MAX_B
    if use_dot:
        bm = 16 if B <= 16 else (32 if B <= 32 else 64)
        bn_lo, bn_hi = 16, 64
        num_warps, num_stages = 8, 2
    else:
        bm = next_pow2(B)
        bn_lo, bn_hi = 4, 32
        num_warps, num_stages = 4, 1
    m_tiles = cdiv(B, bm)
    bn = {name: _pick_bn(n, m_tiles, nprog, bn_lo, bn_hi)
          for name, n in (("in", dd), ("qkv", 3 * dd), ("o", dd), ("ffn_in", hidden), ("ffn_out", dd),
                          ("head", card))}
    wide = 16 * 32 * num_warps  # weight elements per tile for 16 int8 (128 bits) per thread

    def bk(K: int, n: int) -> int:
        """BK for [n, BK] weight tiles over K columns."""
        if use_dot:  # INT8: 128-bit weight loads, but at most 128 columns beside 64-row activation tiles
            b = min(max(64, wide // n), 128 if bm == 64 else 1024) if int8 else 64
        elif int8:  # 128-bit loads, and as many bytes per tile as bf16 (twice the products)
            b = max(wide // n, min(1024, 2 * _GEMV_PRODUCTS // (bm * n)))
        else:
            b = min(512, _GEMV_PRODUCTS // (bm * n))
        return max(16, min(b, next_pow2(K)))

    n_dd = max(bn["qkv"], bn["ffn_in"], bn["head"])  # dense: one BK for the phases with K = dd, as before
    bks = {"in": bk(dim, bn["in"]), "ffn_out": bk(hidden, bn["ffn_out"]),
           **{name: bk(dd, bn[name] if int8 else n_dd) for name in ("qkv", "ffn_in", "head")}}
    bd = max(16, next_pow2(head_dim))
    hb = 1
    # registers: the attention holds four [bm, hb, bd] fp32 tiles at once
    while int8 and bn["o"] * hb * bd < wide and (dd // head_dim) % (2 * hb) == 0 and bm * 2 * hb * bd <= 8192:
        hb *= 2
    return StepConfig(use_dot, bm, bn, bks, bd, hb, num_warps=num_warps, num_stages=num_stages)


def _meta(cfg: StepConfig) -> dict:
    """The kernel's block-size constexprs."""
    return dict(BD=cfg.bd, HB=cfg.hb, BM=cfg.bm, BN_IN=cfg.bn["in"], BN_QKV=cfg.bn["qkv"], BN_O=cfg.bn["o"],
                BN_FI=cfg.bn["ffn_in"], BN_FO=cfg.bn["ffn_out"], BN_HEAD=cfg.bn["head"], BK_IN=cfg.bk["in"],
                BK_QKV=cfg.bk["qkv"], BK_FI=cfg.bk["ffn_in"], BK_FO=cfg.bk["ffn_out"], BK_HEAD=cfg.bk["head"],
                USE_DOT=cfg.use_dot)


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---- weights and workspace -----------------------------------------------------------------------
@dataclass(frozen=True)
class DepformerWeights:
    """The depformer's weights stacked over steps and layers (layout: module docstring).

    Dense: every tensor float, one dtype (norms: any float), no scales. INT8 (bitsandbytes row-wise): the
    six projections (`PROJECTIONS`) are int8 CB, each with `<name>_scale`, its fp32 SCB stacked the same
    way (the weight's shape without the last, K, dimension), W = CB * SCB / 127; the embedding tables
    stay float and their dtype is the compute dtype (what matmul inputs are rounded to).
    """
    depformer_in: torch.Tensor
    text_emb: torch.Tensor
    audio_emb: torch.Tensor
    norm1: torch.Tensor
    norm2: torch.Tensor
    in_proj: torch.Tensor
    out_proj: torch.Tensor
    linear_in: torch.Tensor
    linear_out: torch.Tensor
    audio_linears: torch.Tensor
    num_heads: int
    depformer_in_scale: torch.Tensor | None = None    # [S, dd]
    in_proj_scale: torch.Tensor | None = None         # [L, S * 3 * dd]
    out_proj_scale: torch.Tensor | None = None        # [L, S * dd]
    linear_in_scale: torch.Tensor | None = None       # [L, S, 2 * hidden]
    linear_out_scale: torch.Tensor | None = None      # [L, S, dd]
    audio_linears_scale: torch.Tensor | None = None   # [S, card]

    @property
    def steps(self) -> int:
        return self.depformer_in.shape[0]

    @property
    def dim(self) -> int:
        return self.depformer_in.shape[2]

    @property
    def dd(self) -> int:
        return self.depformer_in.shape[1]

    @property
    def num_layers(self) -> int:
        return self.norm1.shape[0]

    @property
    def hidden(self) -> int:
        return self.linear_out.shape[3]

    @property
    def card(self) -> int:
        return self.audio_linears.shape[1]

    @property
    def head_dim(self) -> int:
        return self.dd // self.num_heads

    @property
    def quantized(self) -> bool:
        """INT8 projections with row scales."""
        return self.depformer_in.dtype == torch.int8

    @property
    def compute_dtype(self) -> torch.dtype:
        """What matmul inputs are rounded to: the float weights' dtype (the embedding tables')."""
        return self.text_emb.dtype

    def validate(self) -> None:
        """Shapes consistent with the stacked layout, contiguous, one device; dtypes and scales as in the
        class docstring (dense: one float dtype; INT8: int8 projections, fp32 scales, float tables)."""
        check_tensor(self.depformer_in, "depformer_in", 3, (torch.int8, *_WEIGHT_DTYPES))
        dev, quantized = self.depformer_in.device, self.quantized
        check_tensor(self.text_emb, "text_emb", 2, _WEIGHT_DTYPES, dev)
        dtype, like = (self.text_emb.dtype, "text_emb") if quantized else (self.depformer_in.dtype, "depformer_in")
        for name, dims in _WEIGHT_RANKS.items():
            check_tensor(getattr(self, name), name, dims, (torch.int8, *_WEIGHT_DTYPES), dev)
        S, dd, dim = self.depformer_in.shape
        L, H, C = self.norm1.shape[0], self.linear_out.shape[3], self.audio_linears.shape[1]
        T, A = self.text_emb.shape[0], self.audio_emb.shape[1]
        want = {"depformer_in": (S, dd, dim), "text_emb": (T, dd), "audio_emb": (S - 1, A, dd), "norm1": (L, dd),
                "norm2": (L, dd), "in_proj": (L, S * 3 * dd, dd), "out_proj": (L, S * dd, dd),
                "linear_in": (L, S, 2 * H, dd), "linear_out": (L, S, dd, H), "audio_linears": (S, C, dd)}
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} (stacked layout), got {list(t.shape)}")
            if name in ("norm1", "norm2"):
                if t.dtype not in _WEIGHT_DTYPES:
                    raise ValueError(f"{name} must be float, got {t.dtype}")
            elif quantized and name in PROJECTIONS:
                if t.dtype != torch.int8:
                    raise ValueError(f"{name} has dtype {t.dtype}, expected torch.int8 like depformer_in (INT8 "
                                     f"weights: all of {list(PROJECTIONS)} int8, with scales)")
            elif t.dtype != dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype} like {like}")
            if not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous (the kernel computes its strides from the shape)")
        for name in PROJECTIONS:
            scale, key = getattr(self, f"{name}_scale"), f"{name}_scale"
            if not quantized:
                if scale is not None:
                    raise ValueError(f"{key} given for a dense ({self.depformer_in.dtype}) {name}: scales are "
                                     f"only for int8 weights")
                continue
            shape = want[name][:-1]
            if scale is None:
                raise ValueError(f"{key} is missing: int8 {name} needs its fp32 row scales (bitsandbytes' SCB) "
                                 f"of shape {list(shape)}")
            check_tensor(scale, key, len(shape), (torch.float32,), dev)
            if tuple(scale.shape) != shape or not scale.is_contiguous():
                raise ValueError(f"{key} must be contiguous with shape {list(shape)} (one scale per row of {name}), "
                                 f"got {list(scale.shape)}")
        if min(S - 1, dd - 1, dim, L, H, C, T, A) < 1:
            raise ValueError(f"degenerate depformer weights: steps {S}, dd {dd}, dim {dim}, layers {L}, "
                             f"hidden {H}, card {C}, text rows {T}, audio rows {A}")
        if self.num_heads < 1 or dd % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide the depformer dim {dd}")


PROJECTIONS = ("depformer_in", "in_proj", "out_proj", "linear_in", "linear_out", "audio_linears")
_WEIGHT_RANKS = {"text_emb": 2, "audio_emb": 3, "norm1": 2, "norm2": 2, "in_proj": 3, "out_proj": 3,
                 "linear_in": 4, "linear_out": 4, "audio_linears": 3}
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class DepformerWorkspace:
    """Per-frame device buffers for B streams: x, q [B, dd] and g [B, hidden] fp32, the K/V cache
    [L, 2, B, S, dd] and the grid barrier's counters sync int32 [2] (zero at allocation, zero after
    every launch). Allocate once and reuse (CUDA graphs need fixed addresses)."""
    x: torch.Tensor
    q: torch.Tensor
    g: torch.Tensor
    cache: torch.Tensor
    sync: torch.Tensor


def depformer_workspace(weights: DepformerWeights, batch: int, *, cache_dtype: torch.dtype = torch.float32
                        ) -> DepformerWorkspace:
    """A workspace for `batch` streams (the cache in fp32, or bf16 to halve its size and traffic)."""
    w = weights
    dev = w.depformer_in.device
    f32 = dict(dtype=torch.float32, device=dev)
    return DepformerWorkspace(
        x=torch.empty(batch, w.dd, **f32), q=torch.empty(batch, w.dd, **f32), g=torch.empty(batch, w.hidden, **f32),
        cache=torch.empty(w.num_layers, 2, batch, w.steps, w.dd, dtype=cache_dtype, device=dev),
        sync=torch.zeros(2, dtype=torch.int32, device=dev))


def _check_workspace(ws: DepformerWorkspace, w: DepformerWeights, B: int) -> None:
    dev = w.depformer_in.device
    for name, shape in (("x", (B, w.dd)), ("q", (B, w.dd)), ("g", (B, w.hidden))):
        t = getattr(ws, name)
        check_tensor(t, f"workspace.{name}", 2, (torch.float32,), dev)
        if tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"workspace.{name} must be contiguous with shape {list(shape)}, got {list(t.shape)}")
    check_tensor(ws.cache, "workspace.cache", 5, _WEIGHT_DTYPES, dev)
    if tuple(ws.cache.shape) != (w.num_layers, 2, B, w.steps, w.dd) or not ws.cache.is_contiguous():
        raise ValueError(f"workspace.cache must be contiguous with shape {[w.num_layers, 2, B, w.steps, w.dd]}, "
                         f"got {list(ws.cache.shape)}")
    check_tensor(ws.sync, "workspace.sync", 1, (torch.int32,), dev)
    if ws.sync.shape[0] != 2:
        raise ValueError(f"workspace.sync must have shape [2], got {list(ws.sync.shape)}")


# ---- public wrappers ---------------------------------------------------------------------------------
def _launch(w: DepformerWeights, step: int, h, prev, ws, out, phase_lo: int, phase_hi: int, fused: bool,
            nprog: int) -> None:
    B = h.shape[0]
    cfg = _step_config(B, w.dim, w.dd, w.hidden, w.card, w.head_dim, nprog, w.quantized)
    # dense weights have no scales: their pointers are never read, the weights stand in for them
    scales = [getattr(w, f"{name}_scale") if w.quantized else getattr(w, name) for name in PROJECTIONS]
    _depformer_step_kernel[(nprog,)](
        h, h.stride(0), prev, prev.stride(0),
        w.depformer_in, w.text_emb, w.text_emb.shape[0], w.audio_emb, w.audio_emb.shape[1],
        w.norm1, w.norm2, w.in_proj, w.out_proj, w.linear_in, w.linear_out, w.audio_linears, *scales,
        ws.x, ws.q, ws.g, ws.cache, out, out.stride(0), ws.sync,
        B, step, w.num_layers, phase_lo, phase_hi, EPS, w.head_dim ** -0.5,
        DIM=w.dim, DD=w.dd, HID=w.hidden, CARD=w.card, STEPS=w.steps, HEAD_DIM=w.head_dim, **_meta(cfg),
        HAS_SCALE=w.quantized, DOT_PRECISION="ieee" if w.compute_dtype == torch.float32 else "tf32",
        FUSED=fused, num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_cooperative_grid=fused)


def _programs(device: torch.device, fused: bool, num_programs: int | None) -> int:
    if num_programs is None:
        return 1 if INTERPRET else _sm_count(device)
    if num_programs < 1:
        raise ValueError(f"num_programs must be >= 1, got {num_programs}")
    if fused and INTERPRET and num_programs != 1:
        raise ValueError("a fused launch in the Triton interpreter must have num_programs=1 (programs run one "
                         "after another there, so a grid barrier between several would never open)")
    return num_programs


def num_phases(weights: DepformerWeights) -> int:
    """Phases of one step: launches per step when not fused."""
    return 4 * weights.num_layers + 2


def depformer_step(weights: DepformerWeights, step: int, h: torch.Tensor, prev: torch.Tensor,
                   workspace: DepformerWorkspace, *, out: torch.Tensor | None = None, fused: bool = True,
                   num_programs: int | None = None) -> torch.Tensor:
    """Codebook step `step` for B streams -> audio logits [B, card] (fp32 unless `out` is bf16/fp16).

    h [B, dim] the temporal output, prev [B] int32/int64 the previous token (text at step 0, audio
    token step-1 otherwise; -1 embeds as zeros). Writes K/V entry `step` of workspace.cache and reads
    entries 0..step-1 written by the earlier steps of this frame. fused: one launch (else one per phase,
    `num_phases`); num_programs: the persistent grid (default one per SM; 1 in the interpreter).
    No host synchronisation: capturable in a CUDA graph.
    """
    w = weights
    w.validate()
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < w.steps:
        raise ValueError(f"step must be an int in [0, {w.steps}), got {step!r}")
    dev = w.depformer_in.device
    check_tensor(h, "h", 2, _WEIGHT_DTYPES, dev)
    if h.shape[1] != w.dim or h.stride(1) != 1:
        raise ValueError(f"h must have shape [B, {w.dim}] with unit column stride, got {list(h.shape)} "
                         f"strides {list(h.stride())}")
    B = h.shape[0]
    check_tensor(prev, "prev", 1, (torch.int32, torch.int64), dev)
    if prev.shape[0] != B:
        raise ValueError(f"prev must have shape [{B}] (one token per row of h), got {list(prev.shape)}")
    _check_workspace(workspace, w, B)
    if out is None:
        out = torch.empty(B, w.card, dtype=torch.float32, device=dev)
    check_tensor(out, "out", 2, _WEIGHT_DTYPES, dev)
    if tuple(out.shape) != (B, w.card) or (w.card > 1 and out.stride(1) != 1):
        raise ValueError(f"out must have shape [{B}, {w.card}] with unit column stride, got {list(out.shape)}")
    nprog = _programs(dev, fused, num_programs)
    if B == 0:
        return out
    P = num_phases(w)
    if fused:
        _launch(w, step, h, prev, workspace, out, 0, P, True, nprog)
        record_launch("depformer_step")
    else:
        for p in range(P):
            _launch(w, step, h, prev, workspace, out, p, p + 1, False, nprog)
        record_launch("depformer_step", P)
    return out


def depformer_frame(weights: DepformerWeights, h: torch.Tensor, text: torch.Tensor,
                    workspace: DepformerWorkspace, *, temperature: torch.Tensor | None = None,
                    top_k: torch.Tensor | None = None, seed: torch.Tensor | None = None,
                    frame: torch.Tensor | None = None, forced: torch.Tensor | None = None,
                    logits_out: torch.Tensor | None = None, tokens_out: torch.Tensor | None = None,
                    fused: bool = True, num_programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All S codebook steps: (tokens [B, S] int64, logits [B, S, card] fp32).

    text [B]: the text token chosen for this frame (step 0's input). Token k is drawn by
    `moshivis_kernels.sampling.sample_tokens` with codebook 1 + k (temperature, top_k, seed, frame per
    row, as there), or is the argmax when temperature is None; with `forced` [B, 1 + S] (teacher
    forcing; column 0 is the text token, unused here) an entry forced[b, 1 + k] >= 0 replaces it. Per
    step: one depformer launch (fused) and one sampler launch; nothing is read back to the host.
    """
    w = weights
    B, S = h.shape[0], w.steps
    dev = w.depformer_in.device
    if forced is not None:
        check_tensor(forced, "forced", 2, (torch.int32, torch.int64), dev)
        if tuple(forced.shape) != (B, 1 + S):
            raise ValueError(f"forced must have shape [{B}, {1 + S}] (text + {S} audio tokens), got "
                             f"{list(forced.shape)}")
    sampled = (temperature, top_k, seed, frame)
    if any(t is not None for t in sampled) and any(t is None for t in sampled):
        raise ValueError("temperature, top_k, seed and frame must be given together (or none: greedy)")
    if logits_out is None:
        logits_out = torch.empty(B, S, w.card, dtype=torch.float32, device=dev)
    check_tensor(logits_out, "logits_out", 3, _WEIGHT_DTYPES, dev)
    if tuple(logits_out.shape) != (B, S, w.card):
        raise ValueError(f"logits_out must have shape [{B}, {S}, {w.card}], got {list(logits_out.shape)}")
    if tokens_out is None:
        tokens_out = torch.empty(B, S, dtype=torch.int64, device=dev)
    check_tensor(tokens_out, "tokens_out", 2, (torch.int64,), dev)
    if tuple(tokens_out.shape) != (B, S):
        raise ValueError(f"tokens_out must have shape [{B}, {S}], got {list(tokens_out.shape)}")
    prev = text
    for k in range(S):
        logits = depformer_step(w, k, h, prev, workspace, out=logits_out[:, k], fused=fused,
                                num_programs=num_programs)
        forced_k = None if forced is None else forced[:, 1 + k]
        if temperature is None:
            prev = greedy_tokens(logits, forced=forced_k, out=tokens_out[:, k])
        else:
            prev = sample_tokens(logits, temperature, top_k, seed, frame, 1 + k, forced=forced_k,
                                 out=tokens_out[:, k])
    return tokens_out, logits_out


# ---- references (plain PyTorch, fp32) -------------------------------------------------------------
def _var_norm(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x * alpha.float() * torch.rsqrt(x.var(-1, unbiased=True, keepdim=True) + EPS)


def _project(w: DepformerWeights, name: str, index: tuple, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T for the matrix W = w.<name>[index]: dense, or int8 as the model's INT8 linear has it, the
    row scales after the sum: (x @ CB^T) * SCB / 127, SCB = w.<name>_scale[index] (scales drop only K)."""
    y = x @ getattr(w, name)[index].float().T
    scale = getattr(w, f"{name}_scale")
    return y if scale is None else y * (scale[index] / 127)


def depformer_input_reference(w: DepformerWeights, step: int, h: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """depformer_in[step](h) + E_step(prev), ids outside the table -> zeros: [B, dd] fp32."""
    table = (w.text_emb if step == 0 else w.audio_emb[step - 1]).float()
    valid = (prev >= 0) & (prev < table.shape[0])
    e = torch.where(valid[:, None], table[prev.long().clamp(0, table.shape[0] - 1)], 0.0)
    return _project(w, "depformer_in", (step,), h.float()) + e


def depformer_attention_reference(w: DepformerWeights, layer: int, step: int, x: torch.Tensor,
                                  cache: torch.Tensor) -> torch.Tensor:
    """x + out_proj(attention) of layer `layer`; writes K/V entry `step` of cache [L, 2, B, S, dd]."""
    B, dd, H = x.shape[0], w.dd, w.num_heads
    qkv_rows = (layer, slice(3 * dd * step, 3 * dd * (step + 1)))
    q, k, v = _project(w, "in_proj", qkv_rows, _var_norm(x, w.norm1[layer])).split(dd, dim=-1)
    cache[layer, 0, :, step], cache[layer, 1, :, step] = k, v
    keys = cache[layer, 0, :, : step + 1].float().view(B, step + 1, H, -1)
    values = cache[layer, 1, :, : step + 1].float().view(B, step + 1, H, -1)
    scores = torch.einsum("bhd,bthd->bht", q.view(B, H, -1), keys) / (dd // H) ** 0.5
    attn = torch.einsum("bht,bthd->bhd", scores.softmax(-1), values).reshape(B, dd)
    return x + _project(w, "out_proj", (layer, slice(dd * step, dd * (step + 1))), attn)


def depformer_ffn_reference(w: DepformerWeights, layer: int, step: int, x: torch.Tensor) -> torch.Tensor:
    """x + linear_out(silu(u[:hidden]) * u[hidden:]), u = linear_in(var_norm(x, norm2))."""
    gate, up = _project(w, "linear_in", (layer, step), _var_norm(x, w.norm2[layer])).chunk(2, dim=-1)
    return x + _project(w, "linear_out", (layer, step), torch.nn.functional.silu(gate) * up)


def depformer_step_reference(w: DepformerWeights, step: int, h: torch.Tensor, prev: torch.Tensor,
                             cache: torch.Tensor) -> torch.Tensor:
    """depformer_step in fp32 PyTorch: audio logits [B, card]; writes K/V entry `step` of cache
    [L, 2, B, S, dd] (the workspace layout) and reads entries 0..step."""
    x = depformer_input_reference(w, step, h, prev)
    for layer in range(w.num_layers):
        x = depformer_attention_reference(w, layer, step, x, cache)
        x = depformer_ffn_reference(w, layer, step, x)
    return _project(w, "audio_linears", (step,), x)


def depformer_frame_reference(w: DepformerWeights, h: torch.Tensor, text: torch.Tensor, *,
                              temperature=None, top_k=None, seed=None, frame=None, forced=None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """depformer_frame in fp32 PyTorch (sampling by `sampling.sample_tokens_reference`, same uniforms)."""
    B, S = h.shape[0], w.steps
    cache = torch.zeros(w.num_layers, 2, B, S, w.dd, dtype=torch.float32, device=h.device)
    prev, tokens, logits = text, [], []
    for k in range(S):
        lk = depformer_step_reference(w, k, h, prev, cache)
        forced_k = None if forced is None else forced[:, 1 + k]
        if temperature is None:
            prev = greedy_tokens_reference(lk, forced=forced_k)
        else:
            prev = sample_tokens_reference(lk, temperature, top_k, seed, frame, 1 + k, forced=forced_k)
        tokens.append(prev)
        logits.append(lk)
    return torch.stack(tokens, dim=1), torch.stack(logits, dim=1)


# ---- static audit hook --------------------------------------------------------------------------------
def _signature(int8: bool) -> dict:
    sig = {}
    for name in ("h_ptr", "text_emb_ptr", "audio_emb_ptr", "norm1_ptr", "norm2_ptr"):
        sig[name] = "*bf16"
    for name in ("w_in_ptr", "w_qkv_ptr", "w_o_ptr", "w_lin_in_ptr", "w_lin_out_ptr", "w_head_ptr"):
        sig[name] = "*i8" if int8 else "*bf16"
    for name in ("s_in_ptr", "s_qkv_ptr", "s_o_ptr", "s_lin_in_ptr", "s_lin_out_ptr", "s_head_ptr"):
        sig[name] = "*fp32" if int8 else "*bf16"  # dense: the weights stand in (never read)
    sig["prev_ptr"] = "*i64"
    for name in ("x_ptr", "q_ptr", "g_ptr", "cache_ptr", "logits_ptr"):
        sig[name] = "*fp32"
    sig["sync_ptr"] = "*i32"
    for name in ("stride_hb", "stride_pb", "text_rows", "audio_rows", "stride_lb", "B", "step", "num_layers",
                 "phase_lo", "phase_hi"):
        sig[name] = "i32"
    sig["eps"] = sig["sm_scale"] = "fp32"
    return sig


def audit_cases() -> list[dict]:
    """The fused step at moshika-vis shapes (dim 4096, dd 1024, hidden 2816, 16 heads x 64, card 2048,
    8 steps, 6 layers, 32001 text rows), bf16 activations and tables, dense bf16 or INT8 weights, on 132
    SMs: B = 1 and 8 (FMA path), 17, 64, 160 and 256 (tl.dot path, 32- and 64-row tiles)."""
    dim, dd, hidden, card, heads, steps, layers, text_rows = 4096, 1024, 2816, 2048, 16, 8, 6, 32001
    cases = []
    for int8 in (False, True):
        for B in (1, 8, 17, 64, 160, 256):
            cfg = _step_config(B, dim, dd, hidden, card, dd // heads, _DEFAULT_SMS, int8)
            constexprs = dict(DIM=dim, DD=dd, HID=hidden, CARD=card, STEPS=steps, HEAD_DIM=dd // heads,
                              **_meta(cfg), HAS_SCALE=int8, DOT_PRECISION="tf32", FUSED=True)
            sig = _signature(int8)
            sig.update({name: "constexpr" for name in constexprs})
            cases.append({"name": f"depformer_step{'_int8' if int8 else ''}_b{B}", "fn": _depformer_step_kernel,
                          "signature": sig, "constexprs": constexprs, "num_warps": cfg.num_warps,
                          "num_stages": cfg.num_stages,
                          # as the runtime launches it: h rows of 4096, logits rows of 8 x 2048, int64 tokens
                          # in a column of its [B, 9] frame tokens, the tables' rows
                          "int_values": {"B": B, "stride_hb": dim, "stride_lb": steps * card, "stride_pb": steps + 1,
                                         "text_rows": text_rows, "audio_rows": card + 1, "num_layers": layers}})
    return cases
