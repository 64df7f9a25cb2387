"""The engine's stream slots and image pool against a simple model of what they should hold, after random
sequences of open / replace / remove / close / step.

The model is a dict: stream id -> (image or none, frames run, seed, sampling, xa_start), ids handed out in
order. From it alone follow: which calls must fail (all slots in use; a new distinct image when the pool
holds `max_images` distinct ones, unless the caller's own image is held by it alone and goes anyway), which
streams share an image slot (same features), each slot's count of holders, the K/V each slot must hold
(`reference.image_kv` of its features, first n rows, n its token count), each stream's frame counter, seed
and sampling parameters, and whether a stepped stream's gate means are 0 (no image, or before xa_start) or
inside (0, 1). Nothing is checked through the pool's own helpers (`used`, `swap`'s return).
"""
from __future__ import annotations

import pytest
import torch

from moshivis import Engine, ImageError, SamplingParams, StreamError
from moshivis.reference import image_kv

MAX_STREAMS, MAX_IMAGES = 5, 2


class Model:
    def __init__(self):
        self.streams: dict[int, dict] = {}
        self.next_id = 0

    def held(self) -> set[int]:
        return {s["image"] for s in self.streams.values() if s["image"] is not None}

    def holders(self, image: int) -> list[int]:
        return [i for i, s in self.streams.items() if s["image"] == image]

    def takes_image(self, image: int | None, old: int | None = None, stream: int | None = None) -> bool:
        """Whether attaching `image` in place of `old` (held by `stream`) finds room in the pool."""
        held = self.held()
        return (image is None or image in held or len(held) < MAX_IMAGES
                or (old is not None and self.holders(old) == [stream]))


def check(engine: Engine, model: Model, images: list[torch.Tensor], weights, cfg) -> None:
    assert sorted(engine.streams) == sorted(model.streams)
    st = engine.state
    slots = {i: engine._streams[i].slot for i in model.streams}
    assert len(set(slots.values())) == len(slots) and all(0 <= s < MAX_STREAMS for s in slots.values())
    for i, s in model.streams.items():
        sp, slot = s["sampling"], slots[i]
        assert st.t[slot] == s["frames"] and st.seed[slot] == s["seed"], i
        assert st.temperature[slot].tolist() == pytest.approx([sp.temperature_text, sp.temperature_audio]), i
        assert st.top_k[slot].tolist() == [sp.top_k_text, sp.top_k_audio], i
        assert st.repetition_penalty[slot] == pytest.approx(sp.repetition_penalty), i
        assert st.repetition_context[slot] == sp.repetition_penalty_context, i
    image_slot = {i: engine._streams[i].image_slot for i in model.streams}
    slot_of = {}
    for i, s in model.streams.items():
        if s["image"] is None:
            assert image_slot[i] == -1, i
        else:  # one slot per distinct image, shared by its streams
            assert slot_of.setdefault(s["image"], image_slot[i]) == image_slot[i], i
    assert len(set(slot_of.values())) == len(slot_of) and all(0 <= s < MAX_IMAGES for s in slot_of.values())
    want_refs = [0] * MAX_IMAGES
    for image, slot in slot_of.items():
        want_refs[slot] = len(model.holders(image))
    assert engine.pool.refcount == want_refs
    engine.pool.flush()  # what the engine does before a frame
    for image, slot in slot_of.items():
        n = images[image].shape[0]
        assert int(engine.pool.num_tokens[slot]) == n
        # batched with another image of its token count or alone: measured 1e-6 apart (fp32)
        torch.testing.assert_close(engine.pool.kv[slot, :n], image_kv(weights, cfg, images[image]), atol=1e-5, rtol=0)


def random_sampling(g: torch.Generator) -> SamplingParams:
    r = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731
    return SamplingParams(temperature_text=r(20) / 10, top_k_text=r(60), temperature_audio=r(20) / 10,
                          top_k_audio=r(50), repetition_penalty=1 + r(5) / 10, repetition_penalty_context=r(9))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slots_and_image_pool_follow_a_simple_model(tiny_cfg, tiny_weights, seed):
    """200 random operations on 5 stream slots and 2 image slots (images of 12, 12, 7, 3 and 12 tokens, each
    attached as its own tensor or as a copy), every call's outcome predicted by the model, the state checked
    after every call, successful or refused."""
    cfg = tiny_cfg
    g = torch.Generator().manual_seed(1000 + seed)
    images = [torch.randn(n, cfg.image_encoder_dim, generator=g) for n in (12, 12, 7, 3, 12)]
    engine = Engine(cfg, dict(tiny_weights), max_streams=MAX_STREAMS, max_images=MAX_IMAGES)
    model = Model()
    r = lambda hi: int(torch.randint(0, hi, (1,), generator=g))  # noqa: E731

    def pick_image():
        image = r(len(images) + 1) - 1
        return (None, None) if image < 0 else (image, images[image].clone() if r(2) else images[image])

    outcomes = {"ok": 0, "streams full": 0, "pool full": 0, "own slot reused": 0}
    for _ in range(200):
        op = ["open", "open", "replace", "remove", "close", "step", "step"][r(7)]
        ids = list(model.streams)
        if op != "open" and not ids:
            op = "open"
        if op == "open":
            image, features = pick_image()
            spec = dict(seed=r(2**31), sampling=random_sampling(g), xa_start=r(3))
            if len(ids) == MAX_STREAMS:
                with pytest.raises(StreamError, match=f"all max_streams={MAX_STREAMS} slots are in use"):
                    engine.open_stream(image=features, **spec)
                outcomes["streams full"] += 1
            elif not model.takes_image(image):
                with pytest.raises(ImageError, match="image pool is full"):
                    engine.open_stream(image=features, **spec)
                outcomes["pool full"] += 1
            else:
                assert engine.open_stream(image=features, **spec) == model.next_id
                model.streams[model.next_id] = dict(spec, image=image, frames=0)
                model.next_id += 1
                outcomes["ok"] += 1
        elif op in ("replace", "remove"):
            i = ids[r(len(ids))]
            image, features = pick_image() if op == "replace" else (None, None)
            if model.takes_image(image, model.streams[i]["image"], i):
                reused = not model.takes_image(image)  # room only because the caller's own image goes
                engine.set_image(i, features)
                model.streams[i]["image"] = image
                outcomes["own slot reused" if reused else "ok"] += 1
            else:
                with pytest.raises(ImageError, match="image pool is full"):
                    engine.set_image(i, features)
                outcomes["pool full"] += 1
        elif op == "close":
            i = ids[r(len(ids))]
            engine.close_stream(i)
            del model.streams[i]
        else:
            batch = [i for i in ids if r(3)] or ids[:1]
            engine.step(torch.randint(-1, cfg.audio_card, (len(batch), cfg.num_audio_in), generator=g), batch)
            gates = engine.gate_means(batch)
            for i, gate in zip(batch, gates):
                s = model.streams[i]
                if s["image"] is None or s["frames"] < s["xa_start"]:
                    assert (gate == 0).all(), (i, s)
                else:
                    assert ((gate > 0) & (gate < 1)).all(), (i, s)
                s["frames"] += 1
        check(engine, model, images, tiny_weights, cfg)
    assert min(outcomes.values()) > 0, outcomes  # every kind of outcome happened
