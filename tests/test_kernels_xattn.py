"""Gated cross-attention kernels (moshivis_kernels.cross_attention) against plain PyTorch.

Interpreter on CPU, fp32: the kernels and the fp32 references differ only in the order of fp32 sums
(blocked dot products, split online softmax), so rtol = atol = 1e-4 on outputs of order 1 (observed
~1e-7). Rows without an image must equal x bit for bit. The bf16 check at the real sizes runs only
on a GPU (the interpreter's bf16 arithmetic is unreliable).
"""
import math

import pytest
import torch

from moshivis import checkpoint, reference
from moshivis.checkpoint import XA
from moshivis.config import tiny
from moshivis_kernels import count_launches
from moshivis_kernels import cross_attention as xa

TOL = dict(rtol=1e-4, atol=1e-4)
# The interpreter turns a loop bound given as a kernel argument into a scalar this way (its own quirk).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


def cdiv(a, b):
    return -(-a // b)


@pytest.fixture(params=[132, 1], ids=["h100", "1sm"])
def sms(request, monkeypatch):
    """Launch configs for an H100, and for 1 SM: wide column tiles (with tails) and few attention
    splits, each of several key blocks (the online-softmax rescaling)."""
    monkeypatch.setattr(xa, "_num_sms", lambda device: request.param)
    return request.param


def _problem(gen, B, *, H=2, D=16, N=37, S=3, G=8, slots=None, dtype=torch.float32, device="cpu"):
    """Inputs of gated_cross_attention with unit-scale activations; slots mix shared images and -1."""
    dim = H * D
    in_proj = torch.randn(3 * dim, dim, generator=gen) / math.sqrt(dim)
    if slots is None:
        slots = torch.randint(-1, S, (B,), generator=gen)
        slots[: min(B, 3)] = torch.tensor([0, -1, 0])[: min(B, 3)]  # a shared slot and a no-image row
    p = dict(
        x=torch.randn(B, dim, generator=gen),
        norm_alpha=1 + 0.1 * torch.randn(1, 1, dim, generator=gen),
        wq=in_proj[:dim],
        image_kv=torch.randn(S, N, 2, H, D, generator=gen),
        slots=torch.as_tensor(slots, dtype=torch.int32),
        wo=torch.randn(dim, dim, generator=gen) / math.sqrt(dim),
        gate_w0=torch.randn(G, dim, generator=gen) / math.sqrt(dim),
        gate_w2=torch.randn(dim, G, generator=gen) / math.sqrt(G) + 0.5,  # gates away from 0
    )
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in p.items()}


def _nan(*shape, dtype=torch.float32, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _check_block(p, out, gate_mean):
    ref_out, ref_mean = xa.gated_cross_attention_reference(**p)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(gate_mean, ref_mean, **TOL)
    none = p["slots"] < 0
    assert torch.equal(out[none].view(torch.int32), p["x"][none].view(torch.int32)), "no-image rows must be x"
    assert torch.all(gate_mean[none] == 0)


# ---- the whole block ------------------------------------------------------------------------------
@pytest.mark.parametrize("N", [12, 37, 100, 1024])
def test_block_matches_reference(gen, N, sms):
    B = int(torch.randint(1, 10, (1,), generator=gen))
    p = _problem(gen, B, N=N, H=3)  # dim 48: column tails with 1 SM  # the sign of zero survives a no-image row
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=_nan(B, p["x"].shape[1]), gate_mean=gate_mean)
    _check_block(p, out, gate_mean)


@pytest.mark.parametrize("slots", [[2], [-1], [-1, -1, -1], [1, 1, 1, 1, 1]],
                         ids=["b1", "b1_none", "none", "one_image"])
def test_block_edge_batches(gen, slots):
    B = len(slots)
    p = _problem(gen, B, N=70, slots=slots)
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=_nan(B, p["x"].shape[1]), gate_mean=gate_mean)
    _check_block(p, out, gate_mean)


@pytest.mark.parametrize("B", [1, 6, 40])
def test_block_in_place(gen, B):
    p = _problem(gen, B, N=37)
    p["x"][p["slots"] < 0, 0] = -0.0  # the sign of zero survives a no-image row
    x0 = p["x"].clone()
    ref_out, ref_mean = xa.gated_cross_attention_reference(**p)
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=p["x"], gate_mean=gate_mean)
    assert out is p["x"]
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(gate_mean, ref_mean, **TOL)
    none = p["slots"] < 0
    assert torch.equal(out[none].view(torch.int32), x0[none].view(torch.int32))


