"""Planted bugs: each one applied to the source, the tests meant to catch it run, the source restored.

    python tests/mutants.py [--only SUBSTRING] [--json PATH]        (make mutants)

A mutant is (what it plants, file, text replaced, replacement, test groups). The groups run one after the
other with -x until one fails: the mutant is caught by that test; if none fails it SURVIVED (exit 1). A
group is a test file, optionally "-k EXPR" (that selects within that file only). Every mutant must be
caught; a new engine, sampling, image-pool, quantization, token-delay or server rule gets one here.
The files are restored whatever happens (the replacement is undone in a finally); never run two at once.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
S, M = "tests/test_engine_sampling.py", "tests/test_engine_model.py"
G, E, Q = "tests/test_golden.py", "tests/test_engine.py", "tests/test_quantize.py"
K, SP = "tests/test_kernels.py", "kernels/moshivis_kernels/sampling.py"
R, SV, KY, CO = "tests/test_robust.py", "tests/test_serve.py", "tests/test_kyutai.py", "tests/test_codec.py"
MUTANTS = [
    ("text/audio temperature swapped at open", "moshivis/engine.py",
     "(sampling.temperature_text, sampling.temperature_audio)", "(sampling.temperature_audio, sampling.temperature_text)", [S]),
    ("text/audio top-k swapped at open", "moshivis/engine.py",
     "(sampling.top_k_text, sampling.top_k_audio)", "(sampling.top_k_audio, sampling.top_k_text)", [S]),
    ("seed not passed at open (every stream seed 0)", "moshivis/engine.py",
     "self.state.reset(free[0], seed,", "self.state.reset(free[0], 0,", [S]),
    ("audio codebooks sampled with the text temperature (triton)", "moshivis/backends/triton.py",
     "temperature=fb.temperature[:, 1]", "temperature=fb.temperature[:, 0]", [S]),
    ("audio codebooks sampled with the text temperature (torch)", "moshivis/backends/torch.py",
     "kind = min(codebook, 1)", "kind = 0", [S]),
    ("audio seed unused (triton depformer)", "moshivis/backends/triton.py",
     "top_k=fb.top_k[:, 1], seed=fb.seed,", "top_k=fb.top_k[:, 1], seed=fb.seed * 0,", [S]),
    ("audio codebook index off by one (torch)", "moshivis/backends/torch.py",
     "prev = self.choose(lk, fb, 1 + k)", "prev = self.choose(lk, fb, k)", [S]),
    ("top-k off by one (kernel)", SP, "thr = _topk_threshold(row_ptr, V, k.to(tl.int32), BLOCK_R)",
     "thr = _topk_threshold(row_ptr, V, (k + 1).to(tl.int32), BLOCK_R)", [S, K + " -k sampl"]),
    ("top-k off by one (reference)", SP, "gather(1, (k - 1).clamp(0, V - 1))", "gather(1, k.clamp(0, V - 1))", [S]),
    ("Gumbel noise sign flipped (kernel)", SP, "s = tl.math.div_rn(x, temperature) - tl.log(-tl.log(u))",
     "s = tl.math.div_rn(x, temperature) + tl.log(-tl.log(u))", [S]),
    ("temperature multiplies instead of divides (reference)", SP, "scores = torch.where(keep, x / t - torch.log",
     "scores = torch.where(keep, x * t - torch.log", [S]),
    ("repetition penalty sign (kernel)", SP, "y = tl.where(xf >= 0, tl.math.div_rn(xf, penalty), xf * penalty)",
     "y = tl.where(xf >= 0, xf * penalty, tl.math.div_rn(xf, penalty))", [S, E, K + " -k penal or histor"]),
    ("repetition penalty sign (reference)", SP, "y = torch.where(x >= 0, x / p, x * p)",
     "y = torch.where(x >= 0, x * p, x / p)", [S, E, K + " -k penal or histor"]),
    ("repetition context off by one (kernel)", SP, "ok = i < tl.minimum(tl.minimum(context, n), H)",
     "ok = i < tl.minimum(tl.minimum(context + 1, n), H)", [S, E, K + " -k penal or histor"]),
    ("padding appended to the text history (kernel)", SP,
     "if (slot >= 0) & (tok != ignored_a) & (tok != ignored_b):", "if (slot >= 0) & (tok != ignored_a):", [S, E, K + " -k penal or histor"]),
    ("output token delay off by one (kernel)", "kernels/moshivis_kernels/token_delays.py",
     "(t1 - max_delay + d) % W", "(t1 - max_delay + d + 1) % W", [G, E]),
    ("input token delay boundary (reference)", "kernels/moshivis_kernels/token_delays.py",
     "inp = torch.where(t <= delays,", "inp = torch.where(t < delays,", [G, E]),
    ("image refcount ignores sharing", "moshivis/image_pool.py", "self.refcount[slot] += 1", "self.refcount[slot] = 1", [M]),
    ("replace reuses a slot other streams still hold", "moshivis/image_pool.py",
     "if not free and old >= 0 and self.refcount[old] == 1:", "if not free and old >= 0 and self.refcount[old] >= 1:", [M]),
    ("close does not release the image", "moshivis/engine.py",
     "        self.pool.swap(self._get(stream).image_slot, None)\n", "        self._get(stream)\n", [M]),
    ("image token count ignored (all max_tokens read)", "moshivis/image_pool.py",
     "self.num_tokens[index] = n", "self.num_tokens[index] = self.max_tokens", [E, "tests/test_vision.py"]),
    ("int8 weight scale /128 (kernel)", "kernels/moshivis_kernels/linear.py",
     "y = y * (tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0) / 127.0)[None, :]",
     "y = y * (tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0) / 128.0)[None, :]", [Q, E]),
    ("int8 quantization scale 128 (quantize_rowwise)", "kernels/moshivis_kernels/linear.py",
     "inv = 127.0 / torch.where(scb > 0, scb, torch.ones_like(scb))",
     "inv = 128.0 / torch.where(scb > 0, scb, torch.ones_like(scb))", [Q]),
    ("int8 KV scale max/128 (kernel)", "kernels/moshivis_kernels/self_attention.py",
     "scale = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 127.0)", "scale = tl.math.div_rn(tl.max(tl.abs(x), axis=0), 128.0)",
     [K + " -k int8_kv", E]),
    ("queue bound off by one (one more input queued)", "moshivis/serve/scheduler.py",
     "if len(s.inbox) >= self.config.max_queued_frames:", "if len(s.inbox) > self.config.max_queued_frames:", [R, SV]),
    ("dropped inputs not counted", "moshivis/serve/scheduler.py",
     "            self.metrics.dropped_inputs += 1\n", "", [R, SV]),
    ("catch-up frames not counted", "moshivis/serve/metrics.py",
     "self.catchup_frames += catchup", "self.catchup_frames += 0", [R, SV]),
    ("catch-up frames are no deadline misses", "moshivis/serve/scheduler.py",
     "catchup, seconds * 1e3 > self.config.budget_ms)", "catchup, not catchup and seconds * 1e3 > self.config.budget_ms)", [SV, R]),
    ("no catch-up after a stall", "moshivis/serve/scheduler.py",
     "        for _ in range(self.config.max_catchup_per_tick):\n", "        for _ in range(0):\n", [R]),
    ("codec encoder row not reset for a new stream", "moshivis/serve/scheduler.py",
     "                        self._engine_ex.submit(self.speech.encoder.reset, s.slot)", "                        pass", [CO, SV, KY]),
    ("codec decoder row not reset for a new stream", "moshivis/serve/scheduler.py",
     "                        self._output_ex.submit(self.speech.decoder.reset, s.slot)", "                        pass", [CO, SV, KY]),
    ("colour from the gate floor 0.0", "moshivis/gates.py",
     "GATE_FLOOR, GATE_SPAN, LEVELS = 0.005, 0.016, 10", "GATE_FLOOR, GATE_SPAN, LEVELS = 0.0, 0.016, 10", [KY, "tests/test_engine.py -k colo"]),
    ("colour averages all layers, not the last 10", "moshivis/gates.py",
     "last = min(LAST_LAYERS, gate_means.shape[1])", "last = gate_means.shape[1]", [KY, "tests/test_engine.py -k colo"]),
    ("/api/chat text after its frame's audio", "moshivis/serve/kyutai.py",
     "        pages = self._opus_out.append_pcm(out.pcm.numpy())\n        if len(pages):\n            msgs.append(bytes([AUDIO]) + bytes(pages))\n",
     "        pages = self._opus_out.append_pcm(out.pcm.numpy())\n        if len(pages):\n            msgs.insert(0, bytes([AUDIO]) + bytes(pages))\n", [KY]),
    ("/api/chat coloured text for image-less sessions too", "moshivis/serve/kyutai.py",
     "+ out.text.encode() if self._image\n", "+ out.text.encode() if True\n", [KY]),
    ("Kyutai seeds combined without the audio seed", "moshivis/serve/kyutai.py",
     "seed = ((text_seed or 0) * 1_000_003 + (audio_seed or 0)) % 2 ** 63", "seed = ((text_seed or 0) * 1_000_003) % 2 ** 63", [KY]),
    ("teacher forcing: token 0 not forced (kernel)", SP, "    if forced >= 0:\n        tok = forced", "    if forced > 0:\n        tok = forced",
     [K + " -k forced or sampled", G]),
    ("reused slot keeps its text history", "moshivis/state.py", "        self.text_history_len[slot] = 0\n", "", [S, E]),
    ("text top-k read from the audio column (triton)", "moshivis/backends/triton.py",
     "sample_tokens(fb.text_logits, fb.temperature[:, 0], fb.top_k[:, 0]", "sample_tokens(fb.text_logits, fb.temperature[:, 0], fb.top_k[:, 1]", [S]),
    ("input timeout ignores the configured limit", "moshivis/serve/scheduler.py",
     "now - s.last_input > limit]", "now - s.last_input > 10 * limit]", [R]),
    ("image worker encodes one pending image per call (no batching)", "moshivis/serve/media.py",
     "batch, self._pending = self._pending, []", "batch, self._pending = self._pending[:1], self._pending[1:]",
     [SV + " -k image_worker"]),
    ("image rate limit not applied", "moshivis/serve/scheduler.py", "image_tokens: float = IMAGE_BURST", "image_tokens: float = 1e9", [R]),
    ("cross-attention gate bias -4 -> -4.001 (a small systematic error)", "kernels/moshivis_kernels/cross_attention.py",
     "g = tl.sigmoid((z.to(dt).to(tl.float32) - 4.0)", "g = tl.sigmoid((z.to(dt).to(tl.float32) - 4.001)",
     [K + " -k gated_output or image_attention or reference_equals", G]),
    ("RMSNorm rstd scaled by 1.0001 (kernel)", "kernels/moshivis_kernels/rms_norm.py",
     "rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / dim + eps)", "rstd = 1.0001 / tl.sqrt(tl.sum(acc, axis=0) / dim + eps)",
     [K + " -k rms", G]),
    ("xa_start off by one", "moshivis/engine.py", "r.image_slot if t >= r.xa_start else NO_IMAGE",
     "r.image_slot if t > r.xa_start else NO_IMAGE", ["tests/test_engine.py -k hand_stepped", SV + " -k xa_start"]),
]


def first_failure(out: str) -> str:
    for line in out.splitlines():
        if line.startswith(("FAILED tests/", "ERROR tests/")):  # pytest's summary, not captured log lines
            return line.split(" - ")[0].split(" ", 1)[1]
    return ""


def run_mutant(name: str, file: str, old: str, new: str, groups: list[str]) -> dict:
    path = ROOT / file
    src = path.read_text()
    if src.count(old) != 1:
        raise SystemExit(f"error: mutant {name!r}: the text to replace occurs {src.count(old)} times in {file}, not once")
    t0, caught = time.time(), ""
    try:
        path.write_text(src.replace(old, new))
        for group in groups:
            target, _, expr = group.partition(" -k ")
            r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", target,
                                *(["-k", expr] if expr else [])], cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                caught = first_failure(r.stdout) or f"pytest exit {r.returncode}: {r.stdout[-200:]!r}"
                break
    finally:
        path.write_text(src)
    return {"mutant": name, "file": file, "caught_by": caught, "seconds": round(time.time() - t0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run the mutants whose description contains this")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    results = []
    for mutant in MUTANTS:
        if args.only in mutant[0]:
            results.append(run_mutant(*mutant))
            r = results[-1]
            print(f"{'caught' if r['caught_by'] else 'SURVIVED':8} {r['seconds']:4d} s  {r['mutant']}  <- {r['caught_by']}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    survived = [r["mutant"] for r in results if not r["caught_by"]]
    print(f"{len(results) - len(survived)} of {len(results)} planted bugs caught" +
          (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
