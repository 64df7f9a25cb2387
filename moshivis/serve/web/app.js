// The MoshiVis page: choose a picture, connect, talk, hear the answer and read the transcript.
//
// Audio path, both ways Opus in Ogg (see ogg.js) over the /api/chat socket (see protocol.js):
//   microphone -> capture worklet (20 ms chunks) -> WebCodecs AudioEncoder -> OggOpusWriter -> 0x01
//   0x01 -> OggReader -> WebCodecs AudioDecoder -> playback worklet (jitter.js) -> speakers
// The whole page runs at 48 kHz: Opus decoders (Chrome's AudioDecoder included) give 48 kHz whatever
// rate the stream was made at, and the microphone usually is 48 kHz, so nothing is resampled here.
// The server decodes what we send at 24 kHz (any Opus stream decodes at any rate).

import {
  PARAMS, defaultParams, checkParams, chatURL, randomSeed,
  imageMessage, audioMessage, pingMessage, parseServerMessage,
} from "./protocol.js";
import { OggReader, OggOpusWriter, isOpusHead, isOpusTags, opusPacketSamples } from "./ogg.js";

const SAMPLE_RATE = 48000;
const FRAME_MS = 20; // one Opus packet; two per Ogg page (40 ms pages, as Kyutai's client sends)
const OPUS_BITRATE = 32000; // speech; sphn's stream from the server is about 33 kbit/s
const OPUS_PRE_SKIP = 312; // libopus' encoder delay (6.5 ms) in 48 kHz samples
const MAX_RAW_IMAGE_BYTES = 16 << 20; // our server's default image file limit (max_image_file_bytes)
const MAX_RAW_IMAGE_PIXELS = 1 << 24; // and its limit on decoded pixels (MAX_IMAGE_PIXELS)
const MAX_IMAGE_SIDE = 1024; // an image we re-encode (not JPEG/PNG, or too big) is shrunk to this
const HANDSHAKE_TIMEOUT_MS = 60000; // the server encodes the picture before its handshake
const SILENCE_TIMEOUT_MS = 10000; // a live server sends audio every 80 ms (Kyutai's client: 10 s too)
const PING_LOST_MS = 5000; // a ping not answered by then is counted lost, and another one sent
const MAX_SEND_BACKLOG = 64 << 10; // bytes stuck in the socket (~15 s of microphone) before giving up
const TICK_MS = 1000; // ping, /api/stats, timeouts
const MAX_TRANSCRIPT_PIECES = 5000;
const JITTER = { startMs: 100, maxStartMs: 240, stepMs: 20, headroomMs: 200, fadeMs: 3 };

const $ = (id) => document.getElementById(id);

// Transcript colours for the 0x07 colour byte, 0 (did not look at the picture) .. 10 (looked hard):
// from a quiet grey-blue to a vivid orange, readable on the dark background.
const COLORS = Array.from({ length: 11 }, (_, c) =>
  `hsl(${210 - 18.2 * c} ${15 + 7.5 * c}% ${74 - 1.4 * c}%)`);

// Counters for the person (the figures) and for tests (the browser test reads window.moshivisStats).
const stats = {};
window.moshivisStats = stats;
function resetStats() {
  Object.assign(stats, {
    state: "idle", imageBytesSent: 0, handshakeMs: null, audioMessagesSent: 0, audioBytesSent: 0,
    micSamplesEncoded: 0, audioMessagesReceived: 0, audioBytesReceived: 0, audioPacketsDecoded: 0,
    decodedSamples: 0, sampleRate: SAMPLE_RATE, playedSamples: 0, bufferedSamples: 0,
    starvedSamples: 0, underruns: 0, droppedSamples: 0, drops: 0, textPieces: 0, coloredPieces: 0,
    unknownMessages: 0, oggCrcErrors: 0, oggLostPackets: 0, badOpusPackets: 0, pingsSent: 0, pingsLost: 0,
    rttMs: null, rttMsMedian: null, frameMsP50: null, frameMsP99: null, activeStreams: null,
    maxStreams: null, statsError: null, errors: [], close: null,
  });
}
resetStats();
stats.sessions = 0;

// ---- state, errors ---------------------------------------------------------------------------------

