"""Images in: Pillow + transformers' `SiglipVisionModel` -> features for `Engine.open_stream(image=...)`.

MoshiVis encodes an image once with the SigLIP vision tower of PaliGemma2-448 (SPEC.md §5): 448x448
input, patch 14, 27 layers, hidden 1152 -> 1024 tokens x 1152, its last hidden state (after the
post-layernorm, no pooling head). Preprocessing as in Kyutai's server: RGB, resize to the model's
square size (bicubic, aspect ratio not kept), scale to [0, 1], normalise with mean 0.5 and std 0.5.
Kyutai resizes a uint8 tensor with torchvision (antialiased bicubic); Pillow's bicubic, used here,
is the same filter and agrees with it to about one grey level, not bit for bit.

Other resolutions (Kyutai's web client sends `image_resolution`, and `center_crop`): the side is the
requested one rounded to the nearest multiple of the patch size and clamped to [10 patches, the encoder's
own size], and with center_crop the central square of the image is cut out before the resize, as
Kyutai's Rust server does (moshi-backend image_embedder.rs; its PyTorch server resizes to the requested
side as given, crops nothing and does not clamp). The position embeddings are interpolated to the
smaller grid (transformers' `interpolate_pos_encoding`: bicubic, as Kyutai's encoder asks for), and the
image has (side // patch)^2 tokens: 121 at 160 px, 1024 at 448.

Weights: the MoshiVis checkpoint holds the tower under `image_prefix.enc.model.*`; the rest of each
key is the `SiglipVisionModel` key (transformers 5 has no `vision_model.` level in that model; a
checkpoint that carries one is accepted too). A separate file may be given instead (a SigLIP or
PaliGemma checkpoint: prefixes in `PREFIXES`).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from .checkpoint import meta_tensor

try:
    from PIL import Image, UnidentifiedImageError
    from transformers import SiglipVisionConfig, SiglipVisionModel
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("moshivis.vision needs Pillow and transformers (pip install 'moshivis-kernels[chat]')") from e

# Where the vision tower's keys live, tried in order: MoshiVis, PaliGemma (new and old layouts),
# a SiglipVisionModel saved with its `vision_model.` level; bare keys last.
PREFIXES = ("image_prefix.enc.model.", "model.vision_tower.vision_model.", "vision_tower.vision_model.",
            "vision_model.", "")
MEAN, STD = 0.5, 0.5


class VisionError(ValueError):
    """A missing or unreadable image, or SigLIP weights that do not load."""


def paligemma2_448() -> SiglipVisionConfig:
    """The vision tower MoshiVis uses (Kyutai's `load_paligemma_vision_encoder` sizes)."""
    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=448, patch_size=14, vision_use_head=False)


def load_vision_config(path: str | Path) -> SiglipVisionConfig:
    """A SiglipVisionConfig from JSON: its own fields, or a PaliGemma/SigLIP config's `vision_config`."""
    try:
        values = json.loads(Path(path).read_text())
        values = dict(values.get("vision_config", values))
        values.setdefault("vision_use_head", False)
        known = set(SiglipVisionConfig().to_dict()) - {"model_type"}
        return SiglipVisionConfig(**{k: v for k, v in values.items() if k in known})
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise VisionError(f"vision config {path} is not a readable SigLIP vision config JSON: {e}") from e


