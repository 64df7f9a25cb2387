"""Temporal self-attention decode: RoPE, KV ring-buffer append and attention over the window (SPEC.md §4.1).

For B streams, one new token each, with qkv [B, 3 * H * D] (q, k, v in that order, each [H, D]), one
layer's cache kv [S, 2, context, H, D] (K then V, after RoPE), the streams' slots rows [B] and absolute
positions p = positions [B]:

    q', k'  = RoPE(q, p), RoPE(k, p)     pair (2i, 2i+1) rotated by p * max_period^(-2i/D), fp32 angles
    kv[row, 0, p % context] = k';  kv[row, 1, p % context] = v
    out     = softmax(q' . K^T / sqrt(D)) V  over the positions max(0, p - context + 1) .. p

The key of absolute position p lives at index p % context, so the visible window is: index p % context
(the token of this call) plus every other index j < min(p, context) (the previous context - 1 positions,
or all positions so far before the buffer fills). Rotated q and k are rounded to qkv's dtype, and k, v
to the cache's dtype, where the reference rounds them; scores, softmax and the sum run in fp32.

One launch: the context is split over programs (split, head, stream); every program holds the new k', v
in registers and treats index p % context as masked in the cache, so no program reads what another writes
in the same call. Split 0 of each (stream, head) writes k', v to the cache and folds the new token into its
online softmax. With several splits, each stores its partial (max, sum, unnormalised output) and the last
split of each (stream, head) to finish (an arrival counter, `_arrival.last_arrival`) merges them in split
order, so the result does not depend on which split finishes last.

INT8 cache (kv int8 plus kv_scale [S, 2, H, context] fp32): each appended head vector x [D] (k' or v) is
stored as symmetric int8 with one fp32 scale per token per head,

    scale = max_d |x_d| / 127,   q = clamp(round_half_even(x / scale), -127, 127)   (q = 0 where x is all 0)

and read back as q * scale: scores are (q' . k_q) * k_scale and each key's softmax weight is multiplied by
its v_scale before the sum, so nothing is dequantized in memory (int8 tiles load 128 bits). The new token is
attended as the cache holds it (quantized), as the reference does. Per token per head because the append
writes one token per (stream, head) program: its scale is that program's own reduction over D, no other
program's data; per channel (over tokens) would need the whole window to re-scale. fp32 scales: exactly the
same numbers as PyTorch (IEEE division, round half to even), no fp16 range limits on small heads, and 4 B
per 128 int8 values (3% of the cache). A head's scales are contiguous over positions (kv_scale [.., H,
context]) so a tile of keys reads its scales as one 128-byte line. `quantize_kv` / `dequantize_kv` are the
rule in PyTorch (the references and `moshivis.reference` use them).

Nothing is synchronised with the host (rows and positions stay on the device), so the launches can be
captured in a CUDA graph. Rows must be distinct slots in [0, S) or -1 and positions >= 0: the engine
guarantees it; the kernel cannot check it without a sync, and an out-of-range row writes out of bounds.
A row of -1 is padding (a batch filled up to a captured size): it touches no cache and attends to its
own token only.
"""
from __future__ import annotations

import math

import torch

from ._arrival import last_arrival, shared_counters
from ._runtime import cdiv, check_tensor, next_pow2, record_launch

import triton  # noqa: E402  (after _runtime, which picks the interpreter)
import triton.language as tl  # noqa: E402

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int32, torch.int64)
_LOG2E = 1.4426950408889634
_DEFAULT_SMS = 132  # H100 SXM; used to size the split when the tensors are not on a CUDA device


