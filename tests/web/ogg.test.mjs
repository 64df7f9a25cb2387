// The page's Ogg/Opus framing (moshivis/serve/web/ogg.js) against independent references: the CRC
// catalogue's check value, RFC 3533/7845/6716 layouts, and a stream written by sphn (the Opus/Ogg
// library Kyutai's servers and ours use; fixtures/make_sphn_fixture.py made it).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  oggCrc32, oggPage, OggReader, OggOpusWriter, opusHead, parseOpusHead, opusTags,
  isOpusHead, isOpusTags, opusPacketSamples,
} from "../../moshivis/serve/web/ogg.js";
import { seededRandom, fixtureBytes, fixtureJSON, splitPages } from "./helpers.mjs";

const sphnStream = fixtureBytes("sphn-24k.ogg");
const sphnMeta = fixtureJSON("sphn-24k.json");
const sphnPages = splitPages(sphnStream);
const ascii = (s) => new TextEncoder().encode(s);

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

// A page laid out by hand from the RFC, for streams sphn does not write (continued packets).
function handPage({ flags = 0, granule = -1, serial = 7, sequence, lacing, body }) {
  const page = new Uint8Array(27 + lacing.length + body.length);
  const view = new DataView(page.buffer);
  page.set(ascii("OggS"));
  page[5] = flags;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial, true);
  view.setUint32(18, sequence, true);
  page[26] = lacing.length;
  page.set(lacing, 27);
  page.set(body, 27 + lacing.length);
  view.setUint32(22, oggCrc32(page), true);
  return page;
}

// Opus TOC bytes (plus the frame-count byte of code 3) and the 48 kHz samples RFC 6716 section 3.1
// gives them.
const toc = (config, code) => (config << 3) | code;
const TOC_CASES = [
  [[toc(0, 0)], 480], // SILK NB 10 ms
  [[toc(3, 0)], 2880], // SILK NB 60 ms
  [[toc(9, 0)], 960], // SILK WB 20 ms
  [[toc(13, 0)], 960], // hybrid SWB 20 ms (what Chrome's encoder makes for speech)
  [[toc(14, 0)], 480], // hybrid FB 10 ms
  [[toc(16, 0)], 120], // CELT NB 2.5 ms
  [[toc(31, 0)], 960], // CELT FB 20 ms
  [[toc(31, 1), 0], 1920], // code 1: two frames
  [[toc(11, 2), 0], 5760], // code 2: two 60 ms frames
  [[toc(16, 3), 48], 5760], // code 3: 48 frames of 2.5 ms = 120 ms, the most a packet holds
  [[toc(19, 3), 0x80 | 3], 2880], // code 3, VBR flag set: frame count is the low 6 bits
];

function randomBytes(rand, n) {
  return Uint8Array.from({ length: n }, () => rand.int(0, 255));
}

test("CRC: the catalogue check value, and every checksum sphn wrote", () => {
  // reveng's CRC-32/CKSUM (poly 04c11db7, init 0, not reflected) has check 0x765e7680 with
  // xorout 0xffffffff; Ogg uses no xorout, so its check is 0x765e7680 ^ 0xffffffff.
  assert.equal(oggCrc32(ascii("123456789")), (0x765e7680 ^ 0xffffffff) >>> 0);
  for (const p of sphnPages) {
    const zeroed = p.bytes.slice();
    zeroed.fill(0, 22, 26);
    assert.equal(oggCrc32(zeroed), p.crc, `page ${p.sequence}`);
  }
});

test("reader: sphn's stream gives OpusHead, OpusTags and 25 packets of 40 ms with sphn's granules", () => {
  const packets = new OggReader().push(sphnStream);
  assert.equal(packets.length, sphnPages.length); // sphn writes one packet per page
  // docs/KYUTAI-PROTOCOL notes (sphn 0.2.1): version 1, mono, pre-skip 3840, input rate 48000.
  assert.deepEqual(parseOpusHead(packets[0].data),
    { version: 1, channels: 1, preSkip: 3840, inputRate: 48000, outputGain: 0, mappingFamily: 0 });
  assert.ok(packets[0].bos && isOpusHead(packets[0].data));
  assert.ok(isOpusTags(packets[1].data) && !packets[1].bos);
  const audio = packets.slice(2);
  audio.forEach((p, k) => {
    assert.deepEqual(p.data, sphnPages[k + 2].body, `packet ${k} bytes`);
    assert.equal(opusPacketSamples(p.data), 1920, `packet ${k}: 40 ms at 48 kHz`);
    assert.equal(p.granule, 1920 * (k + 1), `page granule ${k}`);
    assert.equal(p.sequence, k + 2);
  });
  // 24 kHz samples in = 48 kHz samples out / 2: the packets cover exactly the audio sphn was given.
  assert.equal(audio.reduce((n, p) => n + opusPacketSamples(p.data), 0), 2 * sphnMeta.samples_in);
});