def test_block_large_batch_shared_images(gen):
    """tl.dot tiles (B > 8) over two row tiles, and a slot shared by more rows than one attention chunk."""
    B = 70
    slots = torch.randint(-1, 4, (B,), generator=gen)
    slots[torch.randperm(B, generator=gen)[:20]] = 2  # >= 16 rows on slot 2: two chunks, rows scattered
    p = _problem(gen, B, N=50, S=4, slots=slots)
    cfg = xa._linear_config(B, p["x"].shape[1], p["x"].shape[1])
    assert cfg["USE_DOT"] and cdiv(B, cfg["BLOCK_B"]) == 2
    gate_mean = _nan(B)
    out = xa.gated_cross_attention(**p, out=_nan(B, p["x"].shape[1]), gate_mean=gate_mean)
    _check_block(p, out, gate_mean)


def test_block_matches_model_reference(gen):
    """Layer 1 of the tiny model through moshivis.reference.cross_attention (its own image K/V path)."""
    cfg = tiny()
    w = checkpoint.random_init(cfg, seed=3)
    features = torch.randn(2, cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen)
    pool = reference.image_kv(w, cfg, features)  # [2, N, 2, H, D]
    slots = torch.tensor([1, -1, 0, 1], dtype=torch.int64)
    x = torch.randn(4, cfg.dim, generator=gen)
    rows = pool[slots.clamp(min=0)]
    expected = reference.cross_attention(w, cfg, 1, x, rows, slots >= 0)
    p = "llm.transformer.layers.1"
    out = xa.gated_cross_attention(
        x, w[f"{p}.norm_cross.alpha"], w[f"{XA}.in_proj_weight"][: cfg.dim], pool, slots,
        w[f"{XA}.out_proj.weight"], w[f"{p}.cross_attention.gate.alpha.0.weight"],
        w[f"{p}.cross_attention.gate.alpha.2.weight"], out=_nan(4, cfg.dim))
    torch.testing.assert_close(out, expected, **TOL)


def test_block_launches_and_workspace(gen):
    """Six launches; a workspace sized for more rows serves a smaller batch and gives the same result."""
    p = _problem(gen, 5, N=37)
    dim, G = p["x"].shape[1], p["gate_w0"].shape[0]
    ws = xa.cross_attention_workspace(12, dim, 2, 37, G, torch.float32, "cpu")
    for t in vars(ws).values():
        t.fill_(float("nan"))
    gate_mean = _nan(5)
    with count_launches() as launches:
        out = xa.gated_cross_attention(**p, out=_nan(5, dim), gate_mean=gate_mean, workspace=ws)
    assert sum(launches.values()) == 6
    _check_block(p, out, gate_mean)


def test_wq_row_stride_view(gen):
    """wq as a strided view (every other row of a bigger matrix) and a pool slice as image_kv."""
    p = _problem(gen, 4, N=37)
    dim = p["x"].shape[1]
    big = torch.randn(2 * dim, dim, generator=gen) / math.sqrt(dim)
    p["wq"] = big[::2]
    p["image_kv"] = torch.randn(4, 37, 2, 2, 16, generator=gen)[1:]
    out = xa.gated_cross_attention(**p, out=_nan(4, dim))
    torch.testing.assert_close(out, xa.gated_cross_attention_reference(**p)[0], **TOL)


# ---- the pieces -----------------------------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 3, 8, 9, 33])
@pytest.mark.parametrize("with_slots", [False, True])
def test_norm_q_projection(gen, B, with_slots, sms):
    H, D = 3, 16  # dim 48: not a multiple of the column tiles
    p = _problem(gen, B, H=H, D=D)
    slots = p["slots"] if with_slots else None
    q = xa.norm_q_projection(p["x"], p["norm_alpha"], p["wq"], slots=slots, out=_nan(B, H * D))
    torch.testing.assert_close(q, xa.norm_q_projection_reference(p["x"], p["norm_alpha"], p["wq"], slots=slots), **TOL)