# ---- kernels --------------------------------------------------------------------------------------
@triton.jit
def _rope(x_ptr, offs_d, pos_f, freq):
    """RoPE of one head vector x [D] at position pos_f (fp32), natural element order, fp32 result.

    Element d pairs with d ^ 1 and turns by pos_f * freq[d] (freq of pair d // 2):
    even d: x[d] cos - x[d+1] sin,  odd d: x[d] cos + x[d-1] sin.
    """
    x = tl.load(x_ptr + offs_d).to(tl.float32)
    partner = tl.load(x_ptr + (offs_d ^ 1)).to(tl.float32)
    angle = pos_f * freq
    sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    return x * tl.cos(angle) + sign * (partner * tl.sin(angle))


@triton.jit
def _quantize(x):
    """Symmetric int8 of one head vector x [D] (fp32): (q, scale) with scale = max|x| / 127 and
    q = round_half_even(x / scale) clamped to [-127, 127], q as fp32 integers; `quantize_kv`'s arithmetic
    (IEEE divisions, so both give the same bits for the same x)."""
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 127.0)
    y = tl.math.div_rn(x, tl.where(scale > 0, scale, 1.0))
    # Round half to even without libdevice (the interpreter has none): adding 1.5 * 2^23 leaves no fraction
    # bits in an fp32 of magnitude < 2^22 (|y| <= 127 here), so the sum rounds y as rint does.
    q = (y + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(q, -127.0), 127.0), scale


@triton.jit
def _combine(part_acc_ptr, part_ml_ptr, part0, n_split, offs_d, BLOCK_S: tl.constexpr):
    """sum_s w_s acc_s / sum_s w_s l_s over partials part0 .. part0 + n_split - 1, w_s = exp2(m_s - max_s m_s).

    Split 0 always holds the new token, so max_s m_s is finite and the denominator positive; splits that
    saw no key have m_s = -inf and weigh 0.
    """
    offs_s = tl.arange(0, BLOCK_S)
    ok = offs_s < n_split
    m = tl.load(part_ml_ptr + (part0 + offs_s) * 2, mask=ok, other=float("-inf"))
    l_sum = tl.load(part_ml_ptr + (part0 + offs_s) * 2 + 1, mask=ok, other=0.0)
    acc = tl.load(part_acc_ptr + (part0 + offs_s)[:, None] * offs_d.shape[0] + offs_d[None, :], mask=ok[:, None],
                  other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))
    return tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_sum, axis=0)


