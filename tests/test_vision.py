"""Images at other resolutions (Kyutai's `image_resolution`, `center_crop`): the side rule of Kyutai's Rust
server, the centre crop, SigLIP's position embeddings interpolated to the smaller grid, and the token count."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipVisionConfig, SiglipVisionModel

from moshivis.vision import ImageEncoder, VisionError, kyutai_side

PATCH, SIDE = 14, 448  # PaliGemma2-448's grid: 32 x 32 patches


def test_kyutai_side_hand_computed():
    """Nearest multiple of 14 (a remainder of exactly 7 rounds down), clamped to [140, 448]."""
    cases = {448: 448, 449: 448, 512: 448, 504: 448, 160: 154, 161: 154, 162: 168, 224: 224, 300: 294, 305: 308,
             140: 140, 139: 140, 64: 140, 1: 140, 10**6: 448}
    assert {r: kyutai_side(r, PATCH, SIDE) for r in cases} == cases
    for bad in (0, -5, 1.5, True, "224"):
        with pytest.raises(VisionError, match="image resolution must be a positive integer"):
            kyutai_side(bad, PATCH, SIDE)


@pytest.fixture(scope="module")
def encoder():
    """A one-layer SigLIP at PaliGemma2-448's geometry (patch 14, 448 px), random weights."""
    gen = torch.Generator().manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                             image_size=SIDE, patch_size=PATCH, vision_use_head=False)
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return ImageEncoder(model)


def _siglip_by_hand(model: SiglipVisionModel, pixels: torch.Tensor) -> torch.Tensor:
    """SigLIP's forward written out: patch embedding + the 32 x 32 position table resized to the image's
    grid (bicubic, align_corners=False: what `interpolate_pos_encoding` promises) + encoder + final norm."""
    vision = getattr(model, "vision_model", model)
    emb = vision.embeddings
    grid = pixels.shape[-1] // PATCH
    patches = emb.patch_embedding(pixels).flatten(2).transpose(1, 2)
    table = emb.position_embedding.weight.reshape(1, SIDE // PATCH, SIDE // PATCH, -1).permute(0, 3, 1, 2)
    positions = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False)
    x = patches + positions.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return vision.post_layernorm(vision.encoder(inputs_embeds=x).last_hidden_state)[0]


@pytest.mark.parametrize("resolution, center_crop, side", [(None, False, 448), (None, True, 448), (224, True, 224),
                                                           (160, False, 154), (305, True, 308)])
def test_encode_at_other_resolutions(encoder, resolution, center_crop, side):
    """Features of a non-square photo: (side // 14)^2 tokens; equal (fp32: measured bit-identical; tolerance
    1e-5) to SigLIP run by hand on pixels cut and resized here: the central square (numpy slicing), bicubic
    resize, (x / 255 - 0.5) / 0.5."""
    photo = np.random.default_rng(3).integers(0, 256, (45, 61, 3), dtype=np.uint8)
    features = encoder.encode(Image.fromarray(photo), resolution, center_crop)
    assert features.shape == ((side // PATCH) ** 2, 32) and encoder.tokens(resolution) == features.shape[0]
    if center_crop:
        h, w = photo.shape[:2]
        s = min(h, w)
        photo = photo[(h - s) // 2: (h - s) // 2 + s, (w - s) // 2: (w - s) // 2 + s]
    resized = np.asarray(Image.fromarray(photo).resize((side, side), Image.BICUBIC))
    pixels = (torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        want = _siglip_by_hand(encoder.model, pixels[None])
    torch.testing.assert_close(features, want, atol=1e-5, rtol=1e-5)


def test_crop_and_resolution_change_the_features(encoder):
    """The options are not ignored: cropping a non-square photo and a smaller side give other features."""
    photo = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    full, cropped = encoder.encode(photo), encoder.encode(photo, center_crop=True)
    assert full.shape == cropped.shape and (full - cropped).abs().max() > 1e-2
    assert encoder.encode(photo, 224).shape[0] == 256
