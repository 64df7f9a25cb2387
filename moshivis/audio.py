"""Speech in and out: WAV files and the Mimi codec (`transformers.MimiModel`), streamed frame by frame.

Mimi turns 24 kHz mono audio into 8 codebook tokens per 80 ms frame (1920 samples, 12.5 Hz) and
back (SPEC.md §1). The codec itself is transformers' `MimiModel`; this module adds what a live
conversation needs around it:

* Encoding streams with transformers' own support: `MimiModel.encode(..., use_streaming=True)`
  carries a padding cache for the causal convolutions and a KV cache for the encoder transformer.
* Decoding has no streaming support in transformers (its SEANet decoder has no padding cache), so
  `DecoderStream` runs the decoder's own modules one frame at a time with the state Kyutai's
  streaming decoder keeps: the last `kernel - stride` inputs of each causal convolution (in
  transformers' `MimiConv1dPaddingCache`), the `kernel - stride` overlapping outputs of each
  transposed convolution (added to the next frame's head, bias counted once), and a KV cache for the
  decoder transformer. Every operation is causal, so frame-by-frame output equals whole-signal
  `MimiModel.decode` up to float rounding (tests/test_e2e.py checks both directions).

Weights come from a local file or folder only, in either layout (`load_mimi`):
  * Hugging Face (`kyutai/mimi`: `config.json` + `model.safetensors`, flat keys such as
    `encoder.layers.0.conv.weight`, `encoder_transformer.layers.0.self_attn.q_proj.weight`);
  * Kyutai's own (`tokenizer-e351c8d8-checkpoint125.safetensors`: `encoder.model.0.conv.conv.weight`,
    `encoder_transformer.transformer.layers.0.self_attn.in_proj_weight`, `quantizer.rvq_first...`),
    renamed by `KYUTAI_RENAMES` and with the fused q/k/v split (see `kyutai_to_hf`).

Sample rates: the codec's rate (24 kHz) is required. Other rates are refused with an error naming
the file and the rate, unless the caller asks for it (`load_audio(..., resample_input=True)`, CLI
`--resample`): a windowed-sinc resampler in plain PyTorch (`resample`). Multi-channel files are
averaged to mono.
"""
from __future__ import annotations

import contextlib
import math
import wave
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointError, meta_tensor, read_header

try:
    from transformers import MimiConfig, MimiModel
    from transformers.cache_utils import DynamicCache
    from transformers.models.mimi.modeling_mimi import (MimiConv1d, MimiConv1dPaddingCache, MimiConvTranspose1d,
                                                        MimiResnetBlock)
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("moshivis.audio needs transformers (pip install 'moshivis-kernels[chat]')") from e


class AudioError(ValueError):
    """A missing, unreadable or unsupported audio file, or Mimi weights that do not load."""


