"""Fixtures of the training tests that need one family only: what they check (a schedule, the
data-parallel arithmetic) lives above the adapter seam, so they run once per preset, not per family."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvlm.convert.conversion import convert_checkpoint
from dvlm.model.adapters.registry import reference_adapter
from dvlm.zoo.tiny import build_random_checkpoint
from dvlm.zoo.tokenizer import build_tokenizer
from tests.conftest import TEST_SHAPE


@pytest.fixture(scope="session")
def reference_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny random checkpoint of the reference family, converted with each preset."""
    adapter = reference_adapter()
    root = tmp_path_factory.mktemp("reference")
    ar = build_random_checkpoint(root / "ar", build_tokenizer(adapter=adapter), TEST_SHAPE, adapter=adapter)
    for preset in ("fast-dvlm", "diffusionvl"):
        convert_checkpoint(ar, root / preset, preset=preset, log=lambda _: None)
    return {preset: root / preset for preset in ("fast-dvlm", "diffusionvl")}
