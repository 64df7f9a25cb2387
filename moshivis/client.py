"""Client of `moshivis.server`: one conversation from files, and the `Client` class it uses.

python -m moshivis.client [--host 127.0.0.1] [--port 8998]
       (--tokens USER.safetensors --out OUT.safetensors | --audio QUESTION.wav --out ANSWER.wav [--resample])
       [--image IMAGE.safetensors|IMAGE.png|IMAGE.jpg] [--seed N] [--greedy]
       [--temperature-text T] [--top-k-text K] [--temperature-audio T] [--top-k-audio K]
       [--ahead N | --realtime] [--row B]

Tokens: USER.safetensors holds the user's audio tokens [num_audio_in, T] (key `user_audio_tokens`,
or the file's only tensor; a [B, num_audio_in, T] tensor, as in the golden stream files, needs
--row). OUT.safetensors gets `tokens` [1 + dep_q, F] (text token then audio codebooks per frame, -2
during warm-up) for the stream's frames 0 .. F-1, F being the frame of the last input, and
`input_frames` [T]: the frame each input landed in. F == T unless the server fed silence in some
frame because an input was late.

Audio (the server needs --mimi): QUESTION.wav (24 kHz; other rates with --resample) is sent as PCM
frames of 1920 samples, then `max_delay` frames of silence so the model answers every frame, as
`python -m moshivis.chat` does; ANSWER.wav gets the model's speech, as long as the question (longer
by the frames of silence the server inserted for late input), and the transcript is printed on
stdout when the server has a tokenizer.

--image: a .safetensors file holds image-encoder features [num_image_tokens, image_encoder_dim]
(key `image_features` or the only tensor; [B, ...] needs --row); any other file is sent as it is,
a PNG or JPEG for the server's SigLIP encoder (the server needs --siglip or a checkpoint with it).

Pacing: by default up to --ahead frames (4) are in flight (sent, not yet answered), which keeps the
server's queue for this stream non-empty; --realtime sends one frame per server tick instead, like
a microphone, one frame ahead (a one-frame jitter buffer).
"""
from __future__ import annotations

import asyncio
import hashlib
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from . import cli
from . import protocol as P
from .engine import SamplingParams


class ServerError(RuntimeError):
    """The server refused a request or ended the session; `code` is the protocol's code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def image_key(image: torch.Tensor | None = None, image_file: bytes | None = None) -> str | None:
    """The stream's image as a routing key (sha256 of the features' bytes or of the file): sent as the
    `x-session-id` header, so a cluster (`moshivis.cluster`) routes streams of one image to one engine."""
    if image is not None:
        return hashlib.sha256(image.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    if image_file is not None:
        return hashlib.sha256(image_file).hexdigest()
    return None


def refusal(e: InvalidStatus) -> str:
    """A refused handshake in words: the HTTP status and the server's explanation."""
    r = e.response
    body = r.body.decode(errors="replace").strip()[:200] if r.body else ""
    return f"the server refused the connection: HTTP {r.status_code} {r.reason_phrase}{': ' + body if body else ''}"