function setState(state, text) {
  stats.state = state;
  $("state").dataset.state = state;
  $("state").textContent = text;
}

function showError(message) {
  stats.errors.push(message);
  const row = document.createElement("div");
  row.className = "error";
  const text = document.createElement("span");
  text.textContent = message;
  const close = document.createElement("button");
  close.type = "button";
  close.textContent = "×";
  close.setAttribute("aria-label", "Dismiss");
  close.onclick = () => row.remove();
  row.append(text, close);
  $("errors").append(row);
}

// ---- the picture -----------------------------------------------------------------------------------

let image = null; // { bytes, type, url }
let cameraStream = null;

function sniffImageType(b) {
  if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "image/jpeg";
  if ([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a].every((x, i) => b[i] === x)) return "image/png";
  return null;
}

// JPEG and PNG go as they are (the server decodes those); anything else the browser can read, or a
// file over the server's limits, is re-encoded as a JPEG no larger than MAX_IMAGE_SIDE (the model
// sees it at image_resolution <= 512 anyway). Decoding it here also catches a broken file early.
async function prepareImage(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  const type = sniffImageType(bytes);
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    throw new Error(`this browser cannot read it as an image (${blob.type || "unknown type"})`);
  }
  const tooBig = bytes.length > MAX_RAW_IMAGE_BYTES || bitmap.width * bitmap.height > MAX_RAW_IMAGE_PIXELS;
  if (type && !tooBig) {
    bitmap.close();
    return { bytes, type, note: "" };
  }
  const scale = Math.min(1, MAX_IMAGE_SIDE / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  bitmap.close();
  const jpeg = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
  const why = type ? `over ${MAX_RAW_IMAGE_BYTES >> 20} MiB or ${MAX_RAW_IMAGE_PIXELS >> 20} Mpixels` : blob.type || "not JPEG/PNG";
  return { bytes: new Uint8Array(await jpeg.arrayBuffer()), type: "image/jpeg", note: ` (re-encoded: ${why})` };
}

async function useImage(blob, origin) {
  try {
    const prepared = await prepareImage(blob);
    if (image) URL.revokeObjectURL(image.url);
    image = { ...prepared, url: URL.createObjectURL(new Blob([prepared.bytes], { type: prepared.type })) };
    $("preview").src = image.url;
    $("preview").hidden = false;
    $("drop-hint").hidden = true;
    const kib = (image.bytes.length / 1024).toFixed(0);
    $("image-info").textContent = `${origin}: ${kib} KiB ${image.type}${prepared.note}`;
  } catch (e) {
    showError(`Could not use that picture: ${e.message}`);
  }
  updateControls();
}

async function openCamera() {
  try {
    cameraStream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  } catch (e) {
    showError(`Camera: ${e.name}: ${e.message}`);
    return;
  }
  $("camera").srcObject = cameraStream;
  $("camera").hidden = false;
  $("preview").hidden = true;
  $("drop-hint").hidden = true;
  updateControls();
}

function closeCamera() {
  cameraStream?.getTracks().forEach((t) => t.stop());
  cameraStream = null;
  $("camera").srcObject = null;
  $("camera").hidden = true;
  $("preview").hidden = !image;
  $("drop-hint").hidden = !!image;
  updateControls();
}

async function snapCamera() {
  const video = $("camera");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
  closeCamera();
  if (!blob) showError("Camera: no picture yet, try again in a moment");
  else await useImage(blob, "Camera");
}

// ---- parameters ------------------------------------------------------------------------------------

function buildParamsForm() {
  const form = $("params");
  for (const p of PARAMS) {
    const label = document.createElement("label");
    label.htmlFor = `param-${p.name}`;
    label.textContent = p.label;
    const input = document.createElement("input");
    input.id = `param-${p.name}`;
    input.name = p.name;
    const shown = document.createElement("output");
    shown.htmlFor = input.id;
    if (typeof p.value === "boolean") {
      input.type = "checkbox";
      input.oninput = () => { shown.textContent = input.checked ? "on" : "off"; };
    } else {
      Object.assign(input, { type: "range", min: p.min, max: p.max, step: p.step });
      input.oninput = () => { shown.textContent = input.value; };
    }
    form.append(label, input, shown);
  }
  setParams(defaultParams());
}

