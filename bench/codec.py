"""The speech codec for many streams: batched streaming Mimi against the per-stream loop.

python -m bench.codec [--streams 1 8 32] [--frames N] [--warmup N] [--mimi-config JSON]
       [--device cpu|cuda] [--eager] [--threads N] [--seed S] [--json PATH]

Real-size Mimi (transformers' default `MimiConfig`, the kyutai/mimi sizes, or --mimi-config) with
seeded random weights (codebooks random too and fitted to the latents, so codes vary as a trained
Mimi's do; `fit_codebooks`). For each stream count N, every frame
gets N new 1920-sample frames of noise to encode and N rows of random codes to decode, run two ways
on the same inputs, interleaved frame by frame so both see the same machine load:

* batched: `moshivis.codec.MimiStreams` (one encode call and one decode call for all N streams;
  on a GPU each bucket replays its CUDA graph unless --eager);
* loop: what the server did before it, `EncoderStream` / `DecoderStream` of `moshivis.audio` per
  stream, one stream after another (batch 1 each).

Reported per N: median milliseconds per frame of each stage (encode, decode) both ways,
stream-frames per second (N over the median encode + decode time of a frame) both ways and their
ratio, the streams each way could serve in real time (80 ms per frame), and how far the two agree
(codes equal, largest PCM difference). CPU figures are labelled CPU and are never GPU figures.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moshivis import cli
from moshivis.audio import AudioError, MimiCodec
from moshivis.codec import MimiStreams

from .common import FRAME_BUDGET_MS, add_common_args, environment, set_threads, sync, table, write_json


def fit_codebooks(model, gen: torch.Generator, num_codebooks: int = 8) -> None:
    """Make a random Mimi quantize like a trained one: each quantizer's codebooks scaled to the spread
    of its input on noise (random codebooks far from the latents' scale leave every distance nearly
    equal, so the nearest entry wins by float rounding), and the decoder's last convolution scaled so
    decoded random codes peak at 0.25, as audio stays within [-1, 1]. Runs on the model's device."""
    dev = next(model.parameters()).device
    with torch.no_grad():
        latents = model.encoder(0.3 * torch.randn(1, 1, 8 * model.config.frame_size, generator=gen).to(dev)).latents
        q = model.quantizer
        for rvq in (q.semantic_residual_vector_quantizer, q.acoustic_residual_vector_quantizer):
            scale = rvq.input_proj(latents).std() if rvq.input_proj is not None else latents.std()
            for layer in rvq.layers:
                layer.codebook.embed_sum.mul_(scale)
                layer.codebook._embed = None  # transformers caches embed_sum / cluster_usage
        codes = torch.randint(0, model.config.codebook_size, (1, num_codebooks, 8), generator=gen).to(dev)
        pcm = model.decode(codes).audio_values
        model.decoder.decoder_seanet.layers[-1].conv.weight.mul_(0.25 / pcm.abs().max())


def random_mimi(config, seed: int, device: torch.device) -> MimiCodec:
    """A Mimi of `config` (a MimiConfig, or None: kyutai/mimi's sizes) with seeded random weights,
    random unit-normal codebooks (transformers initialises them to zero: every code would be 0) fitted
    by `fit_codebooks`."""
    from transformers import MimiConfig, MimiModel
    torch.manual_seed(seed)
    model = MimiModel(config or MimiConfig()).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("embed_sum"):
                b.normal_()
    model.to(device)
    fit_codebooks(model, torch.Generator().manual_seed(seed))
    return MimiCodec(model, num_codebooks=8)


