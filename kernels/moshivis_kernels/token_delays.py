"""Kyutai's delayed token streams (SPEC.md §7) on the device: a frame's input tokens in, its outputs out.

Each stream slot keeps a ring buffer buf [C, W] of token columns (C = 1 + n_q rows: text, the model's
audio codebooks, then the user's U codebooks; W > max delay columns); row j runs delays[j] frames late.
For a stream at frame t (its position) and slot `row`:

  frame_input_tokens:  the user's tokens of frame t enter their rows at column (t + delays[j]) % W;
                       then the input column i[j] = initial[j] if t <= delays[j] else buf[j, t % W] is
                       written back to column t % W and returned: the tokens the model embeds.
  frame_output_tokens: the model's tokens of frame t (rows 0..K-1) enter column (t + 1) % W; the output
                       is o[j] = buf[j, (t + 1 - max_delay + delays[j]) % W], or -2 (not generated yet)
                       while t + 1 <= max_delay: every row realigned to the most delayed one.

A row of -1 is padding (a batch filled up to a captured size): it touches no buffer, its inputs are -1
(the zero token) and its outputs -2. One program per stream; a value that one thread would store and
another read back in the same launch (delay 0 for the user's rows, max_delay for the outputs) is taken
from registers instead, so no program reads an address it writes. Positions come from the device, so
both launches can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch

from ._runtime import check_tensor, next_pow2, record_launch

import triton  # noqa: E402  (after _runtime, which picks the interpreter)
import triton.language as tl  # noqa: E402

UNGENERATED = -2  # an output not generated yet
ZERO_TOKEN = -1   # an input with no token (embeds as zeros)
_UNGENERATED, _ZERO_TOKEN = tl.constexpr(UNGENERATED), tl.constexpr(ZERO_TOKEN)  # the same, inside kernels


@triton.jit
def _input_tokens_kernel(buf_ptr, stride_bs, stride_bc, rows_ptr, pos_ptr, user_ptr, stride_ub, delays_ptr,
                         initial_ptr, out_ptr, stride_ob, C, U, W, BLOCK_C: tl.constexpr):
    """Program b: stream b's user tokens user [B, U] into buf [S, C, W] (int64, unit column stride), and its
    input column into out [B, C]."""
    b = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + b)
    t = tl.load(pos_ptr + b).to(tl.int64)
    j = tl.arange(0, BLOCK_C)
    in_c = j < C
    d = tl.load(delays_ptr + j, mask=in_c, other=0).to(tl.int64)
    is_user = in_c & (j >= C - U)
    u = tl.load(user_ptr + b * stride_ub + (j - (C - U)), mask=is_user, other=0).to(tl.int64)
    valid = row >= 0
    base = buf_ptr + tl.maximum(row, 0).to(tl.int64) * stride_bs + j * stride_bc
    now = is_user & (d == 0)  # a delay-0 user token is this frame's input: from registers
    tl.store(base + (t + d) % W, u, mask=valid & is_user & (d > 0))
    cur = t % W
    old = tl.load(base + cur, mask=valid & in_c & ~now, other=0)
    inp = tl.where(t <= d, tl.load(initial_ptr + j, mask=in_c, other=0).to(tl.int64), tl.where(now, u, old))
    tl.store(base + cur, inp, mask=valid & in_c)
    tl.store(out_ptr + b * stride_ob + j, tl.where(valid, inp, _ZERO_TOKEN), mask=in_c)


@triton.jit
def _output_tokens_kernel(buf_ptr, stride_bs, stride_bc, rows_ptr, pos_ptr, tokens_ptr, stride_tb, delays_ptr,
                          out_ptr, stride_ob, K, W, max_delay, BLOCK_K: tl.constexpr):
    """Program b: stream b's model tokens tokens [B, K] into buf [S, C, W] at column t + 1, and its delayed
    outputs into out [B, K]."""
    b = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + b)
    t1 = tl.load(pos_ptr + b).to(tl.int64) + 1
    j = tl.arange(0, BLOCK_K)
    in_k = j < K
    d = tl.load(delays_ptr + j, mask=in_k, other=0).to(tl.int64)
    tok = tl.load(tokens_ptr + b * stride_tb + j, mask=in_k, other=0).to(tl.int64)
    valid = row >= 0
    base = buf_ptr + tl.maximum(row, 0).to(tl.int64) * stride_bs + j * stride_bc
    tl.store(base + t1 % W, tok, mask=valid & in_k)
    ready = t1 > max_delay
    now = d == max_delay  # reads the column just written: from registers
    old = tl.load(base + (t1 - max_delay + d) % W, mask=valid & in_k & ready & ~now, other=0)
    o = tl.where(ready, tl.where(now, tok, old), _UNGENERATED)
    tl.store(out_ptr + b * stride_ob + j, tl.where(valid, o, _UNGENERATED), mask=in_k)


# ---- public wrappers ---------------------------------------------------------------------------------
_INT_DTYPES = (torch.int32, torch.int64)


def _check_common(buf, rows, positions, delays) -> int:
    check_tensor(buf, "buf", 3, (torch.int64,))
    dev = buf.device
    S, C, W = buf.shape
    if buf.stride(2) != 1:
        raise ValueError(f"buf must be contiguous along its columns (stride(2) == 1), got strides {buf.stride()}")
    if C < 1 or W < 2:
        raise ValueError(f"buf must have shape [slots, rows >= 1, columns >= 2], got {list(buf.shape)}")
    check_tensor(rows, "rows", 1, (torch.int64,), dev)
    B = rows.shape[0]
    check_tensor(positions, "positions", 1, (torch.int64,), dev)
    check_tensor(delays, "delays", 1, _INT_DTYPES, dev)
    for name, t, n in (("rows", rows, B), ("positions", positions, B), ("delays", delays, C)):
        if t.shape[0] != n or (n > 1 and t.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous [{n}] tensor, got shape {list(t.shape)}")
    return B


def _check_matrix(t, name: str, shape: tuple, device) -> None:
    check_tensor(t, name, 2, _INT_DTYPES if name != "out" else (torch.int64,), device)
    if tuple(t.shape) != shape or (shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"{name} must have shape {list(shape)} with unit column stride, got shape "
                         f"{list(t.shape)} strides {t.stride()}")


def _check_tokens(t, name: str, B: int, lowest: int, C: int, device) -> int:
    """t [B, n] int32/int64 with lowest <= n <= C columns, unit column stride; returns n."""
    check_tensor(t, name, 2, _INT_DTYPES, device)
    n = t.shape[1]
    if not lowest <= n <= C:
        raise ValueError(f"{name} must have {lowest} to C = {C} columns, got shape {list(t.shape)}")
    _check_matrix(t, name, (B, n), device)
    return n


def frame_input_tokens(buf: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, user: torch.Tensor,
                       delays: torch.Tensor, initial: torch.Tensor, *, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """The model's input tokens of this frame, out [B, C] int64 (module docstring); updates buf in place.

    buf [S, C, W] int64; rows [B] int64 slots (distinct; -1 = padding); positions [B] int64 >= 0 (frames
    so far); user [B, U] int32/int64 the user's tokens for rows C - U .. C - 1; delays [C] in [0, W),
    initial [C] int32/int64. One launch, no host synchronisation.
    """
    B = _check_common(buf, rows, positions, delays)
    dev, (S, C, W) = buf.device, buf.shape
    U = _check_tokens(user, "user", B, 0, C, dev)
    check_tensor(initial, "initial", 1, _INT_DTYPES, dev)
    if initial.shape[0] != C or (C > 1 and initial.stride(0) != 1):
        raise ValueError(f"initial must be a contiguous [{C}] tensor, got shape {list(initial.shape)}")
    if out is None:
        out = torch.empty(B, C, dtype=torch.int64, device=dev)
    _check_matrix(out, "out", (B, C), dev)
    if B:
        _input_tokens_kernel[(B,)](buf, buf.stride(0), buf.stride(1), rows, positions, user, user.stride(0), delays,
                                   initial, out, out.stride(0), C, U, W, BLOCK_C=next_pow2(C), num_warps=1)
        record_launch("frame_input_tokens")
    return out


def frame_output_tokens(buf: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor,
                        delays: torch.Tensor, max_delay: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The delayed outputs of this frame, out [B, K] int64 (-2 while not generated; module docstring);
    writes tokens [B, K] int32/int64 (rows 0..K-1 of buf) at column positions + 1. delays [C] as for
    frame_input_tokens (rows K.. unused), max_delay the largest of them, < W. One launch, no host
    synchronisation."""
    B = _check_common(buf, rows, positions, delays)
    dev, (S, C, W) = buf.device, buf.shape
    K = _check_tokens(tokens, "tokens", B, 1, C, dev)
    if isinstance(max_delay, bool) or not isinstance(max_delay, int) or not 0 <= max_delay < W:
        raise ValueError(f"max_delay must be an int in [0, W = {W}), got {max_delay!r}")
    if out is None:
        out = torch.empty(B, K, dtype=torch.int64, device=dev)
    _check_matrix(out, "out", (B, K), dev)
    if B:
        _output_tokens_kernel[(B,)](buf, buf.stride(0), buf.stride(1), rows, positions, tokens, tokens.stride(0),
                                    delays, out, out.stride(0), K, W, max_delay, BLOCK_K=next_pow2(K), num_warps=1)
        record_launch("frame_output_tokens")
    return out