function setParams(values) {
  for (const p of PARAMS) {
    const input = $(`param-${p.name}`);
    if (typeof p.value === "boolean") input.checked = values[p.name];
    else input.value = values[p.name];
    input.oninput();
  }
}

function readParams() {
  const values = {};
  for (const p of PARAMS) {
    const input = $(`param-${p.name}`);
    values[p.name] = typeof p.value === "boolean" ? input.checked : Number(input.value);
  }
  return checkParams(values);
}

// ---- the conversation ------------------------------------------------------------------------------

let session = null;

class Session {
  constructor(params, picture) {
    this.params = params;
    this.picture = picture;
    this.live = false; // the server's handshake has come
    this.ended = false;
    this.rtts = [];
    this.pingSentAt = null;
    this.statsInFlight = false;
    this.micTime = 0; // microseconds of microphone audio handed to the encoder
    this.decodeTime = 0; // microseconds of server audio handed to the decoder
    this.reader = new OggReader();
    this.writer = new OggOpusWriter({ inputRate: SAMPLE_RATE, preSkip: OPUS_PRE_SKIP, packetsPerPage: 2 });
  }

  async start() {
    setState("starting", "Starting the microphone…");
    if (!window.isSecureContext) {
      throw new Error("the microphone needs a secure page: open it over https (or on http://localhost)");
    }
    if (typeof AudioEncoder === "undefined" || typeof AudioDecoder === "undefined") {
      throw new Error("this browser has no WebCodecs audio (AudioEncoder/AudioDecoder); use a recent Chrome, Edge or Firefox");
    }
    // Created in the Connect click, so the browser lets it play.
    this.ctx = new AudioContext({ sampleRate: SAMPLE_RATE, latencyHint: "interactive" });
    await this.ctx.audioWorklet.addModule(new URL("./worklets.js", import.meta.url));
    this.checkNotEnded();
    this.playback = new AudioWorkletNode(this.ctx, "moshivis-playback", {
      numberOfInputs: 0, outputChannelCount: [1], processorOptions: JITTER,
    });
    this.playback.port.onmessage = ({ data }) => this.onPlaybackStats(data);
    this.playback.connect(this.ctx.destination);

    this.mic = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    this.checkNotEnded();
    this.capture = new AudioWorkletNode(this.ctx, "moshivis-capture", {
      numberOfOutputs: 0, channelCount: 1, channelCountMode: "explicit",
      processorOptions: { chunkSamples: (SAMPLE_RATE * FRAME_MS) / 1000 },
    });
    this.capture.port.onmessage = ({ data }) => this.onMicChunk(data);
    this.ctx.createMediaStreamSource(this.mic).connect(this.capture);
    await this.ctx.resume();
    this.checkNotEnded();

    const encoderConfig = {
      codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1, bitrate: OPUS_BITRATE,
      opus: { frameDuration: FRAME_MS * 1000, application: "audio" },
    };
    if (!(await AudioEncoder.isConfigSupported(encoderConfig)).supported) {
      throw new Error("this browser cannot encode Opus at 48 kHz mono");
    }
    this.checkNotEnded();
    this.encoder = new AudioEncoder({
      output: (chunk) => this.onEncoded(chunk),
      error: (e) => this.fail(`Audio encoder: ${e.message}`),
    });
    this.encoder.configure(encoderConfig);
    this.decoder = new AudioDecoder({
      output: (data) => this.onDecoded(data),
      error: (e) => this.fail(`Audio decoder: ${e.message}`),
    });
    this.decoder.configure({ codec: "opus", sampleRate: SAMPLE_RATE, numberOfChannels: 1 });

    setState("waiting", "Connecting…");
    const url = chatURL(window.location, this.params, { textSeed: randomSeed(), audioSeed: randomSeed() });
    this.ws = new WebSocket(url);
    this.ws.binaryType = "arraybuffer";
    this.ws.onopen = () => this.onOpen();
    this.ws.onmessage = (ev) => this.onMessage(ev.data);
    this.ws.onerror = () => { this.socketError = true; };
    this.ws.onclose = (ev) => this.onClose(ev);
    this.openedAt = performance.now();
    this.tick = setInterval(() => this.onTick(), TICK_MS);
  }