class Client:
    """One WebSocket session. `recv()` returns decoded messages, None once the connection is closed."""

    def __init__(self, ws: ClientConnection, limits: P.Limits):
        self.ws, self.limits = ws, limits
        self.opened: dict | None = None

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = 8998, limits: P.Limits | None = None,
                      open_timeout: float = 10.0, session_id: str | None = None,
                      headers: dict[str, str] | None = None) -> "Client":
        """`session_id`: the routing key (`image_key` of the image the stream will open with), sent as the
        `x-session-id` header; `headers`: more handshake headers. A server refusing the connection at the
        handshake (too many connections; a cluster whose replicas and queue are all full) raises websockets'
        InvalidStatus (`refusal` words it)."""
        limits = limits or P.Limits()
        extra = {**(headers or {}), **({"x-session-id": session_id} if session_id else {})}
        ws = await connect(f"ws://{host}:{port}/", compression=None, open_timeout=open_timeout,
                           max_size=limits.max_message_bytes, additional_headers=extra or None)
        return cls(ws, limits)

    @property
    def closed_why(self) -> str:
        """How the connection ended, for error messages: the server's close code and reason, or a loss."""
        code, reason = self.ws.close_code, self.ws.close_reason
        if code is None or code == 1006:
            return "connection lost without a close frame (1006): the server (or its replica) died or the network failed"
        return f"connection closed by the server ({code}{': ' + reason if reason else ''})"

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def recv(self) -> P.Message | None:
        try:
            return P.decode(await self.ws.recv(), self.limits)
        except ConnectionClosed:
            return None

    async def open(self, seed: int = 0, sampling: SamplingParams | None = None,
                   image: torch.Tensor | None = None, ref=None, image_file: bytes | None = None,
                   audio: str = "tokens", xa_start: int = 0, image_resolution: int | None = None,
                   center_crop: bool | None = None) -> dict:
        """Open the stream and wait for the answer: the `opened` header, or ServerError.
        `audio`: "tokens" or "pcm" (what `audio` messages carry); `image_file`: the bytes of an image file
        (resized to `image_resolution`, after a centre crop with `center_crop`); `xa_start`: the frame from
        which the stream looks at its image."""
        await self.send(P.open_message(seed, sampling, image, ref, image_file, audio, xa_start, image_resolution,
                                       center_crop))
        msg = await self.recv()
        if msg is None:
            raise ServerError("closed", f"no answer to the open: {self.closed_why}")
        if msg.type == "refused":
            raise ServerError(msg.header["code"], msg.header["reason"])
        if msg.type == "error":
            raise ServerError(msg.header["code"], msg.header["message"])
        if msg.type != "opened":
            raise ServerError("bad_message", f"expected 'opened', got {msg.type!r}")
        self.opened = msg.header
        return msg.header

    async def audio(self, tokens: torch.Tensor, ref=None) -> None:
        await self.send(P.audio_message(tokens, ref))

    async def pcm(self, pcm: torch.Tensor, ref=None) -> None:
        """One frame [1920] of 24 kHz samples (float32 or int16), in a session opened with audio "pcm"."""
        await self.send(P.pcm_message(pcm, ref))

    async def set_image(self, image: torch.Tensor | None, ref=None, image_file: bytes | None = None) -> None:
        await self.send(P.image_message(image, ref, image_file))

    async def close(self, ref=None) -> None:
        """Ask the server to close the stream (it answers `closed`, then closes the connection)."""
        await self.send(P.close_message(ref))

    async def aclose(self) -> None:
        await self.ws.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


async def _exchange(c: Client, opened: dict, send, T: int, ahead: int, realtime: bool
                    ) -> tuple[dict[int, P.Message], list[int]]:
    """Send inputs 0 .. T-1 with `send(t)` and collect the `frame` replies until every input is
    answered: ({frame: message}, the frame each input landed in)."""
    ahead = max(1, min(ahead, opened["max_queued_frames"]))
    frames: dict[int, P.Message] = {}
    input_frames = [-1] * T
    sent = answered = 0

    async def pace():  # --realtime: one frame per tick after a one-frame jitter buffer
        nonlocal sent
        loop = asyncio.get_running_loop()
        start = loop.time()
        for t in range(T):
            await asyncio.sleep(max(0.0, start + (t - 1) * opened["tick_ms"] / 1e3 - loop.time()))
            await send(t)
            sent += 1

    pacer = asyncio.create_task(pace()) if realtime else None
    try:
        if not realtime:
            for t in range(min(ahead, T)):
                await send(t)
            sent = min(ahead, T)
        while answered < T:
            msg = await c.recv()
            if msg is None:
                raise ServerError("closed", f"after {answered}/{T} frames: {c.closed_why}")
            if msg.type == "frame":
                frames[msg.header["frame"]] = msg
                if msg.header["seq"] is not None:
                    input_frames[msg.header["seq"]] = msg.header["frame"]
                    answered += 1
                    if not realtime and sent < T:
                        await send(sent)
                        sent += 1
            elif msg.type in ("error", "shutdown", "refused"):
                raise ServerError(msg.header.get("code", msg.type),
                                  msg.header.get("message") or msg.header.get("reason", ""))
        await c.close()
        while (msg := await c.recv()) is not None and msg.type != "closed":
            pass
    finally:
        if pacer is not None:
            pacer.cancel()
    return frames, input_frames


def _tokens(frames: dict[int, P.Message], last: int, width: int) -> torch.Tensor:
    return torch.stack([frames[f].tensors["tokens"].to(torch.int64) for f in range(last + 1)], dim=1) if last >= 0 \
        else torch.empty(width, 0, dtype=torch.int64)