# ---- WAV files ----------------------------------------------------------------------------------
_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path: str | Path) -> tuple[torch.Tensor, int]:
    """A WAV file as float32 samples in [-1, 1], [channels, samples], and its sample rate.

    Integer PCM (8, 16, 24, 32 bits) and IEEE float (32, 64 bits), plain or WAVE_FORMAT_EXTENSIBLE.
    The RIFF chunks are parsed here because the stdlib `wave` module reads integer PCM only.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist")
    data = path.read_bytes()
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioError(f"audio file {path} is not a WAV file (no RIFF/WAVE header); convert it first, "
                         f"e.g. `ffmpeg -i {path.name} -ac 1 -ar 24000 out.wav`")
    fmt, payload, pos = None, None, 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = data[pos + 8:pos + 8 + size]  # a streamed file may declare more than it holds: keep what is there
        if cid == b"fmt ":
            fmt = body
        elif cid == b"data":
            payload = body
            break
        pos += 8 + size + (size & 1)
    if fmt is None or len(fmt) < 16 or payload is None:
        raise AudioError(f"audio file {path} is a corrupt WAV file (no {'fmt' if fmt is None else 'data'} chunk)")
    tag, channels, rate = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little"), \
        int.from_bytes(fmt[4:8], "little")
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == _EXTENSIBLE and len(fmt) >= 26:
        tag = int.from_bytes(fmt[24:26], "little")  # the sub-format GUID starts with the plain tag
    if channels < 1 or rate < 1:
        raise AudioError(f"audio file {path} declares {channels} channels at {rate} Hz")
    width = bits // 8
    if tag == _PCM and bits in (8, 16, 24, 32):
        raw = np.frombuffer(payload, np.uint8)[: len(payload) // (width * channels) * width * channels]
        if bits == 8:
            x = (raw.astype(np.float32) - 128) / 128
        elif bits == 24:
            b = raw.reshape(-1, 3).astype(np.int32)
            v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
            x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
        else:
            x = raw.view(f"<i{width}").astype(np.float32) / float(1 << (bits - 1))
    elif tag == _FLOAT and bits in (32, 64):
        raw = np.frombuffer(payload[: len(payload) // (width * channels) * width * channels], f"<f{width}")
        x = raw.astype(np.float32)
    else:
        raise AudioError(f"audio file {path}: unsupported WAV encoding (format tag {tag}, {bits} bits); "
                         "use integer PCM or float")
    return torch.from_numpy(x.reshape(-1, channels).T.copy()), rate


def write_wav(path: str | Path, pcm: torch.Tensor, sample_rate: int) -> None:
    """Write mono float samples (clipped to [-1, 1]) as 16-bit PCM."""
    x = pcm.detach().float().cpu().reshape(-1).clamp(-1, 1)
    ints = torch.round(x * 32767).to(torch.int16).numpy()
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(ints.astype("<i2").tobytes())


def load_audio(path: str | Path, sample_rate: int, resample_input: bool = False) -> torch.Tensor:
    """A WAV file as mono float32 [samples] at `sample_rate` (channels averaged).

    A different rate is an error unless `resample_input`, which converts it with `resample`.
    """
    pcm, rate = read_wav(path)
    if pcm.shape[-1] == 0:
        raise AudioError(f"audio file {path} holds no samples")
    mono = pcm.mean(0)
    if not bool(torch.isfinite(mono).all()):
        raise AudioError(f"audio file {path} holds NaN or infinite samples")
    if rate != sample_rate:
        if not resample_input:
            raise AudioError(f"audio file {path} is sampled at {rate} Hz; Mimi needs {sample_rate} Hz. Pass "
                             f"--resample (resample_input=True) or convert it, e.g. `sox {Path(path).name} -r "
                             f"{sample_rate} out.wav`")
        mono = resample(mono, rate, sample_rate)
    return mono


def resample(x: torch.Tensor, orig_rate: int, new_rate: int, zeros: int = 6, rolloff: float = 0.99) -> torch.Tensor:
    """Band-limited resampling of x [..., samples] with a Hann-windowed sinc (polyphase, float32).

    With g = gcd(orig, new), up = new/g and down = orig/g: output sample m = up*b + j is
    sum_i x[i] h(i/down - b - j/up), h a sinc low-pass at `rolloff` times the lower of the two Nyquist
    frequencies, windowed to `zeros` zero crossings per side; one strided conv1d with `up` filters.
    Output length ceil(n * new / orig); the first and last few ms see the zero padding.
    """
    if orig_rate == new_rate:
        return x
    g = math.gcd(orig_rate, new_rate)
    up, down = new_rate // g, orig_rate // g
    cutoff = min(up, down) * rolloff  # in units of the reduced input rate `down`
    width = math.ceil(zeros * down / cutoff)
    taps = torch.arange(-width, width + down, dtype=torch.float64) / down        # input offsets, [L]
    phases = -torch.arange(up, dtype=torch.float64)[:, None] / up                # output phases, [up, 1]
    t = ((taps[None, :] + phases) * cutoff).clamp(-zeros, zeros)
    window = torch.cos(t * math.pi / zeros / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    kernel = (sinc * window * cutoff / down).to(torch.float32)[:, None, :]      # [up, 1, L]
    shape, n = x.shape[:-1], x.shape[-1]
    flat = torch.nn.functional.pad(x.reshape(-1, 1, n).float(), (width, width + down))
    y = torch.nn.functional.conv1d(flat, kernel, stride=down)                   # [B, up, blocks]
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(n * up / down)]
    return y.reshape(*shape, -1)


# ---- Mimi weights --------------------------------------------------------------------------------
# Kyutai's names -> Hugging Face's flat names, applied in order to each key (the facts of transformers'
# Mimi conversion script). The fused `in_proj_weight` is split separately (`kyutai_to_hf`).
KYUTAI_RENAMES = [
    ("conv.conv.conv", "conv"), ("convtr.convtr.convtr", "conv"), ("conv.conv", "conv"), ("convtr.convtr", "conv"),
    ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
    ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
    ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"),
    ("_codebook", "codebook"), ("_initialized", "initialized"), ("embedding_sum", "embed_sum"),
    ("encoder.model", "encoder.layers"), ("decoder.model", "decoder.layers"),
    ("encoder_transformer.transformer", "encoder_transformer"),
    ("decoder_transformer.transformer", "decoder_transformer"),
    ("linear1", "mlp.fc1"), ("linear2", "mlp.fc2"), ("self_attn.out_proj", "self_attn.o_proj"),
    ("norm1", "input_layernorm"), ("norm2", "post_attention_layernorm"),
    ("layer_scale_1", "self_attn_layer_scale"), ("layer_scale_2", "mlp_layer_scale"),
]

# Hugging Face's flat checkpoint names -> the module paths of transformers' MimiModel (encoder and
# decoder halves), the renames transformers itself applies when it loads a checkpoint.
HF_TO_MODULES = [
    ("encoder.layers.", "encoder.encoder_seanet.layers."), ("encoder_transformer.", "encoder.encoder_transformer."),
    ("downsample.", "encoder.downsample."), ("upsample.", "decoder.upsample."),
    ("decoder_transformer.", "decoder.decoder_transformer."), ("decoder.layers.", "decoder.decoder_seanet.layers."),
]


def _rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's q/k rows from interleaved RoPE pairs (Kyutai) to rotate-half (transformers):
    rows (0, 2, 4, ..., 1, 3, 5, ...) of every head."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def kyutai_to_hf(state: dict[str, torch.Tensor], config: MimiConfig) -> dict[str, torch.Tensor]:
    """Kyutai's Mimi state dict in Hugging Face's flat names; `in_proj_weight` [3*d, d] becomes
    q/k/v_proj with q and k rows reordered for transformers' rotate-half RoPE."""
    out = {}
    for key, value in state.items():
        new = key
        for old, repl in KYUTAI_RENAMES:
            new = new.replace(old, repl)
        if new.endswith("self_attn.in_proj_weight"):
            base = new[: -len("in_proj_weight")]
            q_rows = config.num_attention_heads * config.head_dim
            kv_rows = config.num_key_value_heads * config.head_dim
            q, k, v = value.split([q_rows, kv_rows, kv_rows])
            out[base + "q_proj.weight"] = _rope_rows(q, config.num_attention_heads)
            out[base + "k_proj.weight"] = _rope_rows(k, config.num_key_value_heads)
            out[base + "v_proj.weight"] = v
        else:
            out[new] = value
    return out