# ---- references (plain PyTorch, in place on buf like the kernels) ------------------------------------
def frame_input_tokens_reference(buf, rows, positions, user, delays, initial) -> torch.Tensor:
    B, U = user.shape
    C, W = buf.shape[1], buf.shape[2]
    real = rows >= 0
    r, t = rows[real][:, None], positions[real][:, None]
    user_rows, all_rows = torch.arange(C - U, C, device=buf.device), torch.arange(C, device=buf.device)
    buf[r, user_rows, (t + delays[user_rows]) % W] = user[real].long()
    cur = t % W
    inp = torch.where(t <= delays, initial.long(), buf[r, all_rows, cur])
    buf[r, all_rows, cur] = inp
    out = torch.full((B, C), ZERO_TOKEN, dtype=torch.int64, device=buf.device)
    out[real] = inp
    return out


def frame_output_tokens_reference(buf, rows, positions, tokens, delays, max_delay: int) -> torch.Tensor:
    B, K = tokens.shape
    W = buf.shape[2]
    real = rows >= 0
    r, t1 = rows[real][:, None], positions[real][:, None] + 1
    own = torch.arange(K, device=buf.device)
    buf[r, own, t1 % W] = tokens[real].long()
    delayed = buf[r, own, (t1 - max_delay + delays[:K]) % W]
    out = torch.full((B, K), UNGENERATED, dtype=torch.int64, device=buf.device)
    out[real] = torch.where(t1 <= max_delay, UNGENERATED, delayed)
    return out


