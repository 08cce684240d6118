"""Adapters: what dvlm needs to know about one family of HF vision-language models.

An adapter is keyed by the `architectures` entry of a checkpoint's `config.json`. Supporting a new
family (Qwen2-VL, a LLaVA-style model, ...) means one new module with an `Adapter` subclass
decorated with `@register`; nothing else in dvlm changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no adapter."""


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


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter available for its architectures."""
    for arch in cls.architectures:
        _REGISTRY[arch] = cls
    return cls


def supported_architectures() -> list[str]:
    _load_builtin_adapters()
    return sorted(_REGISTRY)


def adapter_for_architecture(architecture: str) -> Adapter:
    _load_builtin_adapters()
    if architecture not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[architecture]()


WEIGHTS_INDEX = "model.safetensors.index.json"
"""A sharded checkpoint's map of tensor names to shard files."""


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or damaged; the message names the file at fault."""


def read_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict, with clear errors for a missing or bad directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"model path {p} is not a directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{p} has no config.json: is it a Hugging Face checkpoint directory?")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg} must hold a JSON object, not {type(config).__name__}")
    return config


def check_weights(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files, each with a readable header; dvlm loads nothing else.

    Raises CheckpointError naming the file for missing, empty, truncated or corrupt weights."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        found = sorted(f.name for f in p.iterdir() if f.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        raise CheckpointError(
            f"{p} has no .safetensors weights{' (found ' + ', '.join(found) + ')' if found else ''}; dvlm "
            "loads weights only from safetensors. Re-save the model with save_pretrained(safe_serialization=True).")
    for file in weight_files(p):
        try:
            with safe_open(file, "pt"):  # parses the header and checks it covers the whole file
                pass
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}); the checkpoint is "
                                  "truncated or damaged") from err
    return files


def weight_files(src: Path) -> list[Path]:
    """The safetensors files holding the weights: those the index names, else every one."""
    index = src / WEIGHTS_INDEX
    if not index.is_file():
        return sorted(src.glob("*.safetensors"))
    try:
        files = sorted({src / name for name in json.loads(index.read_text())["weight_map"].values()})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index} is not a valid shard index (a 'weight_map' object): {err!r}") from err
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shard(s) missing from {src}: {', '.join(missing)}")
    return files


def saved_dtype(config: dict[str, Any]) -> str | None:
    """The dtype a checkpoint's weights were saved in (`dtype`, or the older `torch_dtype`, at the top
    level or in `text_config`), e.g. "bfloat16"; None when config.json does not say."""
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, str):
                return value.removeprefix("torch.")
    return None


def adapter_for_checkpoint(path: str | Path) -> Adapter:
    config = read_config(path)
    architectures = config.get("architectures") or []
    if not architectures:
        raise UnsupportedArchitectureError(f"{path}/config.json names no architectures")
    return adapter_for_architecture(architectures[0])


def _load_builtin_adapters() -> None:
    # Importing the modules runs their @register decorators.
    from dvlm.convert import qwen2_5_vl  # noqa: F401