def hf_to_modules(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for old, repl in HF_TO_MODULES:
            if key.startswith(old):
                key = repl + key[len(old):]
                break
        out[key] = value
    return out


def _read_safetensors(files: list[Path], meta: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of `files`; meta=True: meta tensors of the headers' shapes and dtypes (no data read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    state = {}
    for f in files:
        try:
            if meta:
                state.update({k: meta_tensor(shape, dtype) for k, (shape, dtype) in read_header(f).items()})
            else:
                state.update(load_file(str(f)))
        except (SafetensorError, OSError, CheckpointError) as e:
            raise AudioError(f"Mimi weights {f} are not a readable safetensors file: {e}") from e
    return state


def _is_mimi(keys) -> bool:
    """Mimi's keys in any of its layouts: Kyutai's (`encoder.model.*`, `quantizer.rvq_first.*`), Hugging Face's
    flat (`encoder.layers.*`, `quantizer.semantic_residual_vector_quantizer.*`) or module names."""
    return any(k.startswith("quantizer.") for k in keys) and any(k.startswith("encoder") for k in keys)


def mimi_files(folder: Path) -> list[Path]:
    """Mimi's weights in a folder: Kyutai's `tokenizer-*.safetensors` by name (or the folder's only file),
    else the one file whose keys are Mimi's (only the headers are read), so a folder that also holds the
    language model works. An AudioError says what each file holds when none fits."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AudioError(f"Mimi folder {folder} holds no *.safetensors file")
    named = [f for f in files if f.name.startswith("tokenizer-")]
    if len(named) == 1 or len(files) == 1:  # Kyutai's name, or the only file (Hugging Face's kyutai/mimi)
        return named or files
    found, seen = [], []
    for f in named or files:
        try:
            keys = list(read_header(f))
        except CheckpointError as e:
            seen.append(f"{f.name}: unreadable ({e})")
            continue
        if _is_mimi(keys):
            found.append(f)
        else:
            sample = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            seen.append(f"{f.name}: {len(keys)} tensors ({sample})")
    if len(found) > 1:
        raise AudioError(f"several Mimi files in {folder}: {', '.join(f.name for f in found)}; pass one with --mimi")
    if not found:
        raise AudioError(f"no Mimi weights in {folder} (no tokenizer-*.safetensors, and no file with Mimi's "
                         f"encoder.* and quantizer.* keys): {'; '.join(seen)}")
    return found


def load_mimi(path: str | Path, config: MimiConfig | str | Path | None = None, device: str | torch.device = "cpu",
              num_codebooks: int = 8) -> "MimiCodec":
    """Mimi from a local folder or one `.safetensors` file (Kyutai's or Hugging Face's key layout, detected from
    the names). A folder may be Hugging Face's kyutai/mimi (`config.json` + `model.safetensors`) or hold other
    models too, as Kyutai's releases do (`mimi_files` picks Mimi's file). `config`: a MimiConfig or a
    `config.json` path; default: the folder's `config.json`, else `MimiConfig()` (the kyutai/mimi sizes).
    Strict: every missing, unexpected or mis-shaped tensor is reported. device="meta" checks the files'
    headers only and reads no data (a codec with meta weights)."""
    path = Path(path)
    if path.is_dir():
        files = mimi_files(path)
        if config is None and (path / "config.json").is_file():
            config = path / "config.json"
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise AudioError(f"Mimi weights {path} are not a .safetensors file (pickles are never loaded)")
        files = [path]
    else:
        raise AudioError(f"Mimi weights {path} do not exist")
    if config is None:
        config = MimiConfig()
    elif not isinstance(config, MimiConfig):
        try:
            config = MimiConfig.from_json_file(str(config))
        except (OSError, ValueError) as e:
            raise AudioError(f"Mimi config {config} is not a readable MimiConfig JSON: {e}") from e
    meta = torch.device(device).type == "meta"
    state = _read_safetensors(files, meta)
    if any(k.startswith(("encoder.model.", "quantizer.rvq_first")) for k in state):
        state = kyutai_to_hf(state, config)
    if not any(k.startswith("encoder.encoder_seanet.") for k in state):
        state = hf_to_modules(state)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = MimiModel(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: expected {list(expected[k].shape)}, found {list(v.shape)}"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
    if problems:
        where = path if len(files) == 1 and files[0] == path else f"{path} ({', '.join(f.name for f in files)})"
        raise AudioError(f"Mimi weights {where} do not match the Mimi config:\n  " + "\n  ".join(problems))
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=meta)
    return MimiCodec(model.to(device).eval(), num_codebooks)


# ---- the codec, streamed -------------------------------------------------------------------------
class MimiCodec:
    """A loaded Mimi: `encoder()` / `decoder()` streams, and whole-signal helpers built on them."""

    def __init__(self, model: MimiModel, num_codebooks: int = 8):
        cfg = model.config
        if not hasattr(model, "encoder") or not hasattr(model.decoder, "decoder_seanet"):
            raise AudioError("this transformers version's MimiModel has no encoder/decoder halves "
                             "(encoder.encoder_seanet); moshivis.audio needs transformers>=5.24")
        if not 1 <= num_codebooks <= cfg.num_quantizers:
            raise AudioError(f"num_codebooks must be in [1, {cfg.num_quantizers}], got {num_codebooks}")
        if not cfg.use_causal_conv or cfg.trim_right_ratio != 1.0:
            raise AudioError("streaming needs causal convolutions trimmed on the right "
                             "(use_causal_conv=True, trim_right_ratio=1.0)")
        self.model, self.num_codebooks = model, num_codebooks
        self.sample_rate = cfg.sampling_rate
        self.frame_size = cfg.frame_size
        self.frame_rate = cfg.frame_rate
        self.codebook_size = cfg.codebook_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encoder(self) -> "EncoderStream":
        return EncoderStream(self)

    def decoder(self) -> "DecoderStream":
        return DecoderStream(self)

    def encode(self, pcm: torch.Tensor) -> torch.Tensor:
        """pcm [B, samples] -> codes [B, num_codebooks, frames], frame by frame; the tail is
        zero-padded to a whole frame."""
        frames = _frames(pcm, self.frame_size)
        enc = self.encoder()
        return torch.stack([enc.step(f) for f in frames], dim=-1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, num_codebooks, frames] -> pcm [B, frames * frame_size], frame by frame."""
        dec = self.decoder()
        return torch.cat([dec.step(codes[..., t]) for t in range(codes.shape[-1])], dim=-1)


def _frames(pcm: torch.Tensor, frame_size: int) -> list[torch.Tensor]:
    if pcm.dim() != 2 or pcm.shape[-1] == 0:
        raise AudioError(f"pcm must be [batch, samples] with samples > 0, got {list(pcm.shape)}")
    n = -(-pcm.shape[-1] // frame_size) * frame_size
    return list(torch.nn.functional.pad(pcm, (0, n - pcm.shape[-1])).split(frame_size, dim=-1))


class EncoderStream:
    """One stream of audio into codes: `step(pcm [B, frame_size]) -> codes [B, num_codebooks]`.

    transformers' streaming encoder: its padding cache (causal convolutions) and KV cache (encoder
    transformer, sliding window) carry over between calls.
    """

    def __init__(self, codec: MimiCodec):
        self.codec = codec
        self._padding_cache = None
        self._kv_cache = None

    @torch.no_grad()
    def step(self, pcm: torch.Tensor) -> torch.Tensor:
        c = self.codec
        if not isinstance(pcm, torch.Tensor) or pcm.dim() != 2 or pcm.shape[-1] != c.frame_size \
                or not pcm.is_floating_point():
            raise AudioError(f"pcm must be a float tensor [batch, {c.frame_size}], got "
                             f"{getattr(pcm, 'dtype', type(pcm).__name__)} {list(getattr(pcm, 'shape', []))}")
        out = c.model.encode(pcm[:, None, :].to(device=c.device, dtype=torch.float32), num_quantizers=c.num_codebooks,
                             padding_cache=self._padding_cache, encoder_cache=self._kv_cache, use_streaming=True)
        self._padding_cache, self._kv_cache = out.padding_cache, out.encoder_cache
        return out.audio_codes[:, :, 0]


class DecoderStream:
    """One stream of codes into audio: `step(codes [B, num_codebooks]) -> pcm [B, frame_size]`.

    Runs `model.decoder`'s modules in order on one frame, keeping the causal state described in the
    module docstring (transformers' decoder has no streaming mode of its own).
    """

    def __init__(self, codec: MimiCodec):
        self.codec = codec
        dec = codec.model.decoder
        self._convs = [m for m in dec.decoder_seanet.modules() if isinstance(m, MimiConv1d)]
        self._conv_index = {id(m): i for i, m in enumerate(self._convs)}
        self._padding_cache = MimiConv1dPaddingCache(
            len(self._convs), [int(m.padding_total) for m in self._convs], [m.pad_mode for m in self._convs],
            [m.in_channels for m in self._convs])
        self._tails: dict[int, torch.Tensor] = {}
        self._kv_cache = DynamicCache(config=dec.decoder_transformer.config)

    @torch.no_grad()
    def step(self, codes: torch.Tensor) -> torch.Tensor:
        c = self.codec
        if not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.dim() != 2 \
                or codes.shape[-1] != c.num_codebooks:
            raise AudioError(f"codes must be an integer tensor [batch, {c.num_codebooks}], got "
                             f"{getattr(codes, 'dtype', type(codes).__name__)} {list(getattr(codes, 'shape', []))}")
        if bool(((codes < 0) | (codes >= c.codebook_size)).any()):
            raise AudioError(f"codes must be in [0, {c.codebook_size}), got {codes.tolist()}")
        dec = c.model.decoder
        x = c.model.quantizer.decode(codes[:, :, None].to(c.device, torch.long))        # [B, hidden, 1]
        x = self._conv_transpose(dec.upsample, x)
        x = dec.decoder_transformer(x.transpose(1, 2), cache=self._kv_cache, use_cache=True).last_hidden_state
        return self._run(dec.decoder_seanet.layers, x.transpose(1, 2))[:, 0, :]

    def _run(self, layers, x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, MimiConv1d):
                x = self._conv(layer, x)
            elif isinstance(layer, MimiConvTranspose1d):
                x = self._conv_transpose(layer, x)
            elif isinstance(layer, MimiResnetBlock):
                residual = self._conv(layer.shortcut, x) if isinstance(layer.shortcut, MimiConv1d) else x
                x = residual + self._run(layer.block, x)
            else:
                x = layer(x)
        return x

    def _conv(self, layer: MimiConv1d, x: torch.Tensor) -> torch.Tensor:
        """A causal convolution over [its last kernel - stride inputs, this frame]."""
        past = self._padding_cache.update(x, self._conv_index[id(layer)])
        return layer.conv(torch.cat([past, x], dim=-1))

    def _conv_transpose(self, layer: MimiConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
        """A transposed convolution trimmed on the right: the kernel - stride outputs that overlap the
        next frame are held back (less the bias, which the next frame adds again) and added to it."""
        stride = layer.conv.stride[0]
        y = layer.conv(x)
        tail = self._tails.get(id(layer))
        if tail is not None:
            y[..., : tail.shape[-1]] += tail
        n = x.shape[-1] * stride
        tail = y[..., n:]
        if layer.conv.bias is not None:
            tail = tail - layer.conv.bias[:, None]
        self._tails[id(layer)] = tail
        return y[..., :n]
