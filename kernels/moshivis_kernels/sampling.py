"""Token sampling on the device: greedy, or temperature + top-k by the exponential race (SPEC.md §7).

Per row of logits `l` [V] with temperature T and top-k k:
  T <= 0             -> argmax(l), the FIRST maximum on ties (torch.argmax's rule);
  T > 0              -> keep K = {v : l[v] >= l_(k)}, l_(k) the k-th largest logit (k <= 0 or k >= V: keep
                        all), and return argmax over v in K of  l[v] / T - log(-log u[v]).
The second line is the exponential race argmax(p / q), p = softmax(l / T) renormalised over K and
q = -log u ~ Exp(1): an exact draw from the top-k distribution (log p = l / T - const, the constant does
not change the argmax). Ties at the k-th largest logit are all kept, so more than k tokens can be kept
when the threshold value repeats; the race itself breaks exact ties by the first index.

Top-k without sorting: the k-th largest logit is found by a radix select on the order-preserving uint32
image of the fp32 bits (4 passes of an 8-bit histogram over the row, usually fewer: see _topk_threshold),
then the race runs over the elements whose key is >= that key. A row is read in chunks of at most 4096.

Random numbers (counter-based, no state): u[v] = word (v mod 4) of Philox4x32-10 with
  key     = the stream's 64-bit seed,
  counter = (v div 4, codebook, frame mod 2^32, frame div 2^32),
converted to a float in [0, 1) exactly as `tl.rand` does (`tl.uint_to_uniform_float`). The counter is an
injective function of (vocab index, codebook, frame), so no two draws of a stream share random bits, no
offset can overflow 32 bits, and a row's draw depends neither on its batch mates nor on its position.
One Philox call gives the four uniforms of four neighbouring vocabulary entries. With codebook = frame = 0
word 0 is `tl.rand(seed, v div 4)`.

Repetition penalty (Kyutai's, on the text token; optional, `RepetitionPenalty`): before the rule above,
for every DISTINCT token v among the last C = min(context, n, H) entries of the row's history (a ring of
the H most recent tokens of its stream other than the `ignored` ones, n of them appended so far),
  l[v] <- l[v] / penalty  if l[v] >= 0,   l[v] * penalty  otherwise      (fp32, IEEE, rounded to l's dtype)
written back into the logits (they are the logits the token was drawn from); after the token is chosen
(drawn or forced) it is appended to the history unless it is an ignored one. Kyutai's Rust server
(lm_generate_multistream.rs, `apply_repetition_penalty`) walks its generated text tokens newest first,
skips padding (3), end-of-padding (0) and the start token, counts the next `context` tokens and
penalises each distinct one once: the same set.

Every per-row parameter is read from device tensors and nothing is synchronised with the host, so the
launch can be captured in a CUDA graph. Logits must not contain NaN (their token is then unspecified).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._runtime import check_tensor, next_pow2, record_launch


@triton.jit
def _order_key(x):
    """uint32 whose unsigned order is the order of the fp32 values x (-0.0 and +0.0 both map to 2^31)."""
    bits = x.to(tl.uint32, bitcast=True)
    key = tl.where(bits >= 0x80000000, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return tl.where(x == 0.0, 0x80000000, key)


@triton.jit
def _load_chunk(row_ptr, start, V, BLOCK_R: tl.constexpr):
    """Logits [start, start + 4 * BLOCK_R) of a row as an fp32 [BLOCK_R, 4] block (4 = one Philox call)."""
    idx = start + 4 * tl.arange(0, BLOCK_R)[:, None] + tl.arange(0, 4)[None, :]
    mask = idx < V
    x = tl.load(row_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return x, idx, mask


@triton.jit
def _uniforms(seed, start, codebook, frame, BLOCK_R: tl.constexpr):
    """U[0, 1) for vocabulary entries [start, start + 4 * BLOCK_R) as [BLOCK_R, 4] (scheme: module doc)."""
    counter = (start // 4 + tl.arange(0, BLOCK_R)).to(tl.uint32)
    zero = counter * 0
    w0, w1, w2, w3 = tl.philox(seed, counter, zero + codebook.to(tl.uint32),
                               zero + (frame & 0xFFFFFFFF).to(tl.uint32), zero + (frame >> 32).to(tl.uint32))
    c = tl.arange(0, 4)[None, :]
    w = tl.where(c == 0, w0[:, None], tl.where(c == 1, w1[:, None], tl.where(c == 2, w2[:, None], w3[:, None])))
    return tl.uint_to_uniform_float(w)


@triton.jit
def _topk_threshold(row_ptr, V, k, BLOCK_R: tl.constexpr):
    """Order key of the k-th largest logit of a row (1 <= k < V) by radix select, 8 bits per pass.

    Pass p histograms digit p (bits 31-8p .. 24-8p) of the keys that share the digits found so far, then
    picks the digit holding the `need`-th largest of them (need starts at k). After 4 passes the prefix
    is the k-th largest key. It stops early once the chosen bucket must be kept whole (its count equals
    need): then {key >= prefix followed by zeros} is already the top-k set.
    """
    BLOCK: tl.constexpr = 4 * BLOCK_R
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.uint32)
    need = k
    done = k * 0
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        if done == 0:
            hist = tl.zeros([256], tl.int32)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < V
                key = _order_key(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32))
                if p > 0:
                    mask = mask & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                hist += tl.histogram(((key >> shift) & 0xFF).to(tl.int32), 256, mask=mask)
            at_or_above = tl.cumsum(hist, 0, reverse=True)  # keys in the bucket with digit >= d
            digit = tl.max(tl.where(at_or_above >= need, bins, 0))
            above = tl.sum(tl.where(bins > digit, hist, 0))
            in_bucket = tl.sum(tl.where(bins == digit, hist, 0))
            prefix = prefix | (digit.to(tl.uint32) << shift)
            need = need - above
            done = (in_bucket == need).to(tl.int32)
    return prefix


@triton.jit
def _row_argmax(row_ptr, V, thr, temperature, seed, codebook, frame, SAMPLE: tl.constexpr,
                BLOCK_R: tl.constexpr):
    """First index of the maximum of l (SAMPLE False) or of l / T - log(-log u) over {key(l) >= thr}."""
    BLOCK: tl.constexpr = 4 * BLOCK_R
    best = tl.full([BLOCK_R, 4], float("-inf"), tl.float32)
    best_i = tl.full([BLOCK_R, 4], V, tl.int32)  # V = nothing taken yet in this lane
    for start in range(0, V, BLOCK):
        x, idx, mask = _load_chunk(row_ptr, start, V, BLOCK_R)
        if SAMPLE:
            keep = mask & (_order_key(x) >= thr)
            u = _uniforms(seed, start, codebook, frame, BLOCK_R)
            s = tl.math.div_rn(x, temperature) - tl.log(-tl.log(u))  # IEEE x / T, as torch divides
        else:
            keep = mask
            s = x
        # a lane's indices grow from chunk to chunk: take its first element, then strictly larger ones only
        take = keep & ((s > best) | (best_i == V))
        best = tl.where(take, s, best)
        best_i = tl.where(take, idx, best_i)
    m = tl.max(best)
    return tl.min(tl.where(best == m, best_i, V))


@triton.jit
def _penalize_row(row_ptr, V, slot, n, penalty, context, hist_ptr, stride_hs, H, BLOCK_H: tl.constexpr):
    """Kyutai's repetition penalty on one row of logits, in place (rule: module docstring).

    The last C = min(context, n, H) entries of history row `slot` (entry i of the stream's tokens at
    index i mod H) are read, their logits gathered, penalised and scattered back. A token repeated in the
    window is not penalised twice: every copy computes the same value from the unpenalised logit, and
    all reads happen before any write (the barriers also make the writes visible to the later passes).
    """
    i = tl.arange(0, BLOCK_H)
    ok = i < tl.minimum(tl.minimum(context, n), H)
    tok = tl.load(hist_ptr + slot * stride_hs + tl.where(ok, (n - 1 - i) % H, 0), mask=ok, other=0)
    ok = ok & (tok >= 0) & (tok < V)
    x = tl.load(row_ptr + tok, mask=ok, other=0.0)
    xf = x.to(tl.float32)
    y = tl.where(xf >= 0, tl.math.div_rn(xf, penalty), xf * penalty)
    tl.debug_barrier()
    tl.store(row_ptr + tok, y.to(row_ptr.dtype.element_ty), mask=ok)
    tl.debug_barrier()


@triton.jit
def _sample_kernel(logits_ptr, stride_lb, temp_ptr, stride_t, topk_ptr, stride_k, seed_ptr, stride_s,
                   frame_ptr, stride_f, cb_ptr, stride_cb, cb_value, forced_ptr, stride_fo, out_ptr, stride_o, V,
                   rows_ptr, stride_r, pen_ptr, stride_p, ctx_ptr, stride_c, hist_ptr, stride_hs, hlen_ptr, H,
                   ignored_a, ignored_b,
                   GREEDY: tl.constexpr, CB_PER_ROW: tl.constexpr, HAS_FORCED: tl.constexpr,
                   HAS_HISTORY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program per row b of logits [B, V] (row stride stride_lb, unit column stride); writes out[b].

    HAS_HISTORY: the row's history slot is rows[b] (-1: none, nothing read or written); first its logits
    get the repetition penalty (penalty[b] fp32, context[b] int, history [S, H] int64 with row stride
    stride_hs, lengths hlen [S] int64), at the end the chosen token is appended unless it is ignored_a or
    ignored_b. HAS_FORCED: a row whose forced[b] (int) is >= 0 writes that token and reads no sampling
    parameter (teacher forcing; the penalty and the append still apply). GREEDY: argmax only (no
    parameter is read). Otherwise temperature[b] (fp32), top_k[b] (int), seed[b] and frame[b] (int64),
    codebook = cb_ptr[b] if CB_PER_ROW else cb_value select the rule and the random numbers described in
    the module docstring.
    """
    b = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + b * stride_lb
    slot = tl.full([], -1, tl.int64)
    n = tl.zeros([], tl.int64)
    if HAS_HISTORY:
        slot = tl.load(rows_ptr + b * stride_r).to(tl.int64)
        if slot >= 0:
            n = tl.load(hlen_ptr + slot)
            penalty = tl.load(pen_ptr + b * stride_p)
            context = tl.load(ctx_ptr + b * stride_c).to(tl.int64)
            if (penalty != 1.0) & (context > 0) & (n > 0):
                _penalize_row(row_ptr, V, slot, n, penalty, context, hist_ptr, stride_hs, H, BLOCK_H)
    forced = tl.full([], -1, tl.int64)
    if HAS_FORCED:
        forced = tl.load(forced_ptr + b * stride_fo).to(tl.int64)
    if forced >= 0:
        tok = forced
    elif GREEDY:
        tok = _row_argmax(row_ptr, V, 0, 1.0, 0, 0, 0, False, BLOCK_R).to(tl.int64)
    else:
        t = tl.load(temp_ptr + b * stride_t)
        if t > 0:
            k = tl.load(topk_ptr + b * stride_k).to(tl.int64)
            thr = tl.zeros([], tl.uint32)  # keeps every key
            if (k > 0) & (k < V):
                thr = _topk_threshold(row_ptr, V, k.to(tl.int32), BLOCK_R)
            seed = tl.load(seed_ptr + b * stride_s)
            frame = tl.load(frame_ptr + b * stride_f)
            if CB_PER_ROW:
                codebook = tl.load(cb_ptr + b * stride_cb).to(tl.int64)
            else:
                codebook = tl.zeros([], tl.int64) + cb_value
            tok = _row_argmax(row_ptr, V, thr, t, seed, codebook, frame, True, BLOCK_R).to(tl.int64)
        else:
            tok = _row_argmax(row_ptr, V, 0, 1.0, 0, 0, 0, False, BLOCK_R).to(tl.int64)
    tl.store(out_ptr + b * stride_o, tok)
    if HAS_HISTORY:
        if (slot >= 0) & (tok != ignored_a) & (tok != ignored_b):
            tl.store(hist_ptr + slot * stride_hs + n % H, tok)
            tl.store(hlen_ptr + slot, n + 1)


