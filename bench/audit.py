"""Static audit of every Triton kernel, compiled for a GPU on a machine without one.

python -m bench.audit [--arch sm_90a] [--json PATH]

Each kernel file in `moshivis_kernels` lists `audit_cases()`: the kernel, its signature and the
constexprs its launch configuration picks at the real moshika-vis shapes, and `int_values`, the
integer arguments (sizes, strides) at those shapes. Each case is compiled
with `triton.compile` for a CUDA target (pointer arguments 16-byte aligned and integer arguments
listed in `int_values` specialised as a launch would), then the `ptxas` and `cuobjdump` shipped with
triton report registers, spills, shared memory, global load/store widths and tensor-core
instructions. Exits non-zero on any register spill or compile failure.
"""
from __future__ import annotations

import argparse
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections import Counter
from importlib import import_module
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels; must precede any @triton.jit definition

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import moshivis_kernels  # noqa: E402
from moshivis import cli  # noqa: E402

from .common import environment, table, write_json  # noqa: E402

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_TENSOR_CORE = re.compile(r"\b(HGMMA|HMMA|IMMA|QGMMA|IGMMA|UTCHMMA|UTCQMMA)\b")
# Global loads (LDG, and LDGSTS: cp.async copies to shared memory) and stores; not LDGDEPBAR.
_GLOBAL = re.compile(r"\b(LDGSTS|LDG|STG)(?![A-Z])((?:\.[A-Z0-9_]+)*)")


def audit_cases() -> list[tuple[str, dict]]:
    """(module name, case) for every kernel file that lists audit cases."""
    cases = []
    for mod in pkgutil.iter_modules(moshivis_kernels.__path__):
        if mod.name.startswith("_"):
            continue
        module = import_module(f"moshivis_kernels.{mod.name}")
        for case in getattr(module, "audit_cases", lambda: [])():
            cases.append((mod.name, case))
    return cases


_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


def _width(suffixes: str) -> int:
    """Bits moved per thread by one LDG/STG, from its SASS suffixes (.128, .64, .U16, ...; none = 32)."""
    return next((_BITS[s] for s in suffixes.split(".") if s in _BITS), 32)


def compile_case(case: dict, capability: int) -> dict:
    fn, sig = case["fn"], dict(case["signature"])
    constexprs = dict(case.get("constexprs", {}))
    for name in constexprs:
        sig[name] = "constexpr"
    # A launch specialises integer arguments as Triton does: 1 becomes a constant, multiples of 16
    # get a divisibility hint (what lets contiguous rows compile to wide loads).
    ints = case.get("int_values", {})
    for name, value in ints.items():
        if value == 1:
            sig[name], constexprs[name] = "constexpr", 1
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig.get(name, "").startswith("*") or (name in ints and ints[name] % 16 == 0)}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": case.get("num_warps", 4), "num_stages": case.get("num_stages", 3)})
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        info = subprocess.run([BIN / "ptxas", "-v", "--gpu-name", arch, ptx, "-o", Path(tmp) / "v.cubin"],
                              capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([BIN / "cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout

    def number(pattern):
        m = re.search(pattern, info)
        return int(m.group(1)) if m else 0

    loads, stores = Counter(), Counter()
    for op, suffixes in _GLOBAL.findall(sass):
        (stores if op == "STG" else loads)[_width(suffixes)] += 1
    return {
        "registers": number(r"Used (\d+) registers"),
        "spills": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
        "shared_bytes": compiled.metadata.shared,
        "global_loads": dict(sorted(loads.items(), reverse=True)),
        "global_stores": dict(sorted(stores.items(), reverse=True)),
        "max_load_bits": max(loads, default=0),
        "tensor_core_instructions": len(_TENSOR_CORE.findall(sass)),
        "num_warps": compiled.metadata.num_warps,
    }


def cuda_arch(text: str) -> str:
    """An `sm_NN[a]` architecture name, as the audit compiles for it."""
    if not re.fullmatch(r"sm_\d{2,3}a?", text):
        raise argparse.ArgumentTypeError(f"not a CUDA architecture: {text!r} (sm_80, sm_90a, ...)")
    return text


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m bench.audit", description=__doc__)
    ap.add_argument("--arch", type=cuda_arch, default="sm_90a", help="sm_80, sm_90a, ...")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    capability = int(re.sub(r"\D", "", args.arch))
    results, failed = [], False
    for module, case in audit_cases():
        row = {"file": module, "kernel": case["fn"].__name__, "case": case["name"]}
        try:
            row.update(compile_case(case, capability))
        except Exception as e:  # a kernel that does not compile is a failed audit, reported by name
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            failed = True
        failed |= row.get("spills", 0) > 0
        row["loads"] = " ".join(f"{n}x{bits}b" for bits, n in row.get("global_loads", {}).items())
        row["stores"] = " ".join(f"{n}x{bits}b" for bits, n in row.get("global_stores", {}).items())
        results.append(row)
    env = environment(torch.device("cpu")) | {"target": args.arch}
    print(f"# static audit for {args.arch} (compiled on {env['device']}, no GPU needed); commit {env['commit']}")
    print(table(results, [("file", "file", ""), ("case", "case", ""), ("regs", "registers", "d"),
                          ("spill B", "spills", "d"), ("smem B", "shared_bytes", "d"), ("warps", "num_warps", "d"),
                          ("global loads (count x bits)", "loads", ""), ("stores", "stores", ""),
                          ("tensor-core instr", "tensor_core_instructions", "d"), ("error", "error", "")]))
    if not results:
        print("no kernel lists audit cases", file=sys.stderr)
        failed = True
    write_json(args.json, "audit", env, results)
    spilled = [r["case"] for r in results if r.get("spills", 0) > 0 or "error" in r]
    if spilled:
        print(f"FAILED: spills or compile errors in {spilled}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
