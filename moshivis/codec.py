"""Mimi for many streams at once: one batched encode and one batched decode per frame.

`moshivis.audio` streams Mimi one conversation at a time (`EncoderStream`, `DecoderStream`), so a
server with N speech streams runs the codec N times per 80 ms frame, each call at batch 1 where
per-call overhead and re-reading the weights dominate. `MimiStreams` runs every stream of a frame in
one call per direction: each stream owns a *slot*, and the causal state of every slot lives in
preallocated tensors indexed by slot:

* each causal convolution (`MimiConv1d`): its last `kernel - stride` inputs, [C, slots + 1, P];
  the encoder's downsampling convolution pads with the stream's first sample (`pad_mode
  "replicate"`), so a slot also carries a "fresh" flag until its first frame;
* each transposed convolution (`MimiConvTranspose1d`, kernel = 2 x stride): the outputs of the last
  input that overlap the next frame, without bias, [C_out, slots + 1, stride];
* each transformer: a K and V ring buffer per layer, [layers, slots + 1, heads, R, head_dim] with
  R = sliding_window + tokens per frame - 1 (the window of the frame's first token plus the frame's
  own tokens), and the slot's position (tokens seen) for RoPE and the sliding-window mask, since
  streams join at different frames.

A frame gathers its rows' state (index_select by slot), runs every layer batched, and scatters the
new state back (index_copy_). Slot `max_streams` is scratch: padding rows (slot -1) compute on it
and never touch a stream's state. A batch runs in the smallest bucket (a power of two, or
max_streams) that holds it; each bucket has its own fixed buffers and its own list of ops, all
`out=` / in-place, so a steady frame allocates nothing and the op sequence of a bucket has static
shapes and addresses: on a GPU it is captured once as a CUDA graph (after an eager frame) and
replayed, as the engine's triton backend does.

Every layer computes what transformers' `MimiModel` computes, from its own weights (views, no
copies; only the codebook tables are precomputed, as transformers caches them): convolutions as
im2col + one GEMM over all rows and time steps ([channels, rows, time] layout throughout; a GEMM
with few columns runs transposed, which CPU BLAS does several times faster), transposed convolutions
as one GEMM plus an overlap-add with the carried tail, the transformer (LayerNorm, q/k/v, RoPE at
each row's own positions, attention over the ring with a per-row sliding-window mask, layer scale,
GELU MLP), and the split residual quantizer with `torch.cdist`'s own formula
(`[-2x, ||x||^2, 1] . [e, 1, ||e||^2]`, clamped, square root), so the nearest codebook entry is
chosen as transformers chooses it. tests/test_codec.py checks the codes against `MimiModel.encode`
on each whole signal and the PCM against `DecoderStream` per stream; `python -m bench.codec`
measures it against the per-stream loop.
"""
from __future__ import annotations

import functools
import math
import operator

import torch
from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

from moshivis_kernels._runtime import next_pow2

from .audio import AudioError, MimiCodec

PAD_SLOT = -1  # a padding row in `slots`


def _fail(msg: str):
    raise AudioError(msg)


class _Plan:
    """One bucket of one direction: its fixed buffers, its ops (callables run in order, all writing
    into the buffers), its host mirrors and, on a GPU, its CUDA graph."""

    def __init__(self, size: int, device: torch.device, dtype: torch.dtype, col_numel: int):
        self.size, self.device, self.dtype = size, device, dtype
        self.ops: list = []
        self.rows = torch.empty(size, dtype=torch.long, device=device)      # slot of each row (scratch for padding)
        self.pos_rows = torch.empty(size, dtype=torch.long, device=device)  # tokens each row's stream has seen
        self.fresh_rows = torch.empty(size, dtype=torch.bool, device=device)
        self._col = torch.empty(max(col_numel, 1), dtype=dtype, device=device)  # im2col scratch, shared by convs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.input: torch.Tensor | None = None   # set by the direction: pcm [B, frame] or codes [B, nq]
        self.output: torch.Tensor | None = None  # codes [nq, B] or pcm [B, frame]

    def op(self, fn, *args, **kwargs) -> None:
        self.ops.append(functools.partial(fn, *args, **kwargs))

    def buf(self, *shape, dtype=None) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype or self.dtype, device=self.device)

    def scalar(self, value: float, dtype=None) -> torch.Tensor:
        """A 0-dim tensor (default: the plan's dtype): an op given a Python number allocates one per call."""
        return torch.full((), value, dtype=dtype or self.dtype, device=self.device)

    def col(self, *shape) -> torch.Tensor:
        return self._col[: math.prod(shape)].view(shape)

    def stage(self) -> None:
        """Host mirrors of the rows and the input (page-locked on a GPU, the buffers themselves on a CPU)."""
        if self.device.type == "cpu":
            self.host_rows, self.host_input, self.host_output = self.rows, self.input, self.output
        else:
            pinned = dict(device="cpu", pin_memory=True)
            self.host_rows = torch.empty_like(self.rows, **pinned)
            self.host_input = torch.empty_like(self.input, **pinned)
            self.host_output = torch.empty_like(self.output, **pinned)
            self.ready = torch.cuda.Event()
        self.host_rows_np = self.host_rows.numpy()

    def run(self) -> None:
        for fn in self.ops:
            fn()


