"""Tiny Qwen2.5-VL-architecture checkpoints built on the spot (random weights).

The architecture is the real HF class; only the sizes are small. Tests build their fixtures with
this, and the built-in model starts from it before AR training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

PATCH_SIZE = 14
MERGE_SIZE = 2


@dataclass
class TinyShape:
    """Sizes of a tiny Qwen2.5-VL. mrope_section must sum to head_dim / 2."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    """Std of the random init; tests use a larger one so random models give varied outputs."""

    def mrope_section(self) -> list[int]:
        half = self.hidden_size // self.num_heads // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


def tiny_config(tokenizer: Any, shape: TinyShape | None = None) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config sized by `shape`, with special-token ids taken from `tokenizer`."""
    shape = shape or TinyShape()
    ids = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer)
    text = dict(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, vocab_size=vocab,
        max_position_embeddings=shape.max_position_embeddings,
        rope_scaling={"type": "mrope", "mrope_section": shape.mrope_section()},
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, initializer_range=shape.initializer_range,
    )
    vision = dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden_size,
        intermediate_size=2 * shape.vision_hidden_size, num_heads=shape.vision_heads,
        patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, out_hidden_size=shape.hidden_size,
        fullatt_block_indexes=[shape.vision_depth - 1], window_size=PATCH_SIZE * MERGE_SIZE * 2,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        initializer_range=shape.initializer_range,
    )


def tiny_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
        min_pixels=min_pixels, max_pixels=max_pixels,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def build_random_checkpoint(out: str | Path, tokenizer: Any, shape: TinyShape | None = None, seed: int = 0,
                            image_processor: Any = None) -> Path:
    """Write a randomly initialised tiny Qwen2.5-VL checkpoint (safetensors + tokenizer +
    image processor) to `out`, loadable by `dvlm.load` and convertible by `dvlm convert`."""
    out = Path(out)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, shape))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (image_processor or tiny_image_processor()).save_pretrained(out)
    return out


def describe(shape: TinyShape) -> dict[str, Any]:
    return asdict(shape)