@pytest.mark.parametrize("N", [5, 37, 1024])
def test_image_attention(gen, N, sms):
    B = int(torch.randint(1, 10, (1,), generator=gen))
    p = _problem(gen, B, N=N, H=2, D=32)
    q = torch.randn(B, 2, 32, generator=gen)
    attn = xa.image_attention(q, p["image_kv"], p["slots"], out=_nan(B, 2, 32))
    torch.testing.assert_close(attn, xa.image_attention_reference(q, p["image_kv"], p["slots"]), **TOL)
    assert torch.all(attn[p["slots"] < 0] == 0)


@pytest.mark.parametrize("B", [1, 7, 20])
def test_gated_output(gen, B, sms):
    p = _problem(gen, B, H=3, D=16, G=24)
    attn = torch.randn(B, 48, generator=gen)
    gate_mean = _nan(B)
    out = xa.gated_output(p["x"], attn, p["slots"], p["wo"], p["gate_w0"], p["gate_w2"],
                          out=_nan(B, 48), gate_mean=gate_mean)
    ref_out, ref_mean = xa.gated_output_reference(p["x"], attn, p["slots"], p["wo"], p["gate_w0"], p["gate_w2"])
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(gate_mean, ref_mean, **TOL)


def test_reference_equals_definition(gen):
    """The kernel-side reference is the block's math written out once more, in fp32."""
    p = _problem(gen, 5, N=37)
    x, S = p["x"], p["slots"]
    y = x * p["norm_alpha"].reshape(-1) / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)
    q = (y @ p["wq"].T).view(5, 2, 16)
    kv = p["image_kv"][S.clamp(min=0).long()]
    att = torch.softmax(torch.einsum("bhd,bnhd->bhn", q, kv[:, :, 0]) / 4, -1)
    a = torch.einsum("bhn,bnhd->bhd", att, kv[:, :, 1]).reshape(5, 32) @ p["wo"].T
    g = torch.sigmoid(torch.relu(a @ p["gate_w0"].T) @ p["gate_w2"].T - 4)
    expected = torch.where((S >= 0)[:, None], x + a * g, x)
    torch.testing.assert_close(xa.gated_cross_attention_reference(**p)[0], expected, **TOL)


# ---- launch configuration and audit ---------------------------------------------------------------
@pytest.mark.parametrize("B", [1, 2, 8, 9, 64, 256])
@pytest.mark.parametrize("N", [12, 37, 1024])
def test_attention_config_splits_cover_keys(B, N):
    cfg = xa._attention_config(B, 32, N)
    n, kps, splits = cfg["BLOCK_N"], cfg["keys_per_split"], cfg["splits"]
    assert kps % n == 0 and (splits - 1) * kps < N <= splits * kps  # no empty split, every key covered
    assert cfg["BLOCK_ALL"] >= B


def test_real_shape_configs_fill_the_gpu():
    assert xa._attention_config(1, 32, 1024)["splits"] * 32 >= 2 * 132
    cfg = xa._linear_config(1, 4096, 4096)
    assert not cfg["USE_DOT"] and cdiv(4096, cfg["BLOCK_N"]) >= 2 * 132


def test_audit_cases_describe_every_kernel():
    kernels = {xa._rows_linear_kernel, xa._attn_split_kernel, xa._attn_combine_kernel, xa._gate_residual_kernel}
    cases = xa.audit_cases()
    assert {c["fn"] for c in cases} == kernels
    for c in cases:
        constexprs = xa._constexpr_params(c["fn"])
        assert set(c["signature"]) == set(c["fn"].arg_names) - constexprs, c["name"]
        assert set(c["constexprs"]) == constexprs, c["name"]
        assert set(c["int_values"]) <= {n for n, t in c["signature"].items() if t == "i32"}, c["name"]


# ---- bad input ------------------------------------------------------------------------------------
def _bad(p, **changes):
    return {**p, **changes}


