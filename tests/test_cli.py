"""Every command line: bad input is ONE line on stderr (`error: ...`) and exit status 2, never a traceback.

Each case runs the command as a user would, `python -m MODULE ...` in a subprocess, on files made
here (tiny, from the golden set or random), and checks the status, that stderr is exactly one line
naming the offending thing, and that no traceback was printed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moshivis import checkpoint
from moshivis.audio import write_wav
from test_e2e import SR, make_chat_folder, tone

REPO = Path(__file__).resolve().parents[1]


def run(module: str, *args, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(p: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit status 2; stderr exactly one line `error: ...` matching `pattern`; no traceback anywhere."""
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]


# A CUDA device this machine lacks, and what the commands say about it.
MISSING_CUDA = "cuda:99" if torch.cuda.is_available() else "cuda"
NO_SUCH_CUDA = (r"cuda:99: this machine has \d+ CUDA device" if torch.cuda.is_available()
                else r"cuda: this machine has no CUDA device")


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# ---- moshivis.replay --------------------------------------------------------------------------------
@pytest.fixture
def golden_copy(golden_dir, tmp_path) -> Path:
    """A replay folder: the golden config, one stream file and the model."""
    d = tmp_path / "golden"
    d.mkdir()
    for name in ("config.json", "model.safetensors", "stream_noimage_b1.safetensors"):
        shutil.copy(golden_dir / name, d / name)
    return d


@pytest.mark.parametrize("case, pattern", [
    ("checkpoint key missing", r"checkpoint .*model\.safetensors does not match the config: missing keys \(1\): "
                               r"llm\.out_norm\.alpha"),
    ("checkpoint truncated", r"checkpoint file .*model\.safetensors is not a readable safetensors file"),
    ("no config.json", r"config .*config\.json does not exist"),
    ("config not JSON", r"config .*config\.json is not a JSON object"),
    ("golden folder missing", r"golden folder .*nowhere does not exist"),
    ("stream file truncated", r"stream file .*stream_noimage_b1\.safetensors is not a readable safetensors file"),
    ("stream file without user tokens", r"stream file .*stream_noimage_b1\.safetensors has no 'user_audio_tokens'"),
])
def test_replay_bad_input(golden_copy, tiny_weights, tmp_path, case, pattern):
    golden = golden_copy
    if case == "checkpoint key missing":
        checkpoint.save({k: v for k, v in tiny_weights.items() if k != "llm.out_norm.alpha"}, golden / "model.safetensors")
    elif case == "checkpoint truncated":
        truncate(golden / "model.safetensors", 5000)
    elif case == "no config.json":
        (golden / "config.json").unlink()
    elif case == "config not JSON":
        (golden / "config.json").write_text("[1, 2")
    elif case == "golden folder missing":
        golden = tmp_path / "nowhere"
    elif case == "stream file truncated":
        truncate(golden / "stream_noimage_b1.safetensors", 300)
    elif case == "stream file without user tokens":
        save_file({"something": torch.zeros(2)}, str(golden / "stream_noimage_b1.safetensors"))
    assert_one_line_error(run("moshivis.replay", "--golden", golden, "--out", tmp_path / "out"), pattern)


# ---- moshivis.client (its files; no server is reached) ----------------------------------------------
@pytest.mark.parametrize("case, pattern", [
    ("tokens missing", r"tokens file .*nothere\.safetensors does not exist"),
    ("tokens not safetensors", r"tokens file .*user\.safetensors is not a readable safetensors file"),
    ("tokens wrong rank", r"user\.safetensors: expected a 2-d tensor, got shape \[5\]"),
    ("row out of range", r"user\.safetensors: --row 3 is out of range for 2 streams"),
    ("image missing", r"image file .*nothere\.png does not exist"),
    ("image features missing", r"image file .*nothere\.safetensors does not exist"),
    ("port out of range", r"argument --port: must be a port number in \[0, 65535\], got 70000"),
    ("top-k negative", r"sampling top_k_text must be an integer >= 0"),
    ("temperature NaN", r"sampling temperature_audio must be a finite number, got nan"),
    ("nothing in flight", r"argument --ahead: must be a positive integer, got 0"),
    ("seed negative", r"argument --seed: must be >= 0, got -1"),
])
def test_client_bad_input(tmp_path, case, pattern):
    tokens = tmp_path / "user.safetensors"
    save_file({"user_audio_tokens": torch.zeros(2, 8, 3, dtype=torch.long)}, str(tokens))
    args = ["--tokens", tokens, "--row", "0", "--out", tmp_path / "out.safetensors", "--port", "9"]
    if case == "tokens missing":
        args[1] = tmp_path / "nothere.safetensors"
    elif case == "tokens not safetensors":
        tokens.write_text("not a tensor file")
    elif case == "tokens wrong rank":
        save_file({"user_audio_tokens": torch.zeros(5, dtype=torch.long)}, str(tokens))
    elif case == "row out of range":
        args[3] = "3"
    elif case == "image missing":
        args += ["--image", tmp_path / "nothere.png"]
    elif case == "image features missing":
        args += ["--image", tmp_path / "nothere.safetensors"]
    else:
        args += {"port out of range": ["--port", "70000"], "top-k negative": ["--top-k-text", "-1"],
                 "temperature NaN": ["--temperature-audio", "nan"], "nothing in flight": ["--ahead", "0"],
                 "seed negative": ["--seed", "-1"]}[case]
    assert_one_line_error(run("moshivis.client", *args), pattern)


