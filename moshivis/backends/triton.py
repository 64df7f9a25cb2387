"""The `triton` backend: the whole frame on `moshivis_kernels`, on fixed buffers, one CUDA graph per bucket.

Frame (`_run`), every op a kernel writing into a buffer made once per batch-size bucket:
  delayed tokens in -> embedding sum -> per layer: norm1 + QKV, RoPE + KV append + attention, out-proj
  + residual, the gated cross-attention block over the image KV pool, norm2 + linear_in + SiLU gate,
  linear_out + residual -> out_norm, text head, text sampling (the stream's repetition penalty applied and
  its text history appended in the same launch) -> depformer (one persistent launch per codebook step +
  its sampler) -> delayed tokens out. The cross-attention attends over each image's own tokens (the pool's
  per-slot counts); a stream before its xa_start is staged without an image.
Nothing is allocated and nothing waits for the host inside a frame. A batch runs in the smallest bucket
(a power of two, or max_streams) that holds it, the rows past it padded (row -1: kernels skip their
state). On a GPU each bucket's first frame runs eagerly (compiling the kernels), then the frame is
captured as a CUDA graph and later frames replay it; `use_cuda_graphs = False` keeps frames eager, and
a frame inside a `profiling.PhaseTimer` runs eagerly so its phases can be timed.

Kernels take some weights stacked (the 16 audio tables, the depformer's per-step and per-layer
weights); the backend stacks them once and rebinds the engine's weight dict to views of the stacked
tensors, so no weight is held twice. With INT8 weights (`checkpoint.load(..., weights="int8")`) every
large linear reads its int8 bytes: the temporal projections, the text head, the gated cross-attention
and the depformer (its per-step projections and audio heads); embedding tables and norms stay in the
compute dtype.
"""
from __future__ import annotations

import torch

from moshivis_kernels import (DepformerWeights, LinearWorkspace, count_launches, cross_attention_workspace,
                              depformer_frame, depformer_workspace, embed_tokens, gated_cross_attention, linear,
                              linear_workspace, rms_norm, sample_tokens, self_attention_decode,
                              self_attention_workspace)
from moshivis_kernels._runtime import next_pow2, record_launch
from moshivis_kernels.token_delays import frame_input_tokens, frame_output_tokens

from ..checkpoint import XA, scale_key
from ..frame import FrameBuffers, text_repetition, token_constants
from ..profiling import phase, timing_active


def restack(w: dict, keys: list[str]) -> torch.Tensor:
    """torch.stack of w[keys]; the dict's entries become views of the result (no weight held twice)."""
    stacked = torch.stack([w[k] for k in keys])
    w.update(zip(keys, stacked.unbind(0)))
    return stacked


def depformer_weights(w: dict, cfg) -> DepformerWeights:
    """Kyutai's depformer keys (SPEC.md §8) in the layout of `moshivis_kernels.depformer`, with the INT8
    row scales (SCB) stacked like their weights when the checkpoint is quantized."""
    L, S = cfg.depformer_num_layers, cfg.dep_q
    layers = [f"depformer.layers.{l}" for l in range(L)]
    gating = [f"{p}.gating.{s}" for p in layers for s in range(S)]
    projections = {  # name -> (keys, leading dims of the stacked tensor)
        "depformer_in": ([f"depformer_in.{s}.weight" for s in range(S)], (S,)),              # [S, dd, dim]
        "in_proj": ([f"{p}.self_attn.in_proj_weight" for p in layers], (L,)),                # [L, S*3*dd, dd]
        "out_proj": ([f"{p}.self_attn.out_proj.weight" for p in layers], (L,)),              # [L, S*dd, dd]
        "linear_in": ([f"{g}.linear_in.weight" for g in gating], (L, S)),                    # [L, S, 2*hidden, dd]
        "linear_out": ([f"{g}.linear_out.weight" for g in gating], (L, S)),                  # [L, S, dd, hidden]
        "audio_linears": ([f"audio_linears.{s}.weight" for s in range(S)], (S,)),           # [S, card, dd]
    }
    quantized = scale_key("depformer_in.0.weight") in w
    stacked = {}
    for name, (keys, lead) in projections.items():
        stacked[name] = restack(w, keys).unflatten(0, lead)
        if quantized:  # SCB stacked like its weight; the dict's .SCB entries become views
            stacked[f"{name}_scale"] = restack(w, [scale_key(k) for k in keys]).unflatten(0, lead)
    return DepformerWeights(
        text_emb=w["depformer_text_emb.weight"],                                           # [text_card+1, dd]
        audio_emb=restack(w, [f"depformer_emb.{s}.weight" for s in range(S - 1)]),         # [S-1, card+1, dd]
        norm1=restack(w, [f"{p}.norm1.alpha" for p in layers]).reshape(L, -1),            # [L, dd]
        norm2=restack(w, [f"{p}.norm2.alpha" for p in layers]).reshape(L, -1),
        num_heads=cfg.depformer_num_heads, **stacked)


