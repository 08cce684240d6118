"""The adapter registry finds every family module by itself, and every family implements the whole
interface: adding a family is one module in `dvlm.model.adapters` plus its tests."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

import dvlm.model.adapters as adapters_package
from dvlm.model.adapters.base import Adapter
from dvlm.model.adapters.registry import (
    REFERENCE_ARCHITECTURE,
    UnsupportedArchitectureError,
    adapter_for_architecture,
    reference_adapter,
    supported_architectures,
)


def abstract_methods(cls: type) -> set[str]:
    """Methods of `cls` whose body only raises NotImplementedError: what a family must write."""
    tree = ast.parse(inspect.getsource(cls))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
            if len(body) == 1 and isinstance(body[0], ast.Raise) and "NotImplementedError" in ast.unparse(body[0]):
                found.add(node.name)
    return found


def adapter_classes() -> list[type[Adapter]]:
    """Every Adapter subclass defined in a module of the adapters package."""
    classes = []
    for module in pkgutil.iter_modules(adapters_package.__path__):
        loaded = importlib.import_module(f"{adapters_package.__name__}.{module.name}")
        classes += [c for c in vars(loaded).values() if isinstance(c, type) and issubclass(c, Adapter)
                    and c is not Adapter and c.__module__ == loaded.__name__]
    return classes


def test_the_interface_has_abstract_methods_to_check():
    assert {"chat_format", "image_features", "embed_with_features", "split_images", "hidden_states", "logits", "new_cache",
            "vision_parameters", "tokenizer_spec", "random_model", "tiny_image_processor"} <= abstract_methods(Adapter)


def test_every_adapter_module_is_registered_without_listing_it():
    classes = adapter_classes()
    assert classes, "no adapter found in dvlm.model.adapters"
    for cls in classes:
        assert cls.architectures and cls.family, f"{cls.__name__} needs architectures and a family name"
        for architecture in cls.architectures:
            assert architecture in supported_architectures()
            assert type(adapter_for_architecture(architecture)) is cls


@pytest.mark.parametrize("architecture", supported_architectures())
def test_every_family_implements_the_whole_interface(architecture):
    cls = type(adapter_for_architecture(architecture))
    missing = sorted(name for name in abstract_methods(Adapter) if getattr(cls, name) is getattr(Adapter, name))
    assert missing == [], f"{cls.__name__} does not implement {missing}"
    # load_model: the family names its transformers class, or loads the model itself.
    assert cls.model_class is not None or cls.load_model is not Adapter.load_model
    assert cls.model_class is None or architecture in (cls.model_class.__name__, *cls.architectures)


def test_the_reference_family_is_registered():
    assert REFERENCE_ARCHITECTURE in supported_architectures()
    assert REFERENCE_ARCHITECTURE in reference_adapter().architectures


def test_an_unknown_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match=REFERENCE_ARCHITECTURE):
        adapter_for_architecture("NoSuchVLForConditionalGeneration")