# ---- moshivis.chat ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory) -> dict:
    gen = torch.Generator().manual_seed(99)
    b = make_chat_folder(tmp_path_factory.mktemp("chat"), gen)
    write_wav(b["dir"] / "question.wav", tone(0.2, SR, gen), SR)
    return b


def chat_args(d: Path, out: Path, **replace) -> list:
    args = {"--checkpoint": d, "--image": d / "photo.png", "--audio": d / "question.wav", "--out": out,
            "--vision-config": d / "vision_config.json"}
    args.update(replace)
    return [x for kv in args.items() if kv[1] is not None for x in kv] + ["--quiet"]


@pytest.mark.transformers
@pytest.mark.parametrize("case, pattern", [
    ("checkpoint key missing", r"checkpoint .*model\.safetensors does not match the config: missing keys \(1\): "
                               r"llm\.out_norm\.alpha"),
    ("dense checkpoint as int8", r"does not match the config: missing keys \(\d+\): .*SCB"),
    ("SigLIP does not fit", r"SigLIP weights in .*model\.safetensors do not match the vision config .*: "
                            r"missing \(\d+\): encoder\.layers\.2\."),
    ("config is a JSON list", r"config .*list\.json is not a JSON object"),
    ("no CUDA", rf"argument --device: {NO_SUCH_CUDA}"),
    ("not a device", r"argument --device: not a torch device: 'gpu0'"),
])
def test_chat_bad_input(chat_folder, tmp_path, case, pattern):
    d = chat_folder["dir"]
    replace, extra = {}, []
    if case == "checkpoint key missing":
        shutil.copytree(d, tmp_path / "ckpt")
        d = tmp_path / "ckpt"
        siglip = {f"image_prefix.enc.model.{k}": v for k, v in chat_folder["siglip"].state_dict().items()}
        partial = {k: v for k, v in chat_folder["weights"].items() if k != "llm.out_norm.alpha"}
        checkpoint.save({**partial, **siglip}, d / "model.safetensors")
    elif case == "dense checkpoint as int8":
        extra = ["--weights", "int8"]
    elif case == "SigLIP does not fit":
        cfg = chat_folder["siglip"].config.to_dict() | {"num_hidden_layers": 3}
        (tmp_path / "vision.json").write_text(__import__("json").dumps(cfg))
        replace["--vision-config"] = tmp_path / "vision.json"
    elif case == "config is a JSON list":
        (tmp_path / "list.json").write_text("[1, 2, 3]")
        replace["--config"] = tmp_path / "list.json"
    elif case == "no CUDA":
        extra = ["--device", MISSING_CUDA]
    elif case == "not a device":
        extra = ["--device", "gpu0"]
    out = tmp_path / "answer.wav"
    assert_one_line_error(run("moshivis.chat", *chat_args(d, out, **replace), *extra), pattern)
    assert not out.exists()


BLOCK_CHAT_EXTRAS = """
import runpy, sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in {'transformers', 'sentencepiece', 'PIL'}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NotInstalled())
sys.argv[0] = 'moshivis.chat'
runpy.run_module('moshivis.chat', run_name='__main__', alter_sys=True)
"""


