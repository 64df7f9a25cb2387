"""Gated cross-attention to a pool of image K/V (SPEC.md §4.2, §5), one query token per stream.

For B streams, each with a slot into the static pool `image_kv [S, N, 2, H, D]` (-1 = no image) whose
image has n[slot] <= N tokens (`num_tokens [S]`; all N when not given):

    y    = x * alpha * rsqrt(mean(x^2) + eps)              (fp32, rounded to x's dtype)
    q    = y @ Wq^T                                        [B, H, D]
    attn = softmax(q . K[slot]^T / sqrt(D)) V[slot]        (keys 0 .. n[slot]-1, fp32 online softmax)
    a    = attn @ Wo^T
    g    = sigmoid(relu(a @ W0^T) @ W2^T - 4)
    out  = x + a * g    (rows with slot -1: out = x exactly)

Each weight is dense (x's dtype) or bitsandbytes' row-wise INT8: CB int8 [N, K] with SCB fp32 [N],
W = CB * SCB / 127. INT8 tiles are converted in registers (to fp32, or to x's dtype for tl.dot; both
exact) and the row scale is applied to the fp32 dot products in the epilogue (`HAS_SCALE`).

Five launches, in three public pieces (each with a `*_reference`):
  `norm_q_projection`  norm fused into the Q projection (one launch);
  `image_attention`    split-key attention; the last split of each (row chunk, head) to finish merges
                       the partials (an arrival counter, `_arrival.last_arrival`) (one launch);
  `gated_output`       out projection, gate hidden layer, gate output + residual (three launches: a
                       needs all of dim before W0, and the gate output needs all of relu(a W0^T); a
                       last-arriver fusion would leave one program per row tile reading all of W0,
                       or the partial products of every column tile, serially).
Intermediates are rounded to x's dtype where the model's reference rounds them (each linear's output,
the attention output, `- 4`, the sigmoid, `a * g`), so bf16 results track the bf16 reference.

No host synchronisation anywhere: rows without an image are skipped inside the kernels (a tile of
rows that all lack an image reads no weights), and streams sharing a slot are grouped inside the
attention kernel. Slot values must lie in [-1, S) and token counts in [1, N]: they cannot be checked
without a sync (an out-of-range slot reads out of bounds; counts are clamped to N).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ._arrival import last_arrival, shared_counters
from ._runtime import cdiv, check_tensor, next_pow2, record_launch

import triton  # noqa: E402  (after _runtime, which picks the interpreter)
import triton.language as tl  # noqa: E402

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SLOT_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634


# ---- kernels --------------------------------------------------------------------------------------
@triton.jit
def _rows_times_wt(x_ptr, stride_xb, rows, rows_ok, w_ptr, stride_wn, cols, cols_ok, K,
                   alpha_ptr, rstd, NORM: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[b, n] = sum_k xs[b, k] * w[n, k] in fp32 over one [BLOCK_B, BLOCK_N] tile.

    xs = x, or with NORM, x * alpha * rstd rounded to x's dtype (the norm's output). Each weight tile
    is loaded once for all BLOCK_B rows. GEMV (small tiles): [rows, 1, K] x [1, cols, K] products
    accumulated elementwise and reduced once at the end, loaded as 3-D tiles so the weights stay in
    their 16-byte load layout (no per-step layout change or cross-thread reduction). Tiles of 16 rows
    or more use tl.dot. Rows and columns outside the masks contribute zeros. int8 weights are
    converted to fp32 (GEMV) or to x's dtype (tl.dot), exact for |v| <= 127; unscaled.
    """
    if USE_DOT:
        acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            ks_ok = ks < K
            xs = tl.load(x_ptr + rows[:, None] * stride_xb + ks[None, :],
                         mask=rows_ok[:, None] & ks_ok[None, :], other=0.0)
            if NORM:
                alpha = tl.load(alpha_ptr + ks, mask=ks_ok, other=0.0).to(tl.float32)
                xs = (xs.to(tl.float32) * alpha[None, :] * rstd[:, None]).to(x_ptr.dtype.element_ty)
            w = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :],
                        mask=cols_ok[:, None] & ks_ok[None, :], other=0.0)
            acc = tl.dot(xs, tl.trans(w.to(xs.dtype)), acc, input_precision=DOT_PRECISION)
    else:
        acc3 = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = (k0 + tl.arange(0, BLOCK_K))[None, None, :]
            ks_ok = ks < K
            xs = tl.load(x_ptr + rows[:, None, None] * stride_xb + ks,
                         mask=rows_ok[:, None, None] & ks_ok, other=0.0)
            if NORM:
                alpha = tl.load(alpha_ptr + ks, mask=ks_ok, other=0.0).to(tl.float32)
                xs = (xs.to(tl.float32) * alpha * rstd[:, None, None]).to(x_ptr.dtype.element_ty)
            w = tl.load(w_ptr + cols[None, :, None] * stride_wn + ks,
                        mask=cols_ok[None, :, None] & ks_ok, other=0.0)
            acc3 += xs.to(tl.float32) * w.to(tl.float32)
        acc = tl.sum(acc3, axis=2)
    return acc


@triton.jit
def _scaled(acc, scale_ptr, cols, cols_ok, HAS_SCALE: tl.constexpr):
    """acc * SCB[n] / 127 per output column n for int8 weights (HAS_SCALE), else acc."""
    if HAS_SCALE:
        acc = acc * (tl.load(scale_ptr + cols, mask=cols_ok, other=0.0) / 127.0)[None, :]
    return acc


