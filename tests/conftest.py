"""Shared fixtures: tiny random checkpoints of every family in FAMILIES, built on the spot (AR + both
presets). Tests that take `ar_checkpoint`, `dvlm_checkpoints`, `fast_checkpoint` or `tokenizer` run
once per family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: as fast as two for these tiny models, and far faster when the 2 cores are shared.
torch.set_num_threads(1)

from dvlm.convert.conversion import convert_checkpoint  # noqa: E402
from dvlm.convert.verify import probe_image  # noqa: E402
from dvlm.model.adapters.base import Adapter, TinyShape  # noqa: E402
from dvlm.model.adapters.registry import (  # noqa: E402
    REFERENCE_ARCHITECTURE,
    adapter_for_architecture,
)
from dvlm.zoo.tiny import build_random_checkpoint  # noqa: E402
from dvlm.zoo.tokenizer import build_tokenizer  # noqa: E402

# A larger init std than HF's 0.02 makes random models give varied, non-repeating outputs, so
# equality tests between decoders compare real token sequences.
TEST_SHAPE = TinyShape(initializer_range=0.3)


FAMILIES = (REFERENCE_ARCHITECTURE, "Qwen2VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
            "LlavaOnevisionForConditionalGeneration")
"""The architectures the shared checkpoint fixtures are built for: a new family adds its own here."""
CHECKPOINT_SEEDS = {"Qwen2VLForConditionalGeneration": 1, "LlavaOnevisionForConditionalGeneration": 2}
"""Seed of a family's random test checkpoint where 0 does not serve. The checks that give the
equality tests teeth need long, varied outputs; seed 0's tiny Qwen2-VL ends one probe answer after
9 tokens (tests/test_quantize.py wants 10) and samples the same 12 tokens under two seeds
(tests/decode/test_join.py). Seed 0's tiny LLaVA-OneVision ends some join-test answers at once."""


@pytest.fixture(scope="session", params=FAMILIES, ids=lambda a: adapter_for_architecture(a).family)
def adapter(request) -> Adapter:
    return adapter_for_architecture(request.param)


@pytest.fixture(scope="session")
def tokenizer(adapter):
    return build_tokenizer(adapter=adapter)


@pytest.fixture(scope="session")
def ar_checkpoint(tmp_path_factory, tokenizer, adapter) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "ar", tokenizer, TEST_SHAPE,
                                   seed=CHECKPOINT_SEEDS.get(adapter.architectures[0], 0),
                                   adapter=adapter)


@pytest.fixture(scope="session")
def dvlm_checkpoints(tmp_path_factory, ar_checkpoint) -> dict[str, Path]:
    """One converted checkpoint per preset."""
    root = tmp_path_factory.mktemp("converted")
    return {
        preset: convert_checkpoint(ar_checkpoint, root / preset, preset=preset, log=lambda _: None) and root / preset
        for preset in ("fast-dvlm", "diffusionvl")
    }


@pytest.fixture(scope="session")
def fast_checkpoint(dvlm_checkpoints) -> Path:
    return dvlm_checkpoints["fast-dvlm"]


@pytest.fixture(scope="session")
def image():
    return probe_image()
