// The playback jitter buffer (moshivis/serve/web/jitter.js), against what its policy says by
// arithmetic: when it starts, what it plays (the pushed samples, in order), what it drops, and that
// the delay stays bounded under network jitter and clock drift. Reference audio is a sample ramp or a
// sine, so every output sample can be checked.
import { test } from "node:test";
import assert from "node:assert/strict";
import { JitterBuffer } from "../../moshivis/serve/web/jitter.js";
import { seededRandom } from "./helpers.mjs";

const RATE = 48000;
const QUANTUM = 128; // an AudioWorklet render quantum
const ms = (x) => Math.round((x * RATE) / 1000);

// Samples numbered from `from` (each value is its index), so order and losses are visible.
const ramp = (from, n) => Float32Array.from({ length: n }, (_, i) => from + i);

// Pulls until `samples` have been asked for; returns everything that came out.
function pullFor(jb, samples) {
  const out = new Float32Array(samples);
  for (let at = 0; at < samples; at += QUANTUM) {
    const q = new Float32Array(Math.min(QUANTUM, samples - at));
    jb.pull(q);
    out.set(q, at);
  }
  return out;
}

const conserved = (jb) => jb.stats.pushedSamples === jb.stats.playedSamples + jb.stats.droppedSamples + jb.buffered;

test("waits for startMs, then plays every pushed sample in order", () => {
  const rand = seededRandom();
  const jb = new JitterBuffer({ sampleRate: RATE, startMs: 100, fadeMs: 0 });
  jb.push(ramp(0, ms(100) - 1));
  assert.ok(pullFor(jb, 5 * QUANTUM).every((x) => x === 0), "nothing plays below the start threshold");
  assert.equal(jb.stats.starvedSamples, 0, "silence before the first start is not a gap");
  jb.push(ramp(ms(100) - 1, 1));
  // Random push and pull sizes that never run dry: the output is exactly the input.
  let pushed = ms(100);
  let played = 0;
  while (played < RATE) {
    if (jb.buffered < ms(60)) {
      const n = rand.int(1, 3000);
      jb.push(ramp(pushed, n));
      pushed += n;
    }
    const n = Math.min(rand.int(1, 500), jb.buffered);
    const out = new Float32Array(n);
    assert.equal(jb.pull(out), n);
    assert.deepEqual(out, ramp(played, n), `seed ${rand.seed} at sample ${played}`);
    played += n;
  }
  assert.deepEqual([jb.stats.underruns, jb.stats.drops, jb.stats.starvedSamples], [0, 0, 0]);
  assert.ok(conserved(jb));
});

test("an underrun plays silence, is counted, and raises the start threshold", () => {
  const jb = new JitterBuffer({ sampleRate: RATE, startMs: 100, stepMs: 20, maxStartMs: 130, fadeMs: 0 });
  jb.push(ramp(1, ms(100)));
  const out = pullFor(jb, ms(100) + 300);
  assert.deepEqual(out.subarray(0, ms(100)), ramp(1, ms(100)));
  assert.ok(out.subarray(ms(100)).every((x) => x === 0));
  assert.deepEqual([jb.stats.underruns, jb.stats.starvedSamples, jb.startSamples], [1, 300, ms(120)]);
  // It waits for the new, longer threshold: 119 ms is not enough, 120 ms is.
  jb.push(ramp(1, ms(119)));
  assert.equal(jb.pull(new Float32Array(QUANTUM)), 0);
  assert.equal(jb.stats.starvedSamples, 300 + QUANTUM, "silence after a start is a gap");
  jb.push(ramp(ms(119) + 1, ms(1)));
  const q = new Float32Array(QUANTUM);
  assert.equal(jb.pull(q), QUANTUM);
  assert.deepEqual(q, ramp(1, QUANTUM));
  // Threshold growth stops at maxStartMs.
  pullFor(jb, ms(200));
  jb.push(ramp(0, ms(130)));
  pullFor(jb, ms(200));
  assert.deepEqual([jb.stats.underruns, jb.startSamples], [3, ms(130)]);
  assert.ok(conserved(jb));
});

