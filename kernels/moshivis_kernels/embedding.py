"""Input embedding sum for B streams (SPEC.md §7 step 3): one text table plus n_q audio tables.

    x[b] = text_emb[tok[b, 0]] + sum_{j < n_q} audio_emb[j][tok[b, 1 + j]]

with tokens [B, 1 + n_q], text_emb [V_text, dim] and the audio tables stacked into ONE tensor
audio_emb [n_q, V_audio, dim] (the runtime stacks `audio_emb.{j}.weight` once at load time). A negative
id (the zero token -1) contributes exact zeros and reads nothing. The sum is accumulated in fp32 in the
order above and stored in the tables' dtype (the reference model adds in the tables' dtype, so bf16
results can differ from it by bf16 rounding).

Token ids are validated by the engine before the kernel: an id >= the table's rows reads out of bounds,
and checking it here would need a host sync.
"""
from __future__ import annotations

import torch

from ._runtime import cdiv, check_tensor, next_pow2, record_launch

import triton  # noqa: E402  (after _runtime, which picks the interpreter)
import triton.language as tl  # noqa: E402

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int32, torch.int64)


# ---- kernel ---------------------------------------------------------------------------------------
@triton.jit
def _embed_tokens_kernel(tok_ptr, stride_tok_b, stride_tok_j, text_ptr, stride_text_v, audio_ptr,
                         stride_audio_q, stride_audio_v, out_ptr, stride_out_b, dim,
                         N_AUDIO: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, block of BLOCK_D columns): out[b, cols] = text[tok[b, 0], cols] + sum_j audio[j, tok[b, 1+j], cols].

    tokens [B, 1 + N_AUDIO] (strides stride_tok_*), text [V_text, dim], audio [N_AUDIO, V_audio, dim],
    out [B, dim]; unit column stride everywhere. Rows with a negative id are masked off (zeros).
    """
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    tok_row = tok_ptr + b * stride_tok_b
    t = tl.load(tok_row).to(tl.int64)
    acc = tl.load(text_ptr + t * stride_text_v + cols, mask=col_ok & (t >= 0), other=0.0).to(tl.float32)
    table = audio_ptr
    for j in tl.static_range(N_AUDIO):
        t = tl.load(tok_row + (1 + j) * stride_tok_j).to(tl.int64)
        acc += tl.load(table + t * stride_audio_v + cols, mask=col_ok & (t >= 0), other=0.0).to(tl.float32)
        table += stride_audio_q  # one table at a time: j * stride_audio_q could overflow 32 bits
    tl.store(out_ptr + b * stride_out_b + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# ---- launch configuration -------------------------------------------------------------------------
def _launch_config(dim: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps): at most 2 warps, one 16-byte load per thread and table (512 bf16 columns:
    a 4096 row is 8 programs, so even one stream spreads its 17 row reads over several SMs)."""
    per_thread = 16 // elem_bytes
    block_d = min(next_pow2(dim), 64 * per_thread)
    return block_d, max(1, min(2, block_d // (32 * per_thread)))


# ---- public wrapper -------------------------------------------------------------------------------
def embed_tokens(tokens: torch.Tensor, text_emb: torch.Tensor, audio_emb: torch.Tensor, *,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of 1 + n_q embeddings per row of tokens [B, 1 + n_q] (int32/int64) -> [B, dim] in the tables' dtype.

    text_emb [V_text, dim], audio_emb [n_q, V_audio, dim] (the stacked audio tables), same dtype
    (fp32/bf16/fp16), unit last stride. Ids must be < the table's rows (not checked: module docstring);
    negative ids give zeros. One launch, no host sync.
    """
    check_tensor(text_emb, "text_emb", 2, _FLOAT_DTYPES)
    dev, dtype = text_emb.device, text_emb.dtype
    dim = text_emb.shape[1]
    check_tensor(audio_emb, "audio_emb", 3, (dtype,), dev)
    if audio_emb.shape[2] != dim:
        raise ValueError(f"audio_emb must have shape [n_q, V_audio, {dim}] (text_emb's dim), got "
                         f"{list(audio_emb.shape)}")
    n_q = audio_emb.shape[0]
    check_tensor(tokens, "tokens", 2, _INT_DTYPES, dev)
    if tokens.shape[1] != 1 + n_q:
        raise ValueError(f"tokens must have shape [B, 1 + n_q] = [B, {1 + n_q}] for audio_emb of shape "
                         f"{list(audio_emb.shape)}, got {list(tokens.shape)}")
    for t, name in ((text_emb, "text_emb"), (audio_emb, "audio_emb")):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along dim (unit last stride), got strides {list(t.stride())}")
    B = tokens.shape[0]
    if out is None:
        out = torch.empty(B, dim, dtype=dtype, device=dev)
    else:
        check_tensor(out, "out", 2, (dtype,), dev)
        if tuple(out.shape) != (B, dim) or out.stride(1) != 1:
            raise ValueError(f"out must have shape [{B}, {dim}] and unit last stride, got shape "
                             f"{list(out.shape)}, strides {list(out.stride())}")
    if B == 0 or dim == 0:
        return out
    block_d, num_warps = _launch_config(dim, text_emb.element_size())
    _embed_tokens_kernel[(B, cdiv(dim, block_d))](
        tokens, tokens.stride(0), tokens.stride(1), text_emb, text_emb.stride(0), audio_emb,
        audio_emb.stride(0), audio_emb.stride(1), out, out.stride(0), dim,
        N_AUDIO=n_q, BLOCK_D=block_d, num_warps=num_warps)
    record_launch("embed_tokens")
    return out


# ---- reference (plain PyTorch) --------------------------------------------------------------------
def embed_tokens_reference(tokens: torch.Tensor, text_emb: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
    """The same sum in fp32, in the same order, cast to the tables' dtype."""
    def lookup(table, ids):  # negative id -> zeros
        rows = table.float()[ids.long().clamp(min=0)]
        return rows.masked_fill((ids < 0)[:, None], 0.0)

    x = lookup(text_emb, tokens[:, 0])
    for j in range(audio_emb.shape[0]):
        x = x + lookup(audio_emb[j], tokens[:, 1 + j])
    return x.to(text_emb.dtype)


# ---- static audit hook ----------------------------------------------------------------------------
def audit_cases() -> list[dict]:
    """moshika-vis in bf16: dim 4096, text table 32001 rows, 16 stacked audio tables of 2049 rows."""
    dim, n_q, audio_rows = 4096, 16, 2049
    block_d, num_warps = _launch_config(dim, 2)
    return [{
        "name": "embed_tokens", "fn": _embed_tokens_kernel,
        "signature": {"tok_ptr": "*i64", "stride_tok_b": "i32", "stride_tok_j": "i32", "text_ptr": "*bf16",
                      "stride_text_v": "i32", "audio_ptr": "*bf16", "stride_audio_q": "i32",
                      "stride_audio_v": "i32", "out_ptr": "*bf16", "stride_out_b": "i32", "dim": "i32"},
        "int_values": {"stride_tok_b": 1 + n_q, "stride_tok_j": 1, "stride_text_v": dim,
                       "stride_audio_q": audio_rows * dim, "stride_audio_v": dim, "stride_out_b": dim, "dim": dim},
        "constexprs": {"N_AUDIO": n_q, "BLOCK_D": block_d}, "num_warps": num_warps, "num_stages": 1,
    }]
