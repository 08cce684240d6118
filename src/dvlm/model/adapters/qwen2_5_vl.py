"""Qwen2.5-VL adapter (transformers 5.x `Qwen2_5_VLForConditionalGeneration`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, Qwen2_5_VLForConditionalGeneration

from dvlm.model.adapters.base import Adapter
from dvlm.model.adapters.registry import register


@register
class Qwen25VLAdapter(Adapter):
    architectures = ("Qwen2_5_VLForConditionalGeneration",)

    def load_model(self, path: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation="sdpa"
        )
        return model.to(device).eval()

    def load_image_processor(self, path: str | Path) -> Any:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        return Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)

    def embed(self, model, input_ids, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        embeds = model.get_input_embeddings()(input_ids)  # (B, L, D)
        if pixel_values is None:
            return embeds
        features = model.model.get_image_features(pixel_values, image_grid_thw).pooler_output
        features = torch.cat(list(features), dim=0).to(embeds.dtype)  # (num_image_tokens, D)
        slots = input_ids == model.config.image_token_id
        if int(slots.sum()) != features.shape[0]:
            raise ValueError(
                f"{int(slots.sum())} image tokens in the text but {features.shape[0]} image features"
            )
        embeds = embeds.clone()
        embeds[slots] = features
        return embeds

    def hidden_states(self, model, inputs_embeds, position_ids, attention_mask, cache=None) -> torch.Tensor:
        out = model.model.language_model(
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=cache is not None,
        )
        return out.last_hidden_state

    def logits(self, model, hidden) -> torch.Tensor:
        return model.lm_head(hidden)

    def vision_parameters(self, model) -> list[nn.Parameter]:
        visual = model.model.visual  # the ViT; its `merger` is the projector and trains with the LM
        return [p for name, p in visual.named_parameters() if not name.startswith("merger.")]

    def new_cache(self, model) -> Any:
        return DynamicCache(config=model.config)
