"""The install a user gets.

* The top-level name `kernels` belongs to a PyPI package that transformers >= 5.25 depends on and
  imports; ours is `moshivis_kernels` (in kernels/moshivis_kernels/, no kernels/__init__.py), so from
  the repository root `import kernels` gives PyPI's package, or at most an empty namespace.
* setup.py declares every package the code imports, in the extra that needs it.
* The Makefile's environments: the pinned CPU set, the newest allowed transformers (`make
  test-latest`, where the tests marked `transformers`, these included, run again), and a GPU
  machine's own torch kept (HOST_TORCH), checked by dry runs.
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

pytestmark = pytest.mark.transformers

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml"}  # import name -> distribution name, where they differ


def python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_import_kernels_from_the_repository_root_is_never_ours():
    p = python("import json\ntry:\n    import kernels\nexcept ImportError as e:\n    print(json.dumps({'error': str(e)}))\n"
               "else:\n    print(json.dumps({'file': kernels.__file__, 'path': list(getattr(kernels, '__path__', []))}))")
    assert p.returncode == 0, p.stderr
    found = json.loads(p.stdout)
    try:
        pypi = Path(importlib.metadata.distribution("kernels").locate_file("")).resolve()
    except importlib.metadata.PackageNotFoundError:
        pypi = None
    if pypi is not None:  # transformers >= 5.25 brings it: the name must resolve to site-packages
        assert found.get("file"), found
        where = Path(found["file"]).resolve()
        assert where.is_relative_to(pypi) and not where.is_relative_to(REPO / "kernels"), found
    else:  # no regular package of ours: ImportError, or a namespace with no code (file None)
        assert "error" in found or found["file"] is None, found
    assert not (REPO / "kernels" / "__init__.py").exists()


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_our_packages_and_transformers_import(where, tmp_path):
    cwd = REPO if where == "repository root" else tmp_path
    p = python("import moshivis_kernels, moshivis.audio, moshivis.vision, moshivis.chat\n"
               "from transformers import MimiModel, SiglipVisionModel\n"
               "print(moshivis_kernels.__file__)", cwd=cwd)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == REPO / "kernels" / "moshivis_kernels" / "__init__.py"


def test_kernels_run_on_the_installed_triton(gen):
    """A dense and an INT8 fused-norm linear (the GEMV path) against the PyTorch reference: the triton that pip
    resolved within setup.py's range runs our kernels (triton 3.9's interpreter rejects them). fp32, K=37 and
    N=19 (odd sizes); measured error ~1e-6, tolerance 1e-4."""
    from moshivis_kernels.linear import linear, linear_reference, quantize_rowwise
    x = torch.randn(1, 37, generator=gen)
    alpha = torch.rand(37, generator=gen) + 0.5
    w = torch.randn(19, 37, generator=gen)
    for weight, scale in ((w, None), quantize_rowwise(w)):
        args = dict(x=x, weight=weight, scale=scale, norm="rms", norm_alpha=alpha)
        out = torch.full((1, 19), float("nan"))
        torch.testing.assert_close(linear(**args, out=out), linear_reference(**args), atol=1e-4, rtol=1e-4)


# ---- setup.py ------------------------------------------------------------------------------------------
def setup_requirements() -> dict[str, list[Requirement]]:
    """setup.py's install_requires (under "") and extras_require, read without running it."""
    for node in ast.walk(ast.parse((REPO / "setup.py").read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            groups = {"": kw["install_requires"], **kw["extras_require"]}
            return {name: [Requirement(r) for r in reqs] for name, reqs in groups.items()}
    raise AssertionError("no setup() call in setup.py")


def declared() -> dict[str, set[str]]:
    return {group: {r.name.lower() for r in reqs} for group, reqs in setup_requirements().items()}


def imports(files) -> dict[str, set[str]]:
    """Third-party distributions imported anywhere in `files` (lazy imports inside functions included)."""
    ours = {"moshivis", "moshivis_kernels", "bench", "conftest"} | {f.stem for f in (REPO / "tests").glob("*.py")}
    found: dict[str, set[str]] = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ours:
                    found.setdefault(DISTRIBUTION.get(top, top).lower(), set()).add(str(f.relative_to(REPO)))
    return found


def closure(module: Path) -> list[Path]:
    """`module` and every module of this package it imports, directly or not (relative or `moshivis.` imports)."""
    seen, todo = [], [module]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.append(f)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("moshivis")):
                base = f.parent if node.level else REPO
                parts = (node.module or "").split(".") if node.module else []
                targets = [base.joinpath(*parts)] if node.module else [base / a.name for a in node.names]
                if node.module:
                    targets += [base.joinpath(*parts, a.name) for a in node.names]
                todo += [t.with_suffix(".py") for t in targets if t.with_suffix(".py").is_file()]
                todo += [t / "__init__.py" for t in targets if (t / "__init__.py").is_file()]
    return seen


def test_setup_declares_every_import_in_the_extra_that_needs_it():
    deps = declared()
    base = deps[""]
    library = imports(sorted((REPO / "moshivis").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py")))
    anywhere = set().union(*deps.values())
    assert set(library) <= anywhere, {d: library[d] for d in set(library) - anywhere}
    chat = imports(closure(REPO / "moshivis" / "chat.py"))
    assert set(chat) <= base | deps["chat"], {d: chat[d] for d in set(chat) - base - deps["chat"]}
    commands = imports([f for f in sorted((REPO / "bench").glob("*.py")) if not f.name.startswith(("test_", "conftest"))])
    assert set(commands) <= base | deps["bench"], {d: commands[d] for d in set(commands) - base - deps["bench"]}
    tests = imports(sorted((REPO / "tests").glob("*.py")) + sorted((REPO / "bench").glob("test_*.py")))
    testing = base | deps["dev"] | deps["cluster"]  # tests/test_cluster.py runs where the cluster extra is installed
    assert set(tests) <= testing, {d: tests[d] for d in set(tests) - testing}
    assert {"transformers", "sentencepiece", "pillow"} <= deps["chat"]


def test_installed_versions_are_within_setup_py():
    """What this environment resolved (pinned or newest) satisfies setup.py's ranges."""
    reqs = setup_requirements()
    for req in reqs[""] + reqs["chat"]:
        version = importlib.metadata.version(req.name)
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} is outside {req}"


# ---- the Makefile --------------------------------------------------------------------------------------
def dry_run(target: str, *assignments: str) -> str:
    # without the variables of a make this test may run under (`make test PYTEST_XDIST=...` passes them on)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTEST_XDIST")}
    p = subprocess.run(["make", "--no-print-directory", "-n", "-B", target, *assignments], cwd=REPO, capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_make_test_latest_holds_torch_and_resolves_the_newest_transformers():
    pinned = {line.split("==")[0]: line for line in (REPO / "requirements-cpu.txt").read_text().splitlines()
              if line.startswith("torch==")}
    steps = dry_run("test-latest").splitlines()
    constraint = next(i for i, s in enumerate(steps) if "constraints.txt" in s and s.startswith("grep"))
    torch_first = next(i for i, s in enumerate(steps) if s.endswith("-c .venv-latest/constraints.txt torch numpy"))
    package = next(i for i, s in enumerate(steps) if "-c .venv-latest/constraints.txt -e '.[chat,dev]'" in s)
    assert constraint < torch_first < package
    assert re.search(r"grep -E '\^\(torch\|numpy\)\[=<>\]' requirements-cpu\.txt", steps[constraint])
    assert pinned["torch"] == "torch==2.13.0" and "transformers" not in " ".join(steps[:package + 1])
    assert steps[-1] == ".venv-latest/bin/python -m pytest tests -q -m transformers -n 2 --dist loadgroup"


@pytest.mark.parametrize("host", ["cuda torch", "no cuda torch"])
def test_make_setup_keeps_a_gpu_machines_own_torch(host, tmp_path):
    """HOST_TORCH is worked out by running $(PYTHON) -c 'import torch; assert torch.cuda.is_available()': a
    stand-in python that passes (or fails) that check gives the GPU (or CPU) set-up."""
    fake = tmp_path / "python3"
    fake.write_text(f"#!/bin/sh\nexit {0 if host == 'cuda torch' else 1}\n")
    fake.chmod(0o755)
    steps = dry_run("setup", f"PYTHON={fake}")
    if host == "cuda torch":
        assert f"{fake} -m venv --system-site-packages .venv" in steps
        assert "grep -v -E '^(torch|triton)==' requirements-cpu.txt" in steps
        pins = re.search(r"\{ (.*?)'; grep", steps).group(1).replace(".venv/bin/python", sys.executable) + "'"
        import triton
        assert subprocess.run(pins, shell=True, capture_output=True, text=True).stdout.split() == [
            f"torch=={torch.__version__}", f"triton=={triton.__version__}"]
    else:
        assert f"{fake} -m venv  .venv" in steps and "--system-site-packages" not in steps
        assert "cat requirements-cpu.txt > .venv/requirements.txt" in steps
    assert ".venv/bin/python -m pip install -q -r .venv/requirements.txt" in steps
