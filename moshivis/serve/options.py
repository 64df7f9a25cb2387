"""Command-line options shared by every command that builds an engine or a server, and what they build."""
from __future__ import annotations

import argparse
import logging
import os

import torch

from .. import checkpoint, cli
from ..config import MoshiVisConfig, preset
from ..engine import Engine
from ..state import StreamState, add_kv_dtype_arg
from .config import MODES, ServerConfig
from .media import Media, MediaError

log = logging.getLogger("moshivis.server")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def memory_model(cfg: MoshiVisConfig, dtype: torch.dtype, max_streams: int, max_images: int,
                 kv_dtype: str = "auto") -> dict[str, int]:
    """Bytes the engine preallocates: per-stream self-attention K/V (in `kv_dtype`: "auto" = dtype, or
    "int8" with its scales) and per-image cross-attention K/V."""
    kv = StreamState.kv_bytes_per_stream(cfg, dtype, kv_dtype)
    image = cfg.num_image_tokens * 2 * cfg.dim * torch.empty((), dtype=dtype).element_size()
    return {"kv_bytes_per_stream": kv, "image_bytes_per_slot": image,
            "kv_bytes": kv * max_streams, "image_bytes": image * max_images}


def max_streams_for_budget(cfg: MoshiVisConfig, dtype: torch.dtype, budget_bytes: int, kv_dtype: str = "auto") -> int:
    """Streams whose K/V and one image slot each fit in `budget_bytes`."""
    m = memory_model(cfg, dtype, 1, 1, kv_dtype)
    return budget_bytes // (m["kv_bytes_per_stream"] + m["image_bytes_per_slot"])


