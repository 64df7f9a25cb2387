// Playback jitter buffer for the model's voice. It runs inside the playback AudioWorklet
// (worklets.js), which pulls one render quantum (128 samples) at a time; decoded audio is pushed as
// it arrives from the network, in bursts (the server sends an 80 ms frame at a time, and the network
// bunches messages up).
//
// Policy, in samples of the output rate:
// - Wait until startMs of audio is buffered before playing (100 ms: more than one 80 ms frame, so
//   the next frame can arrive late by up to ~20 ms plus whatever is still buffered, without a gap).
// - If the buffer runs dry while playing (an underrun), play silence, count it, and wait for startMs
//   again; each underrun raises startMs by stepMs, up to maxStartMs, since the network has shown
//   more jitter than we allowed for.
// - If the buffer grows beyond startMs + headroomMs (a burst after a stall, or a server clock a little
//   faster than ours), drop the oldest audio down to startMs and count it: the delay never grows.
// - Every start fades in and every drop crossfades over fadeMs, so neither clicks; an underrun fades
//   out what is left of the render quantum it happens in (earlier quanta have been played already).
// Invariant (tested): pushed = played + dropped + buffered.

export class JitterBuffer {
  constructor({ sampleRate, startMs = 100, maxStartMs = 240, stepMs = 20, headroomMs = 200, fadeMs = 3 }) {
    if (!(sampleRate > 0)) throw new Error(`JitterBuffer: sampleRate must be > 0, got ${sampleRate}`);
    if (!(startMs > 0 && maxStartMs >= startMs && headroomMs > 0 && stepMs >= 0 && fadeMs >= 0)) {
      throw new Error("JitterBuffer: need startMs > 0, maxStartMs >= startMs, headroomMs > 0, " +
        `stepMs >= 0, fadeMs >= 0; got ${JSON.stringify({ startMs, maxStartMs, stepMs, headroomMs, fadeMs })}`);
    }
    const ms = (x) => Math.round((x * sampleRate) / 1000);
    this.sampleRate = sampleRate;
    this.initialStart = ms(startMs);
    this.maxStart = ms(maxStartMs);
    this.step = ms(stepMs);
    this.headroom = ms(headroomMs);
    this.fadeLen = ms(fadeMs);
    this.reset();
  }

  reset() {
    this.chunks = []; // Float32Arrays, oldest first
    this.offset = 0; // samples of chunks[0] already played or dropped
    this.buffered = 0;
    this.startSamples = this.initialStart;
    this.playing = false;
    this.started = false; // played at least once: silence after that is a gap the listener hears
    this.fadeFrom = null; // samples to crossfade out of (zeros: a fade-in), or null
    this.fadePos = 0;
    this.stats = {
      pushedSamples: 0, playedSamples: 0, starvedSamples: 0, underruns: 0,
      droppedSamples: 0, drops: 0, maxBufferedSamples: 0,
    };
  }

  get bound() {
    return this.startSamples + this.headroom;
  }

  push(samples) {
    if (samples.length === 0) return;
    this.chunks.push(samples);
    this.buffered += samples.length;
    this.stats.pushedSamples += samples.length;
    const starting = !this.playing && this.buffered >= this.startSamples;
    if (starting) {
      this.playing = true;
      this.started = true;
      this._fadeFrom(new Float32Array(this.fadeLen)); // fade in from silence
    }
    if (this.buffered > this.bound) {
      // Crossfade from the audio that would have played next into the audio we keep (a start
      // keeps its fade-in from silence instead).
      const from = starting ? null : this._peek(this.fadeLen);
      const drop = this.buffered - this.startSamples;
      this._skip(drop);
      this.stats.droppedSamples += drop;
      this.stats.drops++;
      if (from) this._fadeFrom(from);
    }
    this.stats.maxBufferedSamples = Math.max(this.stats.maxBufferedSamples, this.buffered);
  }

  // Fills out (a Float32Array) and returns how many samples of it are real audio; the rest is silence.
  pull(out) {
    if (!this.playing) {
      out.fill(0);
      if (this.started) this.stats.starvedSamples += out.length;
      return 0;
    }
    let n = 0;
    while (n < out.length && this.chunks.length) {
      const first = this.chunks[0];
      const take = Math.min(first.length - this.offset, out.length - n);
      out.set(first.subarray(this.offset, this.offset + take), n);
      n += take;
      this._advance(take);
    }
    this.buffered -= n;
    this.stats.playedSamples += n;
    this._applyFade(out, n);
    if (n < out.length) {
      // Ran dry: fade out what we have, play silence, and wait for a longer start.
      const len = Math.min(this.fadeLen, n);
      for (let i = 0; i < len; i++) out[n - len + i] *= (len - i) / (len + 1);
      out.fill(0, n);
      this.stats.starvedSamples += out.length - n;
      this.stats.underruns++;
      this.playing = false;
      this.fadeFrom = null;
      this.startSamples = Math.min(this.maxStart, this.startSamples + this.step);
    }
    return n;
  }

  _fadeFrom(samples) {
    this.fadeFrom = samples.length ? samples : null;
    this.fadePos = 0;
  }

  _applyFade(out, n) {
    if (!this.fadeFrom) return;
    const from = this.fadeFrom;
    let i = 0;
    for (; i < n && this.fadePos < from.length; i++, this.fadePos++) {
      const w = (this.fadePos + 1) / (from.length + 1);
      out[i] = w * out[i] + (1 - w) * from[this.fadePos];
    }
    if (this.fadePos >= from.length) this.fadeFrom = null;
  }

  // A copy of the next n buffered samples (fewer if fewer are buffered), without consuming them.
  _peek(n) {
    const out = new Float32Array(Math.min(n, this.buffered));
    let got = 0;
    let offset = this.offset;
    for (const c of this.chunks) {
      if (got >= out.length) break;
      const take = Math.min(c.length - offset, out.length - got);
      out.set(c.subarray(offset, offset + take), got);
      got += take;
      offset = 0;
    }
    return out;
  }

  _skip(n) {
    let left = n;
    while (left > 0) {
      const take = Math.min(this.chunks[0].length - this.offset, left);
      this._advance(take);
      left -= take;
    }
    this.buffered -= n;
  }

  _advance(n) {
    this.offset += n;
    if (this.offset === this.chunks[0].length) {
      this.chunks.shift();
      this.offset = 0;
    }
  }
}
