"""The one generate path: prompts (+ images) -> encoded batch -> a decoder -> GenerationOutputs.

`DVLM.generate` / `DVLM.stream` (the facade), the CLI, the evaluation harness, the benchmark and
the demo all call `generate` or `stream` here; the server's engine drives the same decoders'
steppers. Settings are resolved once (`dvlm.decode.settings.resolve`) before any prompt is encoded.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from dvlm.config import ConfigError, DecodeConfig
from dvlm.data.processor import Encoded, PromptTooLongError
from dvlm.decode.ar import generate_ar
from dvlm.decode.block import generate_block
from dvlm.decode.hf import generate_hf
from dvlm.decode.output import GenerationOutput
from dvlm.decode.settings import resolve
from dvlm.decode.speculative import generate_speculative, generate_speculative_quadratic
from dvlm.decode.stream import TextStream
from dvlm.model.loaded import LoadedModel

DECODERS: dict[str, Callable[..., list[GenerationOutput]]] = {
    "ar": generate_ar, "block": generate_block, "spec": generate_speculative,
    "spec-quadratic": generate_speculative_quadratic, "hf": generate_hf,
}


class PositionLimitWarning(UserWarning):
    """Prompt + max_new_tokens may exceed the model's maximum position."""


class PromptError(ValueError):
    """A prompt of a batch cannot be encoded; the message starts with its index."""

    def __init__(self, index: int, error: ValueError):
        super().__init__(f"prompt {index}: {error}")
        self.index = index
        self.error = error


def decoder_function(name: str) -> Callable[..., list[GenerationOutput]]:
    if name not in DECODERS:
        raise ConfigError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return DECODERS[name]


def generate(lm: LoadedModel, prompts: Any, images: Any = None, *, decoder: str | None = None,
             **decode_options: Any) -> GenerationOutput | list[GenerationOutput]:
    """Decode one prompt (-> GenerationOutput) or a batch of prompts (-> list); see `DVLM.generate`."""
    single = is_single_prompt(prompts)
    batch = [prompts] if single else list(prompts)
    per_prompt = images_per_prompt(images, single, len(batch))
    cfg = resolve(DecodeConfig(decoder=decoder or lm.default_decoder, **decode_options), lm.diffusion, lm.path)
    encoded = encode_prompts(lm, batch, per_prompt, cfg.max_new_tokens)
    outputs = decoder_function(cfg.decoder)(lm, encoded, cfg)
    return outputs[0] if single else outputs


def stream(lm: LoadedModel, prompt: Any, images: Any = None, *, decoder: str | None = None,
           **decode_options: Any) -> TextStream:
    """Like `generate` for one prompt, but an iterator of text pieces as blocks are committed.

    After the loop, `stream.output` holds the GenerationOutput."""
    if not is_single_prompt(prompt):
        raise ValueError("stream() takes one prompt; use generate() for a batch")
    cfg = resolve(DecodeConfig(decoder=decoder or lm.default_decoder, **decode_options), lm.diffusion, lm.path)
    encoded = encode_prompts(lm, [prompt], images_per_prompt(images, True, 1), cfg.max_new_tokens)
    run = decoder_function(cfg.decoder)
    return TextStream(lambda listener: run(lm, encoded, cfg, listener=listener)[0], lm.processor.decode)


def encode_prompts(lm: LoadedModel, batch: list[Any], images: list[Any], max_new_tokens: int) -> list[Encoded]:
    """Encode every prompt and check it fits the model's positions; errors name the prompt's index."""
    encoded = []
    for index, (prompt, prompt_images) in enumerate(zip(batch, images)):
        try:
            encoded.append(lm.encode(prompt, prompt_images))
            check_positions(lm, encoded[-1], max_new_tokens)
        except ValueError as err:
            if len(batch) == 1:
                raise
            raise PromptError(index, err) from err
    return encoded


def check_positions(lm: LoadedModel, encoded: Encoded, max_new_tokens: int) -> None:
    """Refuse a prompt that alone reaches the model's last position; warn when the answer could."""
    limit = lm.max_positions()
    if limit is None:
        return
    next_position = encoded.next_position
    if next_position >= limit:
        raise PromptTooLongError(next_position, limit, f"the prompt takes {next_position} positions; the model "
                                 f"has {limit} (max_position_embeddings)")
    if next_position + max_new_tokens > limit:
        warnings.warn(f"the prompt uses {next_position} positions and max_new_tokens={max_new_tokens} could take "
                      f"the answer past the model's {limit} (max_position_embeddings); the model was not "
                      "trained on positions beyond that", PositionLimitWarning, stacklevel=5)


def is_single_prompt(prompts: Any) -> bool:
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


def images_per_prompt(images: Any, single: bool, count: int) -> list[list[Any] | None]:
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
