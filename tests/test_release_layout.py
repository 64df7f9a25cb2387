"""The released checkpoints' real layout, without their data.

`../shared/manifests` lists every key, shape and dtype of Kyutai's moshika-vis (893 keys) and Mimi
(318 keys) files, built from Kyutai's own classes. Here each becomes a sparse safetensors file: the
exact header, then a hole as large as the data (no disk used). The loaders must accept them on the
`meta` device, reading no tensor data (checked by the page faults the process takes), and the chat
command must find every file in a folder laid out like kyutai/moshika-vis-pytorch-bf16.
"""
from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import pytest
import torch

from moshivis import checkpoint, preset
from moshivis.audio import load_mimi
from moshivis.chat import MIMI_FILE, TOKENIZER_FILE, find_files
from moshivis.checkpoint import IMAGE_ENCODER_PREFIX, read_header
from moshivis.vision import ImageEncoder

pytestmark = pytest.mark.transformers

ITEM_BYTES = {"BF16": 2, "F16": 2, "F32": 4}
# Reading the data would fault in at least data / (16 pages of 4 KiB) pages (the kernel's fault-around);
# the headers, the meta models and Python's own allocations take a few thousand.
MAX_FAULTS = 20_000


def write_sparse(path: Path, tensors: dict[str, tuple[list[int], str]]) -> int:
    """A safetensors file with exactly these (shape, dtype) headers whose data region is a hole; its size."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = math.prod(shape) * ITEM_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)
    assert os.stat(path).st_blocks * 512 < (1 << 20), f"{path} is not sparse: this file system fills holes"
    return 8 + len(blob) + offset


def page_faults() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def manifest(manifests_dir: Path, name: str) -> dict[str, tuple[list[int], str]]:
    return {k: (shape, dtype) for k, (shape, dtype) in json.loads((manifests_dir / f"{name}.json").read_text()).items()}


@pytest.fixture(scope="module", params=["BF16", "F32"], ids=["all-bf16", "siglip-f32"])
def release(request, manifests_dir, tmp_path_factory) -> dict:
    """A folder laid out like kyutai/moshika-vis-pytorch-bf16. The manifests take BF16 everywhere as an
    assumption (the published size fits the SigLIP tower in F32 too): both are accepted."""
    model = manifest(manifests_dir, "moshika-vis")
    model = {k: (shape, request.param if k.startswith(IMAGE_ENCODER_PREFIX) else dtype)
             for k, (shape, dtype) in model.items()}
    mimi = manifest(manifests_dir, "mimi")
    d = tmp_path_factory.mktemp("moshika-vis-pytorch-bf16")
    sizes = {"model": write_sparse(d / "model.safetensors", model),
             "mimi": write_sparse(d / MIMI_FILE, mimi)}
    (d / TOKENIZER_FILE).write_bytes(b"not read by the file discovery")
    return {"dir": d, "model": model, "mimi": mimi, "sizes": sizes}


def test_sparse_files_hold_the_release(release):
    """Keys, elements and data bytes as manifests/README.md gives them; the header reads back exactly."""
    assert len(release["model"]) == 893 and len(release["mimi"]) == 318
    numel = {name: sum(math.prod(s) for s, _ in release[name].values()) for name in ("model", "mimi")}
    assert numel == {"model": 8_307_240_688, "mimi": 96_151_393}
    siglip_f32 = release["model"]["image_prefix.enc.model.post_layernorm.weight"][1] == "F32"
    data = 2 * numel["model"] + (2 * 413_327_088 if siglip_f32 else 0)
    assert data < release["sizes"]["model"] < data + 200_000 and 4 * numel["mimi"] < release["sizes"]["mimi"]
    assert read_header(release["dir"] / MIMI_FILE) == {k: (tuple(s), t) for k, (s, t) in release["mimi"].items()}


def test_chat_finds_every_file_of_the_hugging_face_layout(release):
    d = release["dir"]
    for given in (d, d / "model.safetensors"):  # --checkpoint DIR or --checkpoint DIR/model.safetensors
        files = find_files(given)
        assert files.model == d / "model.safetensors" and files.siglip == d / "model.safetensors"
        assert files.mimi == d / MIMI_FILE and files.tokenizer == d / TOKENIZER_FILE
        assert files.config_from == "moshika-vis" and files.config == preset("moshika-vis")  # no config.json


def test_language_model_loads_to_meta_without_reading_data(release):
    faults = page_faults()
    weights = checkpoint.load(release["dir"], preset("moshika-vis"), dtype=torch.bfloat16, device="meta")
    faults = page_faults() - faults
    want = {k: tuple(shape) for k, (shape, _) in release["model"].items() if not k.startswith(IMAGE_ENCODER_PREFIX)}
    assert len(want) == 456
    assert {k: tuple(v.shape) for k, v in weights.items()} == want
    assert all(v.device.type == "meta" and v.dtype == torch.bfloat16 for v in weights.values())
    assert faults < MAX_FAULTS, f"{faults} page faults: the data was read"


def test_siglip_tower_loads_to_meta_without_reading_data(release):
    faults = page_faults()
    encoder = ImageEncoder.load(release["dir"] / "model.safetensors", dtype=torch.bfloat16, device="meta")
    faults = page_faults() - faults
    assert (encoder.num_tokens, encoder.hidden_size) == (1024, 1152)  # PaliGemma2-448: (448 / 14)^2 x 1152
    params = dict(encoder.model.named_parameters())
    want = {k[len(IMAGE_ENCODER_PREFIX):]: tuple(shape) for k, (shape, _) in release["model"].items()
            if k.startswith(IMAGE_ENCODER_PREFIX)}
    assert len(want) == 437 and {k: tuple(p.shape) for k, p in params.items()} == want
    assert sum(p.numel() for p in params.values()) == 413_327_088  # manifests/README.md
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params.values())
    assert faults < MAX_FAULTS, f"{faults} page faults: the data was read"


def test_mimi_loads_to_meta_from_the_release_folder_without_reading_data(release):
    """Given the whole folder (`--mimi DIR`), Mimi's file is picked; no file's data is read."""
    faults = page_faults()
    codec = load_mimi(release["dir"], device="meta")
    faults = page_faults() - faults
    state = codec.model.state_dict()
    # Kyutai's 318 tensors become transformers' names (fused in_proj split into q, k, v): every element kept.
    assert sum(v.numel() for v in state.values()) == sum(math.prod(s) for s, _ in release["mimi"].values())
    assert all(v.device.type == "meta" for v in state.values())
    assert (codec.sample_rate, codec.frame_size, codec.codebook_size) == (24000, 1920, 2048)
    assert faults < MAX_FAULTS, f"{faults} page faults: the data was read"
