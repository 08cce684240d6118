"""The recipe's schedules as a real run follows them, read back from its metrics.jsonl.

The expected values are worked out by hand from the recipe as DESIGN.md and the README state it
("during training B grows over {2, 4, ..., B_max} with progress"; each size gets an equal share of
the first `anneal_fraction` of training, the rest trains at B_max), not from the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dvlm.config import TrainConfig
from dvlm.tasks.builtin import export_llava, get_task
from dvlm.train.loop import METRICS_FILE, lr_lambda, train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return export_llava(get_task("shapes-qa").generate("train", 4, seed=0), tmp_path_factory.mktemp("data"))


def logged(run: Path, key: str) -> list:
    return [json.loads(line)[key] for line in (run / METRICS_FILE).read_text().splitlines()]


def test_block_size_anneals_by_the_recipe_in_a_real_run(tmp_path, data, reference_checkpoints):
    """10 steps, B_max = 16, anneal_fraction = 0.8. The sizes are 2, 4, 8, 16 (four stages); the
    first 0.8 * 10 = 8 steps anneal, 8 / 4 = 2 steps per stage: steps 1-2 at B=2, 3-4 at 4, 5-6
    at 8, 7-8 at 16; steps 9-10 are past the annealing, at 16.

    A run stuck at B=2 fails this; so do stages rounded to the nearest step (they would start half
    a stage early: 2, 4, 4, 8, ...) and stages computed in floats (6 / 10 / 0.8 * 4 = 2.9999999999999996
    puts step 7 at B=8)."""
    cfg = TrainConfig(max_steps=10, batch_size=2, learning_rate=1e-4, warmup_ratio=0.0)
    run = tmp_path / "run"
    train(reference_checkpoints["fast-dvlm"], data, run, cfg, progress=False,
          diffusion_overrides={"block_size": 16, "anneal_block_size": True, "anneal_fraction": 0.8})
    assert logged(run, "step") == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert logged(run, "block_size") == [2, 2, 4, 4, 8, 8, 16, 16, 16, 16]


def test_block_size_is_constant_without_annealing(tmp_path, data, reference_checkpoints):
    """The diffusionvl preset does not anneal: every step at its B = 8."""
    cfg = TrainConfig(max_steps=3, batch_size=2, learning_rate=1e-4, warmup_ratio=0.0)
    train(reference_checkpoints["diffusionvl"], data, tmp_path / "run", cfg, progress=False)
    assert logged(tmp_path / "run", "block_size") == [8, 8, 8]


def test_learning_rate_warms_up_and_decays_in_a_real_run(tmp_path, data, reference_checkpoints):
    """6 steps, peak 1e-3, warmup_ratio 0.5, min_lr_ratio 0.2. Warmup takes 0.5 * 6 = 3 steps:
    (s + 1) / 3 of the peak at steps s = 0, 1, 2. Cosine over the other 3 steps, progress
    p = (s - 3) / 3: factor 0.2 + 0.8 * (1 + cos(pi p)) / 2 = 1, 0.8, 0.4 at s = 3, 4, 5."""
    cfg = TrainConfig(max_steps=6, batch_size=2, learning_rate=1e-3, warmup_ratio=0.5, min_lr_ratio=0.2)
    train(reference_checkpoints["fast-dvlm"], data, tmp_path / "run", cfg, progress=False)
    assert logged(tmp_path / "run", "lr") == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 8e-4, 4e-4], rel=1e-9)


def test_warmup_takes_exactly_its_share_of_the_steps():
    """warmup_ratio 0.29 of 100 steps is 29 warmup steps (0.29 * 100 is 28.999999999999996 in floats):
    step 27 at 28/29 of the peak, step 28 at the peak, step 29 the first of the cosine (the peak).
    0.57 of 100: 57 steps (56.99999999999999 in floats), then a cosine over 43 steps that ends at
    min_lr_ratio and stays there."""
    factor = lr_lambda(100, TrainConfig(warmup_ratio=0.29))
    assert [factor(s) for s in (0, 27, 28, 29)] == pytest.approx([1 / 29, 28 / 29, 1.0, 1.0], rel=1e-12)
    factor = lr_lambda(100, TrainConfig(warmup_ratio=0.57, min_lr_ratio=0.1))
    assert [factor(s) for s in (55, 56, 57)] == pytest.approx([56 / 57, 1.0, 1.0], rel=1e-12)
    assert [factor(s) for s in (100, 101, 143)] == pytest.approx([0.1, 0.1, 0.1], rel=1e-12)
