"""End to end: a WAV and a picture in, a WAV and a transcript out (`python -m moshivis.chat`).

Everything is built here, tiny and random: a MimiModel, a SiglipVisionModel, a SentencePiece model
trained on a few sentences, and the engine's `tiny` preset (image tokens and audio codes sized to
match). The oracles are transformers' own whole-signal `MimiModel.encode` / `decode`, its SigLIP
model and PIL image processor, SentencePiece's `decode` and the engine fed directly.
"""
from __future__ import annotations

import math
import re
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import MimiConfig, MimiModel, SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from moshivis import Engine, SamplingParams, checkpoint, reference
from moshivis.audio import (AudioError, hf_to_modules, kyutai_to_hf, load_audio, load_mimi, read_wav, resample,
                            write_wav)
from moshivis.chat import converse, main
from moshivis.demo import demo_config, tiny_mimi, tiny_siglip, tiny_tokenizer_model
from moshivis.text import TextError, TextTokenizer
from moshivis.vision import ImageEncoder, VisionError, preprocess

pytestmark = pytest.mark.transformers

SR, FRAME = 24000, 1920
SEED = 5


def tone(seconds: float, rate: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    return 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.05 * torch.randn(t.shape, generator=gen)


def read_int16_wav(path: Path) -> tuple[torch.Tensor, int]:
    with wave.open(str(path)) as f:
        assert f.getsampwidth() == 2 and f.getnchannels() == 1
        x = np.frombuffer(f.readframes(f.getnframes()), "<i2")
        return torch.from_numpy(x.astype(np.float32) / 32767), f.getframerate()


def make_chat_folder(d: Path, gen: torch.Generator) -> dict:
    """A checkpoint folder as the chat command expects it (config, model with the SigLIP tower, Mimi in
    the Hugging Face layout, SentencePiece model, a non-square PNG), plus the objects it was made from."""
    cfg = demo_config()
    cfg.to_json(d / "config.json")
    siglip = tiny_siglip(gen)
    siglip.config.to_json_file(str(d / "vision_config.json"))
    weights = checkpoint.random_init(cfg, seed=3)
    tower = {f"image_prefix.enc.model.{k}": v for k, v in siglip.state_dict().items()}
    checkpoint.save({**weights, **tower}, d / "model.safetensors")
    mimi = tiny_mimi(gen)
    mimi.save_pretrained(str(d / "mimi"))  # Hugging Face layout: config.json + flat-key model.safetensors
    sp = tiny_tokenizer_model(cfg.text_card)
    (d / "tokenizer_spm_32k_3.model").write_bytes(sp)
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(d / "photo.png")  # not square
    return dict(dir=d, cfg=cfg, weights=weights, siglip=siglip, mimi=mimi, sp=sp)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """make_chat_folder plus the question: a tone of 31200 samples (16.25 frames)."""
    gen = torch.Generator().manual_seed(1234)
    b = make_chat_folder(tmp_path_factory.mktemp("moshivis"), gen)
    write_wav(b["dir"] / "question.wav", tone(1.3, SR, gen), SR)
    return b


def chat(bundle, capsys, *extra, **replace):
    d = bundle["dir"]
    args = {"--checkpoint": str(d), "--image": str(d / "photo.png"), "--audio": str(d / "question.wav"),
            "--out": str(d / "answer.wav"), "--vision-config": str(d / "vision_config.json")}
    args.update(replace)
    argv = [x for kv in args.items() for x in kv if kv[1] is not None] + ["--seed", str(SEED), *extra]
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ---- the whole path ------------------------------------------------------------------------------
def test_wav_and_png_in_wav_and_transcript_out(bundle, capsys):
    """The command's answer equals the pipeline assembled from the libraries' own whole-signal calls."""
    d, cfg, mimi = bundle["dir"], bundle["cfg"], bundle["mimi"]
    rc, out, err = chat(bundle, capsys)
    assert rc == 0, err
    assert "100%" in err and "wrote" in err
    answer, rate = read_int16_wav(d / "answer.wav")
    question, _ = read_int16_wav(d / "question.wav")
    assert rate == SR and answer.shape == question.shape  # the answer covers the question, sample for sample

    # Oracle: whole-signal Mimi encode (question + max_delay frames of silence), SigLIP on the HF
    # processor's pixels, the engine stepped directly, SentencePiece decode, whole-signal Mimi decode.
    frames = math.ceil(question.shape[0] / FRAME)
    total = frames + cfg.max_delay
    with torch.no_grad():
        user = mimi.encode(torch.nn.functional.pad(question, (0, total * FRAME - question.shape[0]))[None, None],
                           num_quantizers=cfg.dep_q).audio_codes[0]                       # [8, total]
        pixels = SiglipImageProcessorPil(size={"height": 28, "width": 28})(
            images=Image.open(d / "photo.png"), return_tensors="pt").pixel_values
        features = bundle["siglip"](pixel_values=pixels).last_hidden_state[0]
    engine = Engine(cfg, bundle["weights"])
    sid = engine.open_stream(seed=SEED, image=features, sampling=SamplingParams())
    tokens = torch.cat([engine.step(user[:, t][None], [sid]) for t in range(total)])[cfg.max_delay:]  # [frames, 9]
    assert (tokens >= 0).all()
    sp = spm.SentencePieceProcessor(model_proto=bundle["sp"])
    words = sp.decode([t for t in tokens[:, 0].tolist() if t not in (0, 3) and not sp.is_control(t)])
    assert words, "the random model should say something"
    assert out == words + "\n"
    with torch.no_grad():
        speech = mimi.decode(tokens[:, 1:].T[None]).audio_values[0, 0, : question.shape[0]]
    assert speech.abs().max() < 1  # nothing clipped: the WAV holds the decoder's output
    torch.testing.assert_close(answer, speech, atol=1 / 32767 + 1e-5, rtol=0)


def test_resampled_question_gives_an_answer_as_long_as_it(bundle, capsys, tmp_path):
    gen = torch.Generator().manual_seed(2)
    write_wav(tmp_path / "q16k.wav", tone(0.5, 16000, gen), 16000)
    rc, out, err = chat(bundle, capsys, "--resample", "--greedy", "--quiet",
                        **{"--audio": str(tmp_path / "q16k.wav"), "--out": str(tmp_path / "a.wav")})
    assert rc == 0, err
    answer, rate = read_int16_wav(tmp_path / "a.wav")
    assert rate == SR and answer.shape[0] == 12000 and err == ""


def test_kv_dtype_option_gives_the_engine_an_int8_cache(bundle, capsys, tmp_path, monkeypatch):
    """`--kv-dtype int8` reaches the engine the command builds (its cache tensors are int8, with scales)."""
    import moshivis.chat as chat_module
    built = []

    class Recorded(Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(chat_module, "Engine", Recorded)
    gen = torch.Generator().manual_seed(3)
    write_wav(tmp_path / "q.wav", tone(0.2, SR, gen), SR)
    rc, _, err = chat(bundle, capsys, "--kv-dtype", "int8", "--quiet",
                      **{"--audio": str(tmp_path / "q.wav"), "--out": str(tmp_path / "a.wav")})
    assert rc == 0, err
    (engine,) = built
    assert engine.kv_dtype == "int8" and engine.state.kv.dtype == torch.int8 and engine.state.kv_scale is not None


# ---- Mimi ------------------------------------------------------------------------------------------
def test_streamed_codec_equals_mimi_encode_and_decode(bundle, tmp_path):
    """WAV -> codes -> audio, frame by frame (padding and KV caches, overlap-add of the transposed
    convolutions), equals MimiModel.encode / decode on the whole signal, past the sliding window."""
    mimi = bundle["mimi"]
    codec = load_mimi(bundle["dir"] / "mimi")
    gen = torch.Generator().manual_seed(11)
    for i in range(2):
        write_wav(tmp_path / f"{i}.wav", tone(0.9, SR, gen), SR)
    pcm = torch.stack([load_audio(tmp_path / f"{i}.wav", SR) for i in range(2)])  # batch 2, 11.25 frames
    codes = codec.encode(pcm)
    with torch.no_grad():
        whole = mimi.encode(torch.nn.functional.pad(pcm, (0, 12 * FRAME - pcm.shape[-1]))[:, None],
                            num_quantizers=8).audio_codes
        whole_audio = mimi.decode(whole).audio_values[:, 0]
    assert codes.shape == (2, 8, 12)
    assert torch.equal(codes, whole)
    torch.testing.assert_close(codec.decode(codes), whole_audio, atol=1e-5, rtol=1e-4)
    random_codes = torch.randint(0, 64, (2, 8, 12), generator=gen)
    with torch.no_grad():
        ref = mimi.decode(random_codes).audio_values[:, 0]
    torch.testing.assert_close(codec.decode(random_codes), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(AudioError, match=r"codes must be in \[0, 64\)"):
        codec.decoder().step(torch.full((1, 8), 64))
    with pytest.raises(AudioError, match=r"pcm must be a float tensor \[batch, 1920\]"):
        codec.encoder().step(torch.zeros(1, 1000))


def _unrope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """rotate-half rows -> interleaved pairs (the inverse of what the loader does)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_kyutai(model: MimiModel) -> dict[str, torch.Tensor]:
    """A MimiModel's weights under the key names of Kyutai's `moshi` package (its streaming conv
    wrappers, fused in_proj, rvq_first / rvq_rest), written from moshi's module structure."""
    cfg, sd, out = model.config, model.state_dict(), {}
    convtr = {n for n, m in model.named_modules() if type(m).__name__ == "MimiConvTranspose1d"}
    for key, value in sd.items():
        k = key
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            continue
        if k.endswith("v_proj.weight"):
            base = k[: -len("v_proj.weight")]
            q = _unrope_rows(sd[base + "q_proj.weight"], cfg.num_attention_heads)
            kk = _unrope_rows(sd[base + "k_proj.weight"], cfg.num_key_value_heads)
            k, value = base + "in_proj_weight", torch.cat([q, kk, value])
        module = k.rsplit(".", 2)[0]
        k = re.sub(r"^encoder\.encoder_seanet\.layers\.", "encoder.model.", k)
        k = re.sub(r"^decoder\.decoder_seanet\.layers\.", "decoder.model.", k)
        k = re.sub(r"^encoder\.encoder_transformer\.", "encoder_transformer.transformer.", k)
        k = re.sub(r"^decoder\.decoder_transformer\.", "decoder_transformer.transformer.", k)
        k = k.replace("encoder.downsample.conv.", "downsample.conv.conv.conv.")
        k = k.replace("decoder.upsample.conv.", "upsample.convtr.convtr.convtr.")
        if k.startswith(("encoder.model.", "decoder.model.")):
            k = re.sub(r"\.conv\.(weight|bias)$", (r".convtr.convtr.\1" if module in convtr else r".conv.conv.\1"), k)
        for hf, ky in [("self_attn.o_proj", "self_attn.out_proj"), ("mlp.fc1", "linear1"), ("mlp.fc2", "linear2"),
                       ("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2"),
                       ("self_attn_layer_scale", "layer_scale_1"), ("mlp_layer_scale", "layer_scale_2")]:
            k = k.replace(hf, ky)
        k = re.sub(r"quantizer\.semantic_residual_vector_quantizer\.layers", "quantizer.rvq_first.vq.layers", k)
        k = re.sub(r"quantizer\.acoustic_residual_vector_quantizer\.layers", "quantizer.rvq_rest.vq.layers", k)
        k = k.replace("quantizer.semantic_residual_vector_quantizer.", "quantizer.rvq_first.")
        k = k.replace("quantizer.acoustic_residual_vector_quantizer.", "quantizer.rvq_rest.")
        k = k.replace(".codebook.initialized", "._codebook._initialized")
        k = k.replace(".codebook.embed_sum", "._codebook.embedding_sum").replace(".codebook.cluster_usage",
                                                                                  "._codebook.cluster_usage")
        out[k] = value
    return out


def test_mimi_loads_from_kyutai_and_hugging_face_layouts(bundle, tmp_path):
    mimi = bundle["mimi"]
    save_file({k: v.contiguous() for k, v in to_kyutai(mimi).items()}, str(tmp_path / "tokenizer-test.safetensors"))
    for path, config in [(tmp_path / "tokenizer-test.safetensors", bundle["dir"] / "mimi" / "config.json"),
                         (bundle["dir"] / "mimi", None)]:
        loaded = load_mimi(path, config).model.state_dict()
        assert loaded.keys() == mimi.state_dict().keys()
        for k, v in mimi.state_dict().items():
            assert torch.equal(loaded[k], v), k
    # At the real sizes (8 transformer layers, 32 codebooks), Kyutai's names map one to one, shapes included.
    with torch.device("meta"):
        real = MimiModel(MimiConfig())
    kyutai = to_kyutai(real)
    for name in ["encoder.model.0.conv.conv.weight", "encoder.model.1.block.3.conv.conv.bias",
                 "decoder.model.2.convtr.convtr.weight", "downsample.conv.conv.conv.weight",
                 "upsample.convtr.convtr.convtr.weight",
                 "encoder_transformer.transformer.layers.7.self_attn.in_proj_weight",
                 "decoder_transformer.transformer.layers.0.layer_scale_2.scale",
                 "quantizer.rvq_first.input_proj.weight",
                 "quantizer.rvq_rest.vq.layers.30._codebook.embedding_sum"]:
        assert name in kyutai, name
    mapped = hf_to_modules(kyutai_to_hf(kyutai, real.config))
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in real.state_dict().items()}


def _cut_data(path: Path, keep: int = 16) -> None:
    """Keep a safetensors file's header and `keep` bytes of its data: anything reading the data fails."""
    raw = path.read_bytes()
    path.write_bytes(raw[: 8 + int.from_bytes(raw[:8], "little") + keep])


def kyutai_release(bundle, d: Path, mimi_name: str = "tokenizer-e351c8d8-checkpoint125.safetensors") -> Path:
    """A folder laid out as Kyutai publishes MoshiVis (model + Mimi in Kyutai's layout + text tokenizer, no
    config.json), the model's data cut short so that reading more than its header fails."""
    d.mkdir()
    tower = {f"image_prefix.enc.model.{k}": v for k, v in bundle["siglip"].state_dict().items()}
    checkpoint.save({**bundle["weights"], **tower}, d / "model.safetensors")
    save_file({k: v.contiguous() for k, v in to_kyutai(bundle["mimi"]).items()}, str(d / mimi_name))
    (d / "tokenizer_spm_32k_3.model").write_bytes(bundle["sp"])
    return d


def test_mimi_is_picked_from_a_folder_that_also_holds_the_model(bundle, tmp_path):
    """`load_mimi(DIR)` on Kyutai's release folder reads Mimi's file only: found by its name, else by its keys
    (headers only: the model's data is cut short here, so reading it would fail)."""
    config = bundle["dir"] / "mimi" / "config.json"
    d = kyutai_release(bundle, tmp_path / "release")
    _cut_data(d / "model.safetensors")
    for name in ("tokenizer-e351c8d8-checkpoint125.safetensors", "weights.safetensors"):  # by name, by keys
        if name != "tokenizer-e351c8d8-checkpoint125.safetensors":
            (d / "tokenizer-e351c8d8-checkpoint125.safetensors").rename(d / name)
        loaded = load_mimi(d, config).model.state_dict()
        assert loaded.keys() == bundle["mimi"].state_dict().keys()
        assert all(torch.equal(loaded[k], v) for k, v in bundle["mimi"].state_dict().items()), name
    (d / "weights.safetensors").unlink()
    save_file({"vision.proj.weight": torch.zeros(2)}, str(d / "other.safetensors"))
    with pytest.raises(AudioError, match=r"no Mimi weights in .*release .*: model\.safetensors: \d+ tensors "
                                         r"\([\w.]+, [\w.]+, [\w.]+, \.\.\.\); other\.safetensors: 1 tensors "
                                         r"\(vision\.proj\.weight\)"):
        load_mimi(d, config)


def test_chat_with_mimi_given_as_the_release_folder(bundle, capsys, tmp_path):
    """`--mimi DIR` on Kyutai's release folder answers exactly as Mimi given in the Hugging Face layout."""
    d = kyutai_release(bundle, tmp_path / "release")
    rc, _, err = chat(bundle, capsys, "--quiet", **{"--out": str(tmp_path / "a.wav")})
    assert rc == 0, err
    rc, _, err = chat(bundle, capsys, "--quiet", **{"--checkpoint": str(d), "--mimi": str(d), "--out": str(tmp_path / "b.wav"),
                                                    "--config": str(bundle["dir"] / "config.json"),
                                                    "--mimi-config": str(bundle["dir"] / "mimi" / "config.json")})
    assert rc == 0, err
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()


# ---- images ----------------------------------------------------------------------------------------
def test_image_path_gives_the_features_and_kv_of_features_passed_directly(bundle):
    d, cfg = bundle["dir"], bundle["cfg"]
    encoder = ImageEncoder.load(d / "model.safetensors", bundle["siglip"].config)
    assert (encoder.num_tokens, encoder.hidden_size) == (16, 24)
    pixels = SiglipImageProcessorPil(size={"height": 28, "width": 28})(
        images=Image.open(d / "photo.png"), return_tensors="pt").pixel_values
    torch.testing.assert_close(preprocess(d / "photo.png", 28), pixels[0], atol=0, rtol=0)
    with torch.no_grad():
        direct = bundle["siglip"](pixel_values=pixels).last_hidden_state[0]
    from_path = encoder.encode(d / "photo.png")
    torch.testing.assert_close(from_path, direct, atol=0, rtol=0)
    kv, outs = [], []
    user = torch.randint(0, cfg.audio_card, (1, 8), generator=torch.Generator().manual_seed(3))
    for feats in (from_path, direct):
        engine = Engine(cfg, bundle["weights"])
        sid = engine.open_stream(seed=1, image=feats, sampling=SamplingParams.greedy())
        outs.append(engine.step(user, [sid], return_logits=True)[1])
        kv.append(engine.pool.kv[engine._streams[sid].image_slot].clone())
    torch.testing.assert_close(kv[0], kv[1], atol=0, rtol=0)
    ref = reference.image_kv(bundle["weights"], cfg, direct[None])[0]
    torch.testing.assert_close(kv[0], ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


# ---- pieces -------------------------------------------------------------------------------------
def test_wav_reader_reads_pcm_and_float_files(tmp_path):
    x = torch.tensor([0.0, 0.5, -0.5, 0.999, -1.0])
    write_wav(tmp_path / "a.wav", x, 16000)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and y.shape == (1, 5)
    torch.testing.assert_close(y[0], torch.round(x * 32767) / 32768, atol=0, rtol=0)

    def riff(tag, channels, bits, payload):
        fmt = (tag.to_bytes(2, "little") + channels.to_bytes(2, "little") + SR.to_bytes(4, "little")
               + (SR * channels * bits // 8).to_bytes(4, "little") + (channels * bits // 8).to_bytes(2, "little")
               + bits.to_bytes(2, "little"))
        body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"LIST" + (3).to_bytes(4, "little") \
            + b"abc\x00" + b"data" + len(payload).to_bytes(4, "little") + payload
        return b"RIFF" + len(body).to_bytes(4, "little") + body

    stereo = np.array([[0.25, -0.75], [0.5, 0.5], [-1.0, 0.0]], np.float32)  # [samples, channels]
    (tmp_path / "f.wav").write_bytes(riff(3, 2, 32, stereo.astype("<f4").tobytes()))
    y, _ = read_wav(tmp_path / "f.wav")
    torch.testing.assert_close(y, torch.from_numpy(stereo.T.copy()))
    torch.testing.assert_close(load_audio(tmp_path / "f.wav", SR), torch.tensor([-0.25, 0.5, -0.5]))
    ints = np.array([0, 1 << 22, -(1 << 23), (1 << 23) - 1])
    packed = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    (tmp_path / "i24.wav").write_bytes(riff(1, 1, 24, packed))
    y, _ = read_wav(tmp_path / "i24.wav")
    torch.testing.assert_close(y[0], torch.tensor([0.0, 0.5, -1.0, 1 - 2 ** -23]))
    (tmp_path / "alaw.wav").write_bytes(riff(6, 1, 8, b"\x00" * 4))
    with pytest.raises(AudioError, match=r"alaw.wav: unsupported WAV encoding \(format tag 6"):
        read_wav(tmp_path / "alaw.wav")


@pytest.mark.parametrize("orig", [16000, 44100, 48000])
def test_resample_keeps_a_tone(orig):
    t = torch.arange(orig) / orig
    y = resample(torch.sin(2 * math.pi * 440 * t), orig, SR)
    assert y.shape == (SR,)
    want = torch.sin(2 * math.pi * 440 * torch.arange(SR) / SR)
    torch.testing.assert_close(y[200:-200], want[200:-200], atol=2e-3, rtol=0)  # edges see the zero padding


def test_transcript_skips_padding_warmup_and_control_tokens(bundle, tmp_path):
    path = tmp_path / "spm.model"
    path.write_bytes(bundle["sp"])
    tok = TextTokenizer(path, text_card=48)
    sp = spm.SentencePieceProcessor(model_proto=bundle["sp"])
    words = sp.encode("the cat sat on the mat")
    stream = [-2, 3, 0, words[0], 3, 3, 1, 2, *words[1:], 48, -1, 3]
    transcript = tok.stream()
    shown = "".join(transcript.push(t) for t in stream)
    assert shown == transcript.text == tok.decode(stream) == "the cat sat on the mat"
    with pytest.raises(TextError, match="has 48 pieces but the model emits 32000 text ids"):
        TextTokenizer(path, text_card=32000)


# ---- bad input: one clear line, exit status 2 -----------------------------------------------------
def _variant(bundle, tmp_path, drop=(), change=None):
    """A copy of the checkpoint folder without `drop`, with files rewritten by `change(folder)`."""
    d = tmp_path / "ckpt"
    shutil.copytree(bundle["dir"], d, ignore=shutil.ignore_patterns(*drop) if drop else None)
    if change:
        change(d)
    return d


def _truncate(path: Path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("case, pattern", [
    ("audio is a picture", r"question\.wav is not a WAV file \(no RIFF/WAVE header\)"),
    ("audio at 16 kHz", r"question\.wav is sampled at 16000 Hz; Mimi needs 24000 Hz\. Pass --resample"),
    ("audio missing", r"audio file .*nothere\.wav does not exist"),
    ("image truncated", r"image file .*photo\.png is corrupt or truncated"),
    ("image is text", r"image file .*photo\.png is not an image Pillow can read"),
    ("no Mimi weights", r"no Mimi weights in .*ckpt: pass --mimi"),
    ("Mimi weights corrupt", r"Mimi weights .*model\.safetensors are not a readable safetensors file"),
    ("no SigLIP in checkpoint", r"no SigLIP vision weights in .*model\.safetensors .*--siglip"),
    ("checkpoint key missing", r"missing keys \(1\): llm\.out_norm\.alpha"),
    ("no tokenizer", r"no text tokenizer in .*ckpt: pass --tokenizer"),
    ("tokenizer corrupt", r"text tokenizer .*tokenizer_spm_32k_3\.model is not a SentencePiece model"),
    ("no checkpoint", r"checkpoint .*missing does not exist"),
    ("checkpoint is a pickle", r"checkpoint .*model\.pt is not a \.safetensors file \(pickle is never loaded\)"),
])
def test_bad_input_is_one_clear_error(bundle, capsys, tmp_path, case, pattern):
    d = bundle["dir"]
    gen = torch.Generator().manual_seed(0)
    replace, folder = {}, d
    if case == "audio is a picture":
        shutil.copy(d / "photo.png", tmp_path / "question.wav")
        replace["--audio"] = str(tmp_path / "question.wav")
    elif case == "audio at 16 kHz":
        write_wav(tmp_path / "question.wav", tone(0.2, 16000, gen), 16000)
        replace["--audio"] = str(tmp_path / "question.wav")
    elif case == "audio missing":
        replace["--audio"] = str(tmp_path / "nothere.wav")
    elif case == "image truncated":
        shutil.copy(d / "photo.png", tmp_path / "photo.png")
        _truncate(tmp_path / "photo.png", 200)
        replace["--image"] = str(tmp_path / "photo.png")
    elif case == "image is text":
        (tmp_path / "photo.png").write_text("not a picture")
        replace["--image"] = str(tmp_path / "photo.png")
    elif case == "no Mimi weights":
        folder = _variant(bundle, tmp_path, drop=["mimi"])
    elif case == "Mimi weights corrupt":
        folder = _variant(bundle, tmp_path, change=lambda f: _truncate(f / "mimi" / "model.safetensors", 100))
    elif case == "no SigLIP in checkpoint":
        folder = _variant(bundle, tmp_path,
                          change=lambda f: checkpoint.save(bundle["weights"], f / "model.safetensors"))
    elif case == "checkpoint key missing":
        siglip = {f"image_prefix.enc.model.{k}": v for k, v in bundle["siglip"].state_dict().items()}
        partial = {k: v for k, v in bundle["weights"].items() if k != "llm.out_norm.alpha"}
        folder = _variant(bundle, tmp_path,
                          change=lambda f: checkpoint.save({**partial, **siglip}, f / "model.safetensors"))
    elif case == "no tokenizer":
        folder = _variant(bundle, tmp_path, drop=["*.model"])
    elif case == "tokenizer corrupt":
        folder = _variant(bundle, tmp_path, change=lambda f: _truncate(f / "tokenizer_spm_32k_3.model", 50))
    elif case == "no checkpoint":
        folder = tmp_path / "missing"
    elif case == "checkpoint is a pickle":
        folder = _variant(bundle, tmp_path, change=lambda f: torch.save(bundle["weights"], f / "model.pt")) / "model.pt"
    replace.setdefault("--out", str(tmp_path / "answer.wav"))
    rc, out, err = chat(bundle, capsys, "--quiet", **{"--checkpoint": str(folder)}, **replace)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, err), err
    assert not (tmp_path / "answer.wav").exists()


def test_session_options_reach_the_encoder_and_the_engine(bundle, capsys, tmp_path, monkeypatch):
    """--xa-start, --center-crop, --image-resolution and the repetition penalty reach ImageEncoder.encode and
    Engine.open_stream (seen by spies), and the command's answer equals `converse` given the same options by
    hand."""
    d, cfg = bundle["dir"], bundle["cfg"]
    seen = {}
    encode, open_stream = ImageEncoder.encode, Engine.open_stream
    monkeypatch.setattr(ImageEncoder, "encode", lambda self, *a, **k: seen.setdefault("encode", a) and encode(self, *a))
    monkeypatch.setattr(Engine, "open_stream", lambda self, **k: seen.setdefault("open", k) and open_stream(self, **k))
    question = tone(0.5, SR, torch.Generator().manual_seed(8))  # 7 frames: a short run
    write_wav(tmp_path / "q.wav", question, SR)
    question, _ = read_int16_wav(tmp_path / "q.wav")
    options = ["--xa-start", "3", "--center-crop", "--image-resolution", "28", "--repetition-penalty", "2.5",
               "--repetition-penalty-context", "6"]
    rc, out, err = chat(bundle, capsys, "--quiet", *options, **{"--out": str(tmp_path / "a.wav"),
                                                                 "--audio": str(tmp_path / "q.wav")})
    assert rc == 0, err
    assert seen["encode"][1:] == (28, True) and seen["open"]["xa_start"] == 3
    sampling = SamplingParams(repetition_penalty=2.5, repetition_penalty_context=6)
    assert seen["open"]["sampling"] == sampling
    answer, _ = read_int16_wav(tmp_path / "a.wav")
    features = encode(ImageEncoder.load(d / "model.safetensors", bundle["siglip"].config), d / "photo.png", 28, True)
    codec, tok = load_mimi(d / "mimi"), TextTokenizer(d / "tokenizer_spm_32k_3.model", cfg.text_card)
    want = converse(Engine(cfg, bundle["weights"]), codec, tok, features, question, seed=SEED, sampling=sampling,
                    xa_start=3)
    assert out == want.transcript + "\n"
    torch.testing.assert_close(answer, want.pcm, atol=1 / 32767 + 1e-5, rtol=0)


@pytest.mark.parametrize("option, pattern", [
    (["--repetition-penalty", "0"], r"sampling repetition_penalty must be > 0"),
    (["--repetition-penalty-context", "300"], r"sampling repetition_penalty_context must be an integer >= 0"),
    (["--xa-start", "-1"], r"xa_start must be an integer in \[0, 2\*\*63\)"),
    (["--image-resolution", "0"], r"image resolution must be a positive integer"),
])
def test_bad_session_option_is_one_clear_error(bundle, capsys, tmp_path, option, pattern):
    rc, out, err = chat(bundle, capsys, "--quiet", *option, **{"--out": str(tmp_path / "a.wav")})
    assert rc == 2 and len(err.strip().splitlines()) == 1 and re.search(f"^error: .*{pattern}", err), err
    assert not (tmp_path / "a.wav").exists()




def test_converse_without_image_and_vision_errors(bundle, tmp_path):
    """The library path: no image is allowed; a SigLIP config that does not fit the weights is named."""
    d, cfg = bundle["dir"], bundle["cfg"]
    engine = Engine(cfg, bundle["weights"])
    codec = load_mimi(d / "mimi")
    tok = TextTokenizer(d / "tokenizer_spm_32k_3.model", cfg.text_card)
    question = tone(0.3, SR, torch.Generator().manual_seed(1))
    answer = converse(engine, codec, tok, None, question, seed=2)
    assert answer.pcm.shape == question.shape and answer.audio_tokens.shape == (4, 8)
    assert engine.streams == []
    wrong = SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=2,
                               image_size=28, patch_size=7, vision_use_head=False)
    with pytest.raises(VisionError, match=r"missing \(\d+\): encoder\.layers\.2\."):
        ImageEncoder.load(d / "model.safetensors", wrong)
