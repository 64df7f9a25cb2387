// The two AudioWorklet processors, loaded with audioWorklet.addModule(). They run on the audio
// thread, so they only move samples and measure levels; encoding and decoding happen on the page.

import { JitterBuffer } from "./jitter.js";

const LEVEL_EVERY_S = 0.05; // 20 level/stat reports a second is enough for a meter

// Microphone: hands the page the mono input in chunks of chunkSamples (20 ms, one Opus frame), with
// the chunk's RMS level for the meter.
class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.chunkSamples = options.processorOptions.chunkSamples;
    this.chunk = new Float32Array(this.chunkSamples);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0][0]; // absent until the microphone's source is connected
    if (!input) return true;
    let at = 0;
    while (at < input.length) {
      const take = Math.min(input.length - at, this.chunkSamples - this.filled);
      this.chunk.set(input.subarray(at, at + take), this.filled);
      this.filled += take;
      at += take;
      if (this.filled === this.chunkSamples) {
        const samples = this.chunk;
        this.port.postMessage({ samples, level: rms(samples, samples.length) }, [samples.buffer]);
        this.chunk = new Float32Array(this.chunkSamples);
        this.filled = 0;
      }
    }
    return true;
  }
}

// Model's voice: plays decoded audio through the jitter buffer, and reports its level and counters.
class PlaybackProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.buffer = new JitterBuffer({ sampleRate, ...options.processorOptions });
    this.reportEvery = Math.round(LEVEL_EVERY_S * sampleRate);
    this.sinceReport = 0;
    this.sumSquares = 0;
    this.port.onmessage = ({ data }) => {
      if (data.samples) this.buffer.push(data.samples);
      else if (data.reset) this.buffer.reset();
    };
  }

  process(inputs, outputs) {
    const out = outputs[0];
    this.buffer.pull(out[0]);
    for (let c = 1; c < out.length; c++) out[c].set(out[0]);
    const n = out[0].length;
    this.sumSquares += rms(out[0], n) ** 2 * n;
    this.sinceReport += n;
    if (this.sinceReport >= this.reportEvery) {
      this.port.postMessage({
        level: Math.sqrt(this.sumSquares / this.sinceReport),
        bufferedSamples: this.buffer.buffered,
        startSamples: this.buffer.startSamples,
        ...this.buffer.stats,
      });
      this.sinceReport = 0;
      this.sumSquares = 0;
    }
    return true;
  }
}

function rms(samples, n) {
  let sum = 0;
  for (let i = 0; i < n; i++) sum += samples[i] * samples[i];
  return Math.sqrt(sum / n);
}

registerProcessor("moshivis-capture", CaptureProcessor);
registerProcessor("moshivis-playback", PlaybackProcessor);
