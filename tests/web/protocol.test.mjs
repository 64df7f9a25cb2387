// The page's /api/chat messages (moshivis/serve/web/protocol.js) against Kyutai's protocol as
// /work/shared/notes/KYUTAI-PROTOCOL.md records it from kyutai-labs/moshi and kyutai-labs/moshivis.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  KIND, PARAMS, defaultParams, checkParams, chatURL, imageMessage, audioMessage, pingMessage,
  parseServerMessage,
} from "../../moshivis/serve/web/protocol.js";
import { seededRandom } from "./helpers.mjs";

const utf8 = (s) => new TextEncoder().encode(s);
const msg = (kind, ...payload) => Uint8Array.from([kind, ...payload]);

test("the URL: same host, /api/chat, ws or wss, the vis client's query in its order", () => {
  const seeds = { textSeed: 123, audioSeed: 456789 };
  const url = chatURL({ protocol: "http:", host: "127.0.0.1:8998" }, defaultParams(), seeds);
  // Kyutai's vis web defaults (useModelParams.ts) and buildURL's order.
  assert.equal(url, "ws://127.0.0.1:8998/api/chat?text_temperature=0.45&text_topk=25" +
    "&audio_temperature=0.7&audio_topk=250&pad_mult=0&text_seed=123&audio_seed=456789" +
    "&repetition_penalty_context=64&repetition_penalty=1.15&image_resolution=448" +
    "&center_crop=false&xa_start=16");
  const secure = new URL(chatURL({ protocol: "https:", host: "example.org" }, defaultParams(), seeds));
  assert.equal(secure.protocol, "wss:");
  assert.equal(secure.host, "example.org");
  assert.equal(secure.pathname, "/api/chat");
});

test("parameters: every value in range passes, each out-of-range one is named", () => {
  const rand = seededRandom();
  for (let trial = 0; trial < 50; trial++) {
    const values = Object.fromEntries(PARAMS.map((p) => [p.name, typeof p.value === "boolean"
      ? rand() < 0.5
      : p.min + p.step * rand.int(0, Math.round((p.max - p.min) / p.step))]));
    // Steps of 0.01 leave float dust (0.2 + 0.01 * 37); the browser's range input does the same.
    for (const p of PARAMS) if (typeof values[p.name] === "number") values[p.name] = Math.min(p.max, values[p.name]);
    assert.equal(checkParams(values), values, `seed ${rand.seed}`);
    const url = new URL(chatURL({ protocol: "http:", host: "h" }, values, { textSeed: 1, audioSeed: 2 }));
    for (const p of PARAMS) assert.equal(url.searchParams.get(p.name), String(values[p.name]), p.name);
  }
  for (const p of PARAMS) {
    const bad = typeof p.value === "boolean" ? "yes" : p.max + (p.step ?? 1);
    assert.throws(() => checkParams({ ...defaultParams(), [p.name]: bad }), new RegExp(`^Error: ${p.name} must`));
  }
  assert.throws(() => checkParams({ ...defaultParams(), text_topk: 25.5 }), /text_topk must be a whole number/);
  assert.throws(() => checkParams({ ...defaultParams(), xa_start: NaN }), /xa_start must be a number/);
});

test("client messages: kind byte, then the payload untouched", () => {
  const rand = seededRandom();
  const file = Uint8Array.from({ length: rand.int(1, 5000) }, () => rand.int(0, 255));
  assert.deepEqual(imageMessage(file), Uint8Array.from([0x08, ...file]));
  assert.deepEqual(audioMessage(file), Uint8Array.from([0x01, ...file]));
  assert.deepEqual(pingMessage(), Uint8Array.from([0x06]));
});

test("server messages: every kind the servers send, and unknown ones set aside", () => {
  assert.deepEqual(parseServerMessage(msg(0x00)), { kind: "handshake" }); // Kyutai's Python server
  assert.deepEqual(parseServerMessage(msg(0x00, 0, 0, 0, 0, 0, 0, 0, 0)), { kind: "handshake" }); // Rust: +8 bytes
  const page = Uint8Array.from([0x4f, 0x67, 0x67, 0x53, 1, 2, 3]);
  const audio = parseServerMessage(msg(0x01, ...page));
  assert.equal(audio.kind, "audio");
  assert.deepEqual(audio.data, page);
  assert.deepEqual(parseServerMessage(msg(0x02, ...utf8(" héllo"))), { kind: "text", text: " héllo", color: null });
  for (let c = 0; c <= 10; c++) {
    assert.deepEqual(parseServerMessage(msg(0x07, c, ...utf8(" 猫"))), { kind: "text", text: " 猫", color: c });
  }
  assert.equal(parseServerMessage(msg(0x07, 200, ...utf8("x"))).color, 10, "colours above 10 are shown as 10");
  assert.deepEqual(parseServerMessage(msg(0x04, ...utf8('{"a":1}'))), { kind: "metadata", json: '{"a":1}' });
  assert.deepEqual(parseServerMessage(msg(0x05, ...utf8("server full"))), { kind: "error", text: "server full" });
  assert.deepEqual(parseServerMessage(msg(0x06)), { kind: "ping" });
  assert.deepEqual(parseServerMessage(msg(0x09, 1)), { kind: "unknown", byte: 0x09 });
  assert.deepEqual(parseServerMessage(msg(0x07)), { kind: "unknown", byte: 0x07 }, "0x07 without its colour byte");
  assert.deepEqual(parseServerMessage(new Uint8Array()), { kind: "empty" });
  // The socket hands the page ArrayBuffers.
  assert.deepEqual(parseServerMessage(msg(0x05, ...utf8("x")).buffer), { kind: "error", text: "x" });
  assert.deepEqual(Object.values(KIND), [0, 1, 2, 4, 5, 6, 7, 8]);
});
