"""What the HTTP layer needs to know: the server's settings and the served model's description.

`ServedModel` is deliberately narrow (a name, an `encode` function, the recipe, the position and
image limits): the HTTP layer never touches the network itself, so an engine built on another
runtime (an SGLang or vLLM model plugin) can sit behind the same app.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dvlm.config import ConfigError, DecodeConfig, DiffusionConfig, check_field_types
from dvlm.data.images import DEFAULT_LIMITS, MIB, ImageLimits
from dvlm.data.processor import Encoded
from dvlm.decode.prompts import PREFIX_CACHE_MB, VISION_CACHE_MB
from dvlm.model.loaded import LoadedModel
from dvlm.serve.requests import SERVED_DECODERS


@dataclass(frozen=True)
class ServeSettings:
    """`dvlm serve` options; validated when built (a ConfigError says what to change)."""

    api_key: str | None = None
    """Clients must send `Authorization: Bearer <api_key>` (None: no key)."""
    decoder: str | None = None
    """Default decoder of a request that names none (None: block for converted models, else ar)."""
    block_size: int | None = None
    """Default block size (None: the model's)."""
    threshold: float | None = None
    """Default confidence threshold of block decoding (None: the model's)."""
    steps: int | None = None
    """Default fixed step count of block decoding, instead of a threshold."""
    max_batch_size: int = 16
    """Rows the engine decodes together."""
    max_queue: int = 64
    """Requests waiting to start (being prepared or queued); more are refused with 429."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens, images included (None: only the model's positions limit it)."""
    max_tokens: int = 512
    """Largest max_tokens a request may ask for, and the answer limit of one that asks for none."""
    request_timeout_s: float | None = 600.0
    """Wall-clock limit of one request from submission (None: none)."""
    max_body_bytes: int = 48 * MIB
    """Largest request body (data: URL images travel inside it)."""
    max_images: int = 16
    """Most images in one request."""
    allow_local_images: Path | None = None
    """Directory whose files requests may name as images (None: no local files)."""
    allow_remote_images: bool = False
    """Fetch http(s) image URLs."""
    remote_timeout_s: float = 10.0
    """Wall-clock limit of one image download."""
    encode_workers: int = 2
    """Threads that parse, load images and encode prompts (off the event loop)."""
    compile: bool = False
    """Decode under torch.compile (`DecodeConfig.compile`; CUDA graphs on a GPU)."""
    vision_cache_mb: float = VISION_CACHE_MB
    """Memory for the vision tower's features of images seen before (0: no vision cache)."""
    prefix_cache_mb: float = PREFIX_CACHE_MB
    """Memory for the keys/values of earlier prompts and answers, reused by prompts that start with
    them (0: no prefix cache)."""

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("max_batch_size", "max_queue", "max_tokens", "max_body_bytes", "max_images", "encode_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        for name in ("vision_cache_mb", "prefix_cache_mb"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ConfigError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        for name in ("request_timeout_s", "remote_timeout_s"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.decoder is not None and self.decoder not in SERVED_DECODERS:
            raise ConfigError(f"decoder={self.decoder!r} is not served; choose one of {', '.join(SERVED_DECODERS)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty")
        # The default decoding settings must be ones a request could give (same checks, same messages).
        DecodeConfig(decoder=self.decoder or "block", block_size=self.block_size, threshold=self.threshold,
                     steps=self.steps)

    @property
    def default_knobs(self) -> dict[str, Any]:
        """The server's decoding defaults that are set."""
        return {k: v for k, v in (("block_size", self.block_size), ("threshold", self.threshold),
                                  ("steps", self.steps)) if v is not None}


@dataclass(frozen=True)
class ServedModel:
    """The model as the HTTP layer sees it; its forward is only ever called by the engine."""

    name: str
    """The id clients send as `model` and `GET /v1/models` lists."""
    encode: Callable[[list[dict[str, Any]]], Encoded]
    """Chat messages (processor parts, images as PIL) -> the generation-ready prompt. Thread-safe."""
    diffusion: DiffusionConfig | None
    """The block-diffusion recipe (None: a plain AR model, decoder ar only)."""
    max_positions: int | None
    """The model's position limit (max_position_embeddings), None if it states none."""
    image_limits: ImageLimits = field(default=DEFAULT_LIMITS)

    @classmethod
    def from_lm(cls, lm: LoadedModel, name: str) -> "ServedModel":
        return cls(name, lm.encode, lm.diffusion, lm.max_positions(), lm.processor.image_limits)

    @property
    def default_decoder(self) -> str:
        return "block" if self.diffusion is not None else "ar"