test("a burst beyond startMs + headroomMs drops the oldest audio down to startMs", () => {
  const rand = seededRandom();
  const jb = new JitterBuffer({ sampleRate: RATE, startMs: 100, headroomMs: 200, fadeMs: 0 });
  const burst = rand.int(ms(301), ms(2000));
  jb.push(ramp(0, burst));
  assert.equal(jb.buffered, ms(100), `seed ${rand.seed}`);
  assert.deepEqual([jb.stats.drops, jb.stats.droppedSamples], [1, burst - ms(100)]);
  // What is kept is the newest audio: the listener is as close to live as the threshold allows.
  assert.deepEqual(pullFor(jb, ms(100)), ramp(burst - ms(100), ms(100)));
  // Exactly at the bound nothing is dropped.
  const jb2 = new JitterBuffer({ sampleRate: RATE, startMs: 100, headroomMs: 200, fadeMs: 0 });
  jb2.push(ramp(0, ms(300)));
  assert.deepEqual([jb2.stats.drops, jb2.buffered], [0, ms(300)]);
  assert.ok(conserved(jb) && conserved(jb2));
});

// The server sends an 80 ms frame as two 40 ms Opus packets in one message (1920 + 1920 samples at
// 48 kHz once decoded); frame k leaves at k * periodMs and arrives after a random network delay,
// in order. The playback clock pulls 128-sample quanta. Returns the buffer and the worst backlog.
function simulate({ seconds, periodMs, jitterMs, rand, options = {} }) {
  const jb = new JitterBuffer({ sampleRate: RATE, fadeMs: 0, ...options });
  const arrivals = [];
  let last = 0;
  for (let k = 0; k * periodMs < seconds * 1000; k++) {
    last = Math.max(last, ms(k * periodMs + rand() * jitterMs)); // in order: TCP
    arrivals.push(last);
  }
  let next = 0;
  let frame = 0;
  let worst = 0;
  for (let t = 0; t < seconds * RATE; t += QUANTUM) {
    while (next < arrivals.length && arrivals[next] <= t) {
      jb.push(ramp(frame, 1920));
      jb.push(ramp(frame + 1920, 1920));
      frame += 3840;
      next++;
      worst = Math.max(worst, jb.buffered);
      assert.ok(jb.buffered <= jb.bound, `seed ${rand.seed}: buffered ${jb.buffered} over the bound ${jb.bound}`);
    }
    jb.pull(new Float32Array(QUANTUM));
    assert.ok(conserved(jb), `seed ${rand.seed}: pushed = played + dropped + buffered`);
  }
  return { jb, worst };
}

test("network jitter up to 80 ms: no gap and no drop with the 100 ms start", () => {
  // Playback starts once two frames (160 ms >= 100 ms) are in, when frame 1 arrives at 80 + d1.
  // Frame k is needed when frames 0..k-1 have played, at 80 + d1 + 80k, and arrives at 80k + dk:
  // never late while dk - d1 <= 80 ms. The backlog peaks at 160 + 80 = 240 ms < the 300 ms bound.
  const rand = seededRandom();
  const { jb, worst } = simulate({ seconds: 60, periodMs: 80, jitterMs: 80, rand });
  assert.deepEqual([jb.stats.underruns, jb.stats.drops], [0, 0], `seed ${rand.seed}`);
  assert.ok(worst <= ms(240) + 3840, `seed ${rand.seed}: worst backlog ${worst}`);
});

test("heavy jitter: gaps are counted, the threshold adapts, and the delay stays bounded", () => {
  const rand = seededRandom();
  const { jb, worst } = simulate({ seconds: 60, periodMs: 80, jitterMs: 400, rand });
  assert.ok(jb.stats.underruns > 0, `seed ${rand.seed}: 400 ms of jitter must starve a 100 ms buffer`);
  assert.ok(jb.startSamples > ms(100) && jb.startSamples <= ms(240), `seed ${rand.seed}`);
  assert.ok(worst <= ms(240 + 200), `seed ${rand.seed}: worst backlog ${worst}`);
});

