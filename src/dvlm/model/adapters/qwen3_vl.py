"""Qwen3-VL adapter (transformers 5.x `Qwen3VLForConditionalGeneration`).

What differs from Qwen2.5-VL: a Qwen3 language model (q/k norms, explicit head_dim), patches of 16
pixels, M-RoPE whose three axes are interleaved inside the rotary embedding (the position ids
themselves are numbered exactly as Qwen2.5-VL numbers images, `MRopePositions`), and DeepStack:
the vision tower's features from several of its layers are added to the language model's hidden
states after its first layers, at the image tokens.

DeepStack through the seam. `embed` returns wide features, (R, L, D·(1 + S)) for S DeepStack
levels: the input embedding, then the S features an image token receives after LM layers 0..S-1
(zeros for text tokens). Shared code gathers, copies and pads these rows like any embedding, so
the features travel with their tokens into the prefill, the clean stream and any noisy copy;
`hidden_states` splits them again and injects each level at the rows that carry one. Adding zeros
is the identity, so finding those rows by "non-zero features" is exact; it only saves work.

A noisy stream that holds image tokens (`noisy_stream="all"`, the DiffusionVL preset): an unmasked
copy of an image token keeps its DeepStack features, exactly as it keeps its vision embedding and
its position; a masked token is the [MASK] text token and gets none. So a noisy block over image
tokens shows the model what a block forward over the cache would show it for those tokens (the
input the AR model was trained on), never an image token without the features it always had.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, Qwen3VLConfig, Qwen3VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

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
from dvlm.model.adapters.qwen2_5_vl import split_patches
from dvlm.model.adapters.qwen_chat import CHAT_TEMPLATE, ENDOFTEXT, SPECIAL_TOKENS, QwenChatFormat
from dvlm.model.adapters.registry import register

PATCH_SIZE = 16
MERGE_SIZE = 2


@register
class Qwen3VLAdapter(Adapter):
    architectures = ("Qwen3VLForConditionalGeneration",)
    family = "Qwen3-VL"
    model_class = Qwen3VLForConditionalGeneration
    fallback_template = CHAT_TEMPLATE  # Qwen3-VL's published template adds no default system turn

    def check_config(self, config: dict[str, Any], source: str) -> None:
        check_mrope_section(config, source)

    def load_image_processor(self, path: str | Path) -> Any:
        # Qwen3-VL ships a Qwen2-VL image processor (patch 16); the PIL class never needs torchvision.
        return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)

    def chat_format(self, tokenizer: Any, image_processor: Any, template: ChatTemplate | None = None) -> ChatFormat:
        return QwenChatFormat(tokenizer, image_processor, MRopePositions(int(image_processor.merge_size)),
                              *self.chat_layout(tokenizer, template))

    def image_features(self, model, vision: VisionInputs) -> torch.Tensor:
        """(N, D·(1 + S)): each image token's embedding, then its S DeepStack levels (module docstring)."""
        features, levels = image_features(model, vision)
        return torch.cat([features, levels.flatten(1)], dim=-1)

    def embed_with_features(self, model, input_ids, features: torch.Tensor | None = None) -> torch.Tensor:
        """(..., L) ids -> (..., L, D·(1 + S)): input embeddings, then S DeepStack levels (module docstring)."""
        embeds = model.get_input_embeddings()(input_ids)  # (..., L, D)
        deepstack = embeds.new_zeros(*embeds.shape[:-1], deepstack_levels(model), embeds.shape[-1])  # (..., L, S, D)
        if features is not None:
            hidden_size = embeds.shape[-1]
            embeds, slots = place_image_features(embeds, input_ids, model.config.image_token_id, features[:, :hidden_size])
            deepstack[slots] = features[:, hidden_size:].unflatten(-1, (-1, hidden_size)).to(embeds.dtype)
        return torch.cat([embeds, deepstack.flatten(-2)], dim=-1)

    def split_images(self, model, vision: VisionInputs) -> list[ImageInputs]:
        return split_patches(vision, model.config.vision_config.spatial_merge_size)

    def hidden_states(self, model, inputs_embeds, position_ids, attention_mask, cache=None) -> torch.Tensor:
        hidden_size = model.config.text_config.hidden_size
        embeds = inputs_embeds[..., :hidden_size]  # (R, Q, D)
        deepstack = inputs_embeds[..., hidden_size:].unflatten(-1, (-1, hidden_size))  # (R, Q, S, D)
        return language_model_hidden_states(model.model.language_model, embeds, position_ids, attention_mask, cache,
                                            **deepstack_inputs(deepstack))

    def logits(self, model, hidden) -> torch.Tensor:
        return model.lm_head(hidden)

    def new_cache(self, model) -> Any:
        return DynamicCache(config=model.config)

    def hf_generate_inputs(self, batch) -> dict[str, Any]:
        # Qwen's generate numbers its M-RoPE positions from the token types.
        return {"mm_token_type_ids": batch.mm_token_type_ids, **super().hf_generate_inputs(batch)}

    def vision_parameters(self, model) -> list[nn.Parameter]:
        # The ViT; its `merger` and the DeepStack mergers project into the LM and train with it.
        projectors = ("merger.", "deepstack_merger_list.")
        return [p for name, p in model.model.visual.named_parameters() if not name.startswith(projectors)]

    def tokenizer_spec(self) -> TokenizerSpec:
        return TokenizerSpec(SPECIAL_TOKENS, pad_token=ENDOFTEXT, eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)

    def random_model(self, tokenizer: Any, shape: TinyShape) -> nn.Module:
        return Qwen3VLForConditionalGeneration(tiny_config(tokenizer, shape))

    def tiny_image_processor(self, min_pixels: int, max_pixels: int) -> Any:
        return Qwen2VLImageProcessorPil(
            patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
            min_pixels=min_pixels, max_pixels=max_pixels,
            size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        )