async def converse(host: str, port: int, user_tokens: torch.Tensor, image: torch.Tensor | None = None,
                   seed: int = 0, sampling: SamplingParams | None = None, ahead: int = 4,
                   realtime: bool = False, image_file: bytes | None = None) -> dict[str, torch.Tensor]:
    """One conversation: user_tokens [num_audio_in, T] in; `tokens` [1 + dep_q, F] and `input_frames` [T]."""
    if user_tokens.dim() != 2:
        raise ValueError(f"user tokens must be [num_audio_in, T], got shape {list(user_tokens.shape)}")
    T = user_tokens.shape[1]
    async with await Client.connect(host, port, session_id=image_key(image, image_file)) as c:
        opened = await c.open(seed, sampling, image, image_file=image_file)
        frames, input_frames = await _exchange(c, opened, lambda t: c.audio(user_tokens[:, t]), T, ahead, realtime)
    last = input_frames[-1] if T else -1
    return {"tokens": _tokens(frames, last, opened["config"]["num_codebooks_out"]),
            "input_frames": torch.tensor(input_frames, dtype=torch.int64)}


async def converse_pcm(host: str, port: int, question: torch.Tensor, image: torch.Tensor | None = None,
                       seed: int = 0, sampling: SamplingParams | None = None, ahead: int = 4,
                       realtime: bool = False, image_file: bytes | None = None) -> dict:
    """One spoken conversation, as `moshivis.chat.converse`: question [samples] at 24 kHz in (float in
    [-1, 1], or int16).

    Sends ceil(samples / 1920) frames (the last zero-padded) and `max_delay` frames of silence.
    Returns `pcm` [samples + 1920 * frames of inserted silence] (warm-up frames dropped), `transcript`
    (None without a tokenizer on the server), `tokens` [1 + dep_q, F] and `input_frames` [T]."""
    if question.dim() != 1 or question.shape[0] == 0 or not (question.is_floating_point()
                                                              or question.dtype == torch.int16):
        raise ValueError(f"question must be mono float or int16 samples [samples > 0], got {question.dtype} "
                         f"{list(question.shape)}")
    n = question.shape[0]
    async with await Client.connect(host, port, session_id=image_key(image, image_file)) as c:
        opened = await c.open(seed, sampling, image, image_file=image_file, audio="pcm")
        frame = opened["frame_size"]
        T = -(-n // frame) + opened["config"]["max_delay"]
        padded = torch.cat([question, question.new_zeros(T * frame - n)])  # int16 frames are sent as int16
        frames, input_frames = await _exchange(c, opened, lambda t: c.pcm(padded[t * frame:(t + 1) * frame]), T,
                                               ahead, realtime)
    last = input_frames[-1]
    tokens = _tokens(frames, last, opened["config"]["num_codebooks_out"])
    spoken = [f for f in range(last + 1) if int(tokens[0, f]) != -2]  # warm-up frames carry silence
    pcm = torch.cat([frames[f].tensors["pcm"] for f in spoken])[: n + (last + 1 - T) * frame]
    transcript = "".join(frames[f].header["text"] for f in range(last + 1)) if opened["text"] else None
    return {"pcm": pcm, "transcript": transcript, "tokens": tokens,
            "input_frames": torch.tensor(input_frames, dtype=torch.int64)}


def _read(path: str, key: str, row: int | None, ndim: int, what: str) -> torch.Tensor:
    """Tensor `key` (or the only tensor) of a safetensors file, row `row` of a batched one."""
    if not Path(path).is_file():
        raise cli.UsageError(f"{what} file {path} does not exist")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as e:
        raise cli.UsageError(f"{what} file {path} is not a readable safetensors file: {e}") from e
    if key in tensors:
        t = tensors[key]
    elif len(tensors) == 1:
        t = next(iter(tensors.values()))
    else:
        raise cli.UsageError(f"{path}: no tensor {key!r} and more than one tensor ({sorted(tensors)})")
    if t.dim() == ndim + 1:
        if row is None:
            raise cli.UsageError(f"{path}: tensor of shape {list(t.shape)} holds several streams; pick one with --row")
        if not 0 <= row < t.shape[0]:
            raise cli.UsageError(f"{path}: --row {row} is out of range for {t.shape[0]} streams")
        t = t[row]
    if t.dim() != ndim:
        raise cli.UsageError(f"{path}: expected a {ndim}-d tensor, got shape {list(t.shape)}")
    return t


@cli.guard()
def main(argv: list[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m moshivis.client", description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=cli.port_number, default=8998)
    user_in = ap.add_mutually_exclusive_group(required=True)
    user_in.add_argument("--tokens", help="user audio tokens [num_audio_in, T] (.safetensors)")
    user_in.add_argument("--audio", help="the question, a 24 kHz WAV file (sent as PCM; the server needs --mimi)")
    ap.add_argument("--resample", action="store_true", help="--audio: accept other sample rates (resampled)")
    ap.add_argument("--image", help="image features [num_image_tokens, image_encoder_dim] (.safetensors), or a "
                                    "PNG/JPEG file")
    ap.add_argument("--out", required=True, help="--tokens: output .safetensors (tokens [1 + dep_q, F], "
                                                 "input_frames [T]); --audio: the answer, a WAV file")
    ap.add_argument("--row", type=int, help="stream row of a batched [B, ...] file")
    ap.add_argument("--seed", type=cli.non_negative_int, default=0)
    ap.add_argument("--greedy", action="store_true", help="temperature 0 (argmax) for text and audio")
    defaults = SamplingParams()
    ap.add_argument("--temperature-text", type=float, default=defaults.temperature_text)
    ap.add_argument("--top-k-text", type=int, default=defaults.top_k_text)
    ap.add_argument("--temperature-audio", type=float, default=defaults.temperature_audio)
    ap.add_argument("--top-k-audio", type=int, default=defaults.top_k_audio)
    ap.add_argument("--ahead", type=cli.positive_int, default=4, help="frames in flight")
    ap.add_argument("--realtime", action="store_true", help="send one frame per server tick")
    args = ap.parse_args(argv)
    if args.seed >= 2 ** 63:
        ap.error(f"argument --seed: must be < 2**63, got {args.seed}")
    try:
        sampling = SamplingParams.greedy() if args.greedy else SamplingParams(
            args.temperature_text, args.top_k_text, args.temperature_audio, args.top_k_audio)
    except ValueError as e:  # names the field: "sampling top_k_text must be ..."
        ap.error(str(e))
    image = image_file = None
    if args.image and args.image.endswith(".safetensors"):
        image = _read(args.image, "image_features", args.row, 2, "image")
    elif args.image:
        if not Path(args.image).is_file():
            raise cli.UsageError(f"image file {args.image} does not exist")
        image_file = Path(args.image).read_bytes()
    if args.audio:
        return _speak(args, sampling, image, image_file)
    user = _read(args.tokens, "user_audio_tokens", args.row, 2, "tokens")
    try:
        result = asyncio.run(converse(args.host, args.port, user, image, args.seed, sampling, args.ahead,
                                      args.realtime, image_file))
    except (ServerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except InvalidStatus as e:
        print(f"error: {refusal(e)}", file=sys.stderr)
        return 1
    save_file({k: v.contiguous() for k, v in result.items()}, args.out)
    silent = result["tokens"].shape[1] - user.shape[1]
    print(f"{args.out}: {result['tokens'].shape[1]} frames for {user.shape[1]} inputs"
          + (f" ({silent} frames of silence where input was late)" if silent else ""))
    return 0


def _speak(args, sampling: SamplingParams, image: torch.Tensor | None, image_file: bytes | None) -> int:
    from .audio import AudioError, load_audio, write_wav
    try:
        question = load_audio(args.audio, P.PCM_SAMPLE_RATE, resample_input=args.resample)
    except AudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(converse_pcm(args.host, args.port, question, image, args.seed, sampling, args.ahead,
                                          args.realtime, image_file))
    except (ServerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except InvalidStatus as e:
        print(f"error: {refusal(e)}", file=sys.stderr)
        return 1
    if result["transcript"] is not None:
        print(result["transcript"], flush=True)
    write_wav(args.out, result["pcm"], P.PCM_SAMPLE_RATE)
    print(f"{args.out}: {result['pcm'].shape[0] / P.PCM_SAMPLE_RATE:.2f} s of answer for "
          f"{question.shape[0] / P.PCM_SAMPLE_RATE:.2f} s of question", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
