"""INT8 weight-only linear (moshivis_kernels.int8_linear) against plain PyTorch, in the interpreter on CPU.

Tolerances: fp32 activations with int8 weights are exact inputs in fp32 (|CB| <= 127), so the kernel and
the fp32 reference differ only by the order of fp32 accumulation: rtol = atol = 1e-5 on outputs of
order 1 (observed ~3e-7). bf16 activations: the kernel rounds its fp32 result to bf16 once, so it is
within one bf16 ulp of the fp32 reference rounded to bf16: rtol = atol = 1e-2 (an ulp is at most
2^-7 relative).
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moshivis_kernels import count_launches
from moshivis_kernels import int8_linear as mod
from moshivis_kernels.int8_linear import int8_linear, int8_linear_reference, launch_config, quantize_rowwise

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
BF16_TOL = dict(rtol=1e-2, atol=1e-2)
SPLIT_SMS = {False: 1, True: 132}  # pretend GPU size: 1 SM never splits K, 132 SMs splits small-N shapes


def _problem(seed, M, K, N, *, gate=False, bias=False, residual=False, dtype=torch.float32):
    """x [M, K] with unit-scale outputs, quantized weights (2N rows with the gate), optional bias/residual."""
    g = torch.Generator().manual_seed(seed)
    n_w = 2 * N if gate else N
    x = (torch.randn(M, K, generator=g) / K ** 0.5).to(dtype)
    cb, scb = quantize_rowwise(torch.randn(n_w, K, generator=g) / 2)
    b = torch.randn(n_w, generator=g) if bias else None
    r = torch.randn(M, N, generator=g).to(dtype) if residual else None
    return x, cb, scb, b, r


def _nan_out(M, N, dtype=torch.float32):
    return torch.full((M, N), float("nan"), dtype=dtype)


@pytest.fixture(params=[False, True], ids=["nosplit", "splitk"])
def split(request, monkeypatch):
    monkeypatch.setattr(mod, "_num_sms", lambda index: SPLIT_SMS[request.param])
    return request.param


@pytest.mark.parametrize("M", [1, 2, 3, 16, 65])
@pytest.mark.parametrize("variant", ["plain", "bias", "residual", "gate", "gate_bias_residual"])
def test_matches_reference_fp32(M, variant, split):
    K, N = 200, 77
    gate = variant.startswith("gate")
    x, cb, scb, b, r = _problem(M * 31 + len(variant), M, K, N, gate=gate,
                                bias="bias" in variant, residual="residual" in variant)
    cfg = launch_config(M, N, K, gate=gate, dtype=x.dtype, num_sms=SPLIT_SMS[split])
    assert cfg.gemv == (M <= mod._GEMV_MAX_M) and (cfg.split_k > 1) == split
    epilogue = "silu_gate" if gate else "none"
    y = int8_linear(x, cb, scb, b, residual=r, epilogue=epilogue, out=_nan_out(M, N))
    torch.testing.assert_close(y, int8_linear_reference(x, cb, scb, b, residual=r, epilogue=epilogue), **FP32_TOL)


@pytest.mark.parametrize("M", [1, 2, 16])
def test_long_k_many_splits(M, split):
    """K over several split-K ranges and not a multiple of any block."""
    K, N = 1000, 45
    x, cb, scb, b, r = _problem(M, M, K, N, gate=True, bias=True, residual=True)
    y = int8_linear(x, cb, scb, b, residual=r, epilogue="silu_gate", out=_nan_out(M, N))
    torch.testing.assert_close(y, int8_linear_reference(x, cb, scb, b, residual=r, epilogue="silu_gate"), **FP32_TOL)


@pytest.mark.parametrize("M", [1, 3, 65])
@pytest.mark.parametrize("epilogue", ["none", "silu_gate"])
def test_residual_in_place(M, epilogue, split):
    K, N = 200, 77
    x, cb, scb, b, r = _problem(7 + M, M, K, N, gate=epilogue == "silu_gate", bias=True, residual=True)
    expected = int8_linear_reference(x, cb, scb, b, residual=r, epilogue=epilogue)
    y = int8_linear(x, cb, scb, b, residual=r, epilogue=epilogue, out=r)
    assert y is r
    torch.testing.assert_close(r, expected, **FP32_TOL)


@pytest.mark.parametrize("M", [1, 2, 20])
def test_strided_views(M, split):
    """Non-contiguous x, residual and out are handled through their strides."""
    K, N = 96, 40
    x, cb, scb, _, _ = _problem(3 + M, M, 2 * K, N)
    x = x[:, ::2]                                    # stride_xk = 2
    cb = cb[:, :K]                                   # row stride 2K, unit stride along K
    g = torch.Generator().manual_seed(5)
    r = torch.randn(N, M, generator=g).t()           # stride_rm = 1
    out = torch.full((M, 2 * N), float("nan"))[:, ::2]
    y = int8_linear(x, cb, scb, residual=r, out=out)
    assert y is out
    torch.testing.assert_close(y, int8_linear_reference(x, cb, scb, residual=r), **FP32_TOL)


@pytest.mark.parametrize("M", [1, 2])
def test_bf16_activations_gemv(M, split):
    """GEMV path in bf16 (the interpreter's bf16 tl.dot is unreliable; the tl.dot path is checked on GPU)."""
    K, N = 200, 77
    x, cb, scb, b, r = _problem(11 + M, M, K, N, gate=True, bias=True, residual=True, dtype=torch.bfloat16)
    y = int8_linear(x, cb, scb, b, residual=r, epilogue="silu_gate", out=_nan_out(M, N, torch.bfloat16))
    assert y.dtype == torch.bfloat16
    ref = int8_linear_reference(x, cb, scb, b, residual=r, epilogue="silu_gate")
    torch.testing.assert_close(y.float(), ref.float(), **BF16_TOL)


def test_reference_equals_dequantized_linear():
    x, cb, scb, b, _ = _problem(0, 4, 64, 24, bias=True)
    deq = cb.float() * (scb / 127)[:, None]
    torch.testing.assert_close(int8_linear_reference(x, cb, scb, b), torch.nn.functional.linear(x, deq, b), **FP32_TOL)


def test_launch_counts(split):
    x, cb, scb, _, _ = _problem(0, 1, 200, 77)
    with count_launches() as launches:
        int8_linear(x, cb, scb)
    kernels = {"int8_linear.gemv": 1}
    if split:
        kernels["int8_linear.splitk_reduce"] = 1
    assert launches == kernels


def test_empty_shapes():
    x, cb, scb, _, _ = _problem(0, 0, 32, 8)
    assert int8_linear(x, cb, scb).shape == (0, 8)
    b = torch.randn(8, generator=torch.Generator().manual_seed(0))
    y = int8_linear(torch.zeros(2, 0), torch.zeros(8, 0, dtype=torch.int8), torch.ones(8), b, out=_nan_out(2, 8))
    torch.testing.assert_close(y, b.expand(2, 8))  # K = 0: only the bias


# --- quantize_rowwise -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rowwise_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 203, generator=g) * torch.rand(37, 1, generator=g) * 5).to(dtype)
    w[3] = 0  # an all-zero row
    cb, scb = quantize_rowwise(w)
    assert cb.dtype == torch.int8 and scb.dtype == torch.float32 and cb.shape == w.shape and scb.shape == (37,)
    torch.testing.assert_close(scb, w.float().abs().amax(dim=1), rtol=0, atol=0)
    assert cb.abs().max() == 127 and (cb[3] == 0).all()
    err = (w.float() - cb.float() * scb[:, None] / 127).abs()
    # half a quantization step, plus the fp32 rounding of the dequantization (ties are exactly at it)
    assert (err <= scb[:, None] * (1 / 254 + 2 ** -22)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_rowwise_equals_bitsandbytes(dtype):
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(64, 300, generator=g) * 3).to(dtype)
    cb_ref, scb_ref, outliers = bnb_functional.int8_vectorwise_quant(w.clone())
    assert outliers is None
    cb, scb = quantize_rowwise(w)
    assert torch.equal(cb, cb_ref)
    assert torch.equal(scb, scb_ref)


# --- validation -------------------------------------------------------------------------------------

def _inputs():
    x, cb, scb, b, r = _problem(0, 3, 32, 8, bias=True, residual=True)
    return dict(x=x, cb=cb, scb=scb, bias=b, residual=r)


@pytest.mark.parametrize("change, match", [
    (dict(cb=torch.zeros(8, 32)), "cb must have dtype"),
    (dict(cb=torch.zeros(8, 31, dtype=torch.int8)), r"cb must have shape \[N, 32\]"),
    (dict(cb=torch.zeros(32, 8, dtype=torch.int8).t()), "cb must be contiguous along K"),
    (dict(scb=torch.ones(9)), "scb must be a contiguous"),
    (dict(scb=torch.ones(8, dtype=torch.bfloat16)), "scb must have dtype"),
    (dict(scb=torch.ones(8, 1)), "scb must have 1 dimensions"),
    (dict(x=torch.zeros(3, 32, dtype=torch.int32)), "x must have dtype"),
    (dict(x=torch.zeros(32)), "x must have 2 dimensions"),
    (dict(bias=torch.ones(7)), "bias must be a contiguous"),
    (dict(residual=torch.zeros(3, 9)), r"residual must have shape \[3, 8\]"),
    (dict(out=torch.zeros(3, 8, dtype=torch.bfloat16)), "out must have dtype"),
    (dict(out=torch.zeros(4, 8)), r"out must have shape \[3, 8\]"),
    (dict(epilogue="gelu"), "epilogue must be one of"),
    (dict(cb=torch.zeros(7, 32, dtype=torch.int8), scb=torch.ones(7), bias=None, residual=None,
          epilogue="silu_gate"), "even number of cb rows"),
])
def test_bad_inputs_name_the_argument(change, match):
    kwargs = {**_inputs(), **change}
    with pytest.raises((ValueError, TypeError), match=match):
        int8_linear(kwargs.pop("x"), kwargs.pop("cb"), kwargs.pop("scb"), kwargs.pop("bias"), **kwargs)


def test_out_must_not_overlap_inputs():
    kw = _inputs()
    big = torch.zeros(3, 40)
    with pytest.raises(ValueError, match="out must not overlap x"):
        int8_linear(big[:, :32], kw["cb"], kw["scb"], out=big[:, 32:])
    res = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="out may alias residual only exactly"):
        int8_linear(kw["x"], kw["cb"], kw["scb"], residual=res[:3], out=res[1:])