def deepstack_levels(model: nn.Module) -> int:
    """S: how many vision-layer features DeepStack adds to the LM (after its layers 0..S-1)."""
    return len(model.config.vision_config.deepstack_visual_indexes)


def image_features(model: nn.Module, vision: VisionInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The images' token embeddings (N, D) and their DeepStack features (N, S, D), N image tokens."""
    out = model.model.get_image_features(vision["pixel_values"], vision["image_grid_thw"])
    features = torch.cat(list(out.pooler_output), dim=0)
    levels = torch.stack([torch.cat(list(level), dim=0) for level in out.deepstack_features], dim=1)
    return features, levels


def deepstack_inputs(deepstack: torch.Tensor) -> dict[str, Any]:
    """The text model's DeepStack arguments for (R, Q, S, D) features: the rows that carry any
    (text and [MASK] rows carry zeros, and adding zeros changes nothing) and their S levels."""
    visual = deepstack.ne(0).flatten(2).any(-1)  # (R, Q)
    if not bool(visual.any()):
        return {}
    return {"visual_pos_masks": visual, "deepstack_visual_embeds": list(deepstack[visual].unbind(1))}


def mrope_section(shape: TinyShape) -> list[int]:
    """The temporal / height / width counts of half a head's rotary frequencies (sums to head_dim / 2);
    Qwen3-VL interleaves them (t h w t h w ...) rather than giving each axis a contiguous range."""
    half = shape.hidden_size // shape.num_heads // 2
    spatial = half // 4
    return [half - 2 * spatial, spatial, spatial]


def tiny_config(tokenizer: Any, shape: TinyShape) -> Qwen3VLConfig:
    """A Qwen3-VL config sized by `shape`, with special-token ids taken from `tokenizer`.

    Every vision layer feeds DeepStack (at most one per LM layer), so the tiny model exercises it."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.hidden_size // shape.num_heads,
        vocab_size=len(tokenizer), max_position_embeddings=shape.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                         "mrope_section": mrope_section(shape), "mrope_interleaved": True},
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        initializer_range=shape.initializer_range,
    )
    vision = dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden_size,
        intermediate_size=2 * shape.vision_hidden_size, num_heads=shape.vision_heads,
        patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2,
        out_hidden_size=shape.hidden_size, num_position_embeddings=64,
        deepstack_visual_indexes=list(range(min(shape.vision_depth, shape.num_layers))),
        initializer_range=shape.initializer_range,
    )
    return Qwen3VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id,
        initializer_range=shape.initializer_range,
    )