@pytest.mark.parametrize("change, name", [
    (lambda p: dict(x=p["x"][0]), "x"),
    (lambda p: dict(x=p["x"].long()), "x"),
    (lambda p: dict(norm_alpha=p["norm_alpha"][..., :-1]), "norm_alpha"),
    (lambda p: dict(wq=p["wq"][:, :-1]), "wq"),
    (lambda p: dict(wq=p["wq"].double()), "wq"),
    (lambda p: dict(wq=p["wq"].T), "wq"),  # last dimension not contiguous
    (lambda p: dict(image_kv=p["image_kv"][:, :, :1]), "image_kv"),
    (lambda p: dict(image_kv=p["image_kv"].to(torch.bfloat16)), "image_kv"),
    (lambda p: dict(image_kv=p["image_kv"][..., :8]), "image_kv"),
    (lambda p: dict(slots=p["slots"].float()), "slots"),
    (lambda p: dict(slots=p["slots"][:-1]), "slots"),
    (lambda p: dict(wo=p["wo"][:-1]), "wo"),
    (lambda p: dict(gate_w0=p["gate_w0"].to(torch.bfloat16)), "gate_w0"),
    (lambda p: dict(gate_w2=p["gate_w2"][:, :-1]), "gate_w2"),
    (lambda p: dict(out=p["x"][:, :-1].clone()), "out"),
    (lambda p: dict(gate_mean=torch.zeros(len(p["slots"]), dtype=torch.float64)), "gate_mean"),
    (lambda p: dict(gate_mean=torch.zeros(len(p["slots"]) + 1)), "gate_mean"),
    (lambda p: dict(workspace=xa.cross_attention_workspace(2, 32, 2, 37, 8, torch.float32, "cpu")), "workspace"),
    (lambda p: dict(workspace=xa.cross_attention_workspace(4, 32, 2, 37, 8, torch.bfloat16, "cpu")), "workspace.q"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_the_argument(gen, change, name):
    p = _problem(gen, 4, N=37)
    with pytest.raises((ValueError, TypeError), match=name.replace(".", r"\.")):
        xa.gated_cross_attention(**_bad(p, **change(p)))


def test_out_overlapping_x_is_rejected(gen):
    p = _problem(gen, 4, N=37)
    buf = torch.zeros(5, p["x"].shape[1])
    buf[:4] = p["x"]
    with pytest.raises(ValueError, match="out must be x itself"):
        xa.gated_cross_attention(**_bad(p, x=buf[:4], out=buf[1:]))


def test_piece_bad_input(gen):
    p = _problem(gen, 3, N=37)
    with pytest.raises(ValueError, match="q"):
        xa.image_attention(torch.randn(3, 2, 16, dtype=torch.float64), p["image_kv"], p["slots"])
    with pytest.raises(ValueError, match="head_dim"):
        xa.image_attention(torch.randn(3, 2, 12), torch.randn(1, 5, 2, 2, 12), p["slots"])
    with pytest.raises(ValueError, match="attn"):
        xa.gated_output(p["x"], torch.randn(3, 31), p["slots"], p["wo"], p["gate_w0"], p["gate_w2"])
    with pytest.raises(ValueError, match="norm_alpha"):
        xa.norm_q_projection(p["x"], torch.ones(31), p["wq"])


# ---- GPU only -------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 and sync checks)")


@gpu
@pytest.mark.parametrize("B", [1, 8, 64])
def test_real_shapes_bf16_gpu(gen, B):
    """Real sizes in bf16: the kernel's error vs the fp32 reference at most ~2x PyTorch's own bf16 error."""
    p32 = _problem(gen, B, H=32, D=128, N=1024, S=4, G=512, device="cuda")
    p16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in p32.items()}
    exact = xa.gated_cross_attention_reference(**p32)[0]
    torch_err = (xa.gated_cross_attention_reference(**p16)[0].float() - exact).abs().max()
    out = xa.gated_cross_attention(**p16, gate_mean=torch.empty(B, device="cuda"))
    assert (out.float() - exact).abs().max() <= 2 * torch_err + 1e-2


@gpu
def test_no_host_sync_gpu(gen):
    p = _problem(gen, 8, H=4, D=64, N=300, device="cuda")
    ws = xa.cross_attention_workspace(8, 256, 4, 300, 8, torch.float32, "cuda")
    gate_mean = torch.empty(8, device="cuda")
    xa.gated_cross_attention(**p, gate_mean=gate_mean, workspace=ws)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        xa.gated_cross_attention(**p, out=p["x"], gate_mean=gate_mean, workspace=ws)
    finally:
        torch.cuda.set_sync_debug_mode("default")