def run_streams(codec: MimiCodec, batched: MimiStreams, n: int, frames: int, warmup: int, device: torch.device,
                gen: torch.Generator) -> dict:
    """Times `frames` frames of n streams both ways after `warmup` untimed ones (fresh streams)."""
    fs, nq, card = codec.frame_size, codec.num_codebooks, codec.codebook_size
    slots = list(range(n))
    for s in slots:
        batched.reset(s)
    encoders, decoders = [codec.encoder() for _ in slots], [codec.decoder() for _ in slots]
    codes_out, pcm_out = torch.empty(n, nq, dtype=torch.long), torch.empty(n, fs)
    times = {k: [] for k in ("batched_encode", "batched_decode", "loop_encode", "loop_decode")}
    codes_equal = codes_total = 0
    pcm_diff = 0.0

    def timed(key, fn, count):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        if count:
            times[key].append((time.perf_counter() - t0) * 1e3)
        return result

    for t in range(warmup + frames):
        pcm = 0.1 * torch.randn(n, fs, generator=gen)
        codes = torch.randint(0, card, (n, nq), generator=gen)
        count = t >= warmup
        timed("batched_encode", lambda: batched.encode(pcm, slots, out=codes_out), count)
        timed("batched_decode", lambda: batched.decode(codes, slots, out=pcm_out), count)
        pcm_dev, codes_dev = pcm.to(device), codes.to(device)
        loop_codes = timed("loop_encode", lambda: [e.step(pcm_dev[i:i + 1]) for i, e in enumerate(encoders)], count)
        loop_pcm = timed("loop_decode", lambda: [d.step(codes_dev[i:i + 1]) for i, d in enumerate(decoders)], count)
        codes_equal += int((torch.cat(loop_codes).cpu() == codes_out).all(1).sum())
        codes_total += n
        pcm_diff = max(pcm_diff, float((torch.cat(loop_pcm).cpu() - pcm_out).abs().max()))

    ms = {k: statistics.median(v) for k, v in times.items()}
    row = {"streams": n, "frames": frames, **{f"{k}_ms": v for k, v in ms.items()},
           **{f"{k}_times_ms": v for k, v in times.items()}}
    for way in ("batched", "loop"):
        frame_ms = ms[f"{way}_encode"] + ms[f"{way}_decode"]
        row[f"{way}_frame_ms"] = frame_ms
        row[f"{way}_stream_frames_per_s"] = n * 1e3 / frame_ms
        row[f"{way}_encode_ms_per_stream"] = ms[f"{way}_encode"] / n
        row[f"{way}_decode_ms_per_stream"] = ms[f"{way}_decode"] / n
        row[f"{way}_realtime_streams"] = row[f"{way}_stream_frames_per_s"] * FRAME_BUDGET_MS / 1e3
    row["speedup"] = row["batched_stream_frames_per_s"] / row["loop_stream_frames_per_s"]
    row["codes_equal_fraction"] = codes_equal / codes_total
    row["max_pcm_diff"] = pcm_diff
    return row


def parser() -> argparse.ArgumentParser:
    ap = cli.ArgumentParser(prog="python -m bench.codec", description=__doc__)
    ap.add_argument("--streams", type=cli.positive_int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--frames", type=cli.positive_int, default=5, help="timed frames per stream count")
    ap.add_argument("--warmup", type=cli.non_negative_int, default=1,
                    help="untimed frames first (buffers, graphs, caches)")
    ap.add_argument("--mimi-config", default=None, help="a MimiConfig JSON (default: transformers' MimiConfig())")
    ap.add_argument("--device", type=cli.device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eager", action="store_true", help="GPU: run the batched codec eagerly (no CUDA graphs)")
    add_common_args(ap)
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    set_threads(args.threads)
    device = torch.device(args.device)
    config = None
    if args.mimi_config:
        from transformers import MimiConfig
        try:
            config = MimiConfig.from_json_file(args.mimi_config)
        except (OSError, ValueError) as e:
            ap.exit(2, f"error: --mimi-config {args.mimi_config} is not a readable MimiConfig JSON: "
                       f"{str(e).splitlines()[0]}\n")
    env = environment(device)
    try:
        codec = random_mimi(config, args.seed, device)
        batched = MimiStreams(codec, max(args.streams))
    except AudioError as e:
        ap.exit(2, f"error: {cli.one_line(e)}\n")
    batched.use_cuda_graphs = not args.eager
    cfg = codec.model.config
    print(f"# codec: Mimi {'(transformers MimiConfig defaults)' if config is None else args.mimi_config}, "
          f"{sum(p.numel() for p in codec.model.parameters()) / 1e6:.1f} M parameters, random weights, "
          f"{codec.num_codebooks} codebooks, frame {codec.frame_size} samples; on {env['device']} "
          f"({'CPU figures, not GPU' if device.type == 'cpu' else 'GPU'}); commit {env['commit']}")
    print(f"# batched MimiStreams (max_streams {batched.max_streams}) vs the per-stream EncoderStream/DecoderStream "
          f"loop; {args.warmup} warm-up + {args.frames} timed frames each, medians; sliding window "
          f"{cfg.sliding_window}")
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for n in args.streams:
        row = run_streams(codec, batched, n, args.frames, args.warmup, device, gen)
        row.update(device_type=device.type, label=env["label"],
                   cuda_graphs=device.type == "cuda" and not args.eager and batched.graph_error is None)
        rows.append(row)
    print(table(rows, [("streams", "streams", "d"),
                       ("batched enc ms", "batched_encode_ms", ".1f"), ("batched dec ms", "batched_decode_ms", ".1f"),
                       ("loop enc ms", "loop_encode_ms", ".1f"), ("loop dec ms", "loop_decode_ms", ".1f"),
                       ("batched stream-frames/s", "batched_stream_frames_per_s", ".1f"),
                       ("loop stream-frames/s", "loop_stream_frames_per_s", ".1f"), ("speedup", "speedup", ".2f"),
                       ("real-time streams batched", "batched_realtime_streams", ".1f"),
                       ("loop", "loop_realtime_streams", ".1f"),
                       ("codes equal", "codes_equal_fraction", ".3f"), ("max pcm diff", "max_pcm_diff", ".1e")]))
    if batched.graph_error:
        print(f"# {batched.graph_error}; batched frames ran eagerly")
    write_json(args.json, "codec", env, rows, rows=rows,
               mimi_config=cfg.to_dict() if config is not None else "transformers MimiConfig() defaults")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