def open_image(image: str | Path | Image.Image) -> Image.Image:
    """An RGB Pillow image (alpha dropped, greyscale replicated); a clear error for a bad file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise VisionError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError as e:
        raise VisionError(f"image file {path} is not an image Pillow can read") from e
    except Image.DecompressionBombError as e:
        raise VisionError(f"image file {path} is too large to decode safely: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise VisionError(f"image file {path} is corrupt or truncated: {e}") from e


def kyutai_side(resolution: int, patch: int, largest: int) -> int:
    """The square side Kyutai's Rust server resizes an image to for `resolution`: the nearest multiple of
    the patch size (a remainder of exactly half a patch rounds down), clamped to [10 * patch, largest]."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise VisionError(f"image resolution must be a positive integer (pixels), got {resolution!r}")
    rest = resolution % patch
    side = resolution - rest + (patch if rest > patch // 2 else 0)
    return min(max(side, 10 * patch), largest)


def preprocess(image: str | Path | Image.Image, size: int, center_crop: bool = False) -> torch.Tensor:
    """pixel values [3, size, size]: RGB, (the central square, with center_crop,) bicubic resize to
    size x size, [0, 1], (x - 0.5) / 0.5."""
    im = open_image(image)
    if center_crop:
        width, height = im.size
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        im = im.crop((left, top, left + side, top + side))
    im = im.resize((size, size), Image.BICUBIC)
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return (x.permute(2, 0, 1).float() / 255 - MEAN) / STD


class ImageEncoder:
    """`encode(image) -> features [num_tokens, hidden]` with a loaded SiglipVisionModel."""

    def __init__(self, model: SiglipVisionModel):
        self.model = model.eval()
        cfg = model.config
        self.image_size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        self.patch_size = cfg.patch_size
        self.num_tokens = (self.image_size // cfg.patch_size) ** 2
        self.hidden_size = cfg.hidden_size

    def side(self, resolution: int | None = None) -> int:
        """The square side an image is resized to for `resolution` (None: the encoder's own size)."""
        return self.image_size if resolution is None else kyutai_side(resolution, self.patch_size, self.image_size)

    def tokens(self, resolution: int | None = None) -> int:
        """How many tokens `encode(..., resolution)` gives: (side // patch)^2."""
        return (self.side(resolution) // self.patch_size) ** 2

    @classmethod
    def load(cls, path: str | Path, config: SiglipVisionConfig | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> "ImageEncoder":
        """The tower's weights from a `.safetensors` file or a folder of them (only those tensors are
        read); config default: PaliGemma2-448. Strict: missing, unexpected and mis-shaped keys are
        reported. device="meta" checks the keys and shapes from the files' headers and reads no data
        (an encoder with meta weights)."""
        from safetensors import SafetensorError, safe_open
        config = paligemma2_448() if config is None else config
        meta = torch.device(device).type == "meta"
        path = Path(path)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
        elif path.is_file() and path.suffix == ".safetensors":
            files = [path]
        elif path.exists():
            raise VisionError(f"SigLIP weights {path} are not a .safetensors file (pickles are never loaded)")
        else:
            raise VisionError(f"SigLIP weights {path} do not exist")
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = SiglipVisionModel(config)
        target = getattr(model, "vision_model", model)  # transformers 4 nests the tower one level down
        expected = target.state_dict()
        state: dict[str, torch.Tensor] = {}
        try:
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    keys = list(st.keys())
                    prefix = next((p for p in PREFIXES if any(k.startswith(p) and k[len(p):] in expected
                                                              for k in keys)), None)
                    if prefix is None:
                        continue
                    for k in keys:
                        if k.startswith(prefix) and (prefix or k in expected):
                            info = st.get_slice(k)
                            state[k[len(prefix):]] = (meta_tensor(info.get_shape(), info.get_dtype()) if meta
                                                      else st.get_tensor(k))
        except (SafetensorError, OSError) as e:
            raise VisionError(f"SigLIP weights {path} are not a readable safetensors file: {e}") from e
        if not state:
            raise VisionError(f"no SigLIP vision weights in {path} (looked for keys under "
                              f"{', '.join(repr(p) for p in PREFIXES if p)} or bare SiglipVisionModel keys); "
                              "pass the image encoder's weights separately (--siglip FILE)")
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        wrong = [f"{k}: expected {list(expected[k].shape)}, found {list(v.shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
        problems = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if keys]
        if problems:
            raise VisionError(f"SigLIP weights in {path} do not match the vision config (image_size "
                              f"{config.image_size}, hidden {config.hidden_size}, {config.num_hidden_layers} "
                              "layers):\n  " + "\n  ".join(problems))
        target.load_state_dict(state, assign=meta)
        return cls(model.to(device=device, dtype=dtype))

    @torch.no_grad()
    def encode(self, image: str | Path | Image.Image, resolution: int | None = None,
               center_crop: bool = False) -> torch.Tensor:
        """features [tokens(resolution), hidden] (the model's dtype) for `Engine.open_stream(image=...)`:
        resized to `side(resolution)` (default: the encoder's own size), after cutting out the central
        square with center_crop (module docstring)."""
        return self.encode_batch([image], resolution, center_crop)[0]

    @torch.no_grad()
    def encode_batch(self, images: list, resolution: int | None = None, center_crop: bool = False
                     ) -> torch.Tensor:
        """`encode` of several images in one SigLIP call: features [len(images), tokens(resolution), hidden]."""
        p = next(self.model.parameters())
        side = self.side(resolution)
        pixels = torch.stack([preprocess(im, side, center_crop) for im in images]).to(device=p.device, dtype=p.dtype)
        # Kyutai asks for interpolated position embeddings; at the model's own size they are unchanged.
        return self.model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
