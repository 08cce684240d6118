"""The facade users touch: `dvlm.load` and `DVLM` (a loaded model that generates).

    import dvlm
    model = dvlm.load("tiny-dvlm")                     # a checkpoint directory or a built-in name
    out = model.generate("What is in the picture?", images=["cat.png"], decoder="block")
    chat = model.chat()                                # a conversation that keeps its KV between turns
    out = chat.send("What is in the picture?", images=["cat.png"])

`DVLM` is a `dvlm.model.loaded.LoadedModel` (network, adapter, processor, recipe) with `generate`
and `stream`, which run the one generate path (`dvlm.decode.generate`) that the CLI, the
evaluation harness and the benchmark run too, and `chat` (`dvlm.decode.session`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvlm.data.images import DEFAULT_LIMITS, ImageLimits
from dvlm.decode import generate as generate_path
from dvlm.decode.generate import PositionLimitWarning, PromptError
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prompts import PREFIX_CACHE_MB, VISION_CACHE_MB
from dvlm.decode.session import ChatSession
from dvlm.decode.stream import TextStream
from dvlm.model.loaded import LoadedModel
from dvlm.zoo.registry import resolve_model

__all__ = ["DVLM", "ChatSession", "PositionLimitWarning", "PromptError", "load", "resolve_model_path"]


class DVLM(LoadedModel):
    """A vision-language model ready to decode: AR always, block diffusion once converted."""

    def generate(self, prompts: Any, images: Any = None, *, decoder: str | None = None,
                 **decode_options: Any) -> GenerationOutput | list[GenerationOutput]:
        """Decode one prompt (-> GenerationOutput) or a batch of prompts (-> list).

        Args:
            prompts: a string, a chat message list (OpenAI-style dicts, with image parts), or a list
                of either for a batch.
            images: for one prompt, its images (or one image); for a batch, one list of images (or
                one image, or None) per prompt. An image is a path, bytes, a data: URL or a PIL image.
            decoder: `block` (default for converted models), `spec`, `spec-quadratic`, `ar` or `hf`.
            decode_options: DecodeConfig fields (block_size, threshold, steps, max_new_tokens, ...);
                what the model's recipe decides when not given. `out.settings` records what was used.
        Raises:
            ConfigError: invalid settings, or a decoder the model cannot serve. PromptError: a
            prompt of a batch cannot be encoded (its index first). ValueError, ImageError: one prompt.
        """
        return generate_path.generate(self, prompts, images, decoder=decoder, **decode_options)

    def stream(self, prompt: Any, images: Any = None, *, decoder: str | None = None,
               **decode_options: Any) -> TextStream:
        """Like `generate` for one prompt, but an iterator of text pieces as blocks are committed.

        After the loop, `stream.output` holds the GenerationOutput."""
        return generate_path.stream(self, prompt, images, decoder=decoder, **decode_options)

    def chat(self, *, decoder: str | None = None, vision_cache_mb: float = VISION_CACHE_MB,
             prefix_cache_mb: float = PREFIX_CACHE_MB, **decode_options: Any) -> ChatSession:
        """A conversation: `session.send(text, images=...)` answers the next user message (a
        GenerationOutput) and keeps the keys/values of the conversation so far, so the next turn
        prefills only its new tokens; images already sent are not encoded again. Each answer equals
        `generate` of the whole conversation. `session.reset()` starts over.

        Args:
            decoder, decode_options: as `generate` (the settings of every turn).
            vision_cache_mb, prefix_cache_mb: memory for the session's image features and for the
                keys/values of the conversation (MiB; 0 turns that cache off).
        """
        return ChatSession(self, decoder=decoder, vision_cache_mb=vision_cache_mb, prefix_cache_mb=prefix_cache_mb,
                           **decode_options)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A local checkpoint directory, or the directory of a built-in model name (`dvlm.zoo.registry.resolve_model`)."""
    return resolve_model(name_or_path)


def load(name_or_path: str | Path, *, device: str | None = None, dtype: str | None = None,
         max_length: int | None = None, image_limits: ImageLimits = DEFAULT_LIMITS, quantize: str | None = None) -> DVLM:
    """Load a converted dVLM or a plain AR checkpoint from a local directory (safetensors only), or
    a built-in model by name (`tiny-ar`, `tiny-dvlm`).

    `dtype` None/"auto": the checkpoint's own dtype (see `runtime.pick_dtype`). `quantize`: an
    int8/fp8 scheme of `dvlm.model.quantize` applied after loading (`dvlm quantize` writes checkpoints
    that carry their own)."""
    return DVLM.load(resolve_model_path(name_or_path), device=device, dtype=dtype, max_length=max_length,
                     image_limits=image_limits, quantize=quantize)
