"""`DVLM`: a loaded model with its processor, adapter and diffusion recipe; `load` builds one.

This is the one generate path: the CLI, server, eval and bench all call `DVLM.generate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from PIL import Image
from torch import nn

from dvlm.config import ConfigError, DecodeConfig, DiffusionConfig, from_dict
from dvlm.data.images import DEFAULT_LIMITS, ImageLimits
from dvlm.data.processor import ChatProcessor, Encoded, PromptTooLongError
from dvlm.data.tokenizer import load_tokenizer
from dvlm.decode.output import GenerationOutput
from dvlm.model.adapters.base import Adapter
from dvlm.model.adapters.registry import adapter_for_checkpoint
from dvlm.model.checkpoint_files import CheckpointError, check_weights, read_config, saved_dtype
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
        return self.processor.encode(prompt, images, add_generation_prompt=True)

    def generate(self, prompts: Any, images: Any = None, *, decoder: str | None = None,
                 **decode_options: Any) -> GenerationOutput | list[GenerationOutput]:
        """Decode one prompt (-> GenerationOutput) or a batch of prompts (-> list).

        Args:
            prompts: a string, a chat message list (OpenAI-style dicts, with image parts), or a list
                of either for a batch.
            images: for one prompt, its images (or one image); for a batch, one list of images (or
                one image, or None) per prompt. An image is a path, bytes, a data: URL or a PIL image.
            decoder: `block` (default for converted models), `spec`, `ar` or `hf`.
            decode_options: DecodeConfig fields (block_size, threshold, steps, max_new_tokens, ...).
        """
        single = _is_single_prompt(prompts)
        batch = [prompts] if single else list(prompts)
        per_prompt = _images_per_prompt(images, single, len(batch))
        cfg = DecodeConfig(decoder=decoder or ("block" if self.diffusion else "ar"), **decode_options)
        encoded = self._encode_batch(batch, per_prompt, cfg)
        outputs = decoder_function(cfg.decoder)(self, encoded, cfg)
        return outputs[0] if single else outputs

    def stream(self, prompt: Any, images: Any = None, *, decoder: str | None = None,
               **decode_options: Any) -> "TextStream":
        """Like `generate` for one prompt, but an iterator of text pieces as blocks are committed.

        After the loop, `stream.output` holds the GenerationOutput."""
        from dvlm.decode.stream import TextStream

        if not _is_single_prompt(prompt):
            raise ValueError("stream() takes one prompt; use generate() for a batch")
        cfg = DecodeConfig(decoder=decoder or ("block" if self.diffusion else "ar"), **decode_options)
        encoded = self._encode_batch([prompt], _images_per_prompt(images, True, 1), cfg)
        run = decoder_function(cfg.decoder)
        return TextStream(lambda listener: run(self, encoded, cfg, listener=listener)[0], self.processor.decode)

    def _encode_batch(self, batch: list[Any], images: list[Any], cfg: DecodeConfig) -> list[Encoded]:
        """Encode every prompt and check it fits the model's positions; errors name the prompt's index."""
        encoded = []
        for index, (prompt, prompt_images) in enumerate(zip(batch, images)):
            try:
                encoded.append(self.encode(prompt, prompt_images))
                self._check_positions(encoded[-1], cfg.max_new_tokens)
            except ValueError as err:
                if len(batch) == 1:
                    raise
                raise PromptError(index, err) from err
        return encoded

    def _check_positions(self, encoded: Encoded, max_new_tokens: int) -> None:
        """Refuse a prompt that alone reaches the model's last position; warn when the answer could."""
        limit = self.adapter.max_positions(self.model)
        if limit is None:
            return
        next_position = len(encoded) + encoded.rope_delta
        if next_position >= limit:
            raise PromptTooLongError(next_position, limit, f"the prompt takes {next_position} positions; the model "
                                     f"has {limit} (max_position_embeddings)")
        if next_position + max_new_tokens > limit:
            warnings.warn(f"the prompt uses {next_position} positions and max_new_tokens={max_new_tokens} could take "
                          f"the answer past the model's {limit} (max_position_embeddings); the model was not "
                          "trained on positions beyond that", PositionLimitWarning, stacklevel=3)


class PositionLimitWarning(UserWarning):
    """Prompt + max_new_tokens may exceed the model's maximum position."""


class PromptError(ValueError):
    """A prompt of a batch cannot be encoded; the message starts with its index."""

    def __init__(self, index: int, error: ValueError):
        super().__init__(f"prompt {index}: {error}")
        self.index = index
        self.error = error


