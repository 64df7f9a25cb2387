"""Speech and an image in, speech and text out: one spoken question about a picture, from files.

python -m moshivis.chat --checkpoint DIR --image photo.jpg --audio question.wav --out answer.wav
    [--config JSON|PRESET] [--mimi FILE|DIR] [--mimi-config JSON] [--tokenizer FILE]
    [--siglip FILE] [--vision-config JSON] [--backend torch|triton] [--device cpu|cuda]
    [--dtype float32|bfloat16] [--weights dense|int8] [--kv-dtype auto|int8] [--resample] [--seed N]
    [--greedy] [--quiet] [--xa-start FRAME] [--image-resolution PX] [--center-crop]
    [--repetition-penalty P] [--repetition-penalty-context N]

Found in DIR unless given: the model (`*.safetensors` other than Mimi's; the SigLIP tower is read
from it too, `image_prefix.enc.model.*`), the config (`config.json`, else the `moshika-vis` preset),
Mimi (`tokenizer-*.safetensors` in Kyutai's layout, or a Hugging Face folder `mimi/`) and the
text tokenizer (`tokenizer_spm_32k_3.model`, else the only `*.model`). Nothing is downloaded.

The question is fed frame by frame (80 ms, Mimi-encoded) to one engine stream that holds the image,
then `max_delay` frames of silence, so the model has answered every frame of the question: the
answer is exactly as long as the question (its tail zero-padded to a whole frame while encoding,
trimmed after) and its sample i is the model's speech at the question's sample i. The transcript is
printed on stdout as it is produced; progress goes to stderr. Bad input exits with status 2 and one
line naming the file and what is wrong with it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, cli
from .checkpoint import CheckpointError
from .config import PRESETS, UNGENERATED, ConfigError, MoshiVisConfig, preset
from .engine import Engine, SamplingParams, StreamError
from .image_pool import ImageError
from .state import add_kv_dtype_arg

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every file is local: transformers must never reach for the hub

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ChatError(ValueError):
    """A missing input file or a set of files that do not belong together."""


@dataclass
class Answer:
    pcm: torch.Tensor           # [samples] float32, as long as the question
    transcript: str
    text_tokens: list[int]      # the model's text token of every answered frame (padding included)
    audio_tokens: torch.Tensor  # [frames, dep_q]


def converse(engine: Engine, codec, tokenizer, features: torch.Tensor | None, question: torch.Tensor,
             seed: int = 0, sampling: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
             on_frame: Callable[[int, int], None] | None = None, xa_start: int = 0) -> Answer:
    """Answer `question` (mono float32 [samples] at the codec's rate) about the image `features`, looked
    at from frame `xa_start` on.

    One engine stream; per frame: Mimi encoder -> engine.step -> Mimi decoder + transcript.
    """
    if question.dim() != 1 or question.shape[0] == 0 or not question.is_floating_point():
        raise ChatError(f"question must be mono float samples [samples > 0], got {question.dtype} "
                        f"{list(question.shape)}")
    cfg, frame = engine.cfg, codec.frame_size
    frames = math.ceil(question.shape[-1] / frame)
    total = frames + cfg.max_delay
    padded = torch.nn.functional.pad(question.float(), (0, total * frame - question.shape[-1]))
    sid = engine.open_stream(seed=seed, image=features, sampling=sampling, xa_start=xa_start)
    enc, dec, text = codec.encoder(), codec.decoder(), tokenizer.stream()
    pcm, text_tokens, audio_tokens = [], [], []
    try:
        for t in range(total):
            codes = enc.step(padded[None, t * frame:(t + 1) * frame])
            tokens = engine.step(codes.cpu(), [sid])[0]
            if on_frame is not None:
                on_frame(t + 1, total)
            if int(tokens[0]) == UNGENERATED:  # warm-up: the delayed codebooks are not out yet
                continue
            text_tokens.append(int(tokens[0]))
            audio_tokens.append(tokens[1:])
            piece = text.push(int(tokens[0]))
            if piece and on_text is not None:
                on_text(piece)
            pcm.append(dec.step(tokens[None, 1:].to(codec.device))[0].cpu())
    finally:
        engine.close_stream(sid)
    return Answer(torch.cat(pcm)[: question.shape[-1]], text.text, text_tokens, torch.stack(audio_tokens))


# ---- command line --------------------------------------------------------------------------------
def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m moshivis.chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="MoshiVis .safetensors file, or the folder holding it")
    p.add_argument("--image", required=True, help="picture to talk about (any format Pillow reads)")
    p.add_argument("--audio", required=True, help="the question: a WAV file at 24 kHz")
    p.add_argument("--out", required=True, help="where to write the answer (16-bit WAV, 24 kHz)")
    p.add_argument("--config", help=f"MoshiVis config JSON or preset ({', '.join(sorted(PRESETS))})")
    p.add_argument("--mimi", help=f"Mimi weights: Kyutai's {MIMI_FILE} or a Hugging Face kyutai/mimi folder")
    p.add_argument("--mimi-config", help="Mimi config JSON for a single weights file (default: kyutai/mimi sizes)")
    p.add_argument("--tokenizer", help=f"SentencePiece text tokenizer ({TOKENIZER_FILE})")
    p.add_argument("--siglip", help="SigLIP weights, if not in the checkpoint (image_prefix.enc.model.*)")
    p.add_argument("--vision-config", help="SigLIP vision config JSON (default: PaliGemma2-448)")
    p.add_argument("--backend", default="torch", choices=["torch", "triton"])
    p.add_argument("--device", type=cli.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--weights", default="dense", choices=["dense", "int8"], help="checkpoint weight format")
    add_kv_dtype_arg(p)
    p.add_argument("--resample", action="store_true", help="resample a question not at 24 kHz instead of refusing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax instead of Kyutai's default sampling")
    p.add_argument("--xa-start", type=int, default=0,
                   help="the first frame that looks at the image (Kyutai's web client: 16; default 0)")
    p.add_argument("--image-resolution", type=int,
                   help="resize the picture to this side (rounded to the patch size, at most the encoder's own)")
    p.add_argument("--center-crop", action="store_true", help="cut out the picture's central square first")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="Kyutai's text repetition penalty (its web client: 1.15; default 1 = none)")
    p.add_argument("--repetition-penalty-context", type=int, default=64,
                   help="how many recent text tokens the penalty looks at (default 64)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def _existing(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        raise ChatError(f"{what} {p} does not exist")
    return p


def _find(folder: Path, names: list[str], patterns: list[str]) -> Path | None:
    for name in names:
        if (folder / name).exists():
            return folder / name
    for pattern in patterns:
        found = sorted(folder.glob(pattern))
        if len(found) == 1:
            return found[0]
    return None


def _model_path(ckpt: Path, mimi: Path) -> Path:
    """The checkpoint file, or the folder of its shards (Mimi's file in the same folder is left out)."""
    if ckpt.is_file():
        return ckpt
    every = sorted(ckpt.glob("*.safetensors"))
    model = [f for f in every if f.resolve() != mimi.resolve() and not f.name.startswith("tokenizer")]
    if not model:
        raise ChatError(f"no MoshiVis *.safetensors file in {ckpt}")
    if len(model) == 1:
        return model[0]
    if len(model) == len(every):
        return ckpt
    raise ChatError(f"{ckpt} holds several model shards next to Mimi's weights; move Mimi's file elsewhere "
                    "(--mimi) or pass --checkpoint FILE")


def _config(spec: str | None, folder: Path) -> tuple[MoshiVisConfig, str]:
    """The config and where it came from (a JSON file or a preset's name)."""
    if spec is None:
        spec = str(folder / "config.json") if (folder / "config.json").is_file() else "moshika-vis"
    if Path(spec).is_file():
        return MoshiVisConfig.from_json(spec), spec
    if spec.replace("_", "-") in PRESETS:
        return preset(spec), spec
    raise ChatError(f"config {spec} is neither a file nor a preset ({', '.join(sorted(PRESETS))})")


@dataclass
class Files:
    """What the command reads, each given on the command line or found in the checkpoint's folder."""
    model: Path                 # the MoshiVis safetensors file, or the folder of its shards
    mimi: Path                  # Kyutai's tokenizer-*.safetensors, or a folder holding Mimi
    tokenizer: Path             # SentencePiece model
    siglip: Path                # where the SigLIP tower is read (by default the model itself)
    config: MoshiVisConfig
    config_from: str            # a JSON file or a preset's name


def find_files(ckpt: str | Path, mimi: str | None = None, tokenizer: str | None = None, siglip: str | None = None,
               config: str | None = None) -> Files:
    """Every input file, laid out as Kyutai publishes MoshiVis (kyutai/moshika-vis-pytorch-bf16:
    `model.safetensors`, `tokenizer-e351c8d8-checkpoint125.safetensors`, `tokenizer_spm_32k_3.model`, no
    config.json) or with the given paths; a ChatError names what is missing and the option to pass."""
    ckpt = _existing(ckpt, "checkpoint")
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    mimi_path = _existing(mimi, "Mimi weights") or _find(folder, [MIMI_FILE, "mimi"], ["tokenizer-*.safetensors"])
    if mimi_path is None:
        raise ChatError(f"no Mimi weights in {folder}: pass --mimi ({MIMI_FILE} or a Hugging Face kyutai/mimi folder)")
    tok_path = _existing(tokenizer, "text tokenizer") or _find(folder, [TOKENIZER_FILE], ["*.model"])
    if tok_path is None:
        raise ChatError(f"no text tokenizer in {folder}: pass --tokenizer ({TOKENIZER_FILE})")
    cfg, cfg_from = _config(config, folder)
    model = _model_path(ckpt, mimi_path)
    checkpoint.shard_files(model)  # safetensors only: a pickle is refused before anything is read
    return Files(model, mimi_path, tok_path, _existing(siglip, "SigLIP weights") or model, cfg, cfg_from)


class _Progress:
    """'[chat] [####------] 40%  3.2/8.0 s  15.1 frames/s' on stderr, every 10% of the frames."""

    def __init__(self, frame_seconds: float, enabled: bool):
        self.frame_seconds, self.enabled = frame_seconds, enabled
        self.start, self.shown = time.perf_counter(), -1

    def __call__(self, done: int, total: int) -> None:
        tenth = 10 * done // total
        if not self.enabled or tenth == self.shown:
            return
        self.shown = tenth
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        print(f"[chat] [{'#' * tenth}{'-' * (10 - tenth)}] {100 * done // total:3d}%  "
              f"{done * self.frame_seconds:.1f}/{total * self.frame_seconds:.1f} s  {rate:.1f} frames/s",
              file=sys.stderr, flush=True)


def _run(args) -> int:
    from .audio import load_audio, load_mimi, write_wav
    from .text import TextTokenizer
    from .vision import ImageEncoder, load_vision_config, open_image

    out = Path(args.out)
    if out.is_dir() or not out.parent.is_dir():
        raise ChatError(f"cannot write the answer to {out}: " + ("it is a folder" if out.is_dir() else
                                                                 f"folder {out.parent} does not exist"))
    files = find_files(args.checkpoint, args.mimi, args.tokenizer, args.siglip, args.config)
    cfg = files.config
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    # Cheap checks first: a bad question or picture fails before the big weights are read.
    tokenizer = TextTokenizer(files.tokenizer, text_card=cfg.text_card, padding_id=cfg.padding_token_id)
    codec = load_mimi(files.mimi, _existing(args.mimi_config, "Mimi config"), device=device, num_codebooks=cfg.dep_q)
    if codec.codebook_size != cfg.audio_card:
        raise ChatError(f"Mimi {files.mimi} has {codec.codebook_size} codes per codebook; the model's audio_card is "
                        f"{cfg.audio_card}")
    question = load_audio(args.audio, codec.sample_rate, resample_input=args.resample)
    picture = open_image(args.image)
    vision_cfg = load_vision_config(args.vision_config) if args.vision_config else None
    encoder = ImageEncoder.load(files.siglip, vision_cfg, dtype=dtype, device=device)
    if (encoder.num_tokens, encoder.hidden_size) != (cfg.num_image_tokens, cfg.image_encoder_dim):
        raise ChatError(f"SigLIP from {files.siglip} gives {encoder.num_tokens} x {encoder.hidden_size} features; "
                        f"the model expects {cfg.num_image_tokens} x {cfg.image_encoder_dim} (num_image_tokens x "
                        "image_encoder_dim): check --vision-config")
    try:
        sampling = dataclasses.replace(SamplingParams.greedy() if args.greedy else SamplingParams(),
                                       repetition_penalty=args.repetition_penalty,
                                       repetition_penalty_context=args.repetition_penalty_context)
    except ValueError as e:
        raise ChatError(str(e)) from e
    features = encoder.encode(picture, args.image_resolution, args.center_crop)
    weights = checkpoint.load(files.model, cfg, dtype=dtype, device=device, weights=args.weights)
    engine = Engine(cfg, weights, max_streams=1, backend=args.backend, kv_dtype=args.kv_dtype)

    progress = _Progress(codec.frame_size / codec.sample_rate, enabled=not args.quiet)
    answer = converse(engine, codec, tokenizer, features, question, seed=args.seed, sampling=sampling,
                      on_text=lambda s: print(s, end="", flush=True), on_frame=progress, xa_start=args.xa_start)
    print(flush=True)
    write_wav(out, answer.pcm, codec.sample_rate)
    if not args.quiet:
        print(f"[chat] wrote {out} ({answer.pcm.shape[-1] / codec.sample_rate:.2f} s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return _checked_run(_parser().parse_args(argv))


@cli.guard(ChatError, CheckpointError, ConfigError, ImageError, StreamError)
def _checked_run(args) -> int:
    cli.require_extras("python -m moshivis.chat")  # before anything imports them: name what is missing
    from .audio import AudioError
    from .text import TextError
    from .vision import VisionError
    try:
        return _run(args)
    except (AudioError, VisionError, TextError) as e:
        return cli.fail(e)


if __name__ == "__main__":
    sys.exit(main())