class _Bucket:
    """Everything a frame of up to `size` rows touches besides weights and state, made once; the frame's
    CUDA graph once captured, and the kernel launches it holds."""

    def __init__(self, backend: "TritonBackend", size: int):
        cfg, dev, dt = backend.cfg, backend.device, backend.dtype
        self.fb = FrameBuffers(cfg, size, dev, dt)
        act = dict(dtype=dt, device=dev)
        self.inputs = torch.empty(size, 1 + cfg.n_q, dtype=torch.long, device=dev)
        self.x = torch.empty(size, cfg.dim, **act)       # the residual stream
        self.qkv = torch.empty(size, 3 * cfg.dim, **act)
        self.attn = torch.empty(size, cfg.dim, **act)
        self.g = torch.empty(size, cfg.hidden, **act)    # SwiGLU's gated hidden state
        self.h = torch.empty(size, cfg.dim, **act)       # out_norm(x): the text head's and depformer's input
        self.sampled = torch.empty(size, 1 + cfg.dep_q, dtype=torch.long, device=dev)  # this frame's tokens
        self.linear_ws = LinearWorkspace.covering(
            [linear_workspace(x, backend.w[key], epilogue=epilogue, norm=norm)
             for x, key, epilogue, norm in backend.linear_calls(self)], dev)
        self.attention_ws = self_attention_workspace(size, cfg.num_heads, cfg.head_dim, cfg.context, dev)
        gate_dim = backend.w["llm.transformer.layers.0.cross_attention.gate.alpha.0.weight"].shape[0]
        self.cross_ws = cross_attention_workspace(size, cfg.dim, cfg.num_heads, backend.pool.max_tokens, gate_dim,
                                                  dt, dev)
        state = backend.state
        self.repetition = text_repetition(cfg, self.fb, state.text_history, state.text_history_len)
        self.depformer_ws = depformer_workspace(backend.depformer_w, size)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.launches: dict[str, int] = {}