# --- static audit and GPU checks --------------------------------------------------------------------

def test_audit_cases_are_well_formed():
    cases = mod.audit_cases()
    assert len({c["name"] for c in cases}) == len(cases)
    for c in cases:
        assert set(c["signature"]) == set(c["fn"].arg_names), c["name"]
        assert all(c["signature"][k] == "constexpr" for k in c["constexprs"]), c["name"]
        assert all(c["signature"][k] == "i32" for k in c["int_values"]), c["name"]
        assert c["num_warps"] in (4, 8) and c["num_stages"] >= 1
    names = " ".join(c["name"] for c in cases)
    assert "gemv.ffn_linear_in.M1" in names and "mm.ffn_linear_in.M64" in names and "text_head.M64" in names


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from moshivis_kernels import int8_linear as mod
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    report = {}
    for case in mod.audit_cases():
        if ".attn_out_proj.M1." not in case["name"] and ".ffn_linear_in.M1." not in case["name"]:
            continue
        fn, sig, constexprs, ints = case["fn"], dict(case["signature"]), dict(case["constexprs"]), case["int_values"]
        for name, value in ints.items():  # Triton's launch-time specialization
            if value == 1:
                sig[name], constexprs[name] = "constexpr", 1
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if sig[name].startswith("*") or (sig[name] != "constexpr" and ints.get(name, 1) % 16 == 0)}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]}).asm["ptx"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            info = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                  capture_output=True, text=True).stderr
        loop = ptx[ptx.index("Inner Loop"):]
        report[case["name"]] = {
            "v4_in_loop": len(re.findall(r"ld\\.global[\\w.:]*\\.v4\\.b32", loop[:loop.index("bra")])),
            "spill": int(re.search(r"(\\d+) bytes spill stores", info).group(1)),
        }
    print(json.dumps(report))