@triton.jit
def _self_attention_decode_kernel(
        qkv_ptr, stride_qkv_b, kv_ptr, stride_kv_s, stride_kv_t, stride_kv_c, stride_kv_h,
        rows_ptr, stride_rows, pos_ptr, stride_pos, out_ptr, stride_out_b, part_acc_ptr, part_ml_ptr, count_ptr,
        freq_ptr, context, num_heads, qk_scale, scale_ptr, stride_sc_s, stride_sc_t, stride_sc_h,
        HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
        BLOCK_S: tl.constexpr, KV_INT8: tl.constexpr):
    """Program (split, h, b): attention of stream b's head h over cache indices [split * CHUNK, + CHUNK).

    qkv [B, 3 * num_heads * HEAD_DIM] (row stride stride_qkv_b); kv [S, 2, context, num_heads, HEAD_DIM]
    (strides stride_kv_*, unit stride over HEAD_DIM); rows, positions [B]; out [B, num_heads * HEAD_DIM];
    freq [HEAD_DIM / 2] the RoPE frequencies (fp32).
    qk_scale = log2(e) / sqrt(HEAD_DIM): scores are kept in the log2 domain (exp2 softmax).
    SPLIT: write the partial (unnormalised acc [HEAD_DIM] to part_acc[(b, h, split)], max and sum to
    part_ml[(b, h, split)]); the last split of (b, h) to arrive at count[b * num_heads + h] merges them
    (`_combine`, BLOCK_S >= splits). Else write out = acc / sum directly.
    KV_INT8: kv is int8 and scale [S, 2, num_heads, context] fp32 (strides stride_sc_*, unit stride over
    context) holds its per-token per-head scales (module docstring); else scale_ptr is unused.
    """
    split = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    n_split = tl.num_programs(0)
    row = tl.load(rows_ptr + b * stride_rows).to(tl.int64)
    valid = row >= 0  # row -1: padding, which reads and writes no cache
    row = tl.maximum(row, 0)
    pos = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    dim = num_heads * HEAD_DIM
    q_ptr = qkv_ptr + b.to(tl.int64) * stride_qkv_b + h * HEAD_DIM
    pos_f = pos.to(tl.float32)
    freq = tl.load(freq_ptr + offs_d // 2)
    q = _rope(q_ptr, offs_d, pos_f, freq).to(qkv_ptr.dtype.element_ty).to(tl.float32) * qk_scale

    k_base = kv_ptr + row * stride_kv_s + h * stride_kv_h
    v_base = k_base + stride_kv_t
    new_idx = (pos % context).to(tl.int32)
    # The token of this call: attended from registers (never re-read) as the cache holds it, appended by
    # split 0.
    ks_base = scale_ptr + row * stride_sc_s + h * stride_sc_h  # KV_INT8: K's scales of this head; V's next
    vs_base = ks_base + stride_sc_t
    if KV_INT8:
        k_q, k_scale = _quantize(_rope(q_ptr + dim, offs_d, pos_f, freq).to(qkv_ptr.dtype.element_ty)
                                 .to(tl.float32))
        v_q, v_scale = _quantize(tl.load(q_ptr + 2 * dim + offs_d).to(tl.float32))
        if (split == 0) & valid:
            tl.store(k_base + new_idx * stride_kv_c + offs_d, k_q.to(tl.int8))
            tl.store(v_base + new_idx * stride_kv_c + offs_d, v_q.to(tl.int8))
            tl.store(ks_base + new_idx, k_scale)
            tl.store(vs_base + new_idx, v_scale)
        k_new, v_new = k_q * k_scale, v_q * v_scale
    else:
        k_new = _rope(q_ptr + dim, offs_d, pos_f, freq).to(qkv_ptr.dtype.element_ty).to(kv_ptr.dtype.element_ty)
        v_new = tl.load(q_ptr + 2 * dim + offs_d).to(kv_ptr.dtype.element_ty)
        if (split == 0) & valid:
            tl.store(k_base + new_idx * stride_kv_c + offs_d, k_new)
            tl.store(v_base + new_idx * stride_kv_c + offs_d, v_new)

    # Online softmax per key lane (no cross-warp reduction inside the loop); split 0 seeds lane 0 with
    # the new token. Lanes merge after the loop.
    seed = (tl.arange(0, BLOCK_N) == 0) & (split == 0)
    m = tl.where(seed, tl.sum(q * k_new.to(tl.float32), axis=0), float("-inf"))
    l_sum = tl.where(seed, 1.0, 0.0)
    acc = tl.where(seed[:, None], v_new.to(tl.float32)[None, :], 0.0)

    # Older positions: indices j < min(p, context), j != p % context.
    n_old = tl.where(valid, tl.where(pos >= context, context, pos), 0).to(tl.int32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, n_old)
    for blk in range(start, end, BLOCK_N):
        idx = blk + tl.arange(0, BLOCK_N)
        ok = (idx < end) & (idx != new_idx)
        offs = idx[:, None] * stride_kv_c + offs_d[None, :]
        k = tl.load(k_base + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_base + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[None, :] * k, axis=1)
        if KV_INT8:  # q . (k_q * k_scale) = (q . k_q) * k_scale; V's scale goes into the weight below
            s = s * tl.load(ks_base + idx, mask=ok, other=0.0)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, s)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw no key yet
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref)
        l_sum = l_sum * alpha + p
        if KV_INT8:
            acc = acc * alpha[:, None] + (p * tl.load(vs_base + idx, mask=ok, other=0.0))[:, None] * v
        else:
            acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new

    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    l_sum = tl.sum(w * l_sum, axis=0)
    acc = tl.sum(w[:, None] * acc, axis=0)
    bh = b.to(tl.int64) * num_heads + h
    out_ptrs = out_ptr + b.to(tl.int64) * stride_out_b + h * HEAD_DIM + offs_d
    if SPLIT:
        part = bh * n_split + split
        tl.store(part_acc_ptr + part * HEAD_DIM + offs_d, acc)
        tl.store(part_ml_ptr + part * 2, m_max)
        tl.store(part_ml_ptr + part * 2 + 1, l_sum)
        if last_arrival(count_ptr + bh, n_split):
            out = _combine(part_acc_ptr, part_ml_ptr, bh * n_split, n_split, offs_d, BLOCK_S)
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))
    else:
        out = acc / l_sum
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))