# ---- launch configuration ------------------------------------------------------------------------
_NUM_STAGES = 1  # the chunk loops carry reductions, not dots: nothing to pipeline

def _launch_config(V: int) -> tuple[int, int]:
    """(BLOCK_R, num_warps): chunks of 4 * BLOCK_R <= 4096 logits, about 16 logits per thread.

    A whole audio row (V = 2048) is one chunk; a text row (V = 32000) is 8 chunks of 4096, re-read from
    L1/L2 by every radix pass (it does not fit in one program's registers).
    """
    block = min(max(next_pow2(V), 64), 4096)
    return block // 4, max(1, min(8, block // 512))


# ---- public wrappers ---------------------------------------------------------------------------------
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int32, torch.int64)


def _check_logits(logits: torch.Tensor) -> None:
    check_tensor(logits, "logits", 2, _LOGIT_DTYPES)
    if not 1 <= logits.shape[1] < 2**31 - 4096:  # int32 vocabulary offsets, chunk tails included
        raise ValueError(f"logits must have 1 <= V < 2**31 - 4096 columns, got shape {list(logits.shape)}")
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must be contiguous along the vocabulary (stride(1) == 1), got strides "
                         f"{list(logits.stride())}")


def _check_out(out: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(B, dtype=torch.int64, device=device)
    check_tensor(out, "out", 1, (torch.int64,), device)
    if out.shape[0] != B:
        raise ValueError(f"out must have shape [{B}], got {list(out.shape)}")
    return out


def _check_row_param(t, name: str, B: int, dtypes, device) -> None:
    check_tensor(t, name, 1, dtypes, device)
    if t.shape[0] != B:
        raise ValueError(f"{name} must have shape [{B}] (one value per logits row), got {list(t.shape)}")


def _check_forced(forced, B: int, device, filler: torch.Tensor) -> torch.Tensor:
    """forced checked, or `filler` for its unused pointer slot when there is none."""
    if forced is None:
        return filler
    _check_row_param(forced, "forced", B, _INT_DTYPES, device)
    return forced


@dataclass(frozen=True)
class RepetitionPenalty:
    """What `sample_tokens` needs for Kyutai's repetition penalty (rule: module docstring), all on the
    logits' device:

      penalty [B] fp32   per logits row (1: none)
      context [B] int32/int64   how many of the most recent history entries count (0: none)
      rows [B] int32/int64      each row's history slot (-1: none; the row's history is neither read
                                 nor appended to, e.g. a padding row)
      history [S, H] int64      per slot, a ring of its H most recent non-ignored tokens
      length [S] int64          tokens appended to each slot so far (entry i lives at history[s, i % H])
      ignored                   the two token ids never appended (Kyutai: end-of-padding 0, padding 3)

    Rows must name distinct slots (each program appends to its own). Slot values are not checked (that
    would need a sync); they must lie in [-1, S).
    """
    penalty: torch.Tensor
    context: torch.Tensor
    rows: torch.Tensor
    history: torch.Tensor
    length: torch.Tensor
    ignored: tuple[int, int] = (0, 3)


def _check_penalty(rep: RepetitionPenalty, B: int, device) -> None:
    if not isinstance(rep, RepetitionPenalty):
        raise TypeError(f"repetition must be a RepetitionPenalty, got {type(rep).__name__}")
    _check_row_param(rep.penalty, "repetition.penalty", B, (torch.float32,), device)
    _check_row_param(rep.context, "repetition.context", B, _INT_DTYPES, device)
    _check_row_param(rep.rows, "repetition.rows", B, _INT_DTYPES, device)
    check_tensor(rep.history, "repetition.history", 2, (torch.int64,), device)
    S, H = rep.history.shape
    if H < 1 or rep.history.stride(1) != 1:
        raise ValueError(f"repetition.history must be [S, H >= 1] with contiguous rows, got shape "
                         f"{list(rep.history.shape)}, strides {list(rep.history.stride())}")
    check_tensor(rep.length, "repetition.length", 1, (torch.int64,), device)
    if tuple(rep.length.shape) != (S,) or rep.length.stride(0) != 1:
        raise ValueError(f"repetition.length must be a contiguous [{S}] (one per history row), got shape "
                         f"{list(rep.length.shape)}")
    if len(rep.ignored) != 2 or not all(isinstance(t, int) and not isinstance(t, bool) and -2**63 <= t < 2**63
                                        for t in rep.ignored):
        raise ValueError(f"repetition.ignored must be two int64 token ids, got {rep.ignored!r}")


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
                  frame: torch.Tensor, codebook: int | torch.Tensor, *, forced: torch.Tensor | None = None,
                  out: torch.Tensor | None = None, repetition: RepetitionPenalty | None = None) -> torch.Tensor:
    """One token per row of logits [B, V] (fp32/bf16/fp16) -> int64 [B]; one launch, no host sync.

    temperature [B] fp32 (<= 0: greedy), top_k [B] int32/int64 (<= 0 or >= V: no top-k), seed [B] int64
    (the stream's seed), frame [B] int64 (the stream's frame counter), codebook: 0 = text, 1..8 = audio
    codebooks, a Python int or an int32/int64 tensor [B]. forced: optional int32/int64 [B], teacher
    forcing per row: a row with forced >= 0 gets that token, one with forced < 0 is drawn. out: optional
    int64 [B]; both may be strided views (e.g. columns of a token buffer). repetition: optional Kyutai
    repetition penalty (`RepetitionPenalty`): the rows' logits are penalised IN PLACE, and each row's
    token (forced or drawn) is appended to its history. Rule and random numbers: module docstring.
    """
    _check_logits(logits)
    B, V = logits.shape
    dev = logits.device
    _check_row_param(temperature, "temperature", B, (torch.float32,), dev)
    _check_row_param(top_k, "top_k", B, _INT_DTYPES, dev)
    _check_row_param(seed, "seed", B, (torch.int64,), dev)
    _check_row_param(frame, "frame", B, (torch.int64,), dev)
    if isinstance(codebook, torch.Tensor):
        _check_row_param(codebook, "codebook", B, _INT_DTYPES, dev)
        cb_tensor, cb_value = codebook, 0
    elif isinstance(codebook, int) and not isinstance(codebook, bool):
        if not 0 <= codebook < 2**31:
            raise ValueError(f"codebook must be in [0, 2**31), got {codebook}")
        cb_tensor, cb_value = seed, codebook  # seed only fills the unused pointer slot
    else:
        raise TypeError(f"codebook must be an int or an int tensor [B], got {type(codebook).__name__}")
    forced_arg = _check_forced(forced, B, dev, seed)
    out = _check_out(out, B, dev)
    if repetition is not None:
        _check_penalty(repetition, B, dev)
    if B == 0:
        return out
    block_r, num_warps = _launch_config(V)
    rep = repetition
    if rep is None:  # seed / temperature fill the unused pointer slots
        history_args = (seed, 0, temperature, 0, seed, 0, seed, 0, seed, 1, 0, 0)
    else:
        history_args = (rep.rows, rep.rows.stride(0), rep.penalty, rep.penalty.stride(0), rep.context,
                        rep.context.stride(0), rep.history, rep.history.stride(0), rep.length, rep.history.shape[1],
                        *rep.ignored)
    _sample_kernel[(B,)](
        logits, logits.stride(0), temperature, temperature.stride(0), top_k, top_k.stride(0),
        seed, seed.stride(0), frame, frame.stride(0), cb_tensor, cb_tensor.stride(0), cb_value,
        forced_arg, forced_arg.stride(0), out, out.stride(0), V, *history_args,
        GREEDY=False, CB_PER_ROW=isinstance(codebook, torch.Tensor), HAS_FORCED=forced is not None,
        HAS_HISTORY=rep is not None, BLOCK_R=block_r,
        BLOCK_H=1 if rep is None else next_pow2(rep.history.shape[1]),
        num_warps=num_warps, num_stages=_NUM_STAGES)
    record_launch("sample_tokens")
    return out