test("reader: the server's message boundaries, and random splits of the stream", () => {
  // Fed call by call, as the server sends each append_pcm result as one 0x01 message.
  const reader = new OggReader();
  let at = 0;
  const counts = sphnMeta.append_pcm_byte_lengths.map((len) => {
    const n = reader.push(sphnStream.subarray(at, at + len)).length;
    at += len;
    return n;
  });
  assert.equal(at, sphnStream.length);
  const pagesPerCall = sphnMeta.append_pcm_byte_lengths.map(() => 0);
  let end = 0;
  let call = 0;
  for (const p of sphnPages) {
    end += p.bytes.length;
    while (end > sphnMeta.append_pcm_byte_lengths.slice(0, call + 1).reduce((a, b) => a + b, 0)) call++;
    pagesPerCall[call]++;
  }
  assert.deepEqual(counts, pagesPerCall);

  const rand = seededRandom();
  for (let trial = 0; trial < 20; trial++) {
    const r = new OggReader();
    const got = [];
    for (let i = 0; i < sphnStream.length;) {
      const n = rand.int(1, trial < 10 ? 8 : 700);
      got.push(...r.push(sphnStream.subarray(i, i + n)));
      i += n;
    }
    assert.equal(got.length, sphnPages.length, `seed ${rand.seed}`);
    got.forEach((p, k) => assert.deepEqual(p.data, sphnPages[k].body, `seed ${rand.seed} packet ${k}`));
    assert.deepEqual(r.stats, { pages: 27, packets: 27, crcErrors: 0, skippedBytes: 0, lostPackets: 0 });
  }
});

test("reader: resyncs after garbage and a damaged page, dropping only that page's packet", () => {
  const rand = seededRandom();
  const garbage = randomBytes(rand, rand.int(1, 300));
  const damaged = rand.int(2, sphnPages.length - 1);
  const pages = sphnPages.map((p, k) => {
    if (k !== damaged) return p.bytes;
    const copy = p.bytes.slice();
    copy[27 + p.lacing.length + rand.int(0, p.body.length - 1)] ^= 1 << rand.int(0, 7);
    return copy;
  });
  const r = new OggReader();
  const got = r.push(concat([garbage, ...pages]));
  const want = sphnPages.filter((_, k) => k !== damaged).map((p) => p.body);
  assert.deepEqual(got.map((p) => p.data), want, `seed ${rand.seed}`);
  assert.equal(r.stats.crcErrors, 1 + (String.fromCharCode(...garbage).match(/OggS/g)?.length ?? 0));
  // The sequence gap left by the damaged page drops nothing else: no packet spanned it.
  assert.equal(r.stats.lostPackets, 0);
});

test("reader: packets across pages, 255-byte packets, and a lost continuation", () => {
  const rand = seededRandom();
  const A = randomBytes(rand, 600); // laced 255, 255 | 90: goes on into the second page
  const B = randomBytes(rand, 255); // exactly 255: laced 255, 0
  const C = randomBytes(rand, 10);
  const p0 = handPage({ sequence: 0, flags: 0x02, lacing: [255, 255], body: A.subarray(0, 510) });
  const p1 = handPage({ sequence: 1, flags: 0x01, granule: 960, lacing: [90, 255, 0, 10],
    body: concat([A.subarray(510), B, C]) });
  const p2 = handPage({ sequence: 2, flags: 0x04, granule: 1920, lacing: [0], body: new Uint8Array() });

  const whole = new OggReader().push(concat([p0, p1, p2]));
  assert.deepEqual(whole.map((p) => p.data), [A, B, C, new Uint8Array()]);
  assert.deepEqual(whole.map((p) => [p.granule, p.sequence, p.eos]), [[960, 1, false], [960, 1, false], [960, 1, false], [1920, 2, true]]);

  // Without the first page, the rest of A cannot be used; B and C still can.
  const r = new OggReader();
  const partial = r.push(concat([p1, p2]));
  assert.deepEqual(partial.map((p) => p.data), [B, C, new Uint8Array()]);
  assert.equal(r.stats.lostPackets, 1);

  // A packet over three pages whose middle page is lost is dropped, not glued together.
  const D = randomBytes(rand, 255 * 4 + 20);
  const q0 = handPage({ sequence: 0, lacing: [255, 255], body: D.subarray(0, 510) });
  const q1 = handPage({ sequence: 1, flags: 0x01, lacing: [255, 255], body: D.subarray(510, 1020) });
  const q2 = handPage({ sequence: 2, flags: 0x01, granule: 960, lacing: [20, 10], body: concat([D.subarray(1020), C]) });
  assert.deepEqual(new OggReader().push(concat([q0, q1, q2])).map((p) => p.data), [D, C]);
  const gap = new OggReader();
  assert.deepEqual(gap.push(concat([q0, q2])).map((p) => p.data), [C]);
  assert.equal(gap.stats.lostPackets, 1);
  const bad = q1.slice();
  bad[100] ^= 0x10; // the checksum no longer matches: the same loss, counted once
  const damaged = new OggReader();
  assert.deepEqual(damaged.push(concat([q0, bad, q2])).map((p) => p.data), [C]);
  assert.deepEqual([damaged.stats.lostPackets, damaged.stats.crcErrors], [1, 1]);

  // A packet over maxPacketBytes is dropped and counted; the next one comes through.
  const small = new OggReader({ maxPacketBytes: 500 });
  assert.deepEqual(small.push(concat([p0, p1])).map((p) => p.data), [B, C]);
  assert.equal(small.stats.lostPackets, 1);
});