def _is_single_prompt(prompts: Any) -> bool:
    if isinstance(prompts, Mapping):
        raise ValueError("a prompt is a string or a list of message dicts, not one dict; "
                         "wrap a single message in a list: [message]")
    if isinstance(prompts, str):
        return True
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(f"prompts must be a string, a list of messages or a non-empty list of prompts, "
                         f"got {type(prompts).__name__ if prompts is not None else None}"
                         + (" (empty)" if isinstance(prompts, (list, tuple)) else ""))
    return isinstance(prompts[0], Mapping)  # one chat: a list of message dicts


_ONE_IMAGE = (str, Path, bytes, bytearray, memoryview, Image.Image)


def _images_per_prompt(images: Any, single: bool, count: int) -> list[list[Any] | None]:
    """One image list (or None) per prompt; a lone image stands for a list of one."""
    def as_list(value: Any) -> list[Any] | None:
        return None if value is None else [value] if isinstance(value, _ONE_IMAGE) else list(value)

    if images is None:
        return [None] * count
    if single:
        return [as_list(images)]
    if isinstance(images, _ONE_IMAGE):
        raise ValueError("for a batch of prompts, give one image list (or None) per prompt")
    per_prompt = [as_list(item) for item in images]
    if len(per_prompt) != count:
        raise ValueError(f"{count} prompts but {len(per_prompt)} image lists")
    return per_prompt


def decoder_function(name: str) -> Callable[..., list[GenerationOutput]]:
    from dvlm.decode.ar import generate_ar
    from dvlm.decode.block import generate_block
    from dvlm.decode.hf import generate_hf
    from dvlm.decode.speculative import (
        generate_speculative,
        generate_speculative_quadratic,
    )

    decoders = {"ar": generate_ar, "block": generate_block, "spec": generate_speculative,
                "spec-quadratic": generate_speculative_quadratic, "hf": generate_hf}
    if name not in decoders:
        raise ConfigError(f"unknown decoder {name!r}; choose one of {', '.join(decoders)}")
    return decoders[name]


def diffusion_config_of(model: nn.Module, source: str = "config.json") -> DiffusionConfig | None:
    raw = getattr(model.config, DIFFUSION_CONFIG_KEY, None)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{source}: the '{DIFFUSION_CONFIG_KEY}' section must be an object")
    try:
        return from_dict(DiffusionConfig, dict(raw))
    except ConfigError as err:
        raise ConfigError(f"{source}, section '{DIFFUSION_CONFIG_KEY}': {err}") from err


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local checkpoint directory, or the directory of a built-in model name."""
    path = Path(name_or_path)
    if path.exists():
        return path
    from dvlm.zoo.registry import (
        builtin_path,  # lazily: the zoo is optional for library users
    )

    found = builtin_path(str(name_or_path))
    if found is None:
        raise FileNotFoundError(f"model {name_or_path!r}: no such directory and no built-in model of that name")
    return found


def load(name_or_path: str | Path, *, device: str | None = None, dtype: str | None = None,
         max_length: int | None = None, image_limits: ImageLimits = DEFAULT_LIMITS) -> DVLM:
    """Load a converted dVLM or a plain AR checkpoint from a local directory (safetensors only).

    `dtype` None/"auto": the checkpoint's own dtype (see `runtime.pick_dtype`)."""
    path = resolve_model_path(name_or_path)
    config = read_config(path)
    adapter = adapter_for_checkpoint(path)
    check_weights(path)
    _check_processor_files(path)
    dev = pick_device(device)
    model = adapter.load_model(path, pick_dtype(dtype, dev, saved_dtype(config)), dev)
    processor = ChatProcessor(load_tokenizer(path), adapter.load_image_processor(path), max_length=max_length,
                              image_limits=image_limits)
    return DVLM(model, adapter, processor, diffusion_config_of(model, str(path / "config.json")), str(path))


PROCESSOR_FILES = {"preprocessor_config.json": "the image processor's settings",
                   "tokenizer_config.json": "the tokenizer's settings"}


def _check_processor_files(path: Path) -> None:
    for name, what in PROCESSOR_FILES.items():
        if not (path / name).is_file():
            raise CheckpointError(f"{path} has no {name} ({what}); copy it from the model the checkpoint "
                                  "came from, or re-save the processor with save_pretrained")