def greedy_tokens(logits: torch.Tensor, *, forced: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """argmax of each row of logits [B, V] (first maximum on ties) -> int64 [B], one launch; `forced`
    and `out` as in `sample_tokens`."""
    _check_logits(logits)
    B, V = logits.shape
    forced_arg = _check_forced(forced, B, logits.device, logits)
    out = _check_out(out, B, logits.device)
    if B == 0:
        return out
    block_r, num_warps = _launch_config(V)
    _sample_kernel[(B,)](  # GREEDY reads no parameter: any tensor fills those pointer slots
        logits, logits.stride(0), logits, 0, out, 0, out, 0, out, 0, out, 0, 0, forced_arg, forced_arg.stride(0),
        out, out.stride(0), V, out, 0, logits, 0, out, 0, out, 0, out, 1, 0, 0,
        GREEDY=True, CB_PER_ROW=False, HAS_FORCED=forced is not None, HAS_HISTORY=False,
        BLOCK_R=block_r, BLOCK_H=1, num_warps=num_warps, num_stages=_NUM_STAGES)
    record_launch("greedy_tokens")
    return out


# ---- references (plain PyTorch) -----------------------------------------------------------------------
_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for a in [0, 2^32) (int64) and m < 2^32, without int64 overflow."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    t = a * (m >> 16) + (p_lo >> 16)  # a * m = t * 2^16 + (p_lo mod 2^16), t < 2^49
    return t >> 16, ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32_reference(key: torch.Tensor, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 as triton.language.random.philox: key int64 (low word k0, high word k1), counters int64
    tensors holding values in [0, 2^32). Returns the four output words as int64 in [0, 2^32)."""
    k0, k1 = key & _M32, (key >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo32(c2, _PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, _PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def uint32_to_uniform_reference(w: torch.Tensor) -> torch.Tensor:
    """tl.uint_to_uniform_float for uint32 words (int64 holding [0, 2^32)) -> fp32 in [0, 1)."""
    s = torch.where(w >= 2**31, w - 2**32, w)  # the word read as int32
    s = torch.where(s < 0, -s - 1, s)
    return s.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def sampling_uniforms_reference(seed: torch.Tensor, frame: torch.Tensor, codebook: torch.Tensor, V: int
                                ) -> torch.Tensor:
    """The kernel's uniforms u [B, V] for int64 seed, frame, codebook [B] (scheme: module docstring)."""
    col = lambda t: t.to(torch.int64).reshape(-1, 1)  # noqa: E731
    counter = torch.arange((V + 3) // 4, dtype=torch.int64, device=seed.device).reshape(1, -1)
    zero = torch.zeros_like(counter)
    words = philox4x32_reference(col(seed), counter, zero + (col(codebook) & _M32),
                                 zero + (col(frame) & _M32), zero + ((col(frame) >> 32) & _M32))
    return uint32_to_uniform_reference(torch.stack(words, dim=-1).reshape(seed.shape[0], -1)[:, :V])


def sample_tokens_reference(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                            seed: torch.Tensor, frame: torch.Tensor, codebook: int | torch.Tensor, *,
                            forced: torch.Tensor | None = None) -> torch.Tensor:
    """sample_tokens in fp32 PyTorch with the same uniforms, so tokens can be compared exactly."""
    x = logits.float()
    B, V = x.shape
    cb = codebook if isinstance(codebook, torch.Tensor) else torch.full((B,), codebook, dtype=torch.int64)
    u = sampling_uniforms_reference(seed, frame, cb.to(x.device), V)
    k = top_k.to(torch.int64).reshape(B, 1)
    kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1).clamp(0, V - 1))
    keep = (x >= kth) | (k <= 0) | (k >= V)
    t = temperature.reshape(B, 1)
    scores = torch.where(keep, x / t - torch.log(-torch.log(u)), float("-inf"))
    raced = scores.argmax(-1)
    # only when every kept score is -inf: the first kept token (what the kernel's lanes keep)
    raced = torch.where(keep.gather(1, raced[:, None])[:, 0], raced, keep.to(torch.int8).argmax(-1))
    tokens = torch.where(temperature > 0, raced, greedy_tokens_reference(x))
    return tokens if forced is None else torch.where(forced >= 0, forced.to(torch.int64), tokens)


def greedy_tokens_reference(logits: torch.Tensor, *, forced: torch.Tensor | None = None) -> torch.Tensor:
    """torch.argmax per row (first maximum on ties); rows with forced >= 0 take that token."""
    tokens = logits.float().argmax(-1)
    return tokens if forced is None else torch.where(forced >= 0, forced.to(torch.int64), tokens)


def repetition_penalty_reference(logits: torch.Tensor, repetition: RepetitionPenalty) -> torch.Tensor:
    """The logits `sample_tokens(..., repetition=...)` draws from (a new tensor in logits' dtype): in each
    row with a slot, the distinct tokens among the last min(context, n, H) history entries penalised."""
    rep, (B, V) = repetition, logits.shape
    H = rep.history.shape[1]
    slot = rep.rows.long().clamp(min=0)
    n = rep.length[slot]                                                   # [B] tokens appended so far
    count = torch.minimum(torch.minimum(rep.context.long(), n), torch.full_like(n, H))
    count = torch.where(rep.rows >= 0, count, 0)
    i = torch.arange(H, device=logits.device)
    recent = rep.history[slot[:, None], (n[:, None] - 1 - i) % H]          # [B, H] newest first
    counted = (i < count[:, None]) & (recent >= 0) & (recent < V)
    penalised = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
    penalised.scatter_(1, torch.where(counted, recent, V), True)            # a set: duplicates count once
    x, p = logits.float(), rep.penalty[:, None]
    y = torch.where(x >= 0, x / p, x * p).to(logits.dtype)
    return torch.where(penalised[:, :V], y, logits)


def append_history_reference(repetition: RepetitionPenalty, tokens: torch.Tensor) -> None:
    """Each row with a slot appends its token [B] to its history (in place) unless the token is ignored."""
    rep = repetition
    keep = (rep.rows >= 0) & (tokens != rep.ignored[0]) & (tokens != rep.ignored[1])
    slot = rep.rows.long()[keep]
    n = rep.length[slot]
    rep.history[slot, n % rep.history.shape[1]] = tokens[keep].to(torch.int64)
    rep.length[slot] = n + 1


# ---- static audit hook --------------------------------------------------------------------------------
def audit_cases() -> list[dict]:
    """The kernel at moshika-vis shapes in bf16: text head (V = 32000, codebook 0, with the repetition
    penalty's history of 256 tokens, as the runtime launches it) and an audio head (V = 2048, per-row
    codebook tensor), sampling and greedy variants; int_values are the integer arguments of such a launch
    (contiguous [B, V] logits; per-row parameters, forced and out as the runtime passes them: columns of
    its frame buffers)."""
    sig = {"logits_ptr": "*bf16", "stride_lb": "i32", "temp_ptr": "*fp32", "stride_t": "i32",
           "topk_ptr": "*i64", "stride_k": "i32", "seed_ptr": "*i64", "stride_s": "i32",
           "frame_ptr": "*i64", "stride_f": "i32", "cb_ptr": "*i64", "stride_cb": "i32", "cb_value": "i32",
           "forced_ptr": "*i64", "stride_fo": "i32", "out_ptr": "*i64", "stride_o": "i32", "V": "i32",
           "rows_ptr": "*i64", "stride_r": "i32", "pen_ptr": "*fp32", "stride_p": "i32", "ctx_ptr": "*i64",
           "stride_c": "i32", "hist_ptr": "*i64", "stride_hs": "i32", "hlen_ptr": "*i64", "H": "i32",
           "ignored_a": "i64", "ignored_b": "i64"}
    history = 256
    cases = []
    for name, V, greedy, per_row, penalty in (("text", 32000, False, False, True), ("audio", 2048, False, True, False),
                                              ("text_greedy", 32000, True, False, False)):
        block_r, num_warps = _launch_config(V)
        # as the runtime passes them: columns of its [B, 2] temperature / top-k, [B, 9] forced / tokens
        strides = {"stride_t": 2, "stride_k": 2, "stride_s": 1, "stride_f": 1, "stride_cb": 1, "stride_o": 9,
                   "stride_r": 1, "stride_p": 1, "stride_c": 1, "stride_hs": history, "H": history}
        cases.append({"name": f"sample_tokens_{name}", "fn": _sample_kernel, "signature": dict(sig),
                      "constexprs": {"GREEDY": greedy, "CB_PER_ROW": per_row, "HAS_FORCED": True,
                                     "HAS_HISTORY": penalty, "BLOCK_R": block_r,
                                     "BLOCK_H": next_pow2(history) if penalty else 1},
                      "int_values": {"stride_lb": V, "V": V, "cb_value": 0, "stride_fo": 9, **strides},
                      "num_warps": num_warps, "num_stages": _NUM_STAGES})
    return cases
