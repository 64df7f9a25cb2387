# `make bench` and `make test` do all the set-up on a fresh machine: a .venv with the pinned CPU
# dependencies and this package installed in editable mode.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CLUSTER_STAMP := $(VENV)/.installed-cluster
BENCH_ARGS ?=

.PHONY: setup setup-cluster bench test test-web test-cluster audit suite-cpu bench-host clean

setup: $(STAMP)

$(STAMP): requirements-cpu.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Ray Serve (moshivis.cluster) on top of the CPU set-up: CI installs it, so `make test` runs
# tests/test_cluster.py too (without it those tests skip).
setup-cluster: $(CLUSTER_STAMP)

$(CLUSTER_STAMP): $(STAMP) requirements-cluster.txt
	$(PY) -m pip install -q -r requirements-cluster.txt
	touch $(CLUSTER_STAMP)

bench: $(STAMP)
	$(PY) -m bench.frame_latency $(BENCH_ARGS)

test: $(STAMP) test-web
	$(PY) -m pytest tests -q

test-cluster: $(CLUSTER_STAMP)
	$(PY) -m pytest tests/test_cluster.py -q

# The browser page's JavaScript (moshivis/serve/web/): node's built-in test runner, no npm packages.
test-web:
	node --test tests/web/

audit: $(STAMP)
	$(PY) -m bench.audit --arch sm_90a

suite-cpu: $(STAMP)
	$(PY) -m bench.gpu_suite --allow-cpu --out out/suite-cpu

bench-host: $(STAMP)
	$(PY) -m pytest bench/ --benchmark-only --benchmark-compare

clean:
	rm -rf $(VENV) *.egg-info
