"""`DVLM`: a loaded model with its processor, adapter and diffusion recipe; `load` builds one.

This is the one generate path: the CLI, server, eval and bench all call `DVLM.generate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from dvlm.config import ConfigError, DecodeConfig, DiffusionConfig, from_dict
from dvlm.convert.registry import Adapter, adapter_for_checkpoint
from dvlm.data.processor import ChatProcessor, Encoded, load_tokenizer
from dvlm.decode.output import GenerationOutput
from dvlm.runtime import pick_device, pick_dtype

if TYPE_CHECKING:
    from dvlm.decode.stream import TextStream

DIFFUSION_CONFIG_KEY = "dvlm"


class DVLM:
    """A vision-language model ready to decode: AR always, block diffusion once converted."""

    def __init__(self, model: nn.Module, adapter: Adapter, processor: ChatProcessor,
                 diffusion: DiffusionConfig | None, path: str | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.processor = processor
        self.diffusion = diffusion
        self.path = path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def eos_token_ids(self) -> list[int]:
        return self.diffusion.eos_token_ids if self.diffusion else self.processor.eos_token_ids

    @property
    def mask_token_id(self) -> int:
        return self.require_diffusion("block").mask_token_id

    @property
    def banned_token_ids(self) -> list[int]:
        """Ids a decoder must never produce: the mask token."""
        return [self.diffusion.mask_token_id] if self.diffusion else []

    def require_diffusion(self, decoder: str) -> DiffusionConfig:
        if self.diffusion is None:
            raise ConfigError(
                f"decoder={decoder!r} needs a block-diffusion checkpoint; {self.path or 'this model'} is a "
                "plain AR model. Convert it with `dvlm convert` (and fine-tune it with `dvlm train`), or use "
                "decoder='ar' / 'hf'."
            )
        return self.diffusion

    def encode(self, prompt: Any, images: Sequence[Any] | None = None) -> Encoded:
        """A prompt string or a chat message list (+ images) -> the generation-ready Encoded prompt."""
        encoded = self.processor.encode(prompt, images, add_generation_prompt=True)
        if self.diffusion and bool((encoded.input_ids == self.diffusion.mask_token_id).any()):
            # Decoders find the positions to fill by the mask id; a prompt may not contain it.
            raise ValueError(f"the prompt contains the mask token {self.diffusion.mask_token!r}")
        return encoded

    def generate(self, prompts: Any, images: Sequence[Any] | None = None, *, decoder: str | None = None,
                 **decode_options: Any) -> GenerationOutput | list[GenerationOutput]:
        """Decode one prompt (-> GenerationOutput) or a batch of prompts (-> list).

        Args:
            prompts: a string, a chat message list (OpenAI-style dicts, with image parts), or a list
                of either for a batch.
            images: for one prompt, its images; for a batch, one list of images per prompt.
            decoder: `block` (default for converted models), `spec`, `ar` or `hf`.
            decode_options: DecodeConfig fields (block_size, threshold, steps, max_new_tokens, ...).
        """
        single = _is_single_prompt(prompts)
        batch = [prompts] if single else list(prompts)
        if images is None:
            per_prompt = [None] * len(batch)
        else:
            per_prompt = [images] if single else list(images)
        if len(per_prompt) != len(batch):
            raise ValueError(f"{len(batch)} prompts but {len(per_prompt)} image lists")
        cfg = DecodeConfig(decoder=decoder or ("block" if self.diffusion else "ar"), **decode_options)
        encoded = [self.encode(p, imgs) for p, imgs in zip(batch, per_prompt)]
        outputs = decoder_function(cfg.decoder)(self, encoded, cfg)
        return outputs[0] if single else outputs


    def stream(self, prompt: Any, images: Sequence[Any] | None = None, *, decoder: str | None = None,
               **decode_options: Any) -> "TextStream":
        """Like `generate` for one prompt, but an iterator of text pieces as blocks are committed.

        After the loop, `stream.output` holds the GenerationOutput."""
        from dvlm.decode.stream import TextStream

        if not _is_single_prompt(prompt):
            raise ValueError("stream() takes one prompt; use generate() for a batch")
        cfg = DecodeConfig(decoder=decoder or ("block" if self.diffusion else "ar"), **decode_options)
        encoded = [self.encode(prompt, images)]
        run = decoder_function(cfg.decoder)
        return TextStream(lambda listener: run(self, encoded, cfg, listener=listener)[0], self.processor.decode)


def _is_single_prompt(prompts: Any) -> bool:
    if isinstance(prompts, str):
        return True
    if isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict):
        return True  # one chat: a list of message dicts
    return False


def decoder_function(name: str) -> Callable[..., list[GenerationOutput]]:
    from dvlm.decode.ar import generate_ar
    from dvlm.decode.block import generate_block
    from dvlm.decode.hf import generate_hf
    from dvlm.decode.speculative import generate_speculative, generate_speculative_quadratic

    decoders = {"ar": generate_ar, "block": generate_block, "spec": generate_speculative,
                "spec-quadratic": generate_speculative_quadratic, "hf": generate_hf}
    if name not in decoders:
        raise ConfigError(f"unknown decoder {name!r}; choose one of {', '.join(decoders)}")
    return decoders[name]


def diffusion_config_of(model: nn.Module) -> DiffusionConfig | None:
    raw = getattr(model.config, DIFFUSION_CONFIG_KEY, None)
    return None if raw is None else from_dict(DiffusionConfig, dict(raw))


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local checkpoint directory, or the directory of a built-in model name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    from dvlm.zoo.registry import builtin_path  # lazily: the zoo is optional for library users

    found = builtin_path(str(name_or_path))
    if found is None:
        raise FileNotFoundError(f"model {name_or_path!r}: no such directory and no built-in model of that name")
    return found


def load(name_or_path: str | Path, *, device: str | None = None, dtype: str | None = None,
         max_length: int | None = None) -> DVLM:
    """Load a converted dVLM or a plain AR checkpoint from a local directory (safetensors only)."""
    path = resolve_model_path(name_or_path)
    adapter = adapter_for_checkpoint(path)
    dev = pick_device(device)
    model = adapter.load_model(path, pick_dtype(dtype, dev), dev)
    processor = ChatProcessor(
        load_tokenizer(path), adapter.load_image_processor(path), max_length=max_length
    )
    return DVLM(model, adapter, processor, diffusion_config_of(model), str(path))
