// Ogg framing (RFC 3533) for Opus (RFC 7845): what the page needs to send and receive audio.
//
// The server speaks Opus in Ogg pages, and its page boundaries are not tied to WebSocket message
// boundaries, so the reader below is a byte-stream reader: push whatever arrives, get whole packets.
// The writer builds the pages the microphone's Opus packets travel in. Nothing here touches the DOM,
// so node's test runner checks it (tests/web/ogg.test.mjs).

const CAPTURE = [0x4f, 0x67, 0x67, 0x53]; // "OggS"
const HEADER_BYTES = 27;
const FLAG_CONTINUED = 0x01;
const FLAG_BOS = 0x02;
const FLAG_EOS = 0x04;
const MAX_SEGMENTS = 255;

// CRC-32 as Ogg defines it: polynomial 0x04c11db7, MSB first, initial value 0, no final xor
// (not zlib's reflected CRC). Table-driven, one byte at a time.
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let r = i << 24;
    for (let bit = 0; bit < 8; bit++) r = r & 0x80000000 ? (r << 1) ^ 0x04c11db7 : r << 1;
    table[i] = r >>> 0;
  }
  return table;
})();

export function oggCrc32(bytes, crc = 0) {
  for (let i = 0; i < bytes.length; i++) {
    crc = ((crc << 8) ^ CRC_TABLE[((crc >>> 24) ^ bytes[i]) & 0xff]) >>> 0;
  }
  return crc >>> 0;
}

// One Ogg page holding whole packets (the writer never splits a packet across pages). granule is
// a BigInt (64-bit). We never end a stream with an EOS page: the socket's close ends it.
export function oggPage({ packets, granule, serial, sequence, bos = false }) {
  const lacing = [];
  for (const p of packets) {
    // A packet of L bytes is laced as floor(L/255) segments of 255 and one of L % 255 (possibly 0).
    for (let left = p.length; ; left -= 255) {
      lacing.push(Math.min(left, 255));
      if (left < 255) break;
    }
  }
  if (lacing.length > MAX_SEGMENTS) {
    throw new Error(`ogg page: ${lacing.length} lacing segments for packets of ` +
      `${packets.map((p) => p.length).join("+")} bytes; a page holds at most ${MAX_SEGMENTS}`);
  }
  const body = packets.reduce((n, p) => n + p.length, 0);
  const page = new Uint8Array(HEADER_BYTES + lacing.length + body);
  const view = new DataView(page.buffer);
  page.set(CAPTURE, 0);
  page[4] = 0; // stream structure version
  page[5] = bos ? FLAG_BOS : 0;
  view.setBigInt64(6, BigInt(granule), true);
  view.setUint32(14, serial >>> 0, true);
  view.setUint32(18, sequence >>> 0, true);
  page[26] = lacing.length;
  page.set(lacing, HEADER_BYTES);
  let at = HEADER_BYTES + lacing.length;
  for (const p of packets) { page.set(p, at); at += p.length; }
  view.setUint32(22, oggCrc32(page), true); // the checksum field is zero while the CRC runs
  return page;
}

// Streaming Ogg reader: push(bytes) returns the packets completed by those bytes, in order, as
// { data, granule, bos, eos, serial, sequence }, where the page fields are those of the page the
// packet ends on (granule is a Number; -1 on a page where no packet ends). A page with a bad checksum
// is skipped and the reader resyncs on the next "OggS"; a packet whose start or end was lost (bad page,
// sequence gap) is dropped. All of it is counted in stats. Memory stays bounded: a page is at most
// 27 + 255 + 255 * 255 bytes, and a packet at most maxPacketBytes.
export class OggReader {
  constructor({ maxPacketBytes = 1 << 20 } = {}) {
    this.maxPacketBytes = maxPacketBytes;
    this.buf = new Uint8Array(1 << 16);
    this.start = 0; // first unread byte in buf
    this.end = 0; // one past the last byte in buf
    this.partial = []; // pieces of a packet that goes on in the next page
    this.partialBytes = 0;
    this.discard = false; // drop pieces until the current packet ends (its start was lost)
    this.nextSequence = null;
    this.stats = { pages: 0, packets: 0, crcErrors: 0, skippedBytes: 0, lostPackets: 0 };
  }

  push(bytes) {
    this._append(bytes);
    const packets = [];
    for (let page = this._nextPage(); page !== null; page = this._nextPage()) {
      this._readPage(page, packets);
    }
    return packets;
  }

  _append(bytes) {
    if (this.end + bytes.length > this.buf.length) {
      const unread = this.buf.subarray(this.start, this.end);
      const need = unread.length + bytes.length;
      if (need > this.buf.length) {
        const grown = new Uint8Array(Math.max(need, 2 * this.buf.length));
        grown.set(unread);
        this.buf = grown;
      } else {
        this.buf.copyWithin(0, this.start, this.end);
      }
      this.end = unread.length;
      this.start = 0;
    }
    this.buf.set(bytes, this.end);
    this.end += bytes.length;
  }