  // Disconnect may be pressed while start() awaits the browser (the microphone prompt, say).
  checkNotEnded() {
    if (!this.ended) return;
    this.mic?.getTracks().forEach((t) => t.stop()); // may have come after end() ran
    throw new Error("ended while starting");
  }

  onOpen() {
    // The picture is the first message, sent without waiting: the server answers with its
    // handshake once it has encoded the picture.
    this.ws.send(imageMessage(this.picture.bytes));
    stats.imageBytesSent = this.picture.bytes.length;
    this.lastMessageAt = performance.now();
    setState("waiting", "Waiting for the server to look at the picture…");
  }

  onMessage(data) {
    this.lastMessageAt = performance.now();
    const msg = parseServerMessage(data);
    switch (msg.kind) {
      case "handshake":
        if (this.live) break;
        this.live = true;
        stats.handshakeMs = Math.round(performance.now() - this.openedAt);
        setState("live", "Live: talk to it");
        this.sendAudio(this.writer.headers()); // OpusHead + OpusTags, then audio pages follow
        break;
      case "audio": this.onAudio(msg.data); break;
      case "text": addTranscript(msg.text, msg.color); break;
      case "error":
        this.serverError = msg.text;
        showError(`Server: ${msg.text}`);
        break;
      case "ping": this.onPong(); break;
      case "metadata": showServerInfo(msg.json); break;
      default:
        stats.unknownMessages++; // the protocol says to skip kinds we do not know
    }
  }

  onClose(ev) {
    if (this.ended) return;
    stats.close = { code: ev.code, reason: ev.reason, byUser: false };
    const reason = ev.reason ? `: ${ev.reason}` : "";
    if (this.serverError) {
      this.end("error", "Closed by the server"); // its reason is on the page already
    } else if (!this.live) {
      const what = this.socketError ? "Could not reach the server" : "The server closed the connection before the conversation started";
      showError(`${what} (WebSocket code ${ev.code}${reason})`);
      this.end("error", "Not connected");
    } else if (ev.code !== 1000) {
      showError(`The connection broke (WebSocket code ${ev.code}${reason})`);
      this.end("error", "Disconnected");
    } else {
      this.end("closed", `The server ended the conversation${reason}`);
    }
  }

  onTick() {
    const now = performance.now();
    if (!this.live && now - this.openedAt > HANDSHAKE_TIMEOUT_MS) {
      return this.fail(`No answer from the server within ${HANDSHAKE_TIMEOUT_MS / 1000} s`);
    }
    if (this.live && now - this.lastMessageAt > SILENCE_TIMEOUT_MS) {
      return this.fail(`The server sent nothing for ${SILENCE_TIMEOUT_MS / 1000} s`);
    }
    if (this.live) this.ping(now);
    this.pollServerStats();
    showFigures();
  }

  // Round trip: our server answers each 0x06 with a 0x06; one ping is in flight at a time.
  ping(now) {
    if (this.ws.readyState !== WebSocket.OPEN) return; // closing: the close event is on its way
    if (this.pingSentAt !== null && now - this.pingSentAt < PING_LOST_MS) return;
    if (this.pingSentAt !== null) stats.pingsLost++;
    this.pingSentAt = now;
    this.ws.send(pingMessage());
    stats.pingsSent++;
  }

  onPong() {
    if (this.pingSentAt === null) return; // not ours to time
    const rtt = performance.now() - this.pingSentAt;
    this.pingSentAt = null;
    this.rtts = [...this.rtts.slice(-19), rtt];
    stats.rttMs = Math.round(rtt);
    stats.rttMsMedian = Math.round([...this.rtts].sort((a, b) => a - b)[this.rtts.length >> 1]);
  }

  // The server's frame latency over its recent frames: GET /api/stats.
  async pollServerStats() {
    if (this.statsInFlight) return;
    this.statsInFlight = true;
    try {
      const reply = await fetch("/api/stats", { cache: "no-store" });
      if (!reply.ok) throw new Error(`GET /api/stats: HTTP ${reply.status}`);
      const s = await reply.json();
      Object.assign(stats, {
        frameMsP50: s.frame_ms_p50, frameMsP99: s.frame_ms_p99,
        activeStreams: s.active_streams, maxStreams: s.max_streams, statsError: null,
      });
    } catch (e) {
      stats.statsError = e.message;
    } finally {
      this.statsInFlight = false;
    }
  }