# ---- the engine -----------------------------------------------------------------------------------
def add_engine_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="small", type=cli.preset_name, help="model sizes (ignored with --config)")
    ap.add_argument("--config", help="config.json of the checkpoint")
    ap.add_argument("--checkpoint", help=".safetensors file or directory of shards (default: seeded random weights)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ap.add_argument("--backend", default="torch", choices=["torch", "triton"])
    ap.add_argument("--device", type=cli.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--max-streams", type=cli.positive_int, default=8)
    ap.add_argument("--max-images", type=cli.positive_int, help="image pool slots (default: max streams)")
    ap.add_argument("--memory-budget-mb", type=cli.positive_float,
                    help="cap max streams by the K/V + image memory model")
    ap.add_argument("--threads", type=cli.positive_int, help="torch CPU threads (1 is best on a busy 2-core machine)")
    add_kv_dtype_arg(ap)


def build_engine(args, cfg: MoshiVisConfig | None = None, weights: dict | None = None) -> Engine:
    """The engine the options describe (`cfg`/`weights` given: those, e.g. the demo's). Errors name the
    option (ValueError and the config/checkpoint errors, which are ValueErrors too)."""
    if cfg is None:
        cfg = MoshiVisConfig.from_json(args.config) if args.config else preset(args.preset)
    dtype = DTYPES[args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")]
    if weights is None and args.checkpoint:
        weights = checkpoint.load(args.checkpoint, cfg, dtype=dtype, device=args.device)
    elif weights is None:
        weights = checkpoint.random_init(cfg, seed=args.seed, dtype=dtype, device=args.device)
    else:
        weights = {k: v.to(device=args.device, dtype=dtype if v.is_floating_point() else v.dtype)
                   for k, v in weights.items()}
    max_streams = args.max_streams
    if args.memory_budget_mb is not None:
        max_streams = min(max_streams, max_streams_for_budget(cfg, dtype, int(args.memory_budget_mb * 2 ** 20),
                                                              args.kv_dtype))
        if max_streams < 1:
            raise ValueError(f"--memory-budget-mb {args.memory_budget_mb}: not enough for one stream")
    engine = Engine(cfg, weights, max_streams=max_streams, backend=args.backend,
                    max_images=args.max_images or max_streams, kv_dtype=args.kv_dtype)
    if engine.device.type == "cuda":
        engine.warmup()  # every batch size compiled and captured before the first client
    return engine


# ---- media ----------------------------------------------------------------------------------------
def add_media_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--mimi", help="Mimi weights (a .safetensors file, Kyutai's or Hugging Face's layout, or a "
                                   "folder holding it): enables speech (PCM sessions, /api/chat)")
    ap.add_argument("--mimi-config", help="Mimi config.json (default: the folder's, else kyutai/mimi's)")
    ap.add_argument("--siglip", help="SigLIP weights (.safetensors; default: the --checkpoint's image tower, if it "
                                     "holds one): enables image files")
    ap.add_argument("--vision-config", help="SigLIP vision config JSON (default: PaliGemma2-448's tower)")
    ap.add_argument("--tokenizer", help="SentencePiece text tokenizer (tokenizer_spm_32k_3.model): adds the "
                                        "transcript")


def build_media(args, cfg: MoshiVisConfig, dtype: torch.dtype, device: str) -> Media:
    """The codec, image encoder and tokenizer named on the command line (local files only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers must never reach for the hub
    codec = vision = tokenizer = None
    wanted = [o for o, v in (("--mimi", args.mimi), ("--siglip", args.siglip), ("--tokenizer", args.tokenizer)) if v]
    try:
        if args.mimi:
            from ..audio import load_mimi
            codec = load_mimi(args.mimi, args.mimi_config, device=device, num_codebooks=cfg.dep_q)
        tower = args.siglip or args.checkpoint
        if tower:
            try:
                from ..vision import ImageEncoder, VisionError, load_vision_config
            except ImportError:
                if args.siglip:
                    raise
                log.warning("image files are refused: SigLIP needs the chat extras (pip install -e '.[chat]')")
            else:
                vision_cfg = load_vision_config(args.vision_config) if args.vision_config else None
                try:
                    vision = ImageEncoder.load(tower, vision_cfg, dtype=dtype, device=device)
                except VisionError as e:
                    if args.siglip or not str(e).startswith("no SigLIP vision weights"):
                        raise
                    log.warning("image files are refused: %s", str(e).split(";")[0])
        if args.tokenizer:
            from ..text import TextTokenizer
            tokenizer = TextTokenizer(args.tokenizer, text_card=cfg.text_card, padding_id=cfg.padding_token_id)
    except ImportError as e:
        raise MediaError(f"{', '.join(wanted) or '--siglip'} need(s) the chat extras (pip install -e '.[chat]'): "
                         f"{e}") from e
    except ValueError as e:
        raise MediaError(str(e)) from e
    media = Media(codec, vision, tokenizer)
    media.check(cfg)
    return media


# ---- the server -----------------------------------------------------------------------------------
def add_server_args(ap: argparse.ArgumentParser) -> None:
    d = ServerConfig()
    ap.add_argument("--mode", default=d.mode, choices=MODES)
    ap.add_argument("--tick-ms", type=cli.positive_float, default=d.tick_ms)
    ap.add_argument("--budget-ms", type=cli.positive_float, default=d.budget_ms)
    ap.add_argument("--max-lag-ms", type=cli.positive_float, default=d.max_lag_ms,
                    help="realtime: skip ticks when further behind")
    ap.add_argument("--max-queued-frames", type=cli.positive_int, default=d.max_queued_frames,
                    help="inputs a stream may queue ahead (beyond: refused, counted)")
    ap.add_argument("--max-catchup-per-tick", type=cli.non_negative_int, default=d.max_catchup_per_tick,
                    help="extra frames per tick for streams behind their input")
    ap.add_argument("--max-image-file-mb", type=cli.positive_float, default=d.max_image_file_bytes / 2 ** 20,
                    help="largest image file accepted")
    ap.add_argument("--image-interval-s", type=cli.positive_float, default=d.image_interval_s,
                    help="at most one image per this many seconds per stream")
    ap.add_argument("--open-timeout-s", type=cli.positive_float, default=d.open_timeout_s,
                    help="a connection must open its stream within this")
    ap.add_argument("--input-timeout-s", type=cli.positive_float, default=d.input_timeout_s,
                    help="an open stream that sends nothing for this long is closed")
    ap.add_argument("--max-connections", type=cli.positive_int, default=d.max_connections)
    ap.add_argument("--max-pending", type=cli.positive_int, default=d.max_pending,
                    help="connections without a stream; beyond, the oldest is evicted")
    ap.add_argument("--max-pending-per-ip", type=cli.positive_int, default=d.max_pending_per_ip)


def server_config(args, host: str, port: int) -> ServerConfig:
    return ServerConfig(host=host, port=port, mode=args.mode, tick_ms=args.tick_ms, budget_ms=args.budget_ms,
                        max_lag_ms=args.max_lag_ms, max_queued_frames=args.max_queued_frames,
                        max_catchup_per_tick=args.max_catchup_per_tick,
                        max_image_file_bytes=int(args.max_image_file_mb * 2 ** 20),
                        image_interval_s=args.image_interval_s, open_timeout_s=args.open_timeout_s,
                        input_timeout_s=args.input_timeout_s, max_connections=args.max_connections,
                        max_pending=args.max_pending, max_pending_per_ip=args.max_pending_per_ip)