""")



def test_gemv_compiles_for_sm90_with_128bit_loads_and_no_spills():
    """triton.compile for sm_90 (no GPU needed) of the GEMV audit cases: 16-byte weight loads, no spills."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # else _runtime turns the interpreter on (no GPU here)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(".gemv.attn_out_proj" in n for n in report) and any(".gemv.ffn_linear_in" in n for n in report)
    for name, r in report.items():
        if ".gemv." in name:
            assert r["v4_in_loop"] >= 4, (name, r)  # 4 weight vectors (+ 2 for the x row)
        assert r["spill"] == 0, (name, r)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU (bf16 tl.dot is unreliable in the interpreter)")
@pytest.mark.parametrize("M", [1, 2, 5, 64, 256])
@pytest.mark.parametrize("K, n_w, epilogue, residual", [
    (4096, 4096, "none", True), (4096, 22528, "silu_gate", False), (11264, 4096, "none", True),
    (1024, 5632, "silu_gate", False), (4096, 32000, "none", False),
])
def test_bf16_real_shapes_gpu(M, K, n_w, epilogue, residual):
    g = torch.Generator(device="cuda").manual_seed(M + K)
    N = n_w // 2 if epilogue == "silu_gate" else n_w
    x = (torch.randn(M, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
    cb, scb = quantize_rowwise(torch.randn(n_w, K, device="cuda", generator=g))
    r = torch.randn(M, N, device="cuda", generator=g).bfloat16() if residual else None
    out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
    y = int8_linear(x, cb, scb, residual=r, epilogue=epilogue, out=out)
    ref = int8_linear_reference(x, cb, scb, residual=r, epilogue=epilogue)
    torch.testing.assert_close(y.float(), ref.float(), **BF16_TOL)