  onMicChunk({ samples, level }) {
    showLevel("mic-level", level);
    if (!this.live || this.encoder.state !== "configured") return; // nothing goes out before the handshake
    this.encoder.encode(new AudioData({
      format: "f32-planar", sampleRate: SAMPLE_RATE, numberOfChannels: 1,
      numberOfFrames: samples.length, timestamp: this.micTime, data: samples,
    }));
    this.micTime += (samples.length * 1e6) / SAMPLE_RATE;
    stats.micSamplesEncoded += samples.length;
  }

  onEncoded(chunk) {
    const packet = new Uint8Array(chunk.byteLength);
    chunk.copyTo(packet);
    const page = this.writer.add(packet);
    if (page) this.sendAudio(page);
  }

  sendAudio(oggBytes) {
    if (this.ended || this.ws.readyState !== WebSocket.OPEN) return;
    if (this.ws.bufferedAmount > MAX_SEND_BACKLOG) {
      return this.fail(`The network cannot keep up: ${this.ws.bufferedAmount} bytes of microphone audio are waiting to be sent`);
    }
    this.ws.send(audioMessage(oggBytes));
    stats.audioMessagesSent++;
    stats.audioBytesSent += oggBytes.length;
  }

  onAudio(bytes) {
    stats.audioMessagesReceived++;
    stats.audioBytesReceived += bytes.length;
    for (const { data } of this.reader.push(bytes)) {
      if (isOpusHead(data) || isOpusTags(data) || data.length === 0) continue;
      let samples;
      try {
        samples = opusPacketSamples(data);
      } catch {
        stats.badOpusPackets++; // no valid TOC byte: not Opus, so not for the decoder
        continue;
      }
      this.decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: this.decodeTime, data }));
      this.decodeTime += (samples * 1e6) / 48000; // Opus durations are in 48 kHz samples
      stats.audioPacketsDecoded++;
    }
    stats.oggCrcErrors = this.reader.stats.crcErrors;
    stats.oggLostPackets = this.reader.stats.lostPackets;
  }

  onDecoded(data) {
    if (data.sampleRate !== SAMPLE_RATE) {
      data.close();
      return this.fail(`The audio decoder gives ${data.sampleRate} Hz; this page plays ${SAMPLE_RATE} Hz`);
    }
    const samples = new Float32Array(data.numberOfFrames);
    data.copyTo(samples, { planeIndex: 0, format: "f32-planar" });
    data.close();
    stats.decodedSamples += samples.length;
    this.playback.port.postMessage({ samples }, [samples.buffer]);
  }

  onPlaybackStats(s) {
    showLevel("model-level", s.level);
    Object.assign(stats, {
      playedSamples: s.playedSamples, bufferedSamples: s.bufferedSamples,
      starvedSamples: s.starvedSamples, underruns: s.underruns,
      droppedSamples: s.droppedSamples, drops: s.drops,
    });
    this.playbackStart = s.startSamples;
  }

  fail(message) {
    if (this.ended) return;
    showError(message);
    this.end("error", "Disconnected");
  }

  // Frees everything; closing the socket is what frees the server's slot.
  end(state, text) {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.tick);
    if (this.ws) {
      this.ws.onclose = this.ws.onmessage = this.ws.onerror = null;
      if (this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "bye");
    }
    this.mic?.getTracks().forEach((t) => t.stop());
    for (const codec of [this.encoder, this.decoder]) if (codec && codec.state !== "closed") codec.close();
    this.ctx?.close();
    showLevel("mic-level", 0);
    showLevel("model-level", 0);
    showFigures();
    session = null;
    setState(state, text);
    updateControls();
  }
}

async function connect() {
  if (session || !image) return;
  let params;
  try {
    params = readParams();
  } catch (e) {
    showError(`Parameter: ${e.message}`);
    return;
  }
  $("errors").replaceChildren();
  $("transcript").replaceChildren();
  resetStats();
  stats.sessions++;
  const started = new Session(params, image);
  session = started;
  updateControls();
  try {
    await started.start();
  } catch (e) {
    started.fail(e.name && e.name !== "Error" ? `${e.name}: ${e.message}` : e.message); // no-op once ended
  }
}

