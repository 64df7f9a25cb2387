"""A tiny random MoshiVis bundle made on the fly: the model, Mimi, a SigLIP tower and a text tokenizer.

For trying the whole speech + image pipeline (`python -m moshivis.server --demo`) and for tests, with
no downloaded weights. Every weight is random: the "answers" are noise and random words, not speech.
Sizes keep the real structure where it matters to the pipeline: Mimi's real frame (24 kHz, 1920
samples, 8 codebooks) and a square SigLIP grid; everything else is tiny.
"""
from __future__ import annotations

import dataclasses
import io

import torch

from .config import MoshiVisConfig, preset

SENTENCES = ["the cat sat on the mat", "a photo of a dog in the park", "what do you see in this picture",
             "I see a red square on a blue background", "hello how are you today", "the weather is nice and sunny",
             "there is a small green tree next to the house", "can you tell me what colour the car is"]


def demo_config() -> MoshiVisConfig:
    """The `tiny` preset with a square SigLIP grid (4x4 = 16 tokens of 24) and Mimi's codebook size."""
    return dataclasses.replace(preset("tiny"), num_image_tokens=16, audio_card=64)


def tiny_mimi(gen: torch.Generator):
    """transformers' MimiModel with the real frame (ratios 8,6,5,4 and x2 downsampling = 1920 samples) at tiny
    widths, random weights; a sliding window of 4 steps so a few frames already go past it."""
    from transformers import MimiConfig, MimiModel
    cfg = MimiConfig(hidden_size=16, num_filters=4, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=32, codebook_size=64, codebook_dim=8, vector_quantization_hidden_dimension=8,
                     num_quantizers=8, upsample_groups=16, sliding_window=4)
    with torch.random.fork_rng():  # transformers' own init (whose spread sets the scales below) from `gen`
        torch.manual_seed(int(torch.randint(0, 2 ** 31, (), generator=gen)))
        model = MimiModel(cfg).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("embed_sum"):  # codebooks start as zeros: make the codes vary
                b.copy_(torch.randn(b.shape, generator=gen))
        for name, p in model.named_parameters():
            if "layernorm" not in name:
                scale = p.std().item() if p.numel() > 1 else 0.0
                p.copy_(torch.randn(p.shape, generator=gen) * max(scale, 0.02))
        last = model.decoder.decoder_seanet.layers[-1].conv  # keep the output in [-1, 1]: 16-bit WAV holds it
        last.weight.mul_(0.02)
        last.bias.zero_()
    return model


def tiny_siglip(gen: torch.Generator):
    """A SiglipVisionModel of 28x28 pixels, patch 7 (16 tokens of 24), random weights."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    cfg = SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                             image_size=28, patch_size=7, vision_use_head=False)
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def tiny_tokenizer_model(vocab_size: int) -> bytes:
    """A SentencePiece model of `vocab_size` pieces trained on a few sentences (ids 0..3 as Kyutai's:
    unk, bos, eos, and 3 the text padding token)."""
    import sentencepiece as spm
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_writer=buf, vocab_size=vocab_size,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    return buf.getvalue()


def demo_bundle(seed: int = 0, device: str = "cpu"):
    """(cfg, weights, Media) of a random tiny model with Mimi, SigLIP and a tokenizer, all in memory."""
    import tempfile
    from pathlib import Path

    from . import checkpoint
    from .audio import MimiCodec
    from .serve.media import Media
    from .text import TextTokenizer
    from .vision import ImageEncoder
    gen = torch.Generator().manual_seed(seed)
    cfg = demo_config()
    weights = checkpoint.random_init(cfg, seed=seed)
    codec = MimiCodec(tiny_mimi(gen).to(device), num_codebooks=cfg.dep_q)
    vision = ImageEncoder(tiny_siglip(gen).to(device))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.model"
        path.write_bytes(tiny_tokenizer_model(cfg.text_card))
        tokenizer = TextTokenizer(path, text_card=cfg.text_card, padding_id=cfg.padding_token_id)
    return cfg, weights, Media(codec, vision, tokenizer)