@triton.jit
def _rows_linear_kernel(x_ptr, alpha_ptr, w_ptr, scale_ptr, out_ptr, slots_ptr, gate_mean_ptr,
                        B, N, K, stride_xb, stride_wn, stride_ob, eps,
                        NORM: tl.constexpr, RELU: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_SCALE: tl.constexpr,
                        ZERO_GATE_MEAN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[b, n] = act(xs[b] . W[n]) for x [B, K], W [N, K] (row stride stride_wn), out [B, N].

    xs = rms_norm(x) * alpha with NORM (eps, fp32, rounded to x's dtype), else x; act = relu with RELU.
    W dense (x's dtype), or int8 with HAS_SCALE and scale [N] fp32 (W = CB * scale / 127).
    With HAS_SLOTS, rows whose slot is < 0 are not computed and get zeros. ZERO_GATE_MEAN: the
    programs of column tile 0 zero gate_mean [B] (the gate kernel, launched later, adds into it).
    Grid (cdiv(N, BLOCK_N), cdiv(B, BLOCK_B)).
    """
    pid_n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_in = rows < B
    rows_ok = rows_in
    if HAS_SLOTS:
        rows_ok = rows_in & (tl.load(slots_ptr + rows, mask=rows_in, other=-1) >= 0)
    if ZERO_GATE_MEAN:
        tl.store(gate_mean_ptr + rows, tl.zeros((BLOCK_B,), tl.float32), mask=rows_in & (pid_n == 0))
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < N

    acc = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    if tl.sum(rows_ok.to(tl.int32), 0) > 0:  # a tile of rows without images reads no weights
        rstd = tl.zeros((BLOCK_B,), tl.float32)
        if NORM:
            ss = tl.zeros((BLOCK_B,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                xk = tl.load(x_ptr + rows[:, None] * stride_xb + ks[None, :],
                             mask=rows_ok[:, None] & (ks < K)[None, :], other=0.0).to(tl.float32)
                ss += tl.sum(xk * xk, axis=1)
            rstd = tl.rsqrt(ss / K + eps)
        acc = _rows_times_wt(x_ptr, stride_xb, rows, rows_ok, w_ptr, stride_wn, cols, cols_ok, K,
                             alpha_ptr, rstd, NORM, BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, DOT_PRECISION)
        acc = _scaled(acc, scale_ptr, cols, cols_ok, HAS_SCALE)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=rows_in[:, None] & cols_ok[None, :])


@triton.jit
def _merge_splits(stats_ptr, acc_ptr, rows, rows_ok, head, n_splits, stride_sb, stride_sh, stride_ss,
                  stride_ab, stride_ah, stride_as, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """[rows, HEAD_DIM]: sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (M = max_s m_s) over the splits'
    partials of each row, added in split order. Split 0 saw a key (an image has >= 1 token), so M is
    finite; a split that saw none (m = -inf, l = 0, acc = 0) adds zeros."""
    s = tl.arange(0, BLOCK_S)
    stats = stats_ptr + rows[:, None] * stride_sb + head * stride_sh + s[None, :] * stride_ss
    ok = rows_ok[:, None] & (s < n_splits)[None, :]
    m = tl.load(stats, mask=ok, other=float("-inf"))
    m_max = tl.where(rows_ok, tl.max(m, axis=1), 0.0)
    den = tl.sum(tl.exp2(m - m_max[:, None]) * tl.load(stats + 1, mask=ok, other=0.0), axis=1)
    d = tl.arange(0, HEAD_DIM)
    num = tl.zeros((rows.shape[0], HEAD_DIM), tl.float32)
    for i in range(n_splits):  # one [rows, HEAD_DIM] partial at a time: registers stay flat in the splits
        m_i = tl.load(stats_ptr + rows * stride_sb + head * stride_sh + i * stride_ss, mask=rows_ok, other=0.0)
        acc = tl.load(acc_ptr + (rows * stride_ab + head * stride_ah + i * stride_as)[:, None] + d[None, :],
                      mask=rows_ok[:, None], other=0.0)
        num += tl.exp2(m_i - m_max)[:, None] * acc
    return num / tl.where(rows_ok, den, 1.0)[:, None]


@triton.jit
def _attention_kernel(q_ptr, kv_ptr, slots_ptr, ntok_ptr, stats_ptr, acc_ptr, count_ptr, out_ptr,
                      B, N, keys_per_split, qk_scale,
                      stride_qb, stride_qh, stride_ks, stride_kn, stride_k2, stride_kh,
                      stride_sb, stride_sh, stride_ss, stride_ab, stride_ah, stride_as,
                      stride_cb, stride_ob, stride_oh,
                      HAS_COUNTS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_ALL: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Attention of one head over one split of the keys for a group of rows; the last split merges.

    q [B, H, D]; kv [S, N, 2, H, D]; slots [B]; ntok [S] (HAS_COUNTS: the slot's image has its first
    ntok[slot] of the N tokens, the rest is masked; otherwise all N); out [B, H, D] (q's dtype). Grid
    (B, H, splits). A row without an image gets zeros (from its split-0 program). Program (b, h, s)
    otherwise works only if row b is the first of a chunk of BLOCK_R rows with the same slot (in row
    order): it then reads the image's keys among [s * keys_per_split, (s + 1) * keys_per_split) of head
    h of that slot once for the whole chunk, so streams sharing an image share its K/V reads (a split
    past the image's last token reads nothing and contributes nothing). For each row r of the chunk it
    writes, in the log2 domain (qk_scale = log2(e) / sqrt(D)):
        stats[r, h, s] = (m, l) = (max_j z_j, sum_j 2^(z_j - m)),  acc[r, h, s] = sum_j 2^(z_j - m) V_j
    with z_j = q_r . K_j * qk_scale. As in flash-attention, the probabilities are rounded to V's dtype
    for the P @ V product (fp32 accumulation). The last of the chunk's splits to arrive at
    count[b, h] (row stride stride_cb) merges them into out (`_merge_splits`, BLOCK_S >= splits).
    """
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    d = tl.arange(0, HEAD_DIM)
    slot = tl.load(slots_ptr + pid_b)
    if slot < 0:
        tl.store(out_ptr + pid_b * stride_ob + head * stride_oh + d, tl.zeros((HEAD_DIM,), out_ptr.dtype.element_ty),
                 mask=(d < HEAD_DIM) & (split == 0))
        return
    everyone = tl.arange(0, BLOCK_ALL)
    same = (tl.load(slots_ptr + everyone, mask=everyone < B, other=-1) == slot).to(tl.int32)
    rank = tl.sum(tl.where(everyone < pid_b, same, 0), axis=0)  # rows with this slot before pid_b
    if rank % BLOCK_R != 0:
        return
    # The chunk: rows whose rank among this slot's rows is rank .. rank + BLOCK_R - 1.
    ranks = tl.cumsum(same, axis=0) - 1
    hit = (same[None, :] == 1) & (ranks[None, :] == rank + tl.arange(0, BLOCK_R)[:, None])
    rows = tl.sum(tl.where(hit, everyone[None, :], 0), axis=1)
    rows_ok = tl.sum(hit.to(tl.int32), axis=1) > 0

    q = tl.load(q_ptr + rows[:, None] * stride_qb + head * stride_qh + d[None, :],
                mask=rows_ok[:, None], other=0.0)
    k_base = kv_ptr + slot.to(tl.int64) * stride_ks + head * stride_kh
    n_keys = N
    if HAS_COUNTS:
        n_keys = tl.minimum(tl.load(ntok_ptr + slot), N).to(tl.int32)
    start = split * keys_per_split
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, HEAD_DIM), tl.float32)
    # Only blocks holding keys of the image are visited, so m_i is finite after the first one; the last
    # block may be partly past n_keys (those p = 0). A split with no key keeps m = -inf, l = 0, acc = 0.
    for j in range(0, tl.minimum(keys_per_split, n_keys - start), BLOCK_N):
        n = start + j + tl.arange(0, BLOCK_N)
        n_ok = n < n_keys
        offs = n[:, None] * stride_kn + d[None, :]
        k = tl.load(k_base + offs, mask=n_ok[:, None], other=0.0)
        v = tl.load(k_base + stride_k2 + offs, mask=n_ok[:, None], other=0.0)
        z = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        z = tl.where(n_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        rescale = tl.exp2(m_i - m_new)
        p = tl.exp2(z - m_new[:, None])
        l_i = l_i * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    stats = stats_ptr + rows * stride_sb + head * stride_sh + split * stride_ss
    tl.store(stats, m_i, mask=rows_ok)
    tl.store(stats + 1, l_i, mask=rows_ok)
    tl.store(acc_ptr + (rows * stride_ab + head * stride_ah + split * stride_as)[:, None] + d[None, :],
             acc, mask=rows_ok[:, None])
    if last_arrival(count_ptr + pid_b * stride_cb + head, tl.num_programs(2)):
        out = _merge_splits(stats_ptr, acc_ptr, rows, rows_ok, head, tl.num_programs(2), stride_sb, stride_sh,
                            stride_ss, stride_ab, stride_ah, stride_as, HEAD_DIM, BLOCK_S)
        tl.store(out_ptr + (rows * stride_ob + head * stride_oh)[:, None] + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None])


@triton.jit
def _gate_residual_kernel(h_ptr, w2_ptr, scale_ptr, a_ptr, x_ptr, slots_ptr, out_ptr, gate_mean_ptr,
                          B, N, G, stride_hb, stride_wn, stride_ab, stride_xb, stride_ob,
                          HAS_GATE_MEAN: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_B: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_DOT: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """out = x + a * sigmoid(h @ W2^T - 4) for rows with slot >= 0, out = x (bit for bit) otherwise.

    h [B, G], W2 [N, G] (dense, or int8 with HAS_SCALE and scale [N] fp32), a, x, out [B, N] (out may
    be x: each element is read, then written, by the same program). With HAS_GATE_MEAN, gate_mean[b]
    += sum over this tile's columns of g / N (zeroed by the out-projection launch).
    Grid (cdiv(N, BLOCK_N), cdiv(B, BLOCK_B)).
    """
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_in = rows < B
    rows_ok = rows_in & (tl.load(slots_ptr + rows, mask=rows_in, other=-1) >= 0)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < N

    z = tl.zeros((BLOCK_B, BLOCK_N), tl.float32)
    if tl.sum(rows_ok.to(tl.int32), 0) > 0:
        z = _rows_times_wt(h_ptr, stride_hb, rows, rows_ok, w2_ptr, stride_wn, cols, cols_ok, G,
                           h_ptr, z, False, BLOCK_B, BLOCK_N, BLOCK_K, USE_DOT, DOT_PRECISION)  # no norm
        z = _scaled(z, scale_ptr, cols, cols_ok, HAS_SCALE)
    dt = x_ptr.dtype.element_ty
    tile = rows_in[:, None] & cols_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xb + cols[None, :], mask=tile, other=0.0)
    a = tl.load(a_ptr + rows[:, None] * stride_ab + cols[None, :], mask=tile, other=0.0)
    g = tl.sigmoid((z.to(dt).to(tl.float32) - 4.0).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    y = (x.to(tl.float32) + (a.to(tl.float32) * g).to(dt).to(tl.float32)).to(dt)
    tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :], tl.where(rows_ok[:, None], y, x), mask=tile)
    if HAS_GATE_MEAN:
        g_sum = tl.sum(tl.where(rows_ok[:, None] & cols_ok[None, :], g, 0.0), axis=1)
        tl.atomic_add(gate_mean_ptr + rows, g_sum / N, mask=rows_ok)