  // The next whole page with a good checksum, or null when more bytes are needed.
  _nextPage() {
    const b = this.buf;
    for (;;) {
      const at = this._findCapture();
      if (at < 0 || this.end - at < HEADER_BYTES) return null;
      const nseg = b[at + 26];
      if (this.end - at < HEADER_BYTES + nseg) return null;
      let size = HEADER_BYTES + nseg;
      for (let i = 0; i < nseg; i++) size += b[at + HEADER_BYTES + i];
      if (this.end - at < size) return null;
      const page = b.slice(at, at + size);
      const view = new DataView(page.buffer);
      const stored = view.getUint32(22, true);
      view.setUint32(22, 0, true); // the checksum is computed with its own field zeroed
      if (page[4] === 0 && oggCrc32(page) === stored) {
        this.start = at + size;
        return { page, view, nseg };
      }
      // Not a page after all, or a damaged one: look for the next "OggS" one byte further on.
      this.stats.crcErrors++;
      this.stats.skippedBytes++;
      this.start = at + 1;
      this._breakContinuity();
    }
  }

  // Index of the next "OggS" at or after start, skipping (and counting) bytes before it; -1 when
  // there is none yet, keeping three trailing bytes that may begin a pattern split across pushes.
  _findCapture() {
    const b = this.buf;
    for (let i = this.start; i + 4 <= this.end; i++) {
      if (b[i] === CAPTURE[0] && b[i + 1] === CAPTURE[1] && b[i + 2] === CAPTURE[2] && b[i + 3] === CAPTURE[3]) {
        this.stats.skippedBytes += i - this.start;
        this.start = i;
        return i;
      }
    }
    const keep = Math.max(this.start, this.end - 3);
    this.stats.skippedBytes += keep - this.start;
    this.start = keep;
    return -1;
  }

  _readPage({ page, view, nseg }, out) {
    this.stats.pages++;
    const flags = page[5];
    const fields = {
      granule: Number(view.getBigInt64(6, true)),
      serial: view.getUint32(14, true),
      sequence: view.getUint32(18, true),
      bos: (flags & FLAG_BOS) !== 0,
      eos: (flags & FLAG_EOS) !== 0,
    };
    if (this.nextSequence !== null && fields.sequence !== this.nextSequence) this._breakContinuity();
    this.nextSequence = (fields.sequence + 1) >>> 0;
    if (flags & FLAG_CONTINUED) {
      // A packet that goes on from a page we never read: drop the rest of it.
      if (this.partialBytes === 0 && !this.discard) this.discard = true;
    } else {
      this._dropPartial(); // the previous page left a packet open that never ends
    }
    let at = HEADER_BYTES + nseg;
    let pieceStart = at;
    for (let i = 0; i < nseg; i++) {
      const lace = page[HEADER_BYTES + i];
      at += lace;
      if (lace === 255) continue; // a lacing value of 255 means the packet goes on
      this._addPiece(page.subarray(pieceStart, at));
      pieceStart = at;
      if (this.discard) {
        this.discard = false;
        this.stats.lostPackets++;
      } else {
        this.stats.packets++;
        out.push({ data: this._takePacket(), ...fields });
      }
    }
    if (pieceStart < at) this._addPiece(page.subarray(pieceStart, at)); // goes on in the next page
  }

  _addPiece(piece) {
    if (this.discard) return;
    if (this.partialBytes + piece.length > this.maxPacketBytes) {
      this.partial = [];
      this.partialBytes = 0;
      this.discard = true;
      return;
    }
    this.partial.push(piece);
    this.partialBytes += piece.length;
  }

  _takePacket() {
    const data = new Uint8Array(this.partialBytes);
    let at = 0;
    for (const p of this.partial) { data.set(p, at); at += p.length; }
    this.partial = [];
    this.partialBytes = 0;
    return data;
  }

  // A page is missing: the packet in progress cannot be completed, so drop the rest of it too.
  _breakContinuity() {
    if (this.partialBytes === 0) return;
    this.partial = [];
    this.partialBytes = 0;
    this.discard = true;
  }

  // Forget a packet that was left open (counted as lost, once).
  _dropPartial() {
    if (this.partialBytes > 0 || this.discard) this.stats.lostPackets++;
    this.partial = [];
    this.partialBytes = 0;
    this.discard = false;
  }
}

// ---- Opus in Ogg (RFC 7845) ----------------------------------------------------------------------

const ASCII = new TextEncoder();
const OPUS_HEAD = ASCII.encode("OpusHead");
const OPUS_TAGS = ASCII.encode("OpusTags");