@pytest.mark.transformers
def test_chat_without_the_chat_extras_names_what_is_missing(chat_folder, tmp_path):
    """Only --checkpoint given (the rest found in its folder): the error names the missing packages and the
    install command, not options that were never given."""
    d = chat_folder["dir"]
    p = subprocess.run([sys.executable, "-c", BLOCK_CHAT_EXTRAS, "--checkpoint", str(d), "--image", str(d / "photo.png"),
                        "--audio", str(d / "question.wav"), "--out", str(tmp_path / "a.wav")],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert_one_line_error(p, r"python -m moshivis\.chat needs the chat extras; not importable here: "
                             r"transformers \(.*\), sentencepiece \(.*\), pillow \(.*\): pip install -e '\.\[chat\]'")
    assert "--mimi" not in p.stderr and "--siglip" not in p.stderr and "--tokenizer" not in p.stderr


# ---- moshivis.quantize -------------------------------------------------------------------------------
@pytest.mark.parametrize("case, pattern", [
    ("checkpoint missing", r"checkpoint .*nothere\.safetensors does not exist"),
    ("checkpoint truncated", r"checkpoint file .*model\.safetensors is not a readable safetensors file"),
    ("config missing", r"config .*nothere\.json does not exist"),
    ("unknown preset", r"argument --preset: unknown preset 'huge'"),
    ("linear weight missing", r"checkpoint .*model\.safetensors lacks 1 linear weights: llm\.text_linear\.weight"),
    ("out folder missing", r"cannot write .*nowhere/q\.safetensors: folder .*nowhere does not exist"),
])
def test_quantize_bad_input(golden_dir, tiny_weights, tmp_path, case, pattern):
    model = tmp_path / "model.safetensors"
    shutil.copy(golden_dir / "model.safetensors", model)
    args = {"--checkpoint": model, "--config": golden_dir / "config.json", "--out": tmp_path / "q.safetensors"}
    if case == "checkpoint missing":
        args["--checkpoint"] = tmp_path / "nothere.safetensors"
    elif case == "checkpoint truncated":
        truncate(model, 4000)
    elif case == "config missing":
        args["--config"] = tmp_path / "nothere.json"
    elif case == "unknown preset":
        del args["--config"]
        args["--preset"] = "huge"
    elif case == "linear weight missing":
        checkpoint.save({k: v for k, v in tiny_weights.items() if k != "llm.text_linear.weight"}, model)
    elif case == "out folder missing":
        args["--out"] = tmp_path / "nowhere" / "q.safetensors"
    assert_one_line_error(run("moshivis.quantize", *[x for kv in args.items() for x in kv]), pattern)
    assert not (tmp_path / "q.safetensors").exists()


# ---- the benchmarks' arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("command, pattern", [
    ("bench.frame_latency --preset nope", r"argument --preset: unknown preset 'nope'; known: moshika-vis, small, tiny"),
    ("bench.frame_latency --batch 1 0", r"argument --batch: must be a positive integer, got 0"),
    ("bench.frame_latency --frames 0", r"argument --frames: must be a positive integer, got 0"),
    ("bench.frame_latency --threads -1", r"argument --threads: must be a positive integer, got -1"),
    ("bench.frame_latency --device CUDA", rf"argument --device: {NO_SUCH_CUDA}"),
    ("bench.concurrency --preset nope", r"argument --preset: unknown preset 'nope'"),
    ("bench.concurrency --streams 0", r"argument --streams: must be a positive integer, got 0"),
    ("bench.kernels --device CUDA", rf"argument --device: {NO_SUCH_CUDA}"),
    ("bench.kernels --preset nope", r"argument --preset: unknown preset 'nope'"),
    ("bench.load --streams 0", r"argument --streams: must be a positive integer, got 0"),
    ("bench.gpu_suite --out out/x --threads 0", r"argument --threads: must be a positive integer, got 0"),
    ("bench.audit --arch volta", r"argument --arch: not a CUDA architecture: 'volta' \(sm_80, sm_90a, \.\.\.\)"),
    ("bench.load --port 70000", r"argument --port: must be a port number in \[0, 65535\], got 70000"),
    ("bench.load --tick-ms 0", r"argument --tick-ms: must be a finite number > 0, got 0"),
    ("bench.load --config nowhere.json", r"config nowhere\.json does not exist"),
    ("bench.codec --streams 8 0", r"argument --streams: must be a positive integer, got 0"),
    ("bench.codec --frames", r"argument --frames: expected one argument"),
    ("bench.proxy_cost --streams 1,0", r"argument --streams: must be comma-separated positive integers, got '1,0'"),
    ("bench.proxy_cost --preset nope", r"argument --preset: unknown preset 'nope'"),
])
def test_bench_argument_errors(command, pattern):
    module, *args = command.replace("CUDA", MISSING_CUDA).split()
    assert_one_line_error(run(module, *args), pattern)


