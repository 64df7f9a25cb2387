"""Host-side cost of a frame, as pytest-benchmark benchmarks (the tiny preset: the work is so small
that a frame's time is the runtime's own overhead).

    pytest bench/ --benchmark-only                          # run
    pytest bench/ --benchmark-only --benchmark-save=NAME    # store a baseline (bench/results/host_baseline/)
    pytest bench/ --benchmark-only --benchmark-compare       # compare with the newest stored run of this machine
    pytest bench/ --benchmark-only -k host_cost --benchmark-compare --benchmark-compare-fail=median:25%
                                                            # fail on a host-cost regression
    pytest-benchmark --storage bench/results/host_baseline compare --group-by=name   # tables of stored runs

- test_engine_step_host_cost: wall time of Engine.step (to the tokens on the host) for B streams with
  images, fp32 tiny weights; on CPU with one torch thread (the Python overhead, steady on a shared
  machine), on a GPU for both backends (Python + launch overhead).
- test_launches_per_frame: kernel launches of one frame for both backends (Triton launches + PyTorch
  ops, `bench.common.count_launches`), in the benchmark's extra_info as `launches_per_frame` (one
  counted frame: its time is no benchmark; leave it out of --benchmark-compare-fail with -k). Without
  a GPU the triton backend's frame runs in the Triton interpreter: its count is exact, its time is not
  a kernel time.
"""
from __future__ import annotations

import pytest
import torch

from moshivis import Engine, preset, random_init

from .common import count_launches

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def frame_fn(backend: str, device: str, batch: int):
    """One frame of a tiny engine with `batch` streams (each with an image), as a callable."""
    cfg = preset("tiny")
    weights = random_init(cfg, seed=0, dtype=torch.float32, device=device)
    engine = Engine(cfg, weights, max_streams=batch, backend=backend)
    gen = torch.Generator().manual_seed(0)
    streams = [engine.open_stream(seed=b, image=torch.randn(cfg.num_image_tokens, cfg.image_encoder_dim, generator=gen))
               for b in range(batch)]
    user = torch.randint(0, cfg.audio_card, (batch, cfg.num_audio_in), generator=gen)  # from the host, as served
    out = torch.empty(batch, 1 + cfg.dep_q, dtype=torch.long)
    return lambda: engine.step(user, streams, out=out)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("backend,device", [("torch", "cpu"),
                                            pytest.param("torch", "cuda", marks=needs_cuda),
                                            pytest.param("triton", "cuda", marks=needs_cuda)])
def test_engine_step_host_cost(benchmark, one_thread, backend, device, batch):
    step = frame_fn(backend, device, batch)
    for _ in range(3):  # warm-up: past the delay frames; compiles the kernels on a GPU
        step()
    launches = count_launches(step)
    benchmark.extra_info.update(preset="tiny", backend=backend, device=device, batch=batch,
                                launches_per_frame=launches["total"], launches=launches,
                                device_name=torch.cuda.get_device_name() if device == "cuda" else "CPU")
    benchmark(step)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_launches_per_frame(benchmark, one_thread, backend):
    device = "cuda" if CUDA else "cpu"
    step = frame_fn(backend, device, 2)
    step()
    launches = benchmark.pedantic(count_launches, args=(step,), rounds=1, iterations=1)
    benchmark.extra_info.update(preset="tiny", backend=backend, device=device, batch=2,
                                launches_per_frame=launches["total"], launches=launches,
                                interpreted=backend == "triton" and not CUDA)
    assert launches["total"] > 0
    assert (launches["triton"] > 0) == (backend == "triton")