function startsWith(bytes, magic) {
  return bytes.length >= magic.length && magic.every((c, i) => bytes[i] === c);
}
export const isOpusHead = (packet) => startsWith(packet, OPUS_HEAD);
export const isOpusTags = (packet) => startsWith(packet, OPUS_TAGS);

// The identification header. preSkip is in 48 kHz samples, whatever inputRate says (inputRate is
// only informative: an Opus stream decodes at any rate).
export function opusHead({ channels = 1, preSkip = 312, inputRate = 48000 } = {}) {
  const head = new Uint8Array(19);
  const view = new DataView(head.buffer);
  head.set(OPUS_HEAD, 0);
  head[8] = 1; // version
  head[9] = channels;
  view.setUint16(10, preSkip, true);
  view.setUint32(12, inputRate, true);
  view.setInt16(16, 0, true); // output gain
  head[18] = 0; // channel mapping family 0: mono or stereo, no mapping table
  return head;
}

export function parseOpusHead(packet) {
  if (!isOpusHead(packet) || packet.length < 19) throw new Error("not an OpusHead packet");
  const view = new DataView(packet.buffer, packet.byteOffset, packet.byteLength);
  return {
    version: packet[8],
    channels: packet[9],
    preSkip: view.getUint16(10, true),
    inputRate: view.getUint32(12, true),
    outputGain: view.getInt16(16, true),
    mappingFamily: packet[18],
  };
}

// The comment header: vendor string and no user comments.
export function opusTags(vendor = "moshivis web") {
  const v = ASCII.encode(vendor);
  const tags = new Uint8Array(8 + 4 + v.length + 4);
  const view = new DataView(tags.buffer);
  tags.set(OPUS_TAGS, 0);
  view.setUint32(8, v.length, true);
  tags.set(v, 12);
  view.setUint32(12 + v.length, 0, true);
  return tags;
}

// Samples (at 48 kHz) an Opus packet decodes to, from its TOC byte (RFC 6716 section 3.1):
// the configuration gives the frame duration, the code the number of frames.
const FRAME_48K = [
  480, 960, 1920, 2880, 480, 960, 1920, 2880, 480, 960, 1920, 2880, // SILK: 10/20/40/60 ms
  480, 960, 480, 960, // hybrid: 10/20 ms
  120, 240, 480, 960, 120, 240, 480, 960, 120, 240, 480, 960, 120, 240, 480, 960, // CELT: 2.5..20 ms
];
export function opusPacketSamples(packet) {
  if (packet.length === 0) throw new Error("empty Opus packet");
  const toc = packet[0];
  const code = toc & 3;
  let frames = code === 0 ? 1 : code === 3 ? -1 : 2;
  if (code === 3) {
    if (packet.length < 2) throw new Error("Opus packet with code 3 but no frame count byte");
    frames = packet[1] & 0x3f;
  }
  return FRAME_48K[toc >> 3] * frames;
}

// Puts Opus packets into Ogg pages: OpusHead and OpusTags on pages of their own, then
// packetsPerPage packets per page (2 x 20 ms = 40 ms pages, as Kyutai's web client sends), each page
// stamped with the granule position RFC 7845 asks for: all 48 kHz samples decoded up to the end of
// its last packet, pre-skip included.
export class OggOpusWriter {
  constructor({ serial = (Math.random() * 2 ** 32) >>> 0, channels = 1, preSkip = 312,
    inputRate = 48000, packetsPerPage = 2, vendor = "moshivis web" } = {}) {
    this.serial = serial;
    this.head = opusHead({ channels, preSkip, inputRate });
    this.tags = opusTags(vendor);
    this.packetsPerPage = packetsPerPage;
    this.sequence = 0;
    this.granule = 0n;
    this.pending = [];
  }

  // The two header pages, to send before any audio page.
  headers() {
    if (this.sequence !== 0) throw new Error("OggOpusWriter: headers() must come first, once");
    const head = this._page([this.head], 0n, true);
    const tags = this._page([this.tags], 0n, false);
    const both = new Uint8Array(head.length + tags.length);
    both.set(head, 0);
    both.set(tags, head.length);
    return both;
  }

  // Adds one packet; returns a page once packetsPerPage packets are waiting, else null.
  add(packet) {
    this.granule += BigInt(opusPacketSamples(packet));
    this.pending.push(packet);
    return this.pending.length >= this.packetsPerPage ? this.flush() : null;
  }

  // The page of the packets waiting, or null when none are.
  flush() {
    if (this.pending.length === 0) return null;
    const page = this._page(this.pending, this.granule, false);
    this.pending = [];
    return page;
  }

  _page(packets, granule, bos) {
    return oggPage({ packets, granule, serial: this.serial, sequence: this.sequence++, bos });
  }
}