test("writer: oggPage rebuilds sphn's pages byte for byte", () => {
  for (const p of sphnPages) {
    const built = oggPage({
      packets: [p.body], granule: BigInt(p.granule), serial: p.serial, sequence: p.sequence,
      bos: (p.flags & 0x02) !== 0,
    });
    assert.deepEqual(built, p.bytes, `page ${p.sequence}`);
  }
  // And sphn's OpusHead packet is the one opusHead() writes for the same fields.
  assert.deepEqual(opusHead({ channels: 1, preSkip: 3840, inputRate: 48000 }), sphnPages[0].body);
  assert.throws(() => oggPage({ packets: [new Uint8Array(255 * 255)], granule: 0n, serial: 1, sequence: 0 }),
    /256 lacing segments.*at most 255/);
});

test("writer: OggOpusWriter's headers and 40 ms pages follow RFC 7845", () => {
  const rand = seededRandom();
  const serial = rand.int(0, 2 ** 32 - 1);
  const preSkip = rand.int(0, 5000);
  const w = new OggOpusWriter({ serial, preSkip, inputRate: 48000, packetsPerPage: 2, vendor: "test vendor" });
  // Packets of random durations (TOC bytes from the RFC table) and sizes.
  const kinds = Array.from({ length: 2 * rand.int(3, 20) + 1 }, () => TOC_CASES[rand.int(0, TOC_CASES.length - 1)]);
  const packets = kinds.map(([tocBytes]) => concat([Uint8Array.from(tocBytes), randomBytes(rand, rand.int(1, 400))]));
  const endOf = (n) => kinds.slice(0, n).reduce((sum, [, samples]) => sum + samples, 0);
  const out = [w.headers()];
  for (const p of packets) { const page = w.add(p); if (page) out.push(page); }
  out.push(w.flush());
  assert.equal(w.flush(), null);

  const pages = splitPages(concat(out));
  assert.equal(pages.length, 2 + Math.ceil(packets.length / 2), `seed ${rand.seed}`);
  pages.forEach((p, k) => {
    assert.equal(p.serial, serial);
    assert.equal(p.sequence, k);
    assert.equal(p.flags, k === 0 ? 0x02 : 0x00, `page ${k} flags`);
    const zeroed = p.bytes.slice();
    zeroed.fill(0, 22, 26);
    assert.equal(oggCrc32(zeroed), p.crc);
  });
  // OpusHead, RFC 7845 section 5.1, field by field; OpusTags, section 5.2.
  const head = pages[0].body;
  const hv = new DataView(head.buffer, head.byteOffset);
  assert.equal(String.fromCharCode(...head.subarray(0, 8)), "OpusHead");
  assert.deepEqual([head.length, head[8], head[9], hv.getUint16(10, true), hv.getUint32(12, true), hv.getInt16(16, true), head[18]],
    [19, 1, 1, preSkip, 48000, 0, 0]);
  assert.equal(pages[0].granule, 0);
  assert.deepEqual(pages[1].body, concat([ascii("OpusTags"), new Uint8Array([11, 0, 0, 0]), ascii("test vendor"), new Uint8Array(4)]));
  assert.deepEqual(opusTags("test vendor"), pages[1].body);
  assert.equal(pages[1].granule, 0);
  // Audio pages: two packets each (the last one may hold one), laced per RFC 3533, and a granule
  // position of all 48 kHz samples so far (pre-skip included).
  pages.slice(2).forEach((p, k) => {
    const mine = packets.slice(2 * k, 2 * k + 2);
    assert.deepEqual(p.body, concat(mine));
    assert.deepEqual(p.lacing, mine.flatMap((q) => [...Array(Math.floor(q.length / 255)).fill(255), q.length % 255]));
    assert.equal(p.granule, endOf(Math.min(2 * k + 2, packets.length)), `seed ${rand.seed} page ${k}`);
  });
  assert.throws(() => w.headers(), /headers\(\) must come first/);
});

test("opusPacketSamples: durations from the TOC byte (RFC 6716 section 3.1)", () => {
  for (const [bytes, samples] of TOC_CASES) assert.equal(opusPacketSamples(Uint8Array.from(bytes)), samples, `TOC ${bytes}`);
  assert.throws(() => opusPacketSamples(new Uint8Array()), /empty Opus packet/);
  assert.throws(() => opusPacketSamples(Uint8Array.from([toc(16, 3)])), /code 3/);
});