# Below this many columns a GEMM runs transposed (out^T = mat^T W^T): CPU BLAS is several times faster
# that way round for the skinny products of the low-rate layers at small batches (measured).
SKINNY = 128


def _gemm(p: _Plan, weight: torch.Tensor, mat: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[O, N] = weight [O, K] @ mat [K, N] (+ bias [O]), into a buffer of plan p; a view either way round."""
    (O, _), N = weight.shape, mat.shape[1]
    if N <= SKINNY:
        out = p.buf(N, O)
        if bias is None:
            p.op(torch.mm, mat.t(), weight.t(), out=out)
        else:
            p.op(torch.addmm, bias, mat.t(), weight.t(), out=out)
        return out.t()
    out = p.buf(O, N)
    if bias is None:
        p.op(torch.mm, weight, mat, out=out)
    else:
        p.op(torch.addmm, bias[:, None], weight, mat, out=out)
    return out


def _act(plan: _Plan, act: bool, src: torch.Tensor, dst: torch.Tensor) -> None:
    """dst = ELU(src) if act else src (one op)."""
    if act:
        plan.op(torch._C._nn.elu, src, out=dst)
    else:
        plan.op(dst.copy_, src)


# ---- layers: per-slot state made once, ops emitted per bucket ----------------------------------------
class _Conv:
    """A causal `MimiConv1d`: y = conv([the slot's last P inputs, this frame's T inputs]), P = kernel - stride."""

    def __init__(self, m: MimiConv1d, slots: int, steps: int):
        c = m.conv
        if c.groups != 1:
            _fail(f"MimiStreams: grouped convolutions are not supported (groups={c.groups})")
        if m.pad_mode not in ("constant", "replicate"):
            _fail(f"MimiStreams: pad_mode {m.pad_mode!r} is not supported (constant or replicate)")
        self.C, self.O, self.k = c.in_channels, c.out_channels, c.kernel_size[0]
        self.s, self.d = c.stride[0], c.dilation[0]
        self.P = int(m.padding_total)
        if self.P < 0:
            _fail(f"MimiStreams: a convolution with kernel {self.k} < stride {self.s} is not supported")
        self.replicate = m.pad_mode == "replicate"
        if steps % self.s:
            _fail(f"MimiStreams: {steps} steps per frame do not divide by a convolution stride {self.s}")
        self.T, self.T_out = steps, steps // self.s
        self.weight = c.weight.detach().view(self.O, self.C * self.k)  # [O, C*k], the (c, j) order of im2col
        self.bias = None if c.bias is None else c.bias.detach()
        self.state = torch.zeros(self.C, slots + 1, self.P, dtype=c.weight.dtype, device=c.weight.device)

    def col_numel(self, size: int) -> int:
        return self.C * self.k * size * self.T_out if self.k > 1 else 0

    def emit(self, p: _Plan, src: torch.Tensor, act: bool) -> torch.Tensor:
        """src [C, B, T] -> [O, B, T_out] (a buffer of this bucket)."""
        B, C, P, T = p.size, self.C, self.P, self.T
        if self.k == 1 and self.s == 1:  # a pointwise convolution: no past, no im2col
            x = p.buf(C, B, T)
            _act(p, act, src, x)
            mat = x.view(C, B * T)
        else:
            x = p.buf(C, B, P + T)
            _act(p, act, src, x[:, :, P:])
            p.op(torch.index_select, self.state, 1, p.rows, out=x[:, :, :P])  # the rows' past inputs
            if self.replicate:  # a stream's first frame pads with its first sample
                p.op(torch.where, p.fresh_rows[None, :, None], x[:, :, P:P + 1], x[:, :, :P], out=x[:, :, :P])
            p.op(self.state.index_copy_, 1, p.rows, x[:, :, T:])              # the last P inputs, for the next frame
            col = p.col(C, self.k, B, self.T_out)
            L = P + T
            p.op(col.copy_, x.as_strided((C, self.k, B, self.T_out), (B * L, self.d, L, self.s)))
            mat = col.view(C * self.k, B * self.T_out)
        return _gemm(p, self.weight, mat, self.bias).view(self.O, B, self.T_out)


class _ConvTranspose:
    """A `MimiConvTranspose1d` (kernel = 2 x stride, trimmed on the right): input t adds its first
    `stride` outputs to block t and its last `stride` to block t + 1; the last input's second half
    is the slot's tail, added to the next frame's first block (the bias once per output)."""

    def __init__(self, m: MimiConvTranspose1d, slots: int, steps: int):
        c = m.conv
        self.C, self.O, self.k, self.s, self.G = c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.groups
        if self.k != 2 * self.s or m.padding_left != 0:
            _fail(f"MimiStreams: transposed convolutions need kernel = 2 x stride trimmed on the right "
                  f"(kernel {self.k}, stride {self.s})")
        self.T = steps
        if self.G not in (1, self.C) or (self.G > 1 and self.O != self.C):
            _fail(f"MimiStreams: transposed convolutions must be dense or depthwise (groups={self.G})")
        # weight [C, O/G, k] -> [(o, j), c] (dense, a transposed view) or [c, j] (depthwise)
        w = c.weight.detach()
        self.weight = w.view(self.C, self.O * self.k).t() if self.G == 1 else w.view(self.C, self.k, 1)
        self.bias = None if c.bias is None else c.bias.detach()[:, None, None, None]
        self.state = torch.zeros(self.O, slots + 1, self.s, dtype=c.weight.dtype, device=c.weight.device)

    def emit(self, p: _Plan, src: torch.Tensor, act: bool) -> torch.Tensor:
        """src [C, B, T] -> [O, B, T * stride]."""
        B, T, s, O = p.size, self.T, self.s, self.O
        x = p.buf(self.C, B, T)
        _act(p, act, src, x)
        if self.G == 1:
            y = _gemm(p, self.weight, x.view(self.C, B * T), None)      # [(o, j), (b, t)]
        else:                                                           # depthwise: y[c, j] = w[c, j] x[c]
            y = p.buf(O, self.k, B * T)
            p.op(torch.mul, self.weight, x.view(O, 1, B * T), out=y)
        halves = y.view(O, 2, s, B, T).permute(1, 0, 3, 4, 2)       # [2, O, B, T, s] (a view)
        e = p.buf(O, B, T + 1, s)                                       # [tail, second halves of inputs 0..T-1]
        p.op(torch.index_select, self.state, 1, p.rows, out=e[:, :, 0])
        p.op(e[:, :, 1:].copy_, halves[1])
        out = p.buf(O, B, T, s)
        p.op(torch.add, halves[0], e[:, :, :T], out=out)
        if self.bias is not None:
            p.op(out.add_, self.bias)
        p.op(self.state.index_copy_, 1, p.rows, e[:, :, T])
        return out.view(O, B, T * s)


class _SEANet:
    """The layers of a SEANet encoder or decoder: convolutions, transposed convolutions, ELUs (fused
    into the next layer's input copy) and residual blocks (identity shortcut)."""

    def __init__(self, layers, slots: int, steps: int):
        self.items, self.steps = [], steps
        for layer in layers:
            if isinstance(layer, MimiConv1d):
                self.items.append(_Conv(layer, slots, self.steps))
                self.steps = self.items[-1].T_out
            elif isinstance(layer, MimiConvTranspose1d):
                self.items.append(_ConvTranspose(layer, slots, self.steps))
                self.steps *= self.items[-1].s
            elif isinstance(layer, MimiResnetBlock):
                if isinstance(layer.shortcut, MimiConv1d):
                    _fail("MimiStreams: convolutional shortcuts (use_conv_shortcut) are not supported")
                block = _SEANet(layer.block, slots, self.steps)
                if block.steps != self.steps:
                    _fail("MimiStreams: a residual block changes the time resolution")
                self.items.append(block)
            elif isinstance(layer, torch.nn.ELU) and layer.alpha == 1.0:
                self.items.append("elu")
            else:
                _fail(f"MimiStreams: unsupported SEANet layer {type(layer).__name__}")

    def layers(self):
        for item in self.items:
            if isinstance(item, _SEANet):
                yield from item.layers()
            elif item != "elu":
                yield item

    def emit(self, p: _Plan, x: torch.Tensor) -> torch.Tensor:
        act = False
        for item in self.items:
            if item == "elu":
                act = True
                continue
            if isinstance(item, _SEANet):  # residual block: x + block(x)
                y = item.emit(p, x)
                p.op(y.add_, x)
                x = y
            else:
                x = item.emit(p, x, act)
            act = False
        return x


class _Transformer:
    """A `MimiTransformerModel` over `steps` tokens per frame, with a per-slot KV ring buffer."""

    def __init__(self, model, slots: int, steps: int):
        cfg = model.config
        attn = model.layers[0].self_attn
        self.H, self.hd, self.d = attn.num_heads, attn.head_dim, cfg.hidden_size
        if attn.num_key_value_heads != self.H:
            _fail("MimiStreams: grouped-query attention (num_key_value_heads != num_attention_heads) is not supported")
        if not cfg.sliding_window:
            _fail("MimiStreams: needs a sliding window (MimiConfig.sliding_window)")
        if model.rotary_emb.rope_type != "default" or model.rotary_emb.attention_scaling != 1.0:
            _fail(f"MimiStreams: only default RoPE is supported, not {model.rotary_emb.rope_type!r}")
        if cfg.hidden_act != "gelu":
            _fail(f"MimiStreams: only the exact GELU is supported, not {cfg.hidden_act!r}")
        self.T, self.W = steps, cfg.sliding_window
        self.R = self.W + steps - 1
        self.eps, self.scale = cfg.norm_eps, attn.scaling
        self.inv_freq = model.rotary_emb.inv_freq.detach()

        def params(module):  # (weight, bias) of a Linear or LayerNorm, detached views
            return module.weight.detach(), None if module.bias is None else module.bias.detach()

        self.layers = [dict(
            ln1=params(layer.input_layernorm), ln2=params(layer.post_attention_layernorm),
            q=params(layer.self_attn.q_proj), k=params(layer.self_attn.k_proj), v=params(layer.self_attn.v_proj),
            o=params(layer.self_attn.o_proj), fc1=params(layer.mlp.fc1), fc2=params(layer.mlp.fc2),
            scale1=layer.self_attn_layer_scale.scale.detach(), scale2=layer.mlp_layer_scale.scale.detach())
            for layer in model.layers]
        device = self.inv_freq.device
        shape = (len(self.layers), slots + 1, self.H, self.R, self.hd)
        self.k_state = torch.zeros(shape, dtype=self.layers[0]["q"][0].dtype, device=device)
        self.v_state = torch.zeros_like(self.k_state)
        self.ring_offsets = torch.arange(self.R, device=device)                   # r
        self.step_offsets = torch.arange(steps, device=device)                    # t
        self.head_offsets = torch.arange(self.H, device=device) * self.R          # h * R

    def _linear(self, p: _Plan, x, wb, out) -> None:
        weight, bias = wb
        if bias is None:
            p.op(torch.mm, x, weight.t(), out=out)
        else:
            p.op(torch.addmm, bias, x, weight.t(), out=out)

    def _layer_norm(self, p: _Plan, x, wb, out, stats) -> None:
        """out = (x - mean) / sqrt(var + eps) * weight + bias over the last dim."""
        mean, var = stats
        p.op(torch.sum, x, -1, keepdim=True, out=mean)
        p.op(mean.div_, p.scalar(x.shape[-1]))
        p.op(torch.var, x, -1, correction=0, keepdim=True, out=var)
        p.op(var.add_, p.scalar(self.eps))
        p.op(var.rsqrt_)
        p.op(torch.sub, x, mean, out=out)
        p.op(out.mul_, var)
        weight, bias = wb
        p.op(torch.addcmul, bias, out, weight, out=out)

    def emit(self, p: _Plan, src: torch.Tensor) -> torch.Tensor:
        """src [d, B, T] -> tokens [B, T, d]; the rows' positions are p.pos_rows (updated by the caller)."""
        B, T, H, hd, R, W, d = p.size, self.T, self.H, self.hd, self.R, self.W, self.d
        N, half = B * T, hd // 2
        x = p.buf(B, T, d)
        p.op(x.copy_, src.permute(1, 2, 0))
        xf = x.view(N, d)

        # Per frame, for every layer: positions, RoPE angles, ring rows of the new tokens, the mask.
        pos = p.buf(B, T, dtype=torch.long)
        p.op(torch.add, p.pos_rows[:, None], self.step_offsets, out=pos)             # each token's position
        angle = p.buf(B, T, 1, half)
        p.op(angle.copy_, pos.view(B, T, 1, 1).expand(B, T, 1, half))
        p.op(angle.mul_, self.inv_freq)                                               # as MimiRotaryEmbedding
        cos, sin = p.buf(B, T, 1, half), p.buf(B, T, 1, half)
        p.op(torch.cos, angle, out=cos)
        p.op(torch.sin, angle, out=sin)
        ring = p.buf(B, T, dtype=torch.long)
        ring_size = p.scalar(R, torch.long)
        p.op(torch.remainder, pos, ring_size, out=ring)
        base = p.buf(B, dtype=torch.long)
        p.op(torch.mul, p.rows, p.scalar(H * R, torch.long), out=base)
        lin = p.buf(B, T, H, dtype=torch.long)  # row of token (b, t), head h in a layer's state [(slots+1)*H*R, hd]
        p.op(torch.add, ring[:, :, None], self.head_offsets, out=lin)
        p.op(lin.add_, base[:, None, None])
        last = p.buf(B, 1, dtype=torch.long)
        p.op(torch.add, p.pos_rows[:, None], p.scalar(T - 1, torch.long), out=last)
        held = p.buf(B, R, dtype=torch.long)  # the position whose key ring entry r holds: last - ((last - r) mod R)
        p.op(torch.sub, last, self.ring_offsets, out=held)
        p.op(held.remainder_, ring_size)
        p.op(torch.sub, last, held, out=held)
        age = p.buf(B, T, R, dtype=torch.long)
        p.op(torch.sub, pos[:, :, None], held[:, None, :], out=age)
        hidden, too_old, unwritten = (p.buf(B, T, R, dtype=torch.bool), p.buf(B, T, R, dtype=torch.bool),
                                      p.buf(B, R, dtype=torch.bool))
        p.op(torch.lt, age, 0, out=hidden)             # a later token of this frame
        p.op(torch.ge, age, W, out=too_old)            # outside the sliding window
        p.op(torch.lt, held, 0, out=unwritten)         # before the stream's first token
        p.op(hidden.logical_or_, too_old)
        p.op(hidden.logical_or_, unwritten[:, None, :])
        mask = p.buf(B, 1, T, R)
        p.op(mask.zero_)
        p.op(mask.masked_fill_, hidden.view(B, 1, T, R), float("-inf"))

        h, stats = p.buf(N, d), (p.buf(N, 1), p.buf(N, 1))
        q, k, v = p.buf(N, H * hd), p.buf(N, H * hd), p.buf(N, H * hd)
        q_rot = p.buf(B, H, T, hd)          # bmm layout
        k_rot = p.buf(B, T, H, hd)          # state rows in (b, t, h) order, as `lin`
        keys, values = p.buf(B, H, R, hd), p.buf(B, H, R, hd)
        scores = p.buf(B, H, T, R)
        probs = p.buf(B, H, T, R)
        ctx, ctx_t = p.buf(B, H, T, hd), p.buf(B, T, H, hd)
        o = p.buf(N, d)
        f = p.buf(N, self.layers[0]["fc1"][0].shape[0])
        rows_flat = lin.view(-1)
        for i, layer in enumerate(self.layers):
            self._layer_norm(p, xf, layer["ln1"], h, stats)
            for name, out in (("q", q), ("k", k), ("v", v)):
                self._linear(p, h, layer[name], out)
            # RoPE (rotate-half): first half x1 cos - x2 sin, second half x2 cos + x1 sin
            for src_, dst in ((q, q_rot.permute(0, 2, 1, 3)), (k, k_rot)):
                s4 = src_.view(B, T, H, hd)
                x1, x2, y1, y2 = s4[..., :half], s4[..., half:], dst[..., :half], dst[..., half:]
                p.op(torch.mul, x1, cos, out=y1)
                p.op(y1.addcmul_, x2, sin, value=-1)
                p.op(torch.mul, x2, cos, out=y2)
                p.op(y2.addcmul_, x1, sin)
            ks, vs = self.k_state[i], self.v_state[i]
            p.op(ks.view(-1, hd).index_copy_, 0, rows_flat, k_rot.view(N * H, hd))
            p.op(vs.view(-1, hd).index_copy_, 0, rows_flat, v.view(N * H, hd))
            p.op(torch.index_select, ks, 0, p.rows, out=keys)
            p.op(torch.index_select, vs, 0, p.rows, out=values)
            sc = scores.view(B * H, T, R)
            p.op(torch.bmm, q_rot.view(B * H, T, hd), keys.view(B * H, R, hd).transpose(1, 2), out=sc)
            p.op(torch.add, mask, scores, alpha=self.scale, out=scores)
            p.op(torch.softmax, scores, -1, out=probs)
            p.op(torch.bmm, probs.view(B * H, T, R), values.view(B * H, R, hd), out=ctx.view(B * H, T, hd))
            p.op(ctx_t.copy_, ctx.permute(0, 2, 1, 3))
            self._linear(p, ctx_t.view(N, H * hd), layer["o"], o)
            p.op(xf.addcmul_, o, layer["scale1"])
            self._layer_norm(p, xf, layer["ln2"], h, stats)
            self._linear(p, h, layer["fc1"], f)
            p.op(torch.ops.aten.gelu_, f)
            self._linear(p, f, layer["fc2"], o)
            p.op(xf.addcmul_, o, layer["scale2"])
        return x


def _codebook(layer) -> torch.Tensor:
    return layer.codebook.embed.detach()  # embed_sum / cluster_usage, as transformers computes it


class _Quantize:
    """The split residual quantizer's encode: latents [d, B] -> codes [nq, B]."""

    def __init__(self, quantizer, nq: int):
        self.groups = []
        n_sem = quantizer.num_semantic_quantizers
        for rvq, count in ((quantizer.semantic_residual_vector_quantizer, n_sem),
                           (quantizer.acoustic_residual_vector_quantizer, nq - n_sem)):
            books = []
            for layer in rvq.layers[:count]:
                e = _codebook(layer)
                ones = torch.ones(e.shape[0], 1, dtype=e.dtype, device=e.device)
                # torch.cdist's matrix form: [x, 1, ||x||^2]-padded codebook against [-2x, ||x||^2, 1]
                books.append((torch.cat([e, ones, e.pow(2).sum(-1, keepdim=True)], -1), e))
            proj = None if rvq.input_proj is None else rvq.input_proj.weight.detach()[:, :, 0]  # [D, d]
            self.groups.append((proj, books))
        self.dim = self.groups[0][1][0][1].shape[1]

    def emit(self, p: _Plan, latents: torch.Tensor, codes: torch.Tensor) -> None:
        B, D = p.size, self.dim
        res = p.buf(B, D)
        ext = p.buf(B, D + 2)  # [-2 res, ||res||^2, 1]
        ext[:, D + 1] = 1.0
        sq, norm, quantized = p.buf(B, D), p.buf(B, 1), p.buf(B, D)
        dist = p.buf(B, self.groups[0][1][0][0].shape[0])
        minus_two = p.scalar(-2.0)
        q = 0
        for proj, books in self.groups:
            if proj is None:
                p.op(res.copy_, latents.t())
            else:
                p.op(torch.mm, latents.t(), proj.t(), out=res)
            for padded, embed in books:
                p.op(torch.mul, res, minus_two, out=ext[:, :D])
                p.op(torch.pow, res, 2, out=sq)
                p.op(torch.sum, sq, -1, keepdim=True, out=norm)
                p.op(ext[:, D:D + 1].copy_, norm)
                p.op(torch.mm, ext, padded.t(), out=dist)
                p.op(dist.clamp_min_, 0)
                p.op(dist.sqrt_)
                p.op(torch.argmin, dist, 1, out=codes[q])
                p.op(torch.index_select, embed, 0, codes[q], out=quantized)
                p.op(res.sub_, quantized)
                q += 1


class _Dequantize:
    """The split residual quantizer's decode: codes [B, nq] -> latents [d, B] (sum of each group's
    codebook vectors, through the group's output projection)."""

    def __init__(self, quantizer, nq: int):
        self.n_sem, self.nq = quantizer.num_semantic_quantizers, nq
        books = [_codebook(layer) for layer in quantizer.semantic_residual_vector_quantizer.layers[:self.n_sem]] + \
                [_codebook(layer) for layer in quantizer.acoustic_residual_vector_quantizer.layers[:nq - self.n_sem]]
        self.card = books[0].shape[0]
        self.table = torch.cat(books)                                                    # [nq * card, D]
        self.offsets = torch.arange(nq, device=self.table.device) * self.card
        self.proj = [None if r.output_proj is None else r.output_proj.weight.detach()[:, :, 0]   # [d, D]
                     for r in (quantizer.semantic_residual_vector_quantizer,
                               quantizer.acoustic_residual_vector_quantizer)]

    def emit(self, p: _Plan, codes: torch.Tensor, latents: torch.Tensor) -> None:
        B, D = p.size, self.table.shape[1]
        index = p.buf(B, self.nq, dtype=torch.long)
        p.op(torch.add, codes, self.offsets, out=index)
        vectors = p.buf(B, self.nq, D)
        p.op(torch.index_select, self.table, 0, index.view(-1), out=vectors.view(-1, D))
        first = True
        for (lo, hi), proj in zip(((0, self.n_sem), (self.n_sem, self.nq)), self.proj):
            if lo == hi:
                continue
            total = p.buf(B, D)
            p.op(torch.sum, vectors[:, lo:hi], 1, out=total)
            if proj is None:
                p.op(latents.copy_ if first else latents.add_, total.t())
            elif first:
                p.op(torch.mm, proj, total.t(), out=latents)
            else:
                p.op(latents.addmm_, proj, total.t())
            first = False


# ---- the two directions ------------------------------------------------------------------------------
class _Direction:
    """Encoder or decoder: per-slot state, per-bucket plans, CUDA graphs."""

    def __init__(self, owner: "MimiStreams", transformer: _Transformer, layers: list):
        self.owner, self.transformer, self.layers = owner, transformer, layers
        self.replicate = any(isinstance(layer, _Conv) and layer.replicate for layer in layers)
        dev = owner.device
        self.pos = torch.zeros(owner.max_streams + 1, dtype=torch.long, device=dev)
        self.fresh = torch.ones(owner.max_streams + 1, dtype=torch.bool, device=dev)
        self.plans: dict[int, _Plan] = {}

    def reset(self, slot: int) -> None:
        for layer in self.layers:
            layer.state[:, slot].zero_()
        self.transformer.k_state[:, slot].zero_()
        self.transformer.v_state[:, slot].zero_()
        self.pos[slot] = 0
        self.fresh[slot] = True

    def plan(self, size: int) -> _Plan:
        if size not in self.plans:
            o = self.owner
            p = _Plan(size, o.device, o.dtype, max(layer.col_numel(size) for layer in self.layers
                                                  if isinstance(layer, _Conv)))
            p.op(torch.index_select, self.pos, 0, p.rows, out=p.pos_rows)
            if self.replicate:
                p.op(torch.index_select, self.fresh, 0, p.rows, out=p.fresh_rows)
            self.build(p)
            p.op(p.pos_rows.add_, p.scalar(self.transformer.T, torch.long))
            p.op(self.pos.index_copy_, 0, p.rows, p.pos_rows)
            if self.replicate:
                p.op(self.fresh.index_fill_, 0, p.rows, False)
            p.stage()
            self.plans[size] = p
        return self.plans[size]

    def run(self, p: _Plan) -> None:
        """One frame on plan p's buffers (host mirror filled): upload, eager run or graph replay, download."""
        o = self.owner
        if p.device.type == "cpu":
            p.run()
            return
        p.rows.copy_(p.host_rows, non_blocking=True)
        p.input.copy_(p.host_input, non_blocking=True)
        if p.graph is not None:
            p.graph.replay()
        else:
            p.run()
            if o.use_cuda_graphs and o.graph_error is None:
                self._capture(p)
        p.host_output.copy_(p.output, non_blocking=True)
        p.ready.record()
        p.ready.synchronize()

    def _capture(self, p: _Plan) -> None:
        """Record the bucket's frame as a CUDA graph (after an eager frame). The capture runs nothing,
        so the state it would have advanced stays as the eager frame left it."""
        o, stream = self.owner, torch.cuda.current_stream(p.device)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                p.run()
        except RuntimeError as e:
            o.graph_error = f"CUDA graph capture failed: {e}"
            torch.cuda.set_stream(stream)  # a failed capture_end leaves its side stream current
            torch.cuda.synchronize(p.device)
            return
        p.graph = graph


class _Encoder(_Direction):
    def __init__(self, owner: "MimiStreams", model, nq: int):
        enc, S = model.encoder, owner.max_streams
        self.seanet = _SEANet(enc.encoder_seanet.layers, S, owner.frame_size)
        if enc.downsample is None:
            _fail("MimiStreams: needs Mimi's downsampling convolution (frame_rate != encodec_frame_rate)")
        self.downsample = _Conv(enc.downsample, S, self.seanet.steps)
        if self.downsample.T_out != 1:
            _fail(f"MimiStreams: a frame of {owner.frame_size} samples gives {self.downsample.T_out} latents, not 1")
        self.quantize = _Quantize(model.quantizer, nq)
        super().__init__(owner, _Transformer(enc.encoder_transformer, S, self.seanet.steps),
                         [*self.seanet.layers(), self.downsample])

    def build(self, p: _Plan) -> None:
        B = p.size
        p.input = p.buf(B, self.owner.frame_size)
        x = self.seanet.emit(p, p.input.view(1, B, -1))
        tokens = self.transformer.emit(p, x)
        latents = self.downsample.emit(p, tokens.permute(2, 0, 1), act=False)   # [d, B, 1]
        p.output = p.buf(self.owner.num_codebooks, B, dtype=torch.long)
        p.latents = latents.view(-1, B)                                           # [d, B]
        self.quantize.emit(p, p.latents, p.output)


class _Decoder(_Direction):
    def __init__(self, owner: "MimiStreams", model, nq: int):
        dec, S = model.decoder, owner.max_streams
        if dec.upsample is None:
            _fail("MimiStreams: needs Mimi's upsampling convolution (frame_rate != encodec_frame_rate)")
        self.dequantize = _Dequantize(model.quantizer, nq)
        self.upsample = _ConvTranspose(dec.upsample, S, 1)
        steps = self.upsample.s
        self.seanet = _SEANet(dec.decoder_seanet.layers, S, steps)
        if self.seanet.steps != owner.frame_size:
            _fail(f"MimiStreams: the decoder gives {self.seanet.steps} samples per frame, not {owner.frame_size}")
        super().__init__(owner, _Transformer(dec.decoder_transformer, S, steps),
                         [self.upsample, *self.seanet.layers()])

    def build(self, p: _Plan) -> None:
        B = p.size
        p.input = p.buf(B, self.owner.num_codebooks, dtype=torch.long)
        latents = p.buf(self.upsample.C, B)
        self.dequantize.emit(p, p.input, latents)
        x = self.upsample.emit(p, latents.view(-1, B, 1), act=False)
        tokens = self.transformer.emit(p, x)
        pcm = self.seanet.emit(p, tokens.permute(2, 0, 1))                        # [1, B, frame]
        p.output = pcm.view(B, -1)


class MimiStreams:
    """Batched streaming Mimi for up to `max_streams` streams, each in its own slot.

    `reset(slot)` before a stream's first frame (a new stream, or a slot reused); then per frame
    `encode(pcm [B, frame_size], slots)` -> codes [B, num_codebooks] and/or `decode(codes [B,
    num_codebooks], slots)` -> pcm [B, frame_size], where `slots` lists each row's slot and -1 marks a
    padding row (its output is meaningless and no stream's state changes). The encoder and decoder
    state of a slot advance independently. Inputs and outputs are CPU tensors; `out=` receives the
    result without allocating. Bad input raises `AudioError` naming the thing and changes no state.
    """

    use_cuda_graphs = True  # on a GPU: capture each bucket's frame once, then replay it

    def __init__(self, codec: MimiCodec, max_streams: int):
        if not isinstance(max_streams, int) or max_streams < 1:
            _fail(f"max_streams must be a positive integer, got {max_streams!r}")
        model = codec.model
        if model.config.audio_channels != 1:
            _fail(f"MimiStreams: mono audio only (audio_channels={model.config.audio_channels})")
        self.codec, self.max_streams = codec, max_streams
        self.frame_size, self.num_codebooks, self.codebook_size = codec.frame_size, codec.num_codebooks, \
            codec.codebook_size
        self.device = codec.device
        self.dtype = next(model.parameters()).dtype
        self.graph_error: str | None = None  # why capture failed, if it did (frames then stay eager)
        with torch.no_grad():
            self.encoder = _Encoder(self, model, self.num_codebooks)
            self.decoder = _Decoder(self, model, self.num_codebooks)

    # ---- slots ------------------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        """Forget everything slot `slot` held (encoder and decoder): the next frame starts a new stream."""
        slot = self._check_slot(slot, "reset")
        with torch.no_grad():
            self.encoder.reset(slot)
            self.decoder.reset(slot)

    def buckets(self) -> list[int]:
        """Every bucket size: powers of two below max_streams, and max_streams."""
        n = self.max_streams
        return sorted({min(1 << i, n) for i in range(n.bit_length() + 1)})

    def warmup(self) -> None:
        """Make every bucket's buffers (and on a GPU compile and capture its graphs) ahead of serving,
        on padding rows only: no stream's state changes."""
        graphs = self.use_cuda_graphs and self.device.type == "cuda"
        for size in self.buckets():
            for direction in (self.encoder, self.decoder):
                p = self._stage(direction, [PAD_SLOT] * size, size)
                p.host_input.zero_()
                for _ in range(2 if graphs else 1):
                    with torch.no_grad():
                        direction.run(p)

    # ---- frames -----------------------------------------------------------------------------------
    def encode(self, pcm: torch.Tensor, slots, out: torch.Tensor | None = None,
               latents: torch.Tensor | None = None) -> torch.Tensor:
        """pcm [B, frame_size] float -> codes [B, num_codebooks] int64 (CPU), one frame of each row's stream.
        `latents` [B, hidden_size], if given, receives the continuous latents the codes quantize."""
        slots = self._check_slots(slots)
        B = len(slots)
        if not isinstance(pcm, torch.Tensor) or pcm.dim() != 2 or pcm.shape[1] != self.frame_size \
                or not pcm.is_floating_point() or pcm.shape[0] != B:
            _fail(f"pcm must be a float tensor [{B}, {self.frame_size}] (one row per slot), got "
                  f"{getattr(pcm, 'dtype', type(pcm).__name__)} {list(getattr(pcm, 'shape', []))}")
        out = self._check_out(out, (B, self.num_codebooks), torch.long)
        if latents is not None:
            self._check_out(latents, (B, self.encoder.transformer.d), self.dtype, "latents")
        p = self._frame(self.encoder, slots, pcm)
        out.copy_(p.host_output[:, :B].t())
        if latents is not None:
            latents.copy_(p.latents[:, :B].t())
        return out

    def decode(self, codes: torch.Tensor, slots, out: torch.Tensor | None = None) -> torch.Tensor:
        """codes [B, num_codebooks] integer -> pcm [B, frame_size] float32 (CPU), one frame of each row's stream."""
        slots = self._check_slots(slots)
        B, nq, card = len(slots), self.num_codebooks, self.codebook_size
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape != (B, nq) \
                or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            _fail(f"codes must be an integer tensor [{B}, {nq}] (one row per slot), got "
                  f"{getattr(codes, 'dtype', type(codes).__name__)} {list(getattr(codes, 'shape', []))}")
        values = codes.numpy() if codes.device.type == "cpu" else codes.cpu().numpy()
        if values.size and (values.min() < 0 or values.max() >= card):
            b, q = next(zip(*((values < 0) | (values >= card)).nonzero()))
            _fail(f"codes[{b}, {q}] = {int(values[b, q])} (slot {slots[b]}) is out of range [0, {card})")
        out = self._check_out(out, (B, self.frame_size), self.dtype)
        p = self._frame(self.decoder, slots, codes)
        out.copy_(p.host_output[:B])
        return out

    # ---- checks and staging -----------------------------------------------------------------------
    def _check_slot(self, slot, what: str) -> int:
        try:
            index = operator.index(slot)
        except TypeError:
            index = None
        if index is None or isinstance(slot, bool) or not 0 <= index < self.max_streams:
            _fail(f"{what}: slot {slot!r} is not a slot of this codec (0 <= slot < {self.max_streams})")
        return index

    def _check_slots(self, slots) -> list[int]:
        if isinstance(slots, torch.Tensor):
            if slots.dim() != 1 or slots.is_floating_point():
                _fail(f"slots must be a 1-D integer tensor or a list of ints, got {slots.dtype} {list(slots.shape)}")
            slots = slots.tolist()
        slots = list(slots)
        if not 1 <= len(slots) <= self.max_streams:
            _fail(f"a frame needs 1 to {self.max_streams} rows (max_streams), got {len(slots)} slots")
        checked, seen = [], set()
        for s in slots:
            if isinstance(s, int) and not isinstance(s, bool) and s == PAD_SLOT:
                checked.append(PAD_SLOT)
                continue
            s = self._check_slot(s, "slots")
            if s in seen:
                _fail(f"slots: slot {s} appears twice in one frame")
            seen.add(s)
            checked.append(s)
        return checked

    def _check_out(self, out, shape, dtype, name: str = "out") -> torch.Tensor:
        if out is None:
            return torch.empty(shape, dtype=dtype)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype \
                or out.device.type != "cpu":
            _fail(f"{name} must be a CPU {dtype} tensor {list(shape)}, got "
                  f"{getattr(out, 'dtype', type(out).__name__)} {list(getattr(out, 'shape', []))}")
        return out

    def _frame(self, direction: _Direction, slots: list[int], inputs: torch.Tensor) -> _Plan:
        """One frame of `direction`: the rows' slots and inputs staged in the bucket's host mirror
        (padding rows zero), then run; returns the plan holding the outputs."""
        B = len(slots)
        p = self._stage(direction, slots, B)
        p.host_input[:B].copy_(inputs)
        p.host_input[B:].zero_()
        with torch.no_grad():
            direction.run(p)
        return p

    def _stage(self, direction: _Direction, slots: list[int], B: int) -> _Plan:
        size = min(next_pow2(B), self.max_streams)
        p = direction.plan(size)
        rows, scratch = p.host_rows_np, self.max_streams
        for i, s in enumerate(slots):
            rows[i] = scratch if s == PAD_SLOT else s
        rows[B:] = scratch
        return p