# ---- static audit hook --------------------------------------------------------------------------------
def audit_cases() -> list[dict]:
    """Both kernels at moshika-vis sizes: C = 17 token rows (U = 8 user codebooks, K = 9 model tokens),
    W = max_delay + 2 = 4 columns; contiguous buffers."""
    C, U, K, W = 17, 8, 9, 4
    common = {"buf_ptr": "*i64", "stride_bs": "i32", "stride_bc": "i32", "rows_ptr": "*i64", "pos_ptr": "*i64"}
    ints = {"stride_bs": C * W, "stride_bc": W, "W": W}
    return [
        {"name": "frame_input_tokens", "fn": _input_tokens_kernel,
         "signature": {**common, "user_ptr": "*i64", "stride_ub": "i32", "delays_ptr": "*i64",
                       "initial_ptr": "*i64", "out_ptr": "*i64", "stride_ob": "i32", "C": "i32", "U": "i32",
                       "W": "i32"},
         "constexprs": {"BLOCK_C": next_pow2(C)}, "int_values": {**ints, "stride_ub": U, "stride_ob": C, "C": C,
                                                                 "U": U},
         "num_warps": 1, "num_stages": 1},
        {"name": "frame_output_tokens", "fn": _output_tokens_kernel,
         "signature": {**common, "tokens_ptr": "*i64", "stride_tb": "i32", "delays_ptr": "*i64", "out_ptr": "*i64",
                       "stride_ob": "i32", "K": "i32", "W": "i32", "max_delay": "i32"},
         "constexprs": {"BLOCK_K": next_pow2(K)}, "int_values": {**ints, "stride_tb": K, "stride_ob": K, "K": K,
                                                                 "max_delay": W - 2},
         "num_warps": 1, "num_stages": 1},
    ]