# ---- launch configuration -------------------------------------------------------------------------
_DEFAULT_SMS = 132  # H100 SXM; the interpreter and the audit use it


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands keep full fp32 products, as the reference (tl.dot would round them to tf32);
    bf16/fp16 operands ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _linear_config(B: int, N: int, K: int, num_sms: int = _DEFAULT_SMS) -> dict:
    """Row tile, column tile and K chunk for an [B, K] x [N, K]^T product.

    Up to 8 rows: one tile of all rows, broadcast multiply-reduce (GEMV: every weight is read once).
    More rows: tl.dot on tiles of 16..64 rows. Column tiles shrink until there are about two programs
    per SM; the GEMV's K chunk keeps its [rows, cols, K] product at 8192 elements (64 per thread).
    """
    use_dot = B > 8
    block_b = min(64, max(16, next_pow2(B))) if use_dot else next_pow2(B)
    row_tiles = cdiv(B, block_b)
    min_n = 16 if use_dot else 4
    block_n = max(min_n, min(64, next_pow2(N)))
    while block_n > min_n and cdiv(N, block_n) * row_tiles < 2 * num_sms:
        block_n //= 2
    if use_dot:
        block_k = max(16, min(128, next_pow2(K)))
    else:
        block_k = max(16, min(next_pow2(K), 8192 // (block_b * block_n)))
    return dict(BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, USE_DOT=use_dot,
                num_warps=4, num_stages=3 if use_dot else 2)


def _attention_config(B: int, H: int, N: int, num_sms: int = _DEFAULT_SMS) -> dict:
    """Key block, split count and keys per split for the split-key attention.

    Chunks of 16 rows sharing a slot (tl.dot needs 16). Splits: enough (batch x heads x splits)
    programs for about four per SM if every row had its own image, at least 4 and at most one per key
    block; keys_per_split is a multiple of BLOCK_N and no split is empty.
    """
    block_n = max(16, min(64, next_pow2(N)))
    blocks = cdiv(N, block_n)
    splits = min(blocks, max(4, min(16, next_pow2(cdiv(4 * num_sms, B * H)))))
    keys_per_split = cdiv(blocks, splits) * block_n
    splits = cdiv(N, keys_per_split)
    return dict(BLOCK_R=16, BLOCK_ALL=max(16, next_pow2(B)), BLOCK_N=block_n, splits=splits,
                keys_per_split=keys_per_split, num_warps=4, num_stages=2)


def _max_splits(H: int, N: int) -> int:
    """The most splits any batch size gets (B = 1): what a reusable workspace must hold."""
    return _attention_config(1, H, N)["splits"]


# ---- workspace ------------------------------------------------------------------------------------
@dataclass
class CrossAttentionWorkspace:
    """Scratch for `gated_cross_attention`, reusable by every call with batch <= its batch (views of
    the first rows are used), e.g. preallocated once for a CUDA graph.

    q, attn, a [batch, dim] and h [batch, G] in the activations' dtype; stats [batch, H, splits, 2]
    (running max and sum) and acc [batch, H, splits, D] are the attention's fp32 partials; counters
    [batch, H] int32 its arrival counters, zero when made and left at zero by every call (calls sharing
    a workspace must run in stream order).
    """
    q: torch.Tensor
    attn: torch.Tensor
    a: torch.Tensor
    h: torch.Tensor
    stats: torch.Tensor
    acc: torch.Tensor
    counters: torch.Tensor


def cross_attention_workspace(batch: int, dim: int, num_heads: int, n_keys: int, gate_dim: int,
                              dtype: torch.dtype, device) -> CrossAttentionWorkspace:
    """A workspace for up to `batch` streams (image K/V of n_keys tokens, gate hidden size gate_dim)."""
    splits, head_dim = _max_splits(num_heads, n_keys), dim // num_heads
    act = dict(dtype=dtype, device=device)
    f32 = dict(dtype=torch.float32, device=device)
    return CrossAttentionWorkspace(
        q=torch.empty(batch, dim, **act), attn=torch.empty(batch, dim, **act),
        a=torch.empty(batch, dim, **act), h=torch.empty(batch, gate_dim, **act),
        stats=torch.empty(batch, num_heads, splits, 2, **f32),
        acc=torch.empty(batch, num_heads, splits, head_dim, **f32),
        counters=torch.zeros(batch, num_heads, dtype=torch.int32, device=device))


def _scratch(workspace, field: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """workspace.<field> cut to `shape` (each dimension at least as large), or a new tensor."""
    if workspace is None:
        return torch.empty(shape, dtype=dtype, device=device)
    t = getattr(workspace, field)
    check_tensor(t, f"workspace.{field}", len(shape), (dtype,), device)
    if any(have < need for have, need in zip(t.shape, shape)) or t.stride(-1) != 1:
        raise ValueError(f"workspace.{field} has shape {list(t.shape)} (stride {t.stride()}), needs at "
                         f"least {list(shape)} with a contiguous last dimension")
    return t[tuple(slice(0, n) for n in shape)]


# ---- input checks ---------------------------------------------------------------------------------
def _check_rows(t, name: str, shape: tuple, dtype: torch.dtype, device) -> None:
    """A tensor of exactly `shape` and `dtype` on `device` whose last dimension is contiguous."""
    check_tensor(t, name, len(shape), (dtype,), device)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def _check_x(x) -> tuple[int, int]:
    check_tensor(x, "x", 2, _FLOAT_DTYPES)
    if x.shape[0] < 1 or x.stride(-1) != 1:
        raise ValueError(f"x must have at least one row and a contiguous last dimension, got shape "
                         f"{list(x.shape)}, strides {x.stride()}")
    return x.shape


def _check_alpha(norm_alpha, dim: int, device) -> None:
    check_tensor(norm_alpha, "norm_alpha", norm_alpha.dim(), _FLOAT_DTYPES, device)
    if norm_alpha.numel() != dim or norm_alpha.reshape(-1).stride(0) != 1:
        raise ValueError(f"norm_alpha must hold {dim} contiguous values (e.g. shape [{dim}] or "
                         f"[1, 1, {dim}]), got shape {list(norm_alpha.shape)}")


def _check_slots(slots, B: int, device) -> None:
    check_tensor(slots, "slots", 1, _SLOT_DTYPES, device)
    if tuple(slots.shape) != (B,) or slots.stride(0) != 1:
        raise ValueError(f"slots must be a contiguous [{B}] tensor (one per row), got shape {list(slots.shape)}")


def _check_num_tokens(num_tokens, S: int, device) -> None:
    if num_tokens is not None:
        check_tensor(num_tokens, "num_tokens", 1, _SLOT_DTYPES, device)
        if tuple(num_tokens.shape) != (S,) or num_tokens.stride(0) != 1:
            raise ValueError(f"num_tokens must be a contiguous [{S}] tensor (one per image_kv slot), got shape "
                             f"{list(num_tokens.shape)}")


def _check_image_kv(image_kv, H: int, D: int, dtype: torch.dtype, device) -> None:
    check_tensor(image_kv, "image_kv", 5, (dtype,), device)
    if tuple(image_kv.shape[2:]) != (2, H, D) or image_kv.shape[1] < 1 or image_kv.stride(-1) != 1:
        raise ValueError(f"image_kv must have shape [S, N >= 1, 2, {H}, {D}] with a contiguous last "
                         f"dimension, got shape {list(image_kv.shape)}, strides {image_kv.stride()}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"image_kv head_dim must be a power of two >= 16, got {D}")


def _check_weight(w, name: str, shape: tuple, scale, x) -> None:
    """A weight of `shape` in x's dtype with scale None, or int8 with its row scales `<name>_scale`
    (fp32 [shape[0]], contiguous)."""
    check_tensor(w, name, len(shape), (x.dtype, torch.int8), x.device)
    _check_rows(w, name, shape, w.dtype, x.device)
    if w.dtype == torch.int8:
        if scale is None:
            raise ValueError(f"int8 {name} needs {name}_scale, its fp32 [{shape[0]}] row scales (bitsandbytes' SCB)")
        _check_rows(scale, f"{name}_scale", shape[:1], torch.float32, x.device)
    elif scale is not None:
        raise ValueError(f"{name}_scale is only for an int8 {name}, got a {w.dtype} {name}")


def _check_gate(x, wo, gate_w0, gate_w2, out, gate_mean, wo_scale, gate_w0_scale, gate_w2_scale) -> None:
    B, dim = x.shape
    _check_weight(wo, "wo", (dim, dim), wo_scale, x)
    check_tensor(gate_w0, "gate_w0", 2, (x.dtype, torch.int8), x.device)
    G = gate_w0.shape[0]
    _check_weight(gate_w0, "gate_w0", (G, dim), gate_w0_scale, x)
    _check_weight(gate_w2, "gate_w2", (dim, G), gate_w2_scale, x)
    if out is not None:
        _check_rows(out, "out", (B, dim), x.dtype, x.device)
        same_view = out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
        if not same_view and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            raise ValueError("out must be x itself or not share memory with x")
    if gate_mean is not None:
        _check_rows(gate_mean, "gate_mean", (B,), torch.float32, x.device)


# ---- piece 1: norm + shared Q projection ---------------------------------------------------------
def norm_q_projection(x: torch.Tensor, norm_alpha: torch.Tensor, wq: torch.Tensor, *, eps: float = 1e-8,
                      slots: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      wq_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q = (rms_norm(x) * alpha) @ Wq^T: x [B, dim], norm_alpha (dim values), wq [dim, dim] (any row
    stride, e.g. the first rows of in_proj_weight; int8 with wq_scale fp32 [dim]) -> q [B, dim] in x's
    dtype. With slots [B], rows whose slot is < 0 are not computed and get zeros. One launch."""
    B, dim = _check_x(x)
    _check_alpha(norm_alpha, dim, x.device)
    _check_weight(wq, "wq", (dim, dim), wq_scale, x)
    if slots is not None:
        _check_slots(slots, B, x.device)
    if out is None:
        out = torch.empty_like(x)
    else:
        _check_rows(out, "out", (B, dim), x.dtype, x.device)
    _rows_linear(x, norm_alpha.reshape(-1), wq, wq_scale, out, slots, None, eps=eps, norm=True, relu=False)
    return out


def _rows_linear(x, alpha, w, scale, out, slots, gate_mean, *, eps: float = 0.0, norm: bool, relu: bool) -> None:
    B, K = x.shape
    N = w.shape[0]
    cfg = _linear_config(B, N, K, _num_sms(x.device))
    grid = (cdiv(N, cfg["BLOCK_N"]), cdiv(B, cfg["BLOCK_B"]))
    _rows_linear_kernel[grid](
        x, alpha if alpha is not None else x, w, scale if scale is not None else x, out,
        slots if slots is not None else x, gate_mean if gate_mean is not None else x,
        B, N, K, x.stride(0), w.stride(0), out.stride(0), eps,
        NORM=norm, RELU=relu, HAS_SLOTS=slots is not None, HAS_SCALE=scale is not None,
        ZERO_GATE_MEAN=gate_mean is not None,
        DOT_PRECISION=_dot_precision(x.dtype), **cfg)
    record_launch("xattn_rows_linear")


def _dense(w, scale) -> torch.Tensor:
    """The weight in fp32: w, or int8 CB dequantized as CB * scale / 127."""
    return w.float() if scale is None else w.float() * (scale.float() / 127)[:, None]


def norm_q_projection_reference(x, norm_alpha, wq, *, eps: float = 1e-8, slots=None, wq_scale=None) -> torch.Tensor:
    xf = x.float()
    y = (xf * norm_alpha.float().reshape(-1) * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    q = (y.float() @ _dense(wq, wq_scale).T).to(x.dtype)
    if slots is not None:
        q = torch.where((slots >= 0)[:, None], q, torch.zeros_like(q))
    return q


# ---- piece 2: attention over each row's image slot ------------------------------------------------
def image_attention(q: torch.Tensor, image_kv: torch.Tensor, slots: torch.Tensor, *,
                    num_tokens: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    workspace: CrossAttentionWorkspace | None = None) -> torch.Tensor:
    """softmax(q . K^T / sqrt(D)) V over the tokens of each row's slot: q [B, H, D], image_kv
    [S, N, 2, H, D] (K at index 0 of dim 2, V at 1), slots [B] (-1 = no image), num_tokens [S] int32/int64
    (slot s holds its image's first num_tokens[s] in [1, N] tokens; default all N) -> [B, H, D] in q's
    dtype, zeros for rows without an image. One launch."""
    check_tensor(q, "q", 3, _FLOAT_DTYPES)
    B, H, D = q.shape
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last dimension, got strides {q.stride()}")
    _check_image_kv(image_kv, H, D, q.dtype, q.device)
    _check_slots(slots, B, q.device)
    _check_num_tokens(num_tokens, image_kv.shape[0], q.device)
    if out is None:
        out = torch.empty_like(q)
    else:
        _check_rows(out, "out", (B, H, D), q.dtype, q.device)
    _attention(q, image_kv, slots, num_tokens, out,
               *_attention_scratch(workspace, B, H, D, image_kv.shape[1], q.device))
    return out


def _attention_scratch(workspace, B: int, H: int, D: int, N: int, device
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(stats, acc, counters): the workspace's, or new partials and the shared per-device counters."""
    splits = _attention_config(B, H, N, _num_sms(device))["splits"]
    counters = (shared_counters(device, B * H).view(B, H) if workspace is None
                else _scratch(workspace, "counters", (B, H), torch.int32, device))
    return (_scratch(workspace, "stats", (B, H, splits, 2), torch.float32, device),
            _scratch(workspace, "acc", (B, H, splits, D), torch.float32, device), counters)


def _attention(q, image_kv, slots, num_tokens, out, stats, acc, counters) -> None:
    B, H, D = q.shape
    cfg = _attention_config(B, H, image_kv.shape[1], _num_sms(q.device))
    splits = cfg.pop("splits")
    keys_per_split = cfg.pop("keys_per_split")
    _attention_kernel[(B, H, splits)](
        q, image_kv, slots, slots if num_tokens is None else num_tokens, stats, acc, counters, out, B,
        image_kv.shape[1], keys_per_split, _LOG2E / math.sqrt(D),
        q.stride(0), q.stride(1), image_kv.stride(0), image_kv.stride(1), image_kv.stride(2),
        image_kv.stride(3), stats.stride(0), stats.stride(1), stats.stride(2),
        acc.stride(0), acc.stride(1), acc.stride(2), counters.stride(0), out.stride(0), out.stride(1),
        HAS_COUNTS=num_tokens is not None, BLOCK_S=next_pow2(splits), HEAD_DIM=D,
        DOT_PRECISION=_dot_precision(q.dtype), **cfg)
    record_launch("xattn_attention")


def image_attention_reference(q, image_kv, slots, num_tokens=None) -> torch.Tensor:
    slot = slots.clamp(min=0).long()
    kv = image_kv[slot].float()  # [B, N, 2, H, D]
    scores = torch.einsum("bhd,bnhd->bhn", q.float(), kv[:, :, 0]) / math.sqrt(q.shape[-1])
    if num_tokens is not None:  # keys past the image's own tokens are not there
        absent = torch.arange(kv.shape[1], device=q.device)[None, :] >= num_tokens[slot][:, None]
        scores = scores.masked_fill(absent[:, None, :], float("-inf"))
    attn = torch.einsum("bhn,bnhd->bhd", scores.softmax(-1), kv[:, :, 1])
    return torch.where((slots >= 0)[:, None, None], attn, 0.0).to(q.dtype)


# ---- piece 3: output projection + gate + residual -------------------------------------------------
def gated_output(x: torch.Tensor, attn: torch.Tensor, slots: torch.Tensor, wo: torch.Tensor,
                 gate_w0: torch.Tensor, gate_w2: torch.Tensor, *, out: torch.Tensor | None = None,
                 gate_mean: torch.Tensor | None = None, workspace: CrossAttentionWorkspace | None = None,
                 wo_scale: torch.Tensor | None = None, gate_w0_scale: torch.Tensor | None = None,
                 gate_w2_scale: torch.Tensor | None = None) -> torch.Tensor:
    """a = attn @ Wo^T; g = sigmoid(relu(a @ W0^T) @ W2^T - 4); out = x + a * g where slots >= 0, else x.

    x, attn [B, dim]; wo [dim, dim]; gate_w0 [G, dim]; gate_w2 [dim, G] (each dense in x's dtype, or
    int8 with its `*_scale` fp32 row scales); out may be x (in place).
    gate_mean (fp32 [B], optional) receives each row's mean of g over dim (0 without an image).
    Three launches."""
    B, dim = _check_x(x)
    _check_rows(attn, "attn", (B, dim), x.dtype, x.device)
    _check_slots(slots, B, x.device)
    scales = (wo_scale, gate_w0_scale, gate_w2_scale)
    _check_gate(x, wo, gate_w0, gate_w2, out, gate_mean, *scales)
    a, h = _gate_scratch(workspace, x, gate_w0.shape[0])
    out = torch.empty_like(x) if out is None else out
    _gated_output(x, attn, slots, wo, gate_w0, gate_w2, scales, out, gate_mean, a, h)
    return out


def _gate_scratch(workspace, x, G: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (_scratch(workspace, "a", tuple(x.shape), x.dtype, x.device),
            _scratch(workspace, "h", (x.shape[0], G), x.dtype, x.device))


def _gated_output(x, attn, slots, wo, gate_w0, gate_w2, scales, out, gate_mean, a, h) -> None:
    B, dim = x.shape
    G = gate_w0.shape[0]
    wo_scale, gate_w0_scale, gate_w2_scale = scales
    _rows_linear(attn, None, wo, wo_scale, a, slots, gate_mean, norm=False, relu=False)
    _rows_linear(a, None, gate_w0, gate_w0_scale, h, slots, None, norm=False, relu=True)
    cfg = _linear_config(B, dim, G, _num_sms(x.device))
    grid = (cdiv(dim, cfg["BLOCK_N"]), cdiv(B, cfg["BLOCK_B"]))
    _gate_residual_kernel[grid](
        h, gate_w2, gate_w2_scale if gate_w2_scale is not None else x, a, x, slots, out,
        gate_mean if gate_mean is not None else x,
        B, dim, G, h.stride(0), gate_w2.stride(0), a.stride(0), x.stride(0), out.stride(0),
        HAS_GATE_MEAN=gate_mean is not None, HAS_SCALE=gate_w2_scale is not None,
        DOT_PRECISION=_dot_precision(x.dtype), **cfg)
    record_launch("xattn_gate_residual")


def gated_output_reference(x, attn, slots, wo, gate_w0, gate_w2, *, wo_scale=None, gate_w0_scale=None,
                           gate_w2_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, gate_mean) with the rounding of the model's reference (linears in x's dtype; int8 weights
    dequantized first)."""
    dt = x.dtype
    a = (attn.float() @ _dense(wo, wo_scale).T).to(dt)
    hidden = torch.relu(a.float() @ _dense(gate_w0, gate_w0_scale).T).to(dt)
    g = torch.sigmoid(((hidden.float() @ _dense(gate_w2, gate_w2_scale).T).to(dt).float() - 4).to(dt).float()).to(dt)
    y = (x.float() + (a.float() * g.float()).to(dt).float()).to(dt)
    has = slots >= 0
    return torch.where(has[:, None], y, x), torch.where(has, g.float().mean(-1), 0.0)


# ---- the whole block ------------------------------------------------------------------------------
def gated_cross_attention(x: torch.Tensor, norm_alpha: torch.Tensor, wq: torch.Tensor,
                          image_kv: torch.Tensor, slots: torch.Tensor, wo: torch.Tensor,
                          gate_w0: torch.Tensor, gate_w2: torch.Tensor, *, eps: float = 1e-8,
                          out: torch.Tensor | None = None, gate_mean: torch.Tensor | None = None,
                          workspace: CrossAttentionWorkspace | None = None, wq_scale: torch.Tensor | None = None,
                          wo_scale: torch.Tensor | None = None, gate_w0_scale: torch.Tensor | None = None,
                          gate_w2_scale: torch.Tensor | None = None, num_tokens: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """One layer's gated cross-attention with its residual: out [B, dim] (see the module docstring).

    x [B, dim]; norm_alpha (dim values); wq [dim, dim] (row stride free: rows [0, dim) of the shared
    in_proj_weight); image_kv [S, N, 2, H, D] with H * D = dim; slots [B] int32/int64 in [-1, S)
    (not checked: that would need a sync); num_tokens [S] int32/int64 in [1, N] (optional: each slot's
    image token count, the keys past it masked; default all N); wo [dim, dim]; gate_w0 [G, dim];
    gate_w2 [dim, G].
    Each of wq, wo, gate_w0, gate_w2 is dense in x's dtype, or int8 (bitsandbytes' CB) with its
    `<name>_scale` fp32 [rows] (SCB; for a wq cut from in_proj, the matching slice of its SCB).
    out may be x (in place); gate_mean (fp32 [B]) receives each row's mean gate (0 without image).
    workspace: preallocated scratch (`cross_attention_workspace`), else allocated per call (the
    attention's arrival counters then come from a per-device buffer of zeros).
    Five launches, no host synchronisation.
    """
    B, dim = _check_x(x)
    _check_alpha(norm_alpha, dim, x.device)
    _check_weight(wq, "wq", (dim, dim), wq_scale, x)
    check_tensor(image_kv, "image_kv", 5, (x.dtype,), x.device)
    H, D = image_kv.shape[3], image_kv.shape[4]
    if H * D != dim:
        raise ValueError(f"image_kv heads x head_dim must equal dim {dim}, got shape {list(image_kv.shape)}")
    _check_image_kv(image_kv, H, D, x.dtype, x.device)
    _check_slots(slots, B, x.device)
    _check_num_tokens(num_tokens, image_kv.shape[0], x.device)
    scales = (wo_scale, gate_w0_scale, gate_w2_scale)
    _check_gate(x, wo, gate_w0, gate_w2, out, gate_mean, *scales)
    q = _scratch(workspace, "q", (B, dim), x.dtype, x.device)
    attn = _scratch(workspace, "attn", (B, dim), x.dtype, x.device)
    stats, acc, counters = _attention_scratch(workspace, B, H, D, image_kv.shape[1], x.device)
    a, h = _gate_scratch(workspace, x, gate_w0.shape[0])
    out = torch.empty_like(x) if out is None else out

    _rows_linear(x, norm_alpha.reshape(-1), wq, wq_scale, q, slots, None, eps=eps, norm=True, relu=False)
    _attention(q.unflatten(1, (H, D)), image_kv, slots, num_tokens, attn.unflatten(1, (H, D)), stats, acc, counters)
    _gated_output(x, attn, slots, wo, gate_w0, gate_w2, scales, out, gate_mean, a, h)
    return out


def gated_cross_attention_reference(x, norm_alpha, wq, image_kv, slots, wo, gate_w0, gate_w2, *,
                                    eps: float = 1e-8, wq_scale=None, wo_scale=None, gate_w0_scale=None,
                                    gate_w2_scale=None, num_tokens=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, gate_mean) in plain PyTorch, fp32 math with the model reference's rounding points (int8
    weights dequantized first)."""
    B, dim = x.shape
    H, D = image_kv.shape[3], image_kv.shape[4]
    q = norm_q_projection_reference(x, norm_alpha, wq, eps=eps, wq_scale=wq_scale)
    attn = image_attention_reference(q.view(B, H, D), image_kv, slots, num_tokens).reshape(B, dim)
    return gated_output_reference(x, attn, slots, wo, gate_w0, gate_w2, wo_scale=wo_scale,
                                  gate_w0_scale=gate_w0_scale, gate_w2_scale=gate_w2_scale)


# ---- static audit -------------------------------------------------------------------------------
def _constexpr_params(fn) -> set:
    """Names of a kernel's tl.constexpr parameters (compiled or interpreted kernel alike)."""
    return {name for name, p in inspect.signature(fn.fn).parameters.items() if "constexpr" in str(p.annotation)}


def _audit_signature(fn, pointers: dict, floats: tuple = ()) -> dict:
    """Triton types of fn's runtime arguments: pointers as given, floats fp32, other scalars i32."""
    constexprs = _constexpr_params(fn)
    return {name: pointers.get(name, "fp32" if name in floats else "i32")
            for name in fn.arg_names if name not in constexprs}


def audit_cases() -> list[dict]:
    """Each kernel as compiled at the real moshika-vis shapes in bf16, for batch 1 and 8 (GEMV tiles) and
    64 (tl.dot), with dense bf16 and INT8 weights; int_values are the integer arguments (sizes, strides)
    a launch would specialise on."""
    dim, H, D, N, G = 4096, 32, 128, 1024, 512
    bf, f32, slot = "*bf16", "*fp32", "*i32"
    cases = []

    def add(name, fn, pointers, values, constexprs, num_warps, num_stages, floats=()):
        sig = _audit_signature(fn, pointers, floats)
        values = {k: v for k, v in values.items() if k in sig}
        cases.append(dict(name=name, fn=fn, signature=sig, constexprs=constexprs, int_values=values,
                          num_warps=num_warps, num_stages=num_stages))

    for B in (1, 8, 64):
        for wname, wt, st, int8 in (("", bf, bf, False), ("_int8", "*i8", f32, True)):
            lin_ptrs = dict(x_ptr=bf, alpha_ptr=bf, w_ptr=wt, scale_ptr=st, out_ptr=bf, slots_ptr=slot,
                            gate_mean_ptr=f32)
            for what, N_out, K, norm, relu in (("norm_q", dim, dim, True, False),
                                               ("out_proj", dim, dim, False, False),
                                               ("gate_hidden", G, dim, False, True)):
                cfg = _linear_config(B, N_out, K)
                launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
                add(f"xattn_{what}{wname}_b{B}", _rows_linear_kernel, lin_ptrs,
                    dict(B=B, N=N_out, K=K, stride_xb=K, stride_wn=K, stride_ob=N_out),
                    dict(NORM=norm, RELU=relu, HAS_SLOTS=True, HAS_SCALE=int8, ZERO_GATE_MEAN=what == "out_proj",
                         DOT_PRECISION="tf32", **cfg), floats=("eps",), **launch)

            cfg = _linear_config(B, dim, G)
            launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
            add(f"xattn_gate_residual{wname}_b{B}", _gate_residual_kernel,
                dict(h_ptr=bf, w2_ptr=wt, scale_ptr=st, a_ptr=bf, x_ptr=bf, slots_ptr=slot, out_ptr=bf,
                     gate_mean_ptr=f32),
                dict(B=B, N=dim, G=G, stride_hb=G, stride_wn=G, stride_ab=dim, stride_xb=dim, stride_ob=dim),
                dict(HAS_GATE_MEAN=True, HAS_SCALE=int8, DOT_PRECISION="tf32", **cfg), **launch)

        cfg = _attention_config(B, H, N)
        splits = cfg.pop("splits")
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        strides = dict(stride_qb=dim, stride_qh=D, stride_ks=N * 2 * dim, stride_kn=2 * dim, stride_k2=dim,
                       stride_kh=D, stride_sb=H * splits * 2, stride_sh=splits * 2, stride_ss=2,
                       stride_ab=H * splits * D, stride_ah=splits * D, stride_as=D)
        add(f"xattn_attention_b{B}_splits{splits}", _attention_kernel,
            dict(q_ptr=bf, kv_ptr=bf, slots_ptr=slot, ntok_ptr=slot, stats_ptr=f32, acc_ptr=f32, count_ptr="*i32",
                 out_ptr=bf),
            dict(B=B, N=N, keys_per_split=cfg.pop("keys_per_split"), stride_cb=H, stride_ob=dim, stride_oh=D,
                 **strides),
            dict(HAS_COUNTS=True, HEAD_DIM=D, DOT_PRECISION="tf32", BLOCK_S=next_pow2(splits), **cfg),
            floats=("qk_scale",),
            **launch)
    return cases
