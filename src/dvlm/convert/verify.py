"""Conversion checks: the converted model in causal mode must give the source model's logits."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from dvlm.data.collate import collate
from dvlm.data.processor import ChatProcessor, Encoded
from dvlm.model.adapters.base import Adapter

PROBE_TEXT = "Describe the image in one sentence."


def probe_image(size: int = 56) -> Image.Image:
    """A deterministic RGB gradient: a probe image needing no file or download."""
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def probe_input(processor: ChatProcessor) -> Encoded:
    """A short chat with one image: text, image tokens and the family's positions all take part."""
    return processor.encode(PROBE_TEXT, [probe_image()], add_generation_prompt=True)


@torch.inference_mode()
def causal_logits(adapter: Adapter, model: nn.Module, sample: Encoded, pad_token_id: int) -> torch.Tensor:
    """(L, V) logits of a plain causal forward, through the same seams decoding uses."""
    device = next(model.parameters()).device
    batch = collate([sample], pad_token_id).to(device)
    return adapter.logits(model, adapter.causal_hidden_states(model, batch))[0].float()


def max_logit_difference(reference: torch.Tensor, converted: torch.Tensor, ignore_ids: list[int]) -> float:
    """Largest |difference| over the source vocabulary, ignoring the added columns (mask token)."""
    vocab = reference.shape[-1]
    keep = torch.ones(vocab, dtype=torch.bool)
    keep[[i for i in ignore_ids if i < vocab]] = False
    return float((reference[:, keep] - converted[:, :vocab][:, keep]).abs().max())
