"""The static image KV pool: each image's K/V computed once, stored once, shared by its streams."""
from __future__ import annotations

import hashlib

import torch

from . import reference
from .config import MoshiVisConfig


class ImageError(ValueError):
    """Bad image features, or no room left in the pool."""


class ImagePool:
    """`kv` [capacity, max_tokens, 2, heads, head_dim]: one preallocated buffer of image K/V slots;
    `num_tokens` [capacity] int32 (on the device): how many tokens slot s holds (its first rows; an image
    encoded at a resolution other than the encoder's own has fewer, (resolution // patch)^2). The
    cross-attention reads only those.

    Identical features (same bytes) attached by several streams share one slot (content hash +
    refcount); a slot is freed when its last stream lets go of it. New images are projected at the
    next `flush()` (the engine calls it before each frame), batched per token count.
    """

    def __init__(self, cfg: MoshiVisConfig, weights: dict, capacity: int, dtype: torch.dtype,
                 device: torch.device, max_tokens: int | None = None):
        self.cfg, self.weights, self.capacity = cfg, weights, capacity
        self.max_tokens = cfg.num_image_tokens if max_tokens is None else max_tokens
        self.kv = torch.zeros(capacity, self.max_tokens, 2, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.num_tokens = torch.full((capacity,), self.max_tokens, dtype=torch.int32, device=device)
        self.refcount = [0] * capacity
        self._slot_of: dict[str, int] = {}
        self._digest_of: dict[int, str] = {}
        self._pending: dict[int, torch.Tensor] = {}  # slot -> features whose K/V are not computed yet

    @property
    def used(self) -> int:
        return sum(1 for r in self.refcount if r > 0)

    def check_features(self, features: torch.Tensor, what: str = "image features") -> torch.Tensor:
        cfg = self.cfg
        if not isinstance(features, torch.Tensor):
            raise ImageError(f"{what} must be a torch.Tensor, got {type(features).__name__}")
        if not features.is_floating_point():
            raise ImageError(f"{what} must be floating point, got dtype {features.dtype}")
        if features.dim() != 2 or features.shape[1] != cfg.image_encoder_dim \
                or not 1 <= features.shape[0] <= self.max_tokens:
            raise ImageError(f"{what} must have shape [N, {cfg.image_encoder_dim}] (image tokens x encoder dim) "
                             f"with 1 <= N <= {self.max_tokens} (max_image_tokens), got {list(features.shape)}")
        if not bool(torch.isfinite(features).all()):
            raise ImageError(f"{what} contain NaN or infinite values")
        return features

    def swap(self, old: int, features: torch.Tensor | None, what: str = "image features") -> int:
        """Let go of slot `old` (-1: none) and take the slot of `features` (None: no image).

        Identical features share a slot (content hash + refcount). A new image takes a free slot,
        or `old` itself when nothing else holds it, so replacing an image never needs a spare slot.
        Bad features or a full pool raise before anything changes.
        """
        if features is None:
            if old >= 0:
                self.release(old)
            return -1
        self.check_features(features, what)
        digest = hashlib.sha256(features.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()
        slot = self._slot_of.get(digest)
        if slot is None:
            free = [s for s, r in enumerate(self.refcount) if r == 0]
            if not free and old >= 0 and self.refcount[old] == 1:
                self.release(old)  # the caller's own image goes anyway: reuse its slot
                free, old = [old], -1
            if not free:
                raise ImageError(f"image pool is full ({self.capacity} distinct images in use); "
                                 "close a stream or remove an image first")
            slot = free[0]
            self._pending[slot] = features.detach().to(device=self.kv.device, dtype=self.kv.dtype)
            self._slot_of[digest], self._digest_of[slot] = slot, digest
        self.refcount[slot] += 1
        if old >= 0:
            self.release(old)
        return slot

    def release(self, slot: int) -> None:
        if not 0 <= slot < self.capacity or self.refcount[slot] <= 0:
            raise ImageError(f"image slot {slot} is not in use")
        self.refcount[slot] -= 1
        if self.refcount[slot] == 0:
            del self._slot_of[self._digest_of.pop(slot)]
            self._pending.pop(slot, None)

    def flush(self) -> None:
        """Image projection + shared K/V projection for every image attached since the last flush,
        batched per token count n: [P, n, image_encoder_dim] -> kv[slots, :n] [P, n, 2, heads, head_dim]."""
        by_count: dict[int, list[int]] = {}
        for slot, features in self._pending.items():
            by_count.setdefault(features.shape[0], []).append(slot)
        for n, slots in by_count.items():
            features = torch.stack([self._pending.pop(s) for s in slots])
            index = torch.tensor(slots, device=self.kv.device)
            self.kv[index, :n] = reference.image_kv(self.weights, self.cfg, features)
            self.num_tokens[index] = n
