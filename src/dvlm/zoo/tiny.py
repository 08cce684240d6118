"""Tiny checkpoints of a supported family, built on the spot (random weights).

The architecture is the family's real HF class; only the sizes are small. Tests build their
fixtures with this, and the built-in models start from it before AR training; both use the
reference family (`dvlm.model.adapters.registry.reference_adapter`) unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvlm.model.adapters.base import Adapter, TinyShape
from dvlm.model.adapters.registry import reference_adapter
from dvlm.runtime import seed_everything

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
"""The default tiny image processor's range: 4 to 16 image tokens per image for the reference family."""


def tiny_image_processor(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                         adapter: Adapter | None = None) -> Any:
    return (adapter or reference_adapter()).tiny_image_processor(min_pixels, max_pixels)


def build_random_checkpoint(out: str | Path, tokenizer: Any, shape: TinyShape | None = None, seed: int = 0,
                            image_processor: Any = None, adapter: Adapter | None = None) -> Path:
    """Write a randomly initialised tiny checkpoint of the family (safetensors + tokenizer + image
    processor) to `out`, loadable by `dvlm.load` and convertible by `dvlm convert`."""
    adapter = adapter or reference_adapter()
    out = Path(out)
    seed_everything(seed)
    model = adapter.random_model(tokenizer, shape or TinyShape())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (image_processor or tiny_image_processor(adapter=adapter)).save_pretrained(out)
    return out
