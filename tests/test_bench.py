"""The benchmark commands run on CPU with tiny settings and write well-formed JSON with the stable
field names, and the roofline byte model matches SPEC.md §9 at moshika-vis sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import codec, concurrency, frame_latency, gpu_suite, kernels
from bench.common import FRAME_BUDGET_MS, count_launches, frame_bytes, model_weight_bytes, stream_bytes
from moshivis import preset
from moshivis.state import StreamState

ROOT = Path(__file__).resolve().parents[1]
ENV_FIELDS = {"device_type", "device", "label", "torch", "triton", "python", "commit", "time"}
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert ENV_FIELDS <= set(doc["env"]), doc["env"]
    return doc


@cpu_only
def test_frame_latency_defaults_follow_the_machine():
    """With CUDA, a run without arguments measures triton beside torch at the released sizes (bf16 is the
    dtype default on cuda); without, the torch backend on the CPU-sized preset, as `make bench` always did."""
    gpu = {"preset": "moshika-vis", "backend": ["torch", "triton"], "batch": [1, 8, 32], "device": "cuda"}
    cpu = {"preset": "small", "backend": ["torch"], "batch": [1, 4], "device": "cpu"}
    assert frame_latency.defaults(True) == gpu and frame_latency.defaults(False) == cpu
    for cuda, want in ((True, gpu), (False, cpu)):
        ap = frame_latency.parser(cuda=cuda)
        assert {k: ap.get_default(k) for k in want} == want and ap.get_default("dtype") is None
    args = frame_latency.parser().parse_args([])  # this machine
    assert {k: getattr(args, k) for k in cpu} == (gpu if torch.cuda.is_available() else cpu)


def test_frame_latency_writes_json_labelled_cpu(tmp_path, capsys):
    out = tmp_path / "fl.json"
    assert frame_latency.main(["--preset", "tiny", "--batch", "1", "2", "--frames", "3", "--warmup", "1",
                               "--threads", "1", "--json", str(out)]) == 0
    doc = load(out)
    assert doc["benchmark"] == "frame_latency" and doc["env"]["label"] == "CPU"
    assert [r["batch"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        assert r["backend"] == "torch" and r["timed"] and r["device_type"] == "cpu" and r["frames"] == 3
        assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert isinstance(r["launches_per_frame"], int) and r["launches_per_frame"] == r["launches"]["total"] > 0
        assert r["launches"]["triton"] == 0 and r["deadline_misses"] in range(4)
        assert r["roofline_ms"] > 0 and set(r["phases_ms"]) == set(frame_latency.PHASES)
        assert r["kv_dtype"] == "auto" and r["kv_bytes_per_stream"] == StreamState.kv_bytes_per_stream(
            preset("tiny"), torch.float32)
    assert "CPU figures, not GPU" in capsys.readouterr().out
    # --kv-dtype reaches the engine it measures: the int8 cache's bytes, as allocated
    assert frame_latency.main(["--preset", "tiny", "--batch", "2", "--frames", "1", "--warmup", "0",
                               "--threads", "1", "--kv-dtype", "int8", "--json", str(out)]) == 0
    (r,) = load(out)["results"]
    assert r["kv_dtype"] == "int8" and r["kv_bytes_per_stream"] == StreamState.kv_bytes_per_stream(
        preset("tiny"), torch.float32, "int8") < StreamState.kv_bytes_per_stream(preset("tiny"), torch.float32)


@cpu_only
def test_frame_latency_counts_but_never_times_the_interpreted_triton_backend(tmp_path, capsys):
    out = tmp_path / "fl.json"
    assert frame_latency.main(["--preset", "tiny", "--backend", "triton", "--batch", "1", "--threads", "1",
                               "--json", str(out)]) == 0
    (r,) = load(out)["results"]
    assert r["interpreted"] and not r["timed"] and r["frames"] == 0 and "p50_ms" not in r
    assert r["launches"]["triton"] > 0 and r["launches_per_frame"] == r["launches"]["total"]
    assert "latency needs a GPU" in capsys.readouterr().out


@cpu_only
def test_concurrency_writes_json_with_a_labelled_capacity_model(tmp_path, capsys):
    out = tmp_path / "cc.json"
    assert concurrency.main(["--preset", "tiny", "--streams", "1", "2", "--frames", "2", "--warmup", "1",
                             "--kv-dtype", "int8", "--threads", "1", "--json", str(out)]) == 0
    doc = load(out)
    rows, cap = doc["results"], doc["capacity"]
    assert [r["streams"] for r in rows] == [1, 2]
    for r in rows:
        assert {"p50_ms", "p99_ms", "deadline_misses", "miss_rate", "holds_budget", "launches_per_frame"} <= set(r)
        assert r["start_position"] == preset("tiny").context and r["holds_budget"] == (r["p99_ms"] <= FRAME_BUDGET_MS)
        # the int8 cache the engine allocated per stream is what the memory model counts
        assert r["kv_dtype"] == "int8" and r["kv_bytes_per_stream"] == cap["bytes_per_stream_by_part"]["self_attention_kv"]
    assert cap["streams_fit_memory"] is None and "not a measurement" in cap["source"]
    assert cap["max_streams_p99_within_budget"] == max([r["streams"] for r in rows if r["holds_budget"]], default=0)
    model = {(m["device"], m["weights"], m["kv"]): m for m in cap["model"]}
    assert len(model) == 8 and all(m["source"] == "model" and m["preset"] == "moshika-vis" for m in model.values())
    h100 = model[("H100 SXM 80 GB", "bf16", "bf16")]
    # (78 GiB - 14.7 GiB of bf16 weights - 3 GiB reserve) / 1.59 GB per stream
    assert h100["bytes_per_stream"] == pytest.approx(1.5897e9, rel=1e-3) and h100["streams_fit_memory"] == 40
    assert model[("H100 SXM 80 GB", "int8", "bf16")]["streams_fit_memory"] > 40
    assert model[("H200 141 GB", "bf16", "bf16")]["streams_fit_memory"] > 2 * 38
    # an int8 cache: 0.81 GB + 16.8 MB of image K/V per stream; the KV part is what a slot allocates
    h100_int8 = model[("H100 SXM 80 GB", "bf16", "int8")]
    assert h100_int8["bytes_per_stream"] == pytest.approx(0.8278e9, rel=1e-3) and h100_int8["streams_fit_memory"] == 78
    assert model[("H100 SXM 80 GB", "int8", "int8")]["streams_fit_memory"] == 87  # the target: >= 80
    for m in model.values():
        assert m["bytes_per_stream"] - m["kv_bytes_allocated_per_stream"] == pytest.approx(16.8e6, rel=0.01)
    assert "NOT measured" in capsys.readouterr().out


@cpu_only
def test_kernels_times_baselines_and_checks_but_never_times_interpreted_kernels(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert kernels.main(["--only", "xattn", "self_attention", "embedding", "sampling", "linear", "--threads", "1",
                         "--json", str(out)]) == 0
    doc = load(out)
    rows = doc["results"]
    assert {r["kernel"] for r in rows} == {"xattn", "self_attention", "embedding", "sampling", "linear"}
    ours = [r for r in rows if r["ours"] and r["status"] != "not available (no kernels/linear.py)"]
    assert ours and all(not r["timed"] and "us" not in r and r["status"] == kernels.NOT_TIMED for r in ours)
    for r in ours:  # each kernel ran once in the interpreter and matched its reference (fp32)
        err = r.get("max_abs_err", r.get("token_mismatches"))
        assert err is not None and err <= (0 if r["kernel"] == "sampling" else 1e-4), r
    timed = [r for r in rows if r["timed"]]
    assert {r["impl"] for r in timed} >= {"torch", "sdpa", "torch_topk", "torch_int8"}
    for r in timed:
        assert not r["ours"] and not r["cuda_graph"] and r["us"] > 0 and r["gb_per_s"] > 0 and r["roofline_pct"] > 0
        assert {"kernel", "case", "impl", "bytes", "us_p10", "us_p90", "status"} <= set(r)
    flash = [r for r in rows if r["impl"] == "flash_attn"]
    assert flash and all(r["status"] in ("not installed", "ok") for r in flash)
    linear_ms = {r["M"] for r in rows if r["kernel"] == "linear"}
    assert linear_ms == set(kernels.SWEEPS["cpu"]["linear"])
    assert "kernel timings need a GPU" in capsys.readouterr().out


@cpu_only
def test_codec_bench_writes_json_labelled_cpu(tmp_path, capsys):
    """bench.codec on test_e2e's tiny Mimi: one row per stream count with the stable fields; the two
    ways agree (codes equal, PCM within float rounding)."""
    from moshivis.demo import tiny_mimi
    config = tmp_path / "mimi.json"
    tiny_mimi(torch.Generator().manual_seed(0)).config.to_json_file(str(config))
    out = tmp_path / "codec.json"
    assert codec.main(["--streams", "1", "3", "--frames", "2", "--threads", "1", "--mimi-config", str(config),
                       "--json", str(out)]) == 0
    doc = load(out)
    assert doc["benchmark"] == "codec" and doc["env"]["label"] == "CPU"
    assert doc["rows"] == doc["results"] and [r["streams"] for r in doc["rows"]] == [1, 3]
    for r in doc["rows"]:
        assert r["label"] == "CPU" and r["frames"] == 2 and not r["cuda_graphs"]
        for way in ("batched", "loop"):
            assert r[f"{way}_stream_frames_per_s"] == pytest.approx(
                r["streams"] * 1e3 / (r[f"{way}_encode_ms"] + r[f"{way}_decode_ms"]))
            assert len(r[f"{way}_encode_times_ms"]) == len(r[f"{way}_decode_times_ms"]) == 2
        assert r["speedup"] == pytest.approx(r["batched_stream_frames_per_s"] / r["loop_stream_frames_per_s"])
        assert r["codes_equal_fraction"] == 1.0 and r["max_pcm_diff"] < 1e-4
    assert "CPU figures, not GPU" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        codec.main(["--mimi-config", str(tmp_path / "missing.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--mimi-config" in err and len(err.strip().splitlines()) == 1


@cpu_only
def test_gpu_suite_refuses_to_run_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--allow-cpu" in run.stderr
    assert not (tmp_path / "out").exists()


@cpu_only
def test_gpu_suite_on_cpu_writes_at_most_8_files_all_labelled_cpu(tmp_path):
    out = tmp_path / "suite"
    assert gpu_suite.main(["--out", str(out), "--allow-cpu", "--quick", "--skip", "audit"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["concurrency.png", "frame_latency.png", "kernels.png", "results.json", "summary.md"]
    doc = json.loads((out / "results.json").read_text())
    assert doc["env"]["label"] == "CPU"
    for section in ("frame_latency", "concurrency", "kernels"):
        assert doc[section]["benchmark"] == section and doc[section]["env"]["label"] == "CPU"
        assert doc[section]["results"]
    assert all("p50_ms" in r and "launches_per_frame" in r for r in doc["frame_latency"]["results"])
    summary = (out / "summary.md").read_text()
    assert "CPU figures, not GPU" in summary and "GPU timings need" in summary
    assert sum(p.stat().st_size for p in out.iterdir()) < 1 << 20


def test_roofline_byte_model_matches_spec_section_9():
    cfg = preset("moshika-vis")
    parts = frame_bytes(cfg, batch=1, window=cfg.context, distinct_images=1, act_bytes=2, weight_bytes=2)
    weights = sum(parts[k] for k in ("temporal_weights", "cross_attention_weights", "text_head", "depformer_weights"))
    assert weights == pytest.approx(17.2e9, rel=0.01)  # ~8.6 B parameter reads in bf16
    assert weights / 3.35e12 * 1e3 == pytest.approx(5.1, abs=0.1)  # ms at H100 SXM peak
    assert parts["temporal_weights"] == pytest.approx(4.3e9 + 8.9e9 + 0.27e9, rel=0.01)  # self-attn + FFN + gates
    assert parts["cross_attention_weights"] == pytest.approx(2.1e9, rel=0.03)  # 67 MB re-read by 32 layers
    assert parts["text_head"] == pytest.approx(0.26e9, rel=0.02)
    assert parts["depformer_weights"] == pytest.approx(1.33e9, rel=0.01)
    assert parts["self_attention_kv"] == pytest.approx(1.57e9, rel=0.01)  # per stream at full context
    assert parts["image_kv"] == pytest.approx(16.8e6, rel=0.01)
    int8 = frame_bytes(cfg, 1, cfg.context, 1, 2, 1)
    assert sum(int8[k] for k in ("temporal_weights", "cross_attention_weights", "text_head", "depformer_weights")) \
        == pytest.approx(weights / 2)
    many = frame_bytes(cfg, batch=40, window=cfg.context, distinct_images=40, act_bytes=2, weight_bytes=2)
    assert many["self_attention_kv"] == pytest.approx(63e9, rel=0.01)  # 40 streams at full context
    per_stream = stream_bytes(cfg, 2)
    assert per_stream["self_attention_kv"] == StreamState.kv_bytes_per_stream(cfg, torch.bfloat16)
    # an int8 cache: 1 byte per element plus a 4-byte scale per 128-element head vector
    int8_kv = frame_bytes(cfg, 1, cfg.context, 1, 2, 2, kv_dtype="int8")["self_attention_kv"]
    assert int8_kv == parts["self_attention_kv"] * (128 + 4) / 256 == stream_bytes(cfg, 2, "int8")["self_attention_kv"]
    assert per_stream["image_kv"] == pytest.approx(16.8e6, rel=0.01)
    # resident weights: every key once (the shared cross-attention projection is stored once)
    assert model_weight_bytes(cfg, 2, 2) == pytest.approx(15.8e9, rel=0.01)


def test_count_launches_counts_an_interpreted_kernel_as_one_launch(gen):
    from moshivis_kernels import embed_tokens
    text, audio = torch.randn(10, 32, generator=gen), torch.randn(3, 9, 32, generator=gen)
    tokens = torch.tensor([[1, 2, -1, 4], [0, 8, 8, 8]])
    counts = count_launches(lambda: embed_tokens(tokens, text, audio))
    assert counts == {"triton": 1, "torch_ops": 0, "total": 1}
    assert count_launches(lambda: text + 1) == {"triton": 0, "torch_ops": 1, "total": 1}