# ---- moshivis.server --------------------------------------------------------------------------------
@pytest.mark.parametrize("case, pattern", [
    ("checkpoint missing", r"checkpoint .*nowhere\.safetensors does not exist"),
    ("config missing", r"config .*nowhere\.json does not exist"),
    ("unknown preset", r"argument --preset: unknown preset 'huge'"),
    ("checkpoint key missing", r"missing keys \(1\): llm\.out_norm\.alpha"),
    ("no streams", r"argument --max-streams: must be a positive integer, got 0"),
    ("budget too small", r"--memory-budget-mb 0\.001: not enough for one stream"),
    ("bad mode", r"argument --mode: invalid choice"),
    ("bad tick", r"argument --tick-ms: must be a finite number > 0, got 0"),
    ("endless tick", r"argument --tick-ms: must be a finite number, got inf"),
    ("budget not a number", r"argument --memory-budget-mb: must be a finite number, got nan"),
    ("no pending connections", r"argument --max-pending: must be a positive integer, got 0"),
    ("web root missing", r"--web-root .*nowhere is not a folder"),
    ("tls half", r"--ssl-cert and --ssl-key go together"),
])
def test_server_bad_input(golden_copy, tiny_weights, tmp_path, case, pattern):
    cfg = ["--config", str(golden_copy / "config.json")]
    args = {
        "checkpoint missing": [*cfg, "--checkpoint", tmp_path / "nowhere.safetensors"],
        "config missing": ["--config", tmp_path / "nowhere.json"],
        "unknown preset": ["--preset", "huge"],
        "checkpoint key missing": [*cfg, "--checkpoint", tmp_path / "broken.safetensors"],
        "no streams": ["--max-streams", "0"],
        "budget too small": ["--memory-budget-mb", "0.001"],
        "bad mode": ["--mode", "fast"],
        "bad tick": ["--tick-ms", "0"],
        "endless tick": ["--tick-ms", "inf"],
        "budget not a number": ["--memory-budget-mb", "nan"],
        "no pending connections": ["--max-pending", "0"],
        "web root missing": ["--web-root", tmp_path / "nowhere"],
        "tls half": ["--ssl-cert", tmp_path / "cert.pem"],
    }[case]
    if case == "checkpoint key missing":
        save_file({k: v for k, v in tiny_weights.items() if k != "llm.out_norm.alpha"}, tmp_path / "broken.safetensors")
    assert_one_line_error(run("moshivis.server", *args, "--port", "0", timeout=120), pattern)


def test_server_port_in_use():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(run("moshivis.server", "--preset", "tiny", "--port", port, timeout=120),
                              rf"port {port} on 127\.0\.0\.1 is already in use")


# ---- moshivis.cluster (its arguments; Ray is never started) ------------------------------------------
BLOCK_CLUSTER_EXTRAS = BLOCK_CHAT_EXTRAS.replace("{'transformers', 'sentencepiece', 'PIL'}", "{'ray', 'fastapi'}") \
    .replace("moshivis.chat", "moshivis.cluster")


@pytest.mark.parametrize("args, pattern", [
    ("--port 70000", r"argument --port: must be a port number in \[0, 65535\], got 70000"),
    ("--gpus-per-replica -1", r"argument --gpus-per-replica: must be a finite number >= 0, got -1"),
    ("--replicas 0", r"argument --replicas: must be a positive integer, got 0"),
    ("--print-config", r"python -m moshivis\.cluster needs the cluster extras; not importable here: ray\[serve\] \(.*\), "
                       r"fastapi \(.*\): pip install -e '\.\[cluster\]'"),
])
def test_cluster_bad_input(args, pattern):
    """Checked before Ray starts; without the cluster extras (blocked here) the error names them."""
    p = subprocess.run([sys.executable, "-c", BLOCK_CLUSTER_EXTRAS, *args.split()], cwd=REPO, capture_output=True,
                       text=True, timeout=180)
    assert_one_line_error(p, pattern)
