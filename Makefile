# `make bench` and `make test` do all the set-up on a fresh machine: a .venv with the pinned CPU
# dependencies and this package installed in editable mode. On a machine whose python3 already has a
# CUDA torch (a GPU box), the venv keeps that torch and its triton instead (see HOST_TORCH).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LATEST := .venv-latest
CLUSTER_STAMP := $(VENV)/.installed-cluster
BENCH_ARGS ?=
# The suite runs in two pytest-xdist workers (CI has 2 cores); tests marked with the same xdist_group run
# in one worker, one after the other (the servers measuring delays and memory). PYTEST_XDIST= runs it serially.
PYTEST_XDIST ?= -n 2 --dist loadgroup

# "1" when $(PYTHON) has a torch that sees a GPU: the venv is then made with --system-site-packages and its
# requirements pin the host's torch and triton versions (installed already, so pip keeps them) in place of
# the CPU wheels. Worked out once, only when the venv is made; override with HOST_TORCH=1 or HOST_TORCH=.
HOST_TORCH ?= $(eval HOST_TORCH := $(shell $(PYTHON) -c 'import torch; assert torch.cuda.is_available()' \
	>/dev/null 2>&1 && echo 1))$(HOST_TORCH)
HOST_PINS = $(PY) -c 'import torch, triton; print(f"torch=={torch.__version__}\ntriton=={triton.__version__}")'

.PHONY: setup setup-cluster bench test test-web test-latest test-cluster mutants audit suite-cpu bench-host clean

setup: $(STAMP)

$(STAMP): requirements-cpu.txt setup.py
	$(PYTHON) -m venv $(if $(HOST_TORCH),--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(HOST_TORCH),{ $(HOST_PINS); grep -v -E '^(torch|triton)==' requirements-cpu.txt; },\
	  cat requirements-cpu.txt) > $(VENV)/requirements.txt
	$(PY) -m pip install -q -r $(VENV)/requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The newest transformers setup.py allows (and whatever else `pip install -e '.[chat]'` resolves today),
# with torch and numpy held at the pinned set's: the tests marked `transformers` run there.
$(LATEST)/.installed: requirements-cpu.txt setup.py
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	grep -E '^(torch|numpy)[=<>]' requirements-cpu.txt > $(LATEST)/constraints.txt
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/constraints.txt torch numpy
	$(LATEST)/bin/python -m pip install -q -c $(LATEST)/constraints.txt -e '.[chat,dev]'
	touch $@

# Ray Serve (moshivis.cluster) on top of the CPU set-up: CI installs it, so `make test` runs
# tests/test_cluster.py too (without it those tests skip).
setup-cluster: $(CLUSTER_STAMP)

$(CLUSTER_STAMP): $(STAMP) requirements-cluster.txt
	$(PY) -m pip install -q -r requirements-cluster.txt
	touch $(CLUSTER_STAMP)

bench: $(STAMP)
	$(PY) -m bench.frame_latency $(BENCH_ARGS)

test: $(STAMP) test-web
	$(PY) -m pytest tests -q $(PYTEST_XDIST)

# Planted bugs, each applied, tested and undone (tests/mutants.py); about 25 minutes on 2 cores. Not in CI:
# run it after changing what a mutant plants into, and before calling the suite done.
mutants: $(STAMP)
	$(PY) tests/mutants.py

test-cluster: $(CLUSTER_STAMP)
	$(PY) -m pytest tests/test_cluster.py -q

# The browser page's JavaScript (moshivis/serve/web/): node's built-in test runner, no npm packages.
test-web:
	node --test tests/web/

test-latest: $(LATEST)/.installed
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -i -E '^(torch|triton|numpy|transformers|kernels) '
	$(LATEST)/bin/python -m pytest tests -q -m transformers $(PYTEST_XDIST)

audit: $(STAMP)
	$(PY) -m bench.audit --arch sm_90a

suite-cpu: $(STAMP)
	$(PY) -m bench.gpu_suite --allow-cpu --out out/suite-cpu

bench-host: $(STAMP)
	$(PY) -m pytest bench/ --benchmark-only --benchmark-compare

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info
