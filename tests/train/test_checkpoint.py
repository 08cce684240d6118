"""Training checkpoints: complete, loadable, atomic, rotated; resume restores the training state."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dvlm
from dvlm.config import TrainConfig
from dvlm.train import checkpoint as checkpoint_module
from dvlm.train.checkpoint import OPTIMIZER_FILE, RNG_FILE, STATE_FILE, list_checkpoints
from dvlm.train.loop import FINAL_DIR, METRICS_FILE, train
from dvlm.zoo.tasks import export_llava, get_task

CHECKPOINT_FILES = {"model.safetensors", "config.json", OPTIMIZER_FILE, RNG_FILE, STATE_FILE}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    samples = get_task("shapes-qa").generate("train", 8, seed=0) + get_task("multi-turn").generate("train", 4, seed=0)
    return export_llava(samples, tmp_path_factory.mktemp("data"))


CONFIG = TrainConfig(max_steps=5, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, save_every=1, keep_checkpoints=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data, fast_checkpoint):
    """A finished 5-step run saving every step and keeping 2 checkpoints."""
    return train(fast_checkpoint, data, tmp_path_factory.mktemp("run") / "run", CONFIG, progress=False)


def test_only_newest_checkpoints_are_kept(run):
    names = sorted(p.name for p in run.run_dir.iterdir())
    assert names == ["checkpoint-000004", "checkpoint-000005", METRICS_FILE, FINAL_DIR]  # no .tmp left
    assert [step for step, _ in list_checkpoints(run.run_dir)] == [4, 5]


@pytest.mark.parametrize("step", [4, 5])
def test_checkpoint_is_complete_and_loadable(run, step):
    path = run.run_dir / f"checkpoint-{step:06d}"
    assert CHECKPOINT_FILES <= {p.name for p in path.iterdir()}
    state = json.loads((path / STATE_FILE).read_text())
    assert state["step"] == step and state["total_steps"] == CONFIG.max_steps
    assert state["train_config"] == dataclasses.asdict(CONFIG)
    lm = dvlm.load(path)
    assert lm.diffusion is not None and lm.diffusion.mask_token_id >= 0
    saved = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    assert saved["scheduler"]["last_epoch"] == step
    assert len(saved["optimizer"]["state"]) == sum(1 for _ in lm.model.parameters())  # Adam moments per param


def test_checkpoint_rng_state_loads_without_pickle(run):
    rng = torch.load(run.run_dir / "checkpoint-000005" / RNG_FILE, weights_only=True)
    assert set(rng) == {"python", "numpy", "torch", "cuda"}


def test_final_model_loads_and_equals_last_checkpoint(run):
    lm = dvlm.load(run.model_dir)
    assert lm.diffusion == dvlm.load(run.run_dir / "checkpoint-000005").diffusion
    final = load_file(run.model_dir / "model.safetensors")
    last = load_file(run.run_dir / "checkpoint-000005" / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert lm.processor.tokenizer.get_vocab()[lm.diffusion.mask_token] == lm.diffusion.mask_token_id


def test_weights_change_during_training(run, fast_checkpoint):
    before = load_file(fast_checkpoint / "model.safetensors")
    after = load_file(run.model_dir / "model.safetensors")
    assert not all(torch.equal(before[k], after[k]) for k in before)


def test_incomplete_checkpoint_dir_is_not_listed(tmp_path):
    (tmp_path / "checkpoint-000001").mkdir()
    (tmp_path / "checkpoint-000001" / STATE_FILE).write_text("{}")
    (tmp_path / "checkpoint-000002").mkdir()  # killed before its state file was written
    (tmp_path / ".checkpoint-000003.tmp").mkdir()
    (tmp_path / ".checkpoint-000003.tmp" / STATE_FILE).write_text("{}")
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1]
    assert list_checkpoints(tmp_path / "missing") == []


class Killed(Exception):
    pass


def test_crash_while_saving_leaves_previous_checkpoint_to_resume(tmp_path, data, fast_checkpoint, monkeypatch):
    cfg = dataclasses.replace(CONFIG, max_steps=4, save_every=2, keep_checkpoints=1)
    real_save = torch.save

    def crash_on_final_rng(obj, path, *args, **kwargs):
        if Path(path).name == RNG_FILE and Path(path).parent.name == ".checkpoint-000004.tmp":
            raise Killed
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_on_final_rng)
    with pytest.raises(Killed):
        train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "run" / ".checkpoint-000004.tmp").is_dir()  # half-written ...
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]  # ... and not a checkpoint

    result = train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False, resume=True)
    assert len(result.losses) == 2  # steps 3 and 4 only
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint-000004", METRICS_FILE, FINAL_DIR]  # stale .tmp cleaned up
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()] == [
        1, 2, 3, 4,
    ]


def test_resume_loads_checkpoint_files_without_pickle(tmp_path, data, fast_checkpoint, monkeypatch):
    cfg = dataclasses.replace(CONFIG, max_steps=2)
    train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "load", recording_load)
    train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False, resume=True)
    assert calls and all(flag is True for flag in calls)


def test_resuming_a_finished_run_changes_nothing(tmp_path, data, fast_checkpoint):
    cfg = dataclasses.replace(CONFIG, max_steps=2)
    train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False)
    metrics = (tmp_path / "run" / METRICS_FILE).read_text()
    weights = load_file(tmp_path / "run" / FINAL_DIR / "model.safetensors")
    result = train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False, resume=True)
    assert result.losses == []
    assert (tmp_path / "run" / METRICS_FILE).read_text() == metrics
    again = load_file(result.model_dir / "model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
