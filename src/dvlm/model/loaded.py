"""`LoadedModel`: a checkpoint ready to run: the network, its family's adapter, its chat processor and,
once converted, its diffusion recipe. Decoders, the trainer, the converter's verification and the
server's engine take this object; the facade users touch (`dvlm.DVLM`) is a `LoadedModel` that can
also generate.

The recipe travels inside the checkpoint's `config.json`, under `RECIPE_KEY`; `read_recipe` and
`write_recipe` are the only code that knows where.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dvlm.config import ConfigError, DiffusionConfig, from_dict
from dvlm.data.images import DEFAULT_LIMITS, ImageLimits
from dvlm.data.positions import PositionScheme
from dvlm.data.processor import ChatProcessor, Encoded
from dvlm.model.adapters.base import Adapter
from dvlm.model.adapters.registry import adapter_for_checkpoint
from dvlm.model.checkpoint_files import (
    CheckpointError,
    check_processor_files,
    check_weights,
    declared_eos_token_ids,
    read_config,
    saved_dtype,
)
from dvlm.model.checkpoint_writing import write_companions
from dvlm.model.quantize import check_can_quantize, quantize_model, scheme_to_apply
from dvlm.runtime import pick_device, pick_dtype

RECIPE_KEY = "dvlm"
"""The section of a converted checkpoint's config.json that holds its DiffusionConfig."""


class LoadedModel:
    """A vision-language model ready to run: AR always, block diffusion once converted."""

    def __init__(self, model: nn.Module, adapter: Adapter, processor: ChatProcessor,
                 diffusion: DiffusionConfig | None, path: str | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.processor = processor
        self.diffusion = diffusion
        self.path = path

    @classmethod
    def load(cls, path: str | Path, *, device: str | None = None, dtype: str | None = None,
             max_length: int | None = None, image_limits: ImageLimits = DEFAULT_LIMITS, quantize: str | None = None):
        """Load a converted dVLM or a plain AR checkpoint from a local directory (safetensors only).

        `dtype` None/"auto": the checkpoint's own dtype (see `runtime.pick_dtype`). `quantize`: a
        `dvlm.model.quantize` scheme applied after loading; a checkpoint written by `dvlm quantize` applies
        its own."""
        path = Path(path)
        config = read_config(path)
        adapter = adapter_for_checkpoint(path)
        check_weights(path)
        check_processor_files(path)
        dev = pick_device(device)
        scheme = scheme_to_apply(quantize, config)
        if scheme is not None:
            check_can_quantize(scheme, dev)  # an unusable scheme fails before the weights load
        model = adapter.load_model(path, pick_dtype(dtype, dev, saved_dtype(config)), dev)
        if scheme is not None:
            quantize_model(model, adapter, scheme)
        processor = adapter.load_processor(path, max_length=max_length, image_limits=image_limits)
        return cls(model, adapter, processor, read_recipe(model, str(path / "config.json")), str(path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def positions(self) -> PositionScheme:
        """The family's position ids: the prompt's, and those of the text decoded after it."""
        return self.processor.positions

    @property
    def eos_token_ids(self) -> list[int]:
        """Every token that ends an answer (`end_token_ids`: the chat's end of turn and the tokenizer's
        eos, config.json's and generation_config.json's `eos_token_id`), as transformers' `generate`
        stops. A converted model stops on the ids its recipe recorded at conversion (the same union,
        taken from the source checkpoint)."""
        if self.diffusion is not None:
            return self.diffusion.eos_token_ids
        generation = getattr(self.model, "generation_config", None)
        return end_token_ids(self.processor.eos_token_ids, self.model.config.to_dict(),
                             generation.to_dict() if generation is not None else {})

    @property
    def mask_token_id(self) -> int:
        return self.require_diffusion("block").mask_token_id

    @property
    def banned_token_ids(self) -> list[int]:
        """Ids a decoder must never produce: the mask token."""
        return [self.diffusion.mask_token_id] if self.diffusion else []

    @property
    def default_decoder(self) -> str:
        return "block" if self.diffusion is not None else "ar"

    def require_diffusion(self, decoder: str) -> DiffusionConfig:
        return require_recipe(self.diffusion, decoder, self.path)

    def encode(self, prompt: Any, images: Sequence[Any] | None = None) -> Encoded:
        """A prompt string or a chat message list (+ images) -> the generation-ready Encoded prompt."""
        return self.processor.encode(prompt, images, add_generation_prompt=True)

    def max_positions(self) -> int | None:
        return self.adapter.max_positions(self.model)

    def save(self, out: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """`state_dict`: the weights to write when the model holds only its shard of them (FSDP2).
        The chat template and generation config come from the directory the model was loaded from."""
        save_model(self.model, self.processor, Path(out), state_dict=state_dict, source=self.path)


def end_token_ids(chat: list[int], config: dict[str, Any], generation: dict[str, Any]) -> list[int]:
    """The tokens that end an answer: the chat's (the template's end-of-turn token, the tokenizer's
    eos), then those config.json and generation_config.json declare (`declared_eos_token_ids`)."""
    return list(dict.fromkeys([*chat, *declared_eos_token_ids(config, generation)]))


def require_recipe(diffusion: DiffusionConfig | None, decoder: str, path: str | None = None) -> DiffusionConfig:
    """The recipe a diffusion decoder needs; a ConfigError naming what to do for a plain AR model."""
    if diffusion is None:
        raise ConfigError(
            f"decoder={decoder!r} needs a block-diffusion checkpoint; {path or 'this model'} is a "
            "plain AR model. Convert it with `dvlm convert` (and fine-tune it with `dvlm train`), or use "
            "decoder='ar' / 'hf'."
        )
    return diffusion


def save_model(model: nn.Module, processor: ChatProcessor, out: Path, max_shard_size: int | None = None,
               state_dict: dict[str, torch.Tensor] | None = None, source: str | Path | None = None) -> None:
    """A complete, loadable checkpoint: safetensors weights, config (with the recipe, if any),
    tokenizer and image processor, and `source`'s chat template and generation config (the checkpoint
    directory the model came from; `dvlm.model.checkpoint_writing`). `max_shard_size` in bytes (None:
    transformers' default); `state_dict` the weights to write when the model holds only a shard
    (gathered by the caller)."""
    out.mkdir(parents=True, exist_ok=True)
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict, **options)
    processor.save_pretrained(out)
    write_companions(out, processor.format.template, source)


def read_recipe(model: nn.Module, source: str = "config.json") -> DiffusionConfig | None:
    """The DiffusionConfig a converted model carries in its config; None for a plain AR model."""
    raw = getattr(model.config, RECIPE_KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: the '{RECIPE_KEY}' section must be an object")
    try:
        return from_dict(DiffusionConfig, dict(raw))
    except ConfigError as err:
        raise ConfigError(f"{source}, section '{RECIPE_KEY}': {err}") from err


def write_recipe(model: nn.Module, diffusion: DiffusionConfig) -> None:
    """Put the recipe into the model's config, so that a saved checkpoint carries it."""
    setattr(model.config, RECIPE_KEY, diffusion.to_dict())


def has_recipe(config: dict[str, Any]) -> bool:
    """Whether a config.json (as a dict) belongs to a converted dVLM."""
    return RECIPE_KEY in config