class TritonBackend:
    name = "triton"
    use_cuda_graphs = True  # on a GPU: capture each bucket's frame once, then replay it

    def __init__(self, cfg, weights, state, pool):
        self.cfg, self.w, self.state, self.pool = cfg, weights, state, pool
        w = weights
        self.dtype, self.device = w["llm.text_emb.weight"].dtype, w["llm.text_emb.weight"].device
        self.audio_emb = restack(w, [f"audio_emb.{j}.weight" for j in range(cfg.n_q)])  # [n_q, card+1, dim]
        self.depformer_w = depformer_weights(w, cfg)
        self.delays, self.initial = token_constants(cfg, self.device)
        self.layers = [self._layer_args(i) for i in range(cfg.num_layers)]
        self.graph_error: str | None = None  # why capture failed, if it did (frames then stay eager)
        self._buckets: dict[int, _Bucket] = {}

    def _layer_args(self, i: int) -> dict:
        """Layer i's weights as its kernels take them, looked up once."""
        p, w = f"llm.transformer.layers.{i}", self.w
        xa_scale = w.get(scale_key(f"{XA}.in_proj_weight"))
        gate0, gate2 = f"{p}.cross_attention.gate.alpha.0.weight", f"{p}.cross_attention.gate.alpha.2.weight"
        return {
            "norm1": w[f"{p}.norm1.alpha"], "norm2": w[f"{p}.norm2.alpha"],
            "in_proj": f"{p}.self_attn.in_proj_weight", "out_proj": f"{p}.self_attn.out_proj.weight",
            "linear_in": f"{p}.gating.linear_in.weight", "linear_out": f"{p}.gating.linear_out.weight",
            "cross": dict(  # gated_cross_attention's weights: the shared projections, this layer's gate
                norm_alpha=w[f"{p}.norm_cross.alpha"].reshape(-1),
                wq=w[f"{XA}.in_proj_weight"][: self.cfg.dim],  # rows [0, dim) of the shared in_proj: Q
                wo=w[f"{XA}.out_proj.weight"], gate_w0=w[gate0], gate_w2=w[gate2],
                wq_scale=None if xa_scale is None else xa_scale[: self.cfg.dim],
                wo_scale=w.get(scale_key(f"{XA}.out_proj.weight")), gate_w0_scale=w.get(scale_key(gate0)),
                gate_w2_scale=w.get(scale_key(gate2))),
        }

    def linear_calls(self, b: _Bucket):
        """(x, weight key, epilogue, norm) of every `linear` of a frame, for sizing its workspace."""
        first = self.layers[0]
        return [(b.x, first["in_proj"], "none", "rms"), (b.attn, first["out_proj"], "none", None),
                (b.x, first["linear_in"], "silu_gate", "rms"), (b.g, first["linear_out"], "none", None),
                (b.h, "llm.text_linear.weight", "none", None)]

    def _linear(self, b: _Bucket, x, key, **kwargs):
        """x @ W^T for weight `key`, dense or INT8 (its scales at `scale_key(key)`), on the bucket's scratch."""
        return linear(x, self.w[key], self.w.get(scale_key(key)), workspace=b.linear_ws, **kwargs)

    # ---- frames ---------------------------------------------------------------------------------------
    def buffers(self, batch: int) -> FrameBuffers:
        """The frame buffers of the smallest bucket that holds `batch` rows."""
        size = min(next_pow2(batch), self.state.max_streams)
        if not 1 <= batch <= size:
            raise ValueError(f"a batch of {batch} streams exceeds max_streams={self.state.max_streams}")
        if size not in self._buckets:
            self._buckets[size] = _Bucket(self, size)
        return self._buckets[size].fb

    def frame(self, fb: FrameBuffers) -> None:
        """One frame for the rows staged in `fb` (host mirror filled, padding included)."""
        b = self._buckets[fb.size]
        fb.upload()
        graphs = self.use_cuda_graphs and self.device.type == "cuda" and self.graph_error is None
        if b.graph is not None and graphs and not timing_active():
            b.graph.replay()
            for name, n in b.launches.items():  # the graph's kernels, counted as the eager frame counts them
                record_launch(name, n)
            return
        self._run(b)
        if graphs and b.graph is None and not timing_active():  # a timed phase synchronises: never capture it
            self._capture(b)

    def _capture(self, b: _Bucket) -> None:
        """Record the bucket's frame as a CUDA graph (after an eager frame compiled every kernel). If the
        driver refuses (e.g. a launch it cannot capture), frames stay eager and `graph_error` says why."""
        graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream(self.device)
        try:
            with count_launches() as launches, torch.cuda.graph(graph):
                self._run(b)
        except RuntimeError as e:
            self.graph_error = f"CUDA graph capture failed: {e}"
            torch.cuda.set_stream(stream)  # a failed capture_end leaves its side stream current
            torch.cuda.synchronize(self.device)
            return
        finally:
            for name, n in launches.items():  # a capture runs nothing: the frame's count is the eager run's
                record_launch(name, -n)
        b.graph, b.launches = graph, dict(launches)

    def buckets(self) -> list[int]:
        """Every bucket size: powers of two below max_streams, and max_streams."""
        n = self.state.max_streams
        return sorted({min(1 << i, n) for i in range(n.bit_length() + 1)})

    def warmup(self) -> None:
        """Make the buffers, compile the kernels and capture the graph of every bucket ahead of serving,
        so no live frame pays for it. The frames run on padding rows only: no state changes."""
        graphs = self.use_cuda_graphs and self.device.type == "cuda"
        for size in self.buckets():
            fb = self.buffers(size)
            fb.pad(0)
            for _ in range(2 if graphs else 1):  # eager + capture, then a replay
                self.frame(fb)
            fb.download_tokens()

    def _run(self, b: _Bucket) -> None:
        """The frame on bucket b's buffers: launches only (capturable)."""
        cfg, w, fb, x = self.cfg, self.w, b.fb, b.x
        frame_input_tokens(self.state.tokens, fb.rows, fb.positions, fb.user, self.delays, self.initial, out=b.inputs)
        with phase("temporal"):
            embed_tokens(b.inputs, w["llm.text_emb.weight"], self.audio_emb, out=x)
            for i, layer in enumerate(self.layers):
                self._linear(b, x, layer["in_proj"], norm="rms", norm_alpha=layer["norm1"], out=b.qkv)
                kv, kv_scale = self.state.layer_kv(i)
                self_attention_decode(b.qkv, kv, fb.rows, fb.positions, kv_scale=kv_scale,
                                      max_period=float(cfg.max_period), out=b.attn, workspace=b.attention_ws)
                self._linear(b, b.attn, layer["out_proj"], residual=x, out=x)
                with phase("cross_attention"):
                    gated_cross_attention(x, image_kv=self.pool.kv, slots=fb.image_slots, out=x, workspace=b.cross_ws,
                                          gate_mean=fb.gate_mean[i], num_tokens=self.pool.num_tokens, **layer["cross"])
                self._linear(b, x, layer["linear_in"], norm="rms", norm_alpha=layer["norm2"], epilogue="silu_gate",
                             out=b.g)
                self._linear(b, b.g, layer["linear_out"], residual=x, out=x)
            rms_norm(x, w["llm.out_norm.alpha"], out=b.h)
            self._linear(b, b.h, "llm.text_linear.weight", out=fb.text_logits)
        with phase("sampling"):
            sample_tokens(fb.text_logits, fb.temperature[:, 0], fb.top_k[:, 0], fb.seed, fb.positions, 0,
                          forced=fb.forced[:, 0], out=b.sampled[:, 0], repetition=b.repetition)
        with phase("depformer"):
            depformer_frame(self.depformer_w, b.h, b.sampled[:, 0], b.depformer_ws, temperature=fb.temperature[:, 1],
                            top_k=fb.top_k[:, 1], seed=fb.seed, frame=fb.positions, forced=fb.forced,
                            logits_out=fb.audio_logits, tokens_out=b.sampled[:, 1:])
        frame_output_tokens(self.state.tokens, fb.rows, fb.positions, b.sampled, self.delays, cfg.max_delay,
                            out=fb.tokens)
