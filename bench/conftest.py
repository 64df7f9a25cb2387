"""pytest-benchmark set-up for `pytest bench/ --benchmark-only` (the host-overhead benchmarks).

Runs are stored under bench/results/host_baseline/ (pytest-benchmark adds a folder per machine:
<system>-<python implementation>-<version>-<bits>) unless --benchmark-storage names another place.
"""
from __future__ import annotations

from pathlib import Path

import moshivis_kernels  # noqa: F401  (sets TRITON_INTERPRET on CPU before any kernel is defined)

STORAGE = Path(__file__).resolve().parent / "results" / "host_baseline"
_DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's own default


def pytest_configure(config):
    # The Triton interpreter reads scalar kernel arguments in a way NumPy >= 1.25 deprecates.
    config.addinivalue_line("filterwarnings",
                            "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
    if getattr(config.option, "benchmark_storage", None) == _DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{STORAGE}"
