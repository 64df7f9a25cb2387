"""Shared fixtures. The golden set is `../shared/golden/tiny` beside the repository (or
$MOSHIVIS_GOLDEN), the released checkpoints' manifests `../shared/manifests` (or $MOSHIVIS_MANIFESTS);
a missing golden set or manifest is a test failure, never a skip."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
import torch

import moshivis_kernels  # noqa: F401  (sets TRITON_INTERPRET on CPU before any kernel is defined)
from moshivis_kernels._runtime import INTERPRET
from moshivis import MoshiVisConfig, checkpoint
from moshivis.replay import read_stream

GOLDEN = Path(os.environ.get("MOSHIVIS_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden" / "tiny"))
MANIFESTS = Path(os.environ.get("MOSHIVIS_MANIFESTS", Path(__file__).resolve().parents[2] / "shared" / "manifests"))


def pytest_configure(config):
    # `make test` runs the suite in pytest-xdist workers, one per core: each worker gets its share of the
    # cores for torch's threads (more would spin against the other worker).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    # The Triton interpreter reads scalar kernel arguments in a way NumPy >= 1.25 deprecates.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
    config.addinivalue_line("markers", "gpu(reason): runs natively on a CUDA GPU; skipped (with that reason) without one")
    config.addinivalue_line("markers", "transformers: touches transformers (Mimi, SigLIP, the chat command, the "
                                       "install); `make test-latest` runs these with the newest allowed transformers")


def pytest_collection_modifyitems(config, items):
    """Two worlds, one per process (the interpreter switch is read when kernels are defined): on a CPU
    machine (or with TRITON_INTERPRET=1) the interpreter tests run and `gpu` tests skip; natively on a
    GPU machine only the `gpu` tests run, the interpreter tests (CPU tensors) skip."""
    native_gpu = torch.cuda.is_available() and not INTERPRET
    for item in items:
        gpu = item.get_closest_marker("gpu")
        if gpu is not None and not native_gpu:
            reason = (gpu.kwargs.get("reason", "needs a CUDA GPU") if not torch.cuda.is_available()
                      else "needs native Triton on the GPU: unset TRITON_INTERPRET")
            item.add_marker(pytest.mark.skip(reason=reason))
        elif gpu is None and native_gpu:
            item.add_marker(pytest.mark.skip(reason="a CPU test (CPU tensors, Triton interpreter): on a GPU machine "
                                                    "run it with TRITON_INTERPRET=1"))


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "config.json").exists():
        pytest.fail(f"golden set not found at {GOLDEN} (set MOSHIVIS_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    for name in ("moshika-vis.json", "mimi.json"):
        if not (MANIFESTS / name).is_file():
            pytest.fail(f"checkpoint manifest {name} not found in {MANIFESTS} (set MOSHIVIS_MANIFESTS)")
    return MANIFESTS


@pytest.fixture(scope="session")
def tiny_cfg(golden_dir) -> MoshiVisConfig:
    return MoshiVisConfig.from_json(golden_dir / "config.json")


@pytest.fixture(scope="session")
def tiny_weights(golden_dir, tiny_cfg) -> dict[str, torch.Tensor]:
    return checkpoint.load(golden_dir / "model.safetensors", tiny_cfg)


@pytest.fixture(scope="session")
def golden_streams(golden_dir) -> dict[str, dict[str, torch.Tensor]]:
    return {f.stem: read_stream(f) for f in sorted(golden_dir.glob("stream_*.safetensors"))}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytest.mark.usefixtures("one_thread")`): tiny tensors gain
    nothing from threads, and on the shared 2-core machine idle OpenMP threads spinning against other
    processes made such tests 10-100x slower (measured on the 600-frame quality test too)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's name: fresh inputs per test, reproducible runs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
