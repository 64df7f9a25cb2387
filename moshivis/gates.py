"""Kyutai's coloured text: how much the model looked at its image while it spoke, from the gates.

Kyutai's MoshiVis servers send each text piece with one colour byte (message kind 0x07; the web client
maps 0..10 onto an 11-colour palette). Read from their code (kyuteye_pt/kyuteye/modules/transformer.py
and server.py; kyuteye_rs moshi-core transformer.rs and moshi-backend stream_both.rs):

    g     = mean over the last min(10, num_layers) layers of that layer's mean gate
            (the mean of sigmoid(gate MLP - 4) over the model dimension; a layer that skipped the block,
            no image or before xa_start, adds 0 but still counts in the divisor)
    color = round(clamp((g - 0.005) / 0.016, 0, 1) * 10)

`Engine.gate_means` gives the per-layer means of a step. Rounding: Kyutai's PyTorch server uses Python's
round (ties to even, as torch.round here), its Rust server f32::round (ties away from zero); they differ
only when (g - 0.005) / 0.016 * 10 is exactly k + 0.5.
"""
from __future__ import annotations

import torch

LAST_LAYERS = 10   # the layers Kyutai averages: the last ten (all of them in a smaller model)
GATE_FLOOR, GATE_SPAN, LEVELS = 0.005, 0.016, 10


def image_gate(gate_means: torch.Tensor) -> torch.Tensor:
    """g per stream [B] (fp64) from per-layer mean gates [B, num_layers]: the mean of the last
    min(10, num_layers) layers."""
    if gate_means.dim() != 2 or gate_means.shape[1] < 1:
        raise ValueError(f"gate_means must be [streams, num_layers >= 1], got shape {list(gate_means.shape)}")
    last = min(LAST_LAYERS, gate_means.shape[1])
    return gate_means[:, -last:].double().sum(1) / last


def text_colors(gate_means: torch.Tensor) -> list[int]:
    """Kyutai's colour byte (0..10) per stream from per-layer mean gates [B, num_layers]."""
    level = ((image_gate(gate_means) - GATE_FLOOR) / GATE_SPAN).clamp(0, 1) * LEVELS
    return [int(c) for c in torch.round(level).tolist()]