# ---- launch configuration -------------------------------------------------------------------------
def _launch_config(batch: int, num_heads: int, head_dim: int, context: int, n_sm: int) -> dict:
    """Keys per iteration, keys per split, number of splits, warps.

    A tile of BLOCK_N keys x head_dim holds 4096 elements (32 fp32 per thread at 4 warps, four 128-bit
    bf16 loads). The context is split until batch * heads * splits reaches about 4 programs per SM, so a
    single stream (32 heads) still spreads its 3000 keys over every SM; the split is sized for the full
    window because positions live on the device.
    """
    block_n = max(16, min(4096 // head_dim, next_pow2(context)))
    n_split = max(1, min(cdiv(4 * n_sm, batch * num_heads), cdiv(context, block_n)))
    chunk = cdiv(cdiv(context, n_split), block_n) * block_n
    return {"BLOCK_N": block_n, "CHUNK": chunk, "n_split": cdiv(context, chunk), "num_warps": 4,
            "num_stages": 1}


_FREQS: dict[tuple[int, float, torch.device], torch.Tensor] = {}


def _rope_frequencies(head_dim: int, max_period: float, device: torch.device) -> torch.Tensor:
    """freq [head_dim / 2] = exp(i * -ln(max_period) * 2 / head_dim) in fp32, made by torch on the cache's
    device: the reference's (and Kyutai's) numbers, so RoPE angles agree far into a stream (one ulp of
    frequency turns a pair by 1e-4 rad at position 3000). Made once per shape and device; inside a CUDA
    graph capture it would only be computed at replay, so the first call must come before capture (as it
    must anyway, to compile the kernels)."""
    key = (head_dim, max_period, device)
    if key not in _FREQS:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("self_attention_decode: call it once for this head_dim / max_period / device "
                               "before CUDA graph capture (it builds its RoPE frequency table on first use)")
        _FREQS[key] = torch.exp(torch.arange(head_dim // 2, dtype=torch.float32, device=device)
                                * (-math.log(max_period) * 2 / head_dim))
    return _FREQS[key]


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DEFAULT_SMS


def _workspace_size(batch: int, num_heads: int, head_dim: int, n_split: int) -> int:
    """fp32 elements of the split scratch: partial outputs [B, H, splits, D], partial (max, sum)
    [B, H, splits, 2], then one int32 arrival counter per (stream, head)."""
    return batch * num_heads * (n_split * (head_dim + 2) + 1)


def self_attention_workspace(batch: int, num_heads: int, head_dim: int, context: int,
                             device: torch.device | str) -> torch.Tensor | None:
    """The scratch `self_attention_decode` needs for this batch size (None when it needs none), to be
    allocated once and passed as `workspace=`; one buffer serves every layer's call of a frame (calls in
    stream order). An fp32 tensor of zeros: its last batch * num_heads elements are int32 arrival
    counters, which must start at zero and which every call leaves at zero."""
    device = torch.device(device)
    cfg = _launch_config(batch, num_heads, head_dim, context, _num_sms(device))
    if cfg["n_split"] == 1:
        return None
    return torch.zeros(_workspace_size(batch, num_heads, head_dim, cfg["n_split"]), dtype=torch.float32,
                       device=device)


# ---- public wrapper -------------------------------------------------------------------------------
def _check_inputs(qkv, kv, rows, positions, max_period, kv_scale):
    check_tensor(kv, "kv", 5, _FLOAT_DTYPES + (torch.int8,))
    S, two, context, H, D = kv.shape
    dev = kv.device
    if kv.dtype == torch.int8:
        if kv_scale is None:
            raise ValueError("an int8 kv needs kv_scale [slots, 2, heads, context] fp32 (its per-token scales)")
        check_tensor(kv_scale, "kv_scale", 4, (torch.float32,), dev)
        if tuple(kv_scale.shape) != (S, 2, H, context) or kv_scale.stride(3) != 1:
            raise ValueError(f"kv_scale must have shape [slots, 2, heads, context] = {[S, 2, H, context]} for kv "
                             f"of shape {list(kv.shape)}, contiguous along context; got shape "
                             f"{list(kv_scale.shape)}, strides {list(kv_scale.stride())}")
    elif kv_scale is not None:
        raise ValueError(f"kv_scale is only for an int8 kv; kv is {kv.dtype}")
    if two != 2 or context < 1 or H < 1:
        raise ValueError(f"kv must have shape [slots, 2, context >= 1, heads >= 1, head_dim], got {list(kv.shape)}")
    if D < 2 or D & (D - 1):
        raise ValueError(f"kv's head_dim must be a power of two >= 2 (RoPE pairs), got shape {list(kv.shape)}")
    if kv.stride(4) != 1:
        raise ValueError(f"kv must be contiguous along head_dim (stride(4) == 1), got strides {list(kv.stride())}")
    if (context - 1) * kv.stride(2) + D >= 2**31:
        raise ValueError(f"kv's per-slot window is too large for 32-bit offsets: shape {list(kv.shape)}, "
                         f"strides {list(kv.stride())}")
    check_tensor(qkv, "qkv", 2, _FLOAT_DTYPES, dev)
    B = qkv.shape[0]
    if qkv.shape[1] != 3 * H * D:
        raise ValueError(f"qkv must have shape [B, 3 * heads * head_dim] = [B, {3 * H * D}] for kv of shape "
                         f"{list(kv.shape)}, got {list(qkv.shape)}")
    if qkv.stride(1) != 1:
        raise ValueError(f"qkv must be contiguous along its last dimension, got strides {list(qkv.stride())}")
    if B > 65535:
        raise ValueError(f"qkv has {B} rows; at most 65535 streams per launch")
    check_tensor(rows, "rows", 1, _INT_DTYPES, dev)
    check_tensor(positions, "positions", 1, _INT_DTYPES, dev)
    for t, name in ((rows, "rows"), (positions, "positions")):
        if t.shape[0] != B:
            raise ValueError(f"{name} must have shape [{B}] (one per qkv row), got {list(t.shape)}")
    if not (isinstance(max_period, (int, float)) and not isinstance(max_period, bool) and max_period > 0):
        raise ValueError(f"max_period must be a number > 0, got {max_period!r}")
    return B, H, D, context


def self_attention_decode(qkv: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, *,
                          kv_scale: torch.Tensor | None = None, max_period: float = 10000.0,
                          out: torch.Tensor | None = None, workspace: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE + append + windowed attention for B streams (module docstring); returns out [B, H * D].

    qkv [B, 3 * H * D] fp32/bf16/fp16; kv [S, 2, context, H, D] one layer's cache, updated in place at
    index positions % context of each stream's slot: fp32/bf16/fp16, or int8 with kv_scale
    [S, 2, H, context] fp32 (updated with it); rows [B], positions [B] int32/int64 device tensors.
    out defaults to qkv's dtype; workspace: `self_attention_workspace(B, ...)` (when None, the partials
    are allocated per call and the arrival counters come from a per-device buffer of zeros). One launch,
    no host sync.
    """
    B, H, D, context = _check_inputs(qkv, kv, rows, positions, max_period, kv_scale)
    dev = kv.device
    if out is None:
        out = torch.empty(B, H * D, dtype=qkv.dtype, device=dev)
    else:
        check_tensor(out, "out", 2, _FLOAT_DTYPES, dev)
        if tuple(out.shape) != (B, H * D) or out.stride(1) != 1:
            raise ValueError(f"out must have shape [{B}, {H * D}] and unit last stride, got shape "
                             f"{list(out.shape)}, strides {list(out.stride())}")
    if B == 0:
        return out
    cfg = _launch_config(B, H, D, context, _num_sms(dev))
    n_split = cfg["n_split"]
    part_acc = part_ml = counters = out  # unused pointer slots when there is one split
    if n_split > 1:
        n_acc, n_ml = B * H * n_split * D, B * H * n_split * 2
        if workspace is None:
            part_acc = torch.empty(n_acc, dtype=torch.float32, device=dev)
            part_ml = torch.empty(n_ml, dtype=torch.float32, device=dev)
            counters = shared_counters(dev, B * H)
        else:
            # exactly this batch's size: another batch's layout would put partials over these counters
            need = _workspace_size(B, H, D, n_split)
            check_tensor(workspace, "workspace", 1, (torch.float32,), dev)
            if workspace.numel() != need or not workspace.is_contiguous():
                raise ValueError(f"workspace must be a contiguous fp32 tensor of exactly {need} elements for "
                                 f"{B} streams, got {workspace.numel()} (see self_attention_workspace)")
            part_acc, part_ml = workspace[:n_acc], workspace[n_acc: n_acc + n_ml]
            counters = workspace[n_acc + n_ml:].view(torch.int32)
    scale = kv if kv_scale is None else kv_scale  # an unused pointer slot for a dense cache
    _self_attention_decode_kernel[(n_split, H, B)](
        qkv, qkv.stride(0), kv, kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3),
        rows, rows.stride(0), positions, positions.stride(0), out, out.stride(0), part_acc, part_ml, counters,
        _rope_frequencies(D, float(max_period), dev), context, H, _LOG2E / math.sqrt(D),
        scale, scale.stride(0), scale.stride(1), scale.stride(2),
        HEAD_DIM=D, CHUNK=cfg["CHUNK"], BLOCK_N=cfg["BLOCK_N"], SPLIT=n_split > 1, BLOCK_S=next_pow2(n_split),
        KV_INT8=kv_scale is not None, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    record_launch("self_attention_decode")
    return out


# ---- reference (plain PyTorch) --------------------------------------------------------------------
def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The INT8 cache's rule (module docstring) over the last dimension: x [..., D] -> (q int8 [..., D],
    scale fp32 [...]) with x ~= q * scale, |x - q * scale| <= scale / 2. Computed in fp32 with IEEE division
    and round half to even: the kernel's `_quantize` gives the same bits."""
    x = x.float()
    scale = x.abs().amax(-1) / 127
    q = torch.round(x / torch.where(scale > 0, scale, 1.0)[..., None]).clamp(-127, 127)
    return q.to(torch.int8), scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., D] int8, scale [...] fp32 -> q * scale in fp32: what attention reads from an INT8 cache."""
    return q.float() * scale[..., None]


def self_attention_decode_reference(qkv: torch.Tensor, kv: torch.Tensor, rows: torch.Tensor,
                                    positions: torch.Tensor, *, kv_scale: torch.Tensor | None = None,
                                    max_period: float = 10000.0) -> torch.Tensor:
    """The same op in fp32 PyTorch, updating kv (and kv_scale for an int8 kv) in place the same way; returns
    [B, H * D] in qkv's dtype."""
    _, _, context, H, D = kv.shape
    B = qkv.shape[0]
    rows, positions = rows.long(), positions.long()
    q, k, v = qkv.view(B, 3, H, D).unbind(1)

    freqs = torch.exp(torch.arange(D // 2, device=qkv.device, dtype=torch.float32) * (-math.log(max_period) * 2 / D))
    angle = positions.to(torch.float32)[:, None, None] * freqs  # [B, 1, D/2]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rope(x):  # interleaved pairs (2i, 2i+1), rounded back to x's dtype
        xr, xi = x.float().unflatten(-1, (D // 2, 2)).unbind(-1)
        return torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1).flatten(-2).to(x.dtype)

    q, k = rope(q), rope(k)
    real = rows >= 0  # row -1: padding
    slot, idx = rows[real], positions[real] % context
    if kv_scale is None:
        kv[slot, 0, idx], kv[slot, 1, idx] = k[real].to(kv.dtype), v[real].to(kv.dtype)
        keys, values = kv[rows.clamp(min=0)].float().unbind(1)  # [B, context, H, D]
        v = v.to(kv.dtype).float()  # the new value as the cache holds it
    else:
        kv[slot, 0, idx], kv_scale[slot, 0, :, idx] = quantize_kv(k[real])
        kv[slot, 1, idx], kv_scale[slot, 1, :, idx] = quantize_kv(v[real])
        r = rows.clamp(min=0)
        keys, values = dequantize_kv(kv[r], kv_scale[r].transpose(-1, -2)).unbind(1)
        v = dequantize_kv(*quantize_kv(v))
    scores = torch.einsum("bhd,bthd->bht", q.float(), keys) / math.sqrt(D)
    # index j holds a window position once j <= p (all of them once the buffer has wrapped)
    visible = torch.arange(context, device=qkv.device)[None, :] <= positions[:, None]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    out = torch.einsum("bht,bthd->bhd", scores.softmax(-1), values)
    out = torch.where(real[:, None, None], out, v)  # padding sees its own token only
    return out.reshape(B, H * D).to(qkv.dtype)


# ---- static audit hook ----------------------------------------------------------------------------
def audit_cases() -> list[dict]:
    """moshika-vis shapes in bf16 (context 3000, 32 heads, head_dim 128, 132 SMs): one stream (16
    splits, merged by the last) and 64 streams (one split), with a bf16 cache and with an int8 cache
    (its scales [S, 2, H, context] fp32)."""
    H, D, context = 32, 128, 3000
    strides = {"stride_qkv_b": 3 * H * D, "stride_kv_s": 2 * context * H * D, "stride_kv_t": context * H * D,
               "stride_kv_c": H * D, "stride_kv_h": D, "stride_rows": 1, "stride_pos": 1, "stride_out_b": H * D,
               "context": context, "num_heads": H, "stride_sc_s": 2 * H * context, "stride_sc_t": H * context,
               "stride_sc_h": context}
    sig = {"qkv_ptr": "*bf16", "rows_ptr": "*i64", "pos_ptr": "*i64", "out_ptr": "*bf16",
           "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "count_ptr": "*i32", "freq_ptr": "*fp32",
           "scale_ptr": "*fp32", "qk_scale": "fp32"}
    sig |= {name: "i32" for name in strides}
    cases = []
    for kv_type, int8 in (("bf16", False), ("i8", True)):
        for batch in (1, 64):
            cfg = _launch_config(batch, H, D, context, _DEFAULT_SMS)
            cases.append({
                "name": f"self_attention_decode{'_int8kv' if int8 else ''}_b{batch}_splits{cfg['n_split']}",
                "fn": _self_attention_decode_kernel, "signature": sig | {"kv_ptr": f"*{kv_type}"},
                "int_values": strides,
                "constexprs": {"HEAD_DIM": D, "CHUNK": cfg["CHUNK"], "BLOCK_N": cfg["BLOCK_N"],
                               "SPLIT": cfg["n_split"] > 1, "BLOCK_S": next_pow2(cfg["n_split"]), "KV_INT8": int8},
                "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            })
    return cases
