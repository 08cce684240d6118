"""Qwen2-VL adapter (transformers 5.x `Qwen2VLForConditionalGeneration`).

Qwen2-VL is Qwen2.5-VL's predecessor and shares everything dvlm touches: the ChatML layout with
Qwen's vision tokens (`qwen_chat`), 3-axis M-RoPE numbered the same way (`mrope`), the image
processor (patches + grids, merge 2), and the seams (`model.model.get_image_features`,
`model.model.language_model`, `model.lm_head`). Only the network differs: a vision tower with
full attention in every block (no window attention) whose `embed_dim` is the ViT width and whose
`hidden_size` is the projector's output (the language model's width), merged by its own
`merger`. So this adapter is the Qwen2.5-VL one with Qwen2-VL's class and config.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from dvlm.model.adapters.base import TinyShape
from dvlm.model.adapters.qwen2_5_vl import MERGE_SIZE, PATCH_SIZE, Qwen25VLAdapter, mrope_section
from dvlm.model.adapters.registry import register


@register
class Qwen2VLAdapter(Qwen25VLAdapter):
    architectures = ("Qwen2VLForConditionalGeneration",)
    family = "Qwen2-VL"
    model_class = Qwen2VLForConditionalGeneration

    def random_model(self, tokenizer: Any, shape: TinyShape) -> nn.Module:
        return Qwen2VLForConditionalGeneration(tiny_config(tokenizer, shape))


def tiny_config(tokenizer: Any, shape: TinyShape) -> Qwen2VLConfig:
    """A Qwen2-VL config sized by `shape`, with special-token ids taken from `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=shape.max_position_embeddings,
        rope_scaling={"type": "mrope", "mrope_section": mrope_section(shape)},
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, initializer_range=shape.initializer_range,
    )
    # Qwen2-VL names the ViT width `embed_dim` and the projector's output `hidden_size`.
    vision = dict(
        depth=shape.vision_depth, embed_dim=shape.vision_hidden_size, hidden_size=shape.hidden_size,
        mlp_ratio=2, num_heads=shape.vision_heads, patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE,
    )
    return Qwen2VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        initializer_range=shape.initializer_range,
    )
