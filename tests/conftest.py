"""Shared fixtures: tiny random Qwen2.5-VL checkpoints built on the spot (AR + both presets)."""

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
from dvlm.zoo.tiny import TinyShape, build_random_checkpoint  # noqa: E402
from dvlm.zoo.tokenizer import build_tokenizer  # noqa: E402

# A larger init std than HF's 0.02 makes random models give varied, non-repeating outputs, so
# equality tests between decoders compare real token sequences.
TEST_SHAPE = TinyShape(initializer_range=0.3)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def ar_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return build_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "ar", tokenizer, TEST_SHAPE, seed=0)


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
