"""The adapter interface: what dvlm needs to know about one family of HF vision-language models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class Adapter:
    """Bridges dvlm's diffusion logic and one model family's HF implementation.

    The diffusion code only ever calls these methods, so masks, positions and caches are passed
    through documented seams (inputs_embeds, 4-D masks, explicit position ids, Cache objects).
    """

    architectures: ClassVar[tuple[str, ...]] = ()

    # -- loading -----------------------------------------------------------------------------
    def load_model(self, path: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def load_image_processor(self, path: str | Path) -> Any:
        raise NotImplementedError

    # -- forward pieces ----------------------------------------------------------------------
    def embed(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L) ids (+ images) -> (B, L, D) input embeddings with vision features in place."""
        raise NotImplementedError

    def hidden_states(
        self,
        model: nn.Module,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Any | None = None,
    ) -> torch.Tensor:
        """Run the language model. attention_mask: (B, 1, Q, K) additive float. Returns (B, Q, D).

        With a cache, the forward appends this call's keys/values to it."""
        raise NotImplementedError

    def logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """(..., D) hidden states -> (..., V) logits."""
        raise NotImplementedError

    def new_cache(self, model: nn.Module) -> Any:
        raise NotImplementedError

    def vision_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters of the vision encoder, without the projector (for their own learning rate)."""
        raise NotImplementedError

    def model_dtype(self, model: nn.Module) -> torch.dtype:
        return next(model.parameters()).dtype

    def max_positions(self, model: nn.Module) -> int | None:
        """The largest position id the language model was built for (None: no stated limit)."""
        return getattr(model.config.get_text_config(), "max_position_embeddings", None)
