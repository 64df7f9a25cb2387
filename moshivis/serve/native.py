"""Our own protocol (`moshivis.protocol`: JSON header + raw tensors) as a scheduler session."""
from __future__ import annotations

from .. import protocol as P
from .scheduler import OpenRequest
from .session import Session


class NativeSession(Session):
    """One client of `moshivis.protocol`. Every message is checked before it is acted on; a bad one gets
    an `error` naming the rule, for this client only."""

    def __init__(self, conn, scheduler, limits: P.Limits, on_done=None):
        super().__init__(conn, scheduler, on_done)
        self.limits = limits
        self._open_ref = None

    def on_message(self, data) -> None:
        ref = None
        try:
            msg = P.decode(data, self.limits)
            r = msg.header.get("ref")
            ref = r if isinstance(r, (int, str)) and not isinstance(r, bool) and len(str(r)) <= 64 else None
            req = P.parse_request(msg, self.scheduler.cfg, self.limits.max_image_file_bytes or None)
            self._handle(req)
        except P.ProtocolError as e:
            self.error(self.stream, e.code, str(e), ref)

    def _handle(self, req) -> None:
        sched = self.scheduler
        if isinstance(req, P.Open):
            if self.stream is not None:
                raise P.ProtocolError("out_of_order", "open: this connection has already opened a stream")
            self._open_ref = req.ref
            s = sched.open(self, OpenRequest(seed=req.seed, sampling=req.sampling, image=req.image,
                                             image_file=req.image_file, image_options=req.image_options,
                                             audio=req.audio, xa_start=req.xa_start, ref=req.ref))
            self.stream = s if s.state != "gone" else None  # refused at once: `open_failed` has run
            return
        s = self.stream
        if s is None:
            raise P.ProtocolError("out_of_order", f"{type(req).__name__.lower()}: before open")
        if isinstance(req, P.Audio):
            if (req.pcm is None) != (s.audio == "tokens"):
                want = "'tokens' [num_audio_in]" if s.audio == "tokens" else f"'pcm' [{P.PCM_FRAME}]"
                raise P.ProtocolError("bad_message", f"audio: this session speaks {s.audio} (chosen at open): send "
                                                     f"tensor {want}")
            sched.push_audio(s, req.tokens if req.pcm is None else req.pcm, req.ref)
        elif isinstance(req, P.Image):
            sched.set_image(s, req.image, req.image_file, req.image_options, req.ref)
        else:
            if s.state not in ("opening", "open"):
                raise P.ProtocolError("out_of_order", "close: after close")
            sched.close(s, req.ref)

    # ---- scheduler events -------------------------------------------------------------------------
    def opened(self, s) -> None:
        cfg, c = self.scheduler.cfg, self.config
        pcm = {"sample_rate": P.PCM_SAMPLE_RATE, "frame_size": P.PCM_FRAME} if s.audio == "pcm" else {}
        self.send(P.encode({
            "type": "opened", "stream": s.engine_id, "protocol": P.PROTOCOL_VERSION, "ref": self._open_ref,
            "mode": c.mode, "tick_ms": c.tick_ms, "max_queued_frames": c.max_queued_frames, "audio": s.audio,
            "text": self.scheduler.media.tokenizer is not None, **pcm,
            **({"replica": self.scheduler.replica} if self.scheduler.replica else {}),
            "config": {"num_audio_in": cfg.num_audio_in, "num_codebooks_out": cfg.num_codebooks_out,
                       "text_card": cfg.text_card, "audio_card": cfg.audio_card,
                       "num_image_tokens": cfg.num_image_tokens, "image_encoder_dim": cfg.image_encoder_dim,
                       "max_delay": cfg.max_delay}}))

    def open_failed(self, s, code: str, message: str, refused: bool) -> None:
        self.stream = None
        if refused:
            self.end(P.encode({"type": "refused", "code": code, "reason": message, "ref": self._open_ref}), 1013,
                     code)
        else:  # a bad image file: the client may open again
            self.error(s, code, message, self._open_ref)

    def prepare(self, s, out) -> bytes:
        header = {"type": "frame", "frame": out.frame, "tick": out.tick, "seq": out.seq, "ref": out.ref,
                  "frame_ms": out.frame_ms, "step_ms": out.step_ms}
        if out.text is not None:
            header["text"] = out.text
        return P.encode(header, {"tokens": out.tokens, **({} if out.pcm is None else {"pcm": out.pcm})})

    def frame(self, s, out) -> None:
        self.send(out.extra)

    def image_set(self, s, from_frame: int, ref) -> None:
        self.send(P.encode({"type": "image_set", "from_frame": from_frame, "ref": ref}))

    def image_failed(self, s, code: str, message: str, ref) -> None:
        self.error(s, code, message, ref)

    def error(self, s, code: str, message: str, ref=None, fatal: bool = False) -> None:
        self.metrics.errors[code] += 1
        self.send(P.encode({"type": "error", "code": code, "message": message, "ref": ref, "fatal": fatal}))

    def closed(self, s, ref) -> None:
        self.end(P.encode({"type": "closed", "frames": s.frames, "ref": ref}))

    def farewell(self, code: str, message: str) -> bytes:
        frames = 0 if self.stream is None else self.stream.frames
        if code == "shutdown":
            return P.encode({"type": "shutdown", "reason": message, "frames": frames})
        self.metrics.errors[code] += 1
        return P.encode({"type": "error", "code": code, "message": message, "ref": None, "fatal": True})
