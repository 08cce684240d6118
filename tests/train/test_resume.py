"""Training checkpoints: complete, loadable, atomic, rotated; resume restores the training state."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dvlm
from dvlm.config import TrainConfig
from dvlm.convert.verify import probe_image
from dvlm.data.collate import collate
from dvlm.tasks.builtin import export_llava, get_task
from dvlm.train import resume as checkpoint_module
from dvlm.train.loop import FINAL_DIR, METRICS_FILE, train
from dvlm.train.resume import (
    OPTIMIZER_FILE,
    RNG_FILE,
    STATE_FILE,
    CheckpointError,
    list_checkpoints,
    setting_changes,
)

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


def parameters_with_gradients(lm) -> int:
    """How many parameters a forward with an image gives a gradient: all of them, but for a vision
    tower's layers its projector does not read (LLaVA-OneVision takes the SigLIP features before
    the tower's post-norm). AdamW keeps moments for exactly these."""
    batch = collate([lm.processor.encode("Read the digits.", [probe_image()])], lm.processor.pad_token_id)
    lm.adapter.logits(lm.model, lm.adapter.causal_hidden_states(lm.model, batch)).sum().backward()
    return sum(1 for p in lm.model.parameters() if p.grad is not None)


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
    assert len(saved["optimizer"]["state"]) == parameters_with_gradients(lm)  # Adam moments per trained param


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


def hidden(run_dir: Path) -> list[str]:
    """Temporary folders (and files) left in a run directory."""
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory and its bytes: to show that nothing was changed."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def copy_of(run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run.run_dir, tmp_path / "run"))


class Killed(Exception):
    pass


def test_crash_while_saving_leaves_previous_checkpoint_to_resume(tmp_path, data, fast_checkpoint, monkeypatch):
    cfg = dataclasses.replace(CONFIG, max_steps=4, save_every=2, keep_checkpoints=1)
    real_save = torch.save

    def crash_on_final_rng(obj, path, *args, **kwargs):
        if Path(path).name == RNG_FILE and Path(path).parent.name.startswith(".checkpoint-000004.tmp"):
            raise Killed
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", crash_on_final_rng)
    with pytest.raises(Killed):
        train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False)
    monkeypatch.undo()
    assert hidden(tmp_path / "run") == []  # the half-written checkpoint is gone ...
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]  # ... and was never a checkpoint

    result = train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False, resume=True)
    assert len(result.losses) == 2  # steps 3 and 4 only
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["checkpoint-000004", METRICS_FILE, FINAL_DIR]  # no temporary folder
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


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_resume_removes_what_a_killed_writer_left(tmp_path, data, fast_checkpoint, run):
    copy = copy_of(run, tmp_path)
    shutil.rmtree(copy / "checkpoint-000005")
    left = copy / f".checkpoint-000005.tmp-{dead_pid()}"  # killed while writing checkpoint-000005
    left.mkdir()
    (left / "config.json").write_text("")
    train(fast_checkpoint, data, copy, CONFIG, progress=False, resume=True)
    assert hidden(copy) == [] and [step for step, _ in list_checkpoints(copy)] == [4, 5]


# -- corrupt checkpoints: fall back to the newest usable one -------------------------------------------


def truncate_weights(path: Path) -> None:
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def garble_optimizer(path: Path) -> None:
    (path / OPTIMIZER_FILE).write_bytes(b"not a torch file")


def remove_rng(path: Path) -> None:
    (path / RNG_FILE).unlink()


def garble_state(path: Path) -> None:
    (path / STATE_FILE).write_text('{"step": 5, "total_')


@pytest.mark.parametrize(("damage", "why"), [
    (truncate_weights, "model.safetensors is not a readable safetensors file .*incomplete metadata, file not fully covered"),
    (garble_optimizer, f"{OPTIMIZER_FILE}: unreadable"),
    (remove_rng, f"{RNG_FILE}: missing"),
    (garble_state, f"{STATE_FILE}: invalid JSON"),
])
def test_resume_falls_back_from_a_corrupt_newest_checkpoint(tmp_path, data, fast_checkpoint, run, capsys, damage, why):
    copy = copy_of(run, tmp_path)
    damage(copy / "checkpoint-000005")
    capsys.readouterr()
    result = train(fast_checkpoint, data, copy, CONFIG, progress=False, resume=True)
    said = [line for line in capsys.readouterr().out.splitlines() if "checkpoint-000005" in line]
    assert len(said) == 1 and re.fullmatch(
        rf"checkpoint-000005 is unusable \((?:\S*/)?{why}.*\); set aside as checkpoint-000005\.unusable, "
        r"resuming from checkpoint-000004", said[0])
    assert result.losses == run.losses[4:]  # step 5 redone exactly
    assert [step for step, _ in list_checkpoints(copy)] == [4, 5]
    assert (copy / "checkpoint-000005.unusable").is_dir()  # kept for a look, out of the rotation


