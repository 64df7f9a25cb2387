// Shared by the page's node tests: a seeded random source and a reader of the sphn fixture.
import { readFileSync } from "node:fs";
import { randomInt } from "node:crypto";

// mulberry32: small, seeded, good enough to draw test inputs. Each test draws a fresh seed and
// names it in its failure messages, so a failure can be replayed.
export function seededRandom(seed = randomInt(2 ** 31)) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
  next.seed = seed;
  next.int = (lo, hi) => lo + Math.floor(next() * (hi - lo + 1)); // inclusive
  return next;
}

const here = new URL("./fixtures/", import.meta.url);
export const fixtureBytes = (name) => new Uint8Array(readFileSync(new URL(name, here)));
export const fixtureJSON = (name) => JSON.parse(readFileSync(new URL(name, here), "utf8"));

// Splits an Ogg stream into pages by the layout RFC 3533 fixes (27-byte header, lacing table,
// body), independently of ogg.js: the tests compare ogg.js against this.
export function splitPages(bytes) {
  const pages = [];
  for (let at = 0; at < bytes.length;) {
    if (String.fromCharCode(...bytes.subarray(at, at + 4)) !== "OggS") throw new Error(`no page at ${at}`);
    const nseg = bytes[at + 26];
    const lacing = [...bytes.subarray(at + 27, at + 27 + nseg)];
    const size = 27 + nseg + lacing.reduce((a, b) => a + b, 0);
    const view = new DataView(bytes.buffer, bytes.byteOffset + at, size);
    pages.push({
      bytes: bytes.subarray(at, at + size),
      flags: bytes[at + 5],
      granule: Number(view.getBigInt64(6, true)),
      serial: view.getUint32(14, true),
      sequence: view.getUint32(18, true),
      crc: view.getUint32(22, true),
      lacing,
      body: bytes.subarray(at + 27 + nseg, at + size),
    });
    at += size;
  }
  return pages;
}
