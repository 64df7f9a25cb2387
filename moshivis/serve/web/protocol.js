// Kyutai's /api/chat protocol as the MoshiVis web client speaks it: one WebSocket, every message
// binary, its first byte the kind. Pure functions (no DOM), checked by tests/web/protocol.test.mjs.

export const KIND = {
  HANDSHAKE: 0x00, // S->C, payload ignored (1 byte from Kyutai's Python server, 9 from the Rust ones)
  AUDIO: 0x01, // both ways: Ogg pages of Opus; page and message boundaries need not match
  TEXT: 0x02, // S->C: UTF-8 piece
  METADATA: 0x04, // S->C: UTF-8 JSON
  ERROR: 0x05, // S->C: UTF-8 reason, shown to the person
  PING: 0x06, // both ways, no payload; our server answers the page's ping with one
  COLORED_TEXT: 0x07, // S->C: colour byte 0..10 (how much the model looked at the image) + UTF-8
  IMAGE: 0x08, // C->S: the image file's bytes, the first message of a session
};

// The sampling parameters the vis web client sends, with its defaults and the ranges its controls
// allow (kyutai-labs/moshivis client/src/pages/Conversation/hooks/useModelParams.ts), in the order
// its buildURL puts them in the query. Seeds are drawn per session and follow pad_mult there.
export const PARAMS = [
  { name: "text_temperature", label: "Text temperature", value: 0.45, min: 0.2, max: 1.2, step: 0.01 },
  { name: "text_topk", label: "Text top-k", value: 25, min: 10, max: 500, step: 1 },
  { name: "audio_temperature", label: "Audio temperature", value: 0.7, min: 0.2, max: 1.2, step: 0.01 },
  { name: "audio_topk", label: "Audio top-k", value: 250, min: 10, max: 500, step: 1 },
  { name: "pad_mult", label: "Padding multiplier", value: 0, min: -4, max: 4, step: 0.05 },
  { name: "repetition_penalty_context", label: "Repetition penalty context", value: 64, min: 0, max: 200, step: 1 },
  { name: "repetition_penalty", label: "Repetition penalty", value: 1.15, min: 1, max: 2, step: 0.01 },
  { name: "image_resolution", label: "Image resolution (px)", value: 448, min: 160, max: 512, step: 16 },
  { name: "center_crop", label: "Center crop", value: false },
  { name: "xa_start", label: "Look at the image from step (xa_start)", value: 16, min: 0, max: 32, step: 1 },
];
const QUERY_ORDER = [
  "text_temperature", "text_topk", "audio_temperature", "audio_topk", "pad_mult", "text_seed",
  "audio_seed", "repetition_penalty_context", "repetition_penalty", "image_resolution",
  "center_crop", "xa_start",
];

export const defaultParams = () => Object.fromEntries(PARAMS.map((p) => [p.name, p.value]));

// Checks values against PARAMS; throws naming the first bad parameter.
export function checkParams(values) {
  for (const p of PARAMS) {
    const v = values[p.name];
    if (typeof p.value === "boolean") {
      if (typeof v !== "boolean") throw new Error(`${p.name} must be true or false, got ${v}`);
    } else if (typeof v !== "number" || !Number.isFinite(v) || v < p.min || v > p.max) {
      throw new Error(`${p.name} must be a number in [${p.min}, ${p.max}], got ${v}`);
    } else if (p.step === 1 && !Number.isInteger(v)) {
      throw new Error(`${p.name} must be a whole number, got ${v}`);
    }
  }
  return values;
}

// ws(s)://<page host>/api/chat?<query>: wss when the page came over https (browsers allow the
// microphone only on https or localhost, and an https page may not open a plain ws socket).
export function chatURL(location, values, { textSeed, audioSeed }) {
  checkParams(values);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = new URL(`${scheme}//${location.host}/api/chat`);
  const all = { ...values, text_seed: textSeed, audio_seed: audioSeed };
  for (const name of QUERY_ORDER) url.searchParams.append(name, String(all[name]));
  return url.toString();
}

export const randomSeed = () => Math.round(1000000 * Math.random());

function withKind(kind, payload) {
  const msg = new Uint8Array(1 + payload.length);
  msg[0] = kind;
  msg.set(payload, 1);
  return msg;
}
export const imageMessage = (fileBytes) => withKind(KIND.IMAGE, fileBytes);
export const audioMessage = (oggBytes) => withKind(KIND.AUDIO, oggBytes);
export const pingMessage = () => new Uint8Array([KIND.PING]);

// A server message as { kind, ... }; unknown kinds come back as { kind: "unknown", byte } so the
// page can count and skip them (the protocol says to discard them).
const utf8 = new TextDecoder("utf-8");
export function parseServerMessage(data) {
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  if (bytes.length === 0) return { kind: "empty" };
  const payload = bytes.subarray(1);
  switch (bytes[0]) {
    case KIND.HANDSHAKE: return { kind: "handshake" };
    case KIND.AUDIO: return { kind: "audio", data: payload };
    case KIND.TEXT: return { kind: "text", text: utf8.decode(payload), color: null };
    case KIND.COLORED_TEXT:
      if (payload.length === 0) return { kind: "unknown", byte: bytes[0] };
      return { kind: "text", text: utf8.decode(payload.subarray(1)), color: Math.min(payload[0], 10) };
    case KIND.METADATA: return { kind: "metadata", json: utf8.decode(payload) };
    case KIND.ERROR: return { kind: "error", text: utf8.decode(payload) };
    case KIND.PING: return { kind: "ping" };
    default: return { kind: "unknown", byte: bytes[0] };
  }
}