def test_resume_without_a_usable_checkpoint_is_an_error(tmp_path, data, fast_checkpoint, run):
    copy = copy_of(run, tmp_path)
    remove_rng(copy / "checkpoint-000005")
    garble_state(copy / "checkpoint-000004")
    before = snapshot(copy)
    with pytest.raises(CheckpointError, match=(
            rf"^--resume: no usable checkpoint in {re.escape(str(copy))}: "
            rf"checkpoint-000005: {RNG_FILE}: missing; checkpoint-000004: {STATE_FILE}: invalid JSON")):
        train(fast_checkpoint, data, copy, CONFIG, progress=False, resume=True)
    assert snapshot(copy) == before


def test_corrupt_metrics_file_is_named(tmp_path, data, fast_checkpoint, run):
    copy = copy_of(run, tmp_path)
    lines = (copy / METRICS_FILE).read_text().splitlines()
    lines[1] = "{garbage"
    (copy / METRICS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(copy / METRICS_FILE))} line 2: not a metrics record"):
        train(fast_checkpoint, data, copy, CONFIG, progress=False, resume=True)


def test_torn_last_metrics_line_is_dropped_on_resume(tmp_path, data, fast_checkpoint, run):
    # Killed while writing the line of step 5: its checkpoint was never written.
    copy = copy_of(run, tmp_path)
    shutil.rmtree(copy / "checkpoint-000005")
    text = (copy / METRICS_FILE).read_text()
    (copy / METRICS_FILE).write_text(text[:-20])
    train(fast_checkpoint, data, copy, CONFIG, progress=False, resume=True)
    lines = [json.loads(line) for line in (copy / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(step + 1, loss) for step, loss in enumerate(run.losses)]


# -- the promise of exact resume: same data, same settings -----------------------------------------------


def test_trainer_state_records_what_fixes_the_data_order(run, data, fast_checkpoint):
    state = json.loads((run.run_dir / "checkpoint-000005" / STATE_FILE).read_text())
    assert state["data_order"] == {
        "data_file": {"size": data.stat().st_size, "sha256": hashlib.sha256(data.read_bytes()).hexdigest()},
        "batch_size": 4, "grad_accum": 1, "seed": 0, "max_length": 2048, "objective": "diffusion",
        "diffusion": dvlm.load(fast_checkpoint).diffusion.to_dict(),
    }


@pytest.mark.parametrize(("change", "said"), [
    ({"batch_size": 6}, "batch_size was 4 in checkpoint-000005, is 6 now"),
    ({"grad_accum": 2}, "grad_accum was 1 in checkpoint-000005, is 2 now"),
    ({"seed": 1}, "seed was 0 in checkpoint-000005, is 1 now"),
    ({"max_length": 512}, "max_length was 2048 in checkpoint-000005, is 512 now"),
])
def test_resume_refuses_settings_that_change_the_data_order(tmp_path, data, fast_checkpoint, run, change, said):
    copy = copy_of(run, tmp_path)
    before = snapshot(copy)
    with pytest.raises(ValueError, match=rf"^--resume: {said}; "):
        train(fast_checkpoint, data, copy, dataclasses.replace(CONFIG, **change), progress=False, resume=True)
    assert snapshot(copy) == before


def test_setting_changes_literal():
    """Every leaf that differs, dotted; a key recorded but gone now (or new now) is a change too;
    unset and None are the same setting."""
    recorded = {"seed": 0, "group_by_length": True, "diffusion": {"block_size": 16, "eps_min": 0.001},
                "steps": None}
    now = {"seed": 1, "diffusion": {"block_size": 16, "eps_min": 0.002, "fill_last_block": False}}
    assert setting_changes(recorded, now, "checkpoint-000002") == [
        "seed was 0 in checkpoint-000002, is 1 now",
        "diffusion.eps_min was 0.001 in checkpoint-000002, is 0.002 now",
        "diffusion.fill_last_block was unset in checkpoint-000002, is False now",
        "group_by_length was True in checkpoint-000002, is unset now",
    ]
    assert setting_changes(recorded, {**recorded}, "c") == []
    assert setting_changes({"a": {"b": 1}}, {"a": None}, "c") == ["a was {'b': 1} in c, is None now"]


@pytest.mark.parametrize(("recorded", "now", "said"), [
    (True, False, "group_by_length was True in checkpoint-000002, is unset now"),
    (False, True, "group_by_length was unset in checkpoint-000002, is True now"),
])
def test_resume_refuses_a_setting_recorded_then_dropped(tmp_path, data, reference_checkpoints, recorded, now, said):
    """group_by_length is recorded only when on (older checkpoints lack it): turning it off on
    resume drops it from the data order, and that is refused like any changed setting. (One
    family: the check is above the adapter seam.)"""
    model = reference_checkpoints["fast-dvlm"]
    cfg = dataclasses.replace(CONFIG, max_steps=2, save_every=0, group_by_length=recorded)
    train(model, data, tmp_path / "run", cfg, progress=False)
    before = snapshot(tmp_path / "run")
    with pytest.raises(ValueError, match=rf"^--resume: {said}; "):
        train(model, data, tmp_path / "run", dataclasses.replace(cfg, max_steps=3, group_by_length=now),
              progress=False, resume=True)
    assert snapshot(tmp_path / "run") == before


def test_resume_refuses_other_data_or_recipe(tmp_path, data, fast_checkpoint, run):
    copy = copy_of(run, tmp_path)
    before = snapshot(copy)
    shuffled = tmp_path / "shuffled.json"
    shuffled.write_text(json.dumps(json.loads(data.read_text())[::-1], indent=1))  # same records and size, new order
    with pytest.raises(ValueError, match=r"^--resume: data_file\.sha256 was '[0-9a-f]{64}' in checkpoint-000005, "
                                         r"is '[0-9a-f]{64}' now; "):
        train(fast_checkpoint, shuffled, copy, CONFIG, image_root=data.parent, progress=False, resume=True)
    with pytest.raises(ValueError, match=r"^--resume: diffusion\.block_size was 16 in checkpoint-000005, is 4 now; "):
        train(fast_checkpoint, data, copy, CONFIG, diffusion_overrides={"block_size": 4}, progress=False, resume=True)
    assert snapshot(copy) == before


def test_resume_refuses_fewer_steps_than_the_checkpoint(tmp_path, data, fast_checkpoint, run):
    copy = copy_of(run, tmp_path)
    before = snapshot(copy)
    with pytest.raises(ValueError, match=r"^--resume: checkpoint-000005 is at step 5, past the 3 steps asked for; "
                                         r"ask for at least 5 \(--steps\)"):
        train(fast_checkpoint, data, copy, dataclasses.replace(CONFIG, max_steps=3), progress=False, resume=True)
    assert snapshot(copy) == before


def test_resume_with_more_steps_continues_a_finished_run(tmp_path, data, fast_checkpoint, run):
    copy = copy_of(run, tmp_path)
    result = train(fast_checkpoint, data, copy, dataclasses.replace(CONFIG, max_steps=6), progress=False, resume=True)
    assert (result.start_step, result.steps, len(result.losses)) == (5, 6, 1)
    assert [json.loads(line)["step"] for line in (copy / METRICS_FILE).read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


# -- failed writes: nothing half-written, one clear error ------------------------------------------------


@pytest.mark.parametrize(("failure", "why"), [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device"),
    # how torch itself reports a full disk
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     r"\[enforce fail at inline_container.cc:672\] \. unexpected pos 704 vs 598"),
])
def test_full_disk_during_a_checkpoint_is_one_clear_error(tmp_path, data, fast_checkpoint, monkeypatch, failure, why):
    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError) as info:
        train(fast_checkpoint, data, run_dir, CONFIG, progress=False)
    message = str(info.value)
    assert re.fullmatch(rf"cannot write {re.escape(str(run_dir / 'checkpoint-000001'))}: {why} "
                        r"\(\d+\.\d GiB free on that disk\)", message)
    assert sorted(p.name for p in run_dir.iterdir()) == [METRICS_FILE]  # no temporary folder left


def test_failed_final_model_write_leaves_no_model_folder(tmp_path, data, fast_checkpoint, monkeypatch):
    from transformers import PreTrainedModel

    real_save = PreTrainedModel.save_pretrained

    def full_disk_after_weights(self, directory, *args, **kwargs):
        real_save(self, directory, *args, **kwargs)  # config.json and weights written, then the disk fills
        if "model" in Path(directory).name:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk_after_weights)
    run_dir = tmp_path / "run"
    with pytest.raises(OSError, match=rf"^cannot write {re.escape(str(run_dir / FINAL_DIR))}: No space left on device"):
        train(fast_checkpoint, data, run_dir, dataclasses.replace(CONFIG, max_steps=2), progress=False)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-000001", "checkpoint-000002", METRICS_FILE]
