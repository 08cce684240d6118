"""Adapters: what dvlm needs to know about one family of HF vision-language models.

An adapter is keyed by the `architectures` entry of a checkpoint's `config.json`. Supporting a new
family (Qwen2-VL, a LLaVA-style model, ...) means one new module in this package with an `Adapter`
subclass decorated with `@register`: every module here is imported on first use, so nothing
else in dvlm changes.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from pathlib import Path

from dvlm.model.adapters.base import Adapter
from dvlm.model.checkpoint_files import read_config


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture has no adapter."""


_REGISTRY: dict[str, type[Adapter]] = {}


def register(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make an adapter available for its architectures."""
    for arch in cls.architectures:
        _REGISTRY[arch] = cls
    return cls


def supported_architectures() -> list[str]:
    _load_builtin_adapters()
    return sorted(_REGISTRY)


def assembling_architectures() -> list[str]:
    """Architectures whose adapter can assemble a checkpoint from a language model and a vision tower."""
    _load_builtin_adapters()
    return sorted(arch for arch, cls in _REGISTRY.items() if cls.assemble is not Adapter.assemble)


def adapter_for_architecture(architecture: str) -> Adapter:
    _load_builtin_adapters()
    if architecture not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[architecture]()


def adapter_for_checkpoint(path: str | Path) -> Adapter:
    config = read_config(path)
    architectures = config.get("architectures") or []
    if not architectures:
        raise UnsupportedArchitectureError(f"{path}/config.json names no architectures")
    return adapter_for_architecture(architectures[0])


@functools.cache
def _load_builtin_adapters() -> None:
    """Import every module of this package (once): importing runs their @register decorators."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")


REFERENCE_ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"
"""The family of the built-in models and of the test fixtures' random models."""


def reference_adapter() -> Adapter:
    return adapter_for_architecture(REFERENCE_ARCHITECTURE)