function disconnect() {
  if (!session) return;
  stats.close = { code: 1000, reason: "bye", byUser: true };
  session.end("idle", "Not connected");
}

// ---- display ---------------------------------------------------------------------------------------

function addTranscript(text, color) {
  const box = $("transcript");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  const piece = document.createElement("span");
  piece.textContent = text;
  if (color !== null) {
    piece.style.color = COLORS[color];
    piece.dataset.color = color;
    piece.title = `Looked at the picture: ${color}/10`;
    stats.coloredPieces++;
  }
  stats.textPieces++;
  box.append(piece);
  if (box.childElementCount > MAX_TRANSCRIPT_PIECES) box.firstElementChild.remove();
  if (atBottom) box.scrollTop = box.scrollHeight;
}

function showServerInfo(json) {
  let shown = json;
  try {
    shown = JSON.stringify(JSON.parse(json), null, 2);
  } catch {
    // not JSON after all: show it as it came
  }
  $("server-info-json").textContent = shown;
  $("server-info").hidden = false;
}

// RMS level on a -60..0 dBFS scale.
function showLevel(id, rms) {
  const db = 20 * Math.log10(Math.max(rms, 1e-6));
  const x = Math.min(1, Math.max(0, (db + 60) / 60));
  $(id).style.width = `${(100 * x).toFixed(1)}%`;
  $(id).parentElement.setAttribute("aria-valuenow", x.toFixed(2));
}

const ms = (samples) => `${Math.round((1000 * samples) / SAMPLE_RATE)} ms`;
const seconds = (samples) => `${(samples / SAMPLE_RATE).toFixed(1)} s`;

function showFigures() {
  $("fig-rtt").textContent = stats.rttMs === null ? "–" : `${stats.rttMs} ms (median ${stats.rttMsMedian} ms)`;
  $("fig-frame").textContent = stats.statsError ? stats.statsError
    : stats.frameMsP50 === null ? "–" : `${stats.frameMsP50.toFixed(1)} / ${stats.frameMsP99?.toFixed(1)} ms`;
  $("fig-streams").textContent = stats.maxStreams === null ? "–" : `${stats.activeStreams} of ${stats.maxStreams}`;
  const start = session?.playbackStart;
  $("fig-buffer").textContent = `${ms(stats.bufferedSamples)}${start ? ` (starts at ${ms(start)})` : ""}`;
  $("fig-gaps").textContent = `${stats.underruns} gaps, ${ms(stats.starvedSamples)} silent / ` +
    `${stats.drops} drops, ${ms(stats.droppedSamples)}`;
  $("fig-audio").textContent = `${seconds(stats.micSamplesEncoded)} / ${seconds(stats.decodedSamples)}`;
}

function updateControls() {
  const busy = session !== null;
  $("connect").disabled = busy || !image || cameraStream !== null;
  $("disconnect").disabled = !busy;
  $("file").disabled = busy;
  $("camera-open").disabled = busy;
  $("camera-open").hidden = cameraStream !== null;
  $("camera-snap").hidden = $("camera-cancel").hidden = cameraStream === null;
  $("params-reset").disabled = busy;
  for (const p of PARAMS) $(`param-${p.name}`).disabled = busy;
}

// ---- wiring ----------------------------------------------------------------------------------------

function wire() {
  buildParamsForm();
  $("legend-bar").style.background = `linear-gradient(90deg, ${COLORS.join(", ")})`;
  $("file").onchange = () => {
    const file = $("file").files[0];
    if (file) useImage(file, file.name);
    $("file").value = ""; // choosing the same file again still fires change
  };
  const drop = $("drop");
  drop.ondragover = (ev) => { ev.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    const file = [...ev.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    if (session) showError("The picture cannot change during a conversation");
    else if (file) useImage(file, file.name);
    else showError("Drop an image file");
  };
  $("camera-open").onclick = openCamera;
  $("camera-snap").onclick = snapCamera;
  $("camera-cancel").onclick = closeCamera;
  $("params-reset").onclick = () => setParams(defaultParams());
  $("connect").onclick = connect;
  $("disconnect").onclick = disconnect;
  updateControls();
  showFigures();
}

wire();
