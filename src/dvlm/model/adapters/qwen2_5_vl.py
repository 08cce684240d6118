"""Qwen2.5-VL adapter (transformers 5.x `Qwen2_5_VLForConditionalGeneration`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    DynamicCache,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from dvlm.data.chat import ChatFormat
from dvlm.data.template import ChatTemplate
from dvlm.data.vision import VisionInputs
from dvlm.model.adapters.base import (
    Adapter,
    ImageInputs,
    TinyShape,
    TokenizerSpec,
    language_model_hidden_states,
    place_image_features,
)
from dvlm.model.adapters.mrope import MRopePositions, check_mrope_section
from dvlm.model.adapters.qwen_chat import (
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    ENDOFTEXT,
    SPECIAL_TOKENS,
    QwenChatFormat,
)
from dvlm.model.adapters.registry import register

PATCH_SIZE = 14
MERGE_SIZE = 2


@register
class Qwen25VLAdapter(Adapter):
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    family = "Qwen2.5-VL"
    model_class = Qwen2_5_VLForConditionalGeneration
    fallback_template = CHAT_TEMPLATE
    fallback_system_prompt = DEFAULT_SYSTEM_PROMPT

    def check_config(self, config: dict[str, Any], source: str) -> None:
        check_mrope_section(config, source)

    def load_image_processor(self, path: str | Path) -> Any:
        # Explicit PIL class: AutoImageProcessor would pick the torchvision backend when
        # torchvision is importable; both produce the same pixel_values and grids.
        return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)

    def chat_format(self, tokenizer: Any, image_processor: Any, template: ChatTemplate | None = None) -> ChatFormat:
        return QwenChatFormat(tokenizer, image_processor, MRopePositions(int(image_processor.merge_size)),
                              *self.chat_layout(tokenizer, template))

    def image_features(self, model, vision: VisionInputs) -> torch.Tensor:
        features = model.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"]).pooler_output
        return torch.cat(list(features), dim=0)  # (num_image_tokens, D)

    def embed_with_features(self, model, input_ids, features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = model.get_input_embeddings()(input_ids)  # (R, L, D)
        if features is None:
            return embeds
        return place_image_features(embeds, input_ids, model.config.image_token_id, features)[0]

    def split_images(self, model, vision: VisionInputs) -> list[ImageInputs]:
        return split_patches(vision, model.config.vision_config.spatial_merge_size)

    def hidden_states(self, model, inputs_embeds, position_ids, attention_mask, cache=None) -> torch.Tensor:
        return language_model_hidden_states(model.model.language_model, inputs_embeds, position_ids,
                                            attention_mask, cache)

    def logits(self, model, hidden) -> torch.Tensor:
        return model.lm_head(hidden)

    def new_cache(self, model) -> Any:
        return DynamicCache(config=model.config)

    def hf_generate_inputs(self, batch) -> dict[str, Any]:
        # Qwen's generate numbers its M-RoPE positions from the token types.
        return {"mm_token_type_ids": batch.mm_token_type_ids, **super().hf_generate_inputs(batch)}

    def vision_parameters(self, model) -> list[nn.Parameter]:
        visual = model.model.visual  # the ViT; its `merger` is the projector and trains with the LM
        return [p for name, p in visual.named_parameters() if not name.startswith("merger.")]

    def tokenizer_spec(self) -> TokenizerSpec:
        return TokenizerSpec(SPECIAL_TOKENS, pad_token=ENDOFTEXT, eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)

    def random_model(self, tokenizer: Any, shape: TinyShape) -> nn.Module:
        return Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer, shape))

    def tiny_image_processor(self, min_pixels: int, max_pixels: int) -> Any:
        return Qwen2VLImageProcessorPil(
            patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
            min_pixels=min_pixels, max_pixels=max_pixels,
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        )


def split_patches(vision: VisionInputs, merge_size: int) -> list[ImageInputs]:
    """Qwen's images one by one: `pixel_values` holds each image's t·h·w patches in turn
    (`image_grid_thw` row by row), and each image fills t·h·w / merge² image tokens. Its vision
    tower attends within an image only (per-image `cu_seqlens`), so each image alone gives the
    features it gets among others."""
    grids = vision["image_grid_thw"]  # (images, 3)
    patches = grids.prod(dim=1).tolist()
    parts = vision["pixel_values"].split(patches)
    return [ImageInputs(VisionInputs({"pixel_values": part, "image_grid_thw": grid[None]}), count // merge_size ** 2)
            for part, grid, count in zip(parts, grids, patches)]


def mrope_section(shape: TinyShape) -> list[int]:
    """The temporal / height / width split of half a head's rotary dimensions (sums to head_dim / 2)."""
    half = shape.hidden_size // shape.num_heads // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_config(tokenizer: Any, shape: TinyShape) -> Qwen2_5_VLConfig:
    """A Qwen2.5-VL config sized by `shape`, with special-token ids taken from `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer)
    text = dict(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, vocab_size=vocab,
        max_position_embeddings=shape.max_position_embeddings,
        rope_scaling={"type": "mrope", "mrope_section": mrope_section(shape)},
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