test("clock drift: a sender 1% fast is trimmed by drops, one 1% slow by gaps; neither grows the delay", () => {
  const rand = seededRandom();
  // 1% fast over 120 s is 1.2 s of extra audio; each drop trims the backlog from above 300 ms to
  // 100 ms, so about 1200 / 200 = 6 drops.
  const fast = simulate({ seconds: 120, periodMs: 80 * 0.99, jitterMs: 5, rand });
  assert.ok(fast.jb.stats.drops >= 4 && fast.jb.stats.drops <= 8, `seed ${rand.seed}: ${fast.jb.stats.drops} drops`);
  assert.ok(fast.jb.stats.droppedSamples >= ms(1200 - 300) && fast.jb.stats.droppedSamples <= ms(1200 + 100));
  assert.equal(fast.jb.stats.underruns, 0);
  // 1% slow over 120 s runs 1.2 s short: gaps, never a drop, and the backlog stays at its start.
  const slow = simulate({ seconds: 120, periodMs: 80 * 1.01, jitterMs: 5, rand });
  assert.ok(slow.jb.stats.underruns >= 1, `seed ${rand.seed}`);
  assert.equal(slow.jb.stats.drops, 0);
  assert.ok(slow.worst <= slow.jb.startSamples + 3840);
});

test("fades: starts ramp up, underruns ramp down, drops crossfade without a jump", () => {
  const fadeMs = 3;
  const fade = ms(fadeMs);
  const jb = new JitterBuffer({ sampleRate: RATE, startMs: 100, fadeMs });
  jb.push(new Float32Array(ms(100)).fill(1));
  const out = pullFor(jb, ms(100) + QUANTUM);
  // Fade in over `fade` samples from silence, strictly rising, then the signal untouched.
  for (let i = 0; i < fade; i++) assert.ok(Math.abs(out[i] - (i + 1) / (fade + 1)) < 1e-6, `fade-in ${i}`);
  // It runs dry inside a quantum (4800 = 37.5 quanta); what that quantum still had ramps down to
  // silence (samples of earlier quanta are gone to the speakers already).
  const len = Math.min(fade, ms(100) % QUANTUM);
  assert.ok(out.subarray(fade, ms(100) - len).every((x) => x === 1));
  const tail = out.subarray(ms(100) - len, ms(100));
  for (let i = 0; i < len; i++) assert.ok(Math.abs(tail[i] - (len - i) / (len + 1)) < 1e-6, `fade-out ${i}`);
  assert.ok(out.subarray(ms(100)).every((x) => x === 0));

  // A drop inside a 100 Hz sine: the kept audio starts half a period away from what would have
  // played, a jump of about 2 without the crossfade. With it the steps stay near the sine's own.
  const sine = (n0, n) => Float32Array.from({ length: n }, (_, i) => Math.sin((2 * Math.PI * 100 * (n0 + i)) / RATE));
  const run = (fadeMsOf) => {
    const b = new JitterBuffer({ sampleRate: RATE, startMs: 100, headroomMs: 200, fadeMs: fadeMsOf });
    b.push(sine(0, ms(150)));
    const next = ms(50) + 120; // 2520: 5.25 periods, the sine's crest
    const before = pullFor(b, next);
    // Push enough to pass the 300 ms bound; the drop keeps the last 100 ms, which we make start
    // 20.5 periods (480 samples each) after `next`: at the trough.
    const keepFrom = next + 240 + 480 * 20;
    const total = keepFrom + ms(100);
    b.push(sine(ms(150), total - ms(150)));
    assert.equal(b.stats.drops, 1);
    const after = pullFor(b, 2 * QUANTUM);
    const joined = [...before.subarray(before.length - 1), ...after];
    return Math.max(...joined.slice(1).map((x, i) => Math.abs(x - joined[i])));
  };
  const sineStep = (2 * Math.PI * 100) / RATE; // the sine's largest step between samples
  assert.ok(run(0) > 1.5, `without a crossfade the drop jumps (${run(0)})`);
  assert.ok(run(fadeMs) < 2 / fade + sineStep, `with it the largest step is ${run(fadeMs)}`);
});

test("bad settings are refused with the setting named", () => {
  assert.throws(() => new JitterBuffer({ sampleRate: 0 }), /sampleRate must be > 0/);
  assert.throws(() => new JitterBuffer({ sampleRate: RATE, startMs: 200, maxStartMs: 100 }), /maxStartMs >= startMs/);
});
