"""The training loop: it learns, resumes exactly, skips bad samples, and keeps its settings."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dvlm
from dvlm.config import ConfigError, TrainConfig
from dvlm.tasks.builtin import export_llava, get_task
from dvlm.train import loop as loop_module
from dvlm.train.loop import FINAL_DIR, METRICS_FILE, TrainingError, lr_lambda, train

FIXED_BATCH = 12  # the whole dataset: every step sees the same batch


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 LLaVA samples (8 one-turn, 4 multi-turn) with their PNGs; returns data.json."""
    samples = get_task("shapes-qa").generate("train", 8, seed=0) + get_task("multi-turn").generate("train", 4, seed=0)
    return export_llava(samples, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def eval_data(data) -> Path:
    """The same records, each 4 times: one step over it averages 4 noise draws per sample."""
    records = json.loads(data.read_text())
    path = data.with_name("eval.json")
    path.write_text(json.dumps(records * 4))
    return path


def config(**changes) -> TrainConfig:
    base = dict(max_steps=2, batch_size=4, learning_rate=1e-3, warmup_ratio=0.0)
    return TrainConfig(**{**base, **changes})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def fixed_noise_loss(model_dir: Path, data: Path, out: Path, cfg: TrainConfig) -> float:
    """The loss of step 0 over all of `data` (before any update): its noise depends only on the seed."""
    whole = dataclasses.replace(cfg, max_steps=1, batch_size=len(json.loads(data.read_text())))
    return train(model_dir, data, out, whole, progress=False).losses[0]


# -- learning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["fast-dvlm", "diffusionvl", "ar"])
def test_training_lowers_loss_on_fixed_batch(tmp_path, data, eval_data, ar_checkpoint, dvlm_checkpoints, preset):
    start = ar_checkpoint if preset == "ar" else dvlm_checkpoints[preset]
    cfg = config(max_steps=15, batch_size=FIXED_BATCH, learning_rate=3e-3, objective="autoregressive" if preset == "ar" else "diffusion")
    result = train(start, data, tmp_path / "run", cfg, progress=False)
    assert len(result.losses) == 15 and all(math.isfinite(x) for x in result.losses)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.8 * first  # loose: diffusionvl's 1/t-weighted loss is noisy step to step
    # Same samples and same noise before and after training: a like-for-like comparison.
    before = fixed_noise_loss(start, eval_data, tmp_path / "before", cfg)
    after = fixed_noise_loss(result.model_dir, eval_data, tmp_path / "after", cfg)
    assert after < 0.6 * before


def test_ar_training_keeps_model_autoregressive(tmp_path, data, ar_checkpoint):
    result = train(ar_checkpoint, data, tmp_path / "run", config(objective="autoregressive"), progress=False)
    record = metrics(result.run_dir)[-1]
    assert record["diffusion_loss"] == 0.0 and record["masked_tokens"] == 0
    assert record["ar_loss"] == pytest.approx(record["loss"], rel=1e-5)
    assert dvlm.load(result.model_dir).diffusion is None


def test_diffusion_training_reports_both_losses(tmp_path, data, fast_checkpoint):
    result = train(fast_checkpoint, data, tmp_path / "run", config(), progress=False)
    for record in metrics(result.run_dir):
        assert record["masked_tokens"] > 0 and record["diffusion_loss"] > 0 and record["ar_loss"] > 0
        # alpha = beta = 0.5 (fast-dvlm preset), both normalised by the response tokens
        assert record["loss"] == pytest.approx(0.5 * record["diffusion_loss"] + 0.5 * record["ar_loss"], rel=1e-4)


def test_diffusionvl_step_loss_is_the_mean_of_row_losses(tmp_path, data, dvlm_checkpoints, monkeypatch):
    """The loop hands each objective the preset's normaliser: rows for diffusionvl (the reference's
    per-row mean), so the step's loss is the mean over rows of each row's normalised loss."""
    seen = []
    real = loop_module.diffusion_objective

    def spy(adapter, model, batch, stream, clean_block, dcfg, normaliser):
        seen.append((int(batch.labels.shape[0]), normaliser))
        return real(adapter, model, batch, stream, clean_block, dcfg, normaliser)

    monkeypatch.setattr(loop_module, "diffusion_objective", spy)
    train(dvlm_checkpoints["diffusionvl"], data, tmp_path / "run", config(max_steps=1, batch_size=4, grad_accum=2),
          progress=False)
    assert seen == [(4, 8), (4, 8)]  # two micro-batches of 4 rows, normalised by the step's 8 rows
    seen.clear()
    train(dvlm_checkpoints["fast-dvlm"], data, tmp_path / "fast", config(max_steps=1, batch_size=4), progress=False)
    assert seen[0][1] > 4 * 2  # fast-dvlm: the labelled tokens, more than one per row


def test_gradient_accumulation_matches_one_big_batch(tmp_path, data, ar_checkpoint):
    # AR loss: no noise, so the two runs see exactly the same objective; the loss is normalised
    # by the response tokens of the whole step, so the accumulated gradient is the big batch's.
    big = train(ar_checkpoint, data, tmp_path / "big", config(max_steps=3, batch_size=12, objective="autoregressive"), progress=False)
    accumulated = train(ar_checkpoint, data, tmp_path / "acc",
                        config(max_steps=3, batch_size=6, grad_accum=2, objective="autoregressive"), progress=False)
    assert torch.allclose(torch.tensor(accumulated.losses), torch.tensor(big.losses), rtol=1e-4, atol=1e-5)
    assert big.losses[2] < big.losses[0]  # the steps did update the model


def test_diffusion_training_needs_converted_model(tmp_path, data, ar_checkpoint):
    with pytest.raises(ConfigError, match="block-diffusion checkpoint"):
        train(ar_checkpoint, data, tmp_path / "run", config(), progress=False)
    assert not (tmp_path / "run").exists()


# -- resume ------------------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(tmp_path, data, fast_checkpoint):
    # batch_size 4 of 12 samples: 6 steps cross an epoch boundary (reshuffled data order).
    cfg = config(max_steps=6, save_every=2, keep_checkpoints=5)
    full = train(fast_checkpoint, data, tmp_path / "a", cfg, progress=False)

    def stop_at_3(step: int, record: dict) -> None:
        if step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(fast_checkpoint, data, tmp_path / "b", cfg, progress=False, on_step=stop_at_3)
    assert [r["step"] for r in metrics(tmp_path / "b")] == [1, 2, 3]
    assert (tmp_path / "b" / "checkpoint-000002").is_dir()
    assert not (tmp_path / "b" / FINAL_DIR).exists()

    resumed = train(fast_checkpoint, data, tmp_path / "b", cfg, progress=False, resume=True)
    lines = metrics(tmp_path / "b")
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]  # step 3 redone, not duplicated
    assert resumed.losses == full.losses[2:]  # steps 3..6
    assert [r["loss"] for r in lines] == full.losses
    assert [r["lr"] for r in lines] == [r["lr"] for r in metrics(tmp_path / "a")]
    a, b = weights(full.model_dir), weights(resumed.model_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_raises(tmp_path, data, fast_checkpoint):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(fast_checkpoint, data, tmp_path / "run", config(), progress=False, resume=True)


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, data, fast_checkpoint, capsys):
    run = tmp_path / "run"
    cfg = config(max_steps=4, save_every=3)

    def stop_at_2(step: int, record: dict) -> None:
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(fast_checkpoint, data, run, cfg, progress=False, on_step=stop_at_2)
    killed = metrics(run)
    assert [r["step"] for r in killed] == [1, 2] and sorted(p.name for p in run.iterdir()) == [METRICS_FILE]
    capsys.readouterr()

    result = train(fast_checkpoint, data, run, cfg, progress=False, resume=True)
    assert f"--resume: no checkpoint in {run} yet; starting from step 0\n" in capsys.readouterr().out
    lines = metrics(run)
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # the stale lines replaced, not duplicated
    assert [r["loss"] for r in lines[:2]] == [r["loss"] for r in killed]  # the same steps again
    assert result.losses == [r["loss"] for r in lines]
    assert (run / FINAL_DIR / "model.safetensors").is_file()


def test_non_empty_run_dir_without_resume_raises(tmp_path, data, fast_checkpoint):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="resume"):
        train(fast_checkpoint, data, tmp_path / "run", config(), progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


# -- bad samples -------------------------------------------------------------------------------------


def test_bad_images_are_skipped_and_reported(tmp_path, data, fast_checkpoint, capsys):
    root = Path(shutil.copytree(data.parent, tmp_path / "data"))
    records = json.loads((root / "data.json").read_text())
    corrupt, missing = records[1], records[5]
    (root / corrupt["image"]).write_bytes(b"\x89PNG garbage, not an image")
    (root / missing["image"]).unlink()

    result = train(fast_checkpoint, root / "data.json", tmp_path / "run",
                   config(batch_size=FIXED_BATCH, max_steps=3), progress=False)
    assert result.skipped == 2  # counted once each, although every step draws them
    lines = metrics(result.run_dir)
    assert len(lines) == 3 and all(math.isfinite(r["loss"]) for r in lines)
    assert lines[-1]["skipped"] == 2
    summary = capsys.readouterr().out
    assert "skipped 2 sample(s)" in summary
    assert corrupt["id"] in summary and missing["id"] in summary
    assert dvlm.load(result.model_dir).diffusion is not None


def test_records_without_an_answer_are_skipped_and_reported(tmp_path, data, fast_checkpoint, capsys):
    records = json.loads(data.read_text())
    records[2]["conversations"] = records[2]["conversations"][:1]  # the question alone
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    result = train(fast_checkpoint, path, tmp_path / "run", config(batch_size=FIXED_BATCH), image_root=data.parent,
                   progress=False)
    assert result.skipped == 1 and [r["skipped"] for r in metrics(result.run_dir)] == [1, 1]
    assert f"{records[2]['id']!r}: nothing to train on: no assistant answer" in capsys.readouterr().out


# -- nothing to learn from: stop, write nothing misleading --------------------------------------------


def strict_json(line: str) -> dict:
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_empty_data_file_fails_before_the_model_loads(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match=r"empty\.json: no records"):
        train(tmp_path / "no-such-model", empty, tmp_path / "run", config(), progress=False)
    assert not (tmp_path / "run").exists()


def test_run_without_usable_data_stops_at_its_first_step(tmp_path, data, fast_checkpoint):
    records = json.loads(data.read_text())
    for record in records:
        record["conversations"] = record["conversations"][:1]  # questions without answers
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    with pytest.raises(TrainingError) as info:
        train(fast_checkpoint, path, tmp_path / "run", config(batch_size=FIXED_BATCH, save_every=1),
              image_root=data.parent, progress=False)
    message = str(info.value)
    assert message.startswith("step 1: nothing to train on (none of its 12 samples has an answer token); "
                              "skipped 12 sample(s); first 5:")
    assert message.count("nothing to train on: no assistant answer") == 5
    assert list((tmp_path / "run").iterdir()) == []  # no metrics, no checkpoint, no model


def test_non_finite_loss_stops_before_the_update(tmp_path, data, fast_checkpoint, monkeypatch):
    real_objective = loop_module.diffusion_objective
    calls = []

    def nan_on_third_call(*args, **kwargs):
        out = real_objective(*args, **kwargs)
        calls.append(out)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if len(calls) == 3 else out

    monkeypatch.setattr(loop_module, "diffusion_objective", nan_on_third_call)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"^step 3: the loss is nan; stopped before updating the weights"):
        train(fast_checkpoint, data, run, config(max_steps=4, save_every=1, keep_checkpoints=5), progress=False)
    lines = (run / METRICS_FILE).read_text().splitlines()
    assert [strict_json(line)["step"] for line in lines] == [1, 2]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-000001", "checkpoint-000002", METRICS_FILE]


# -- settings ----------------------------------------------------------------------------------------


def test_lr_lambda_warms_up_then_decays_by_cosine():
    factor = lr_lambda(100, TrainConfig(warmup_ratio=0.1, min_lr_ratio=0.1))
    assert factor(0) == pytest.approx(0.1)  # warmup: (step + 1) / 10
    assert factor(4) == pytest.approx(0.5)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert factor(55) == pytest.approx(0.55)  # halfway: min + (1 - min) / 2
    assert factor(100) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)  # past the end: stays at the floor
    no_warmup = lr_lambda(10, TrainConfig(warmup_ratio=0.0))
    assert no_warmup(0) == pytest.approx(1.0)
    assert no_warmup(5) == pytest.approx(0.5)


def test_logged_learning_rate_follows_schedule(tmp_path, data, fast_checkpoint):
    cfg = config(max_steps=4, learning_rate=1e-3, warmup_ratio=0.5, min_lr_ratio=0.2)
    train(fast_checkpoint, data, tmp_path / "run", cfg, progress=False)
    # warmup 2 steps (1/2, 2/2 of the peak), then cosine over 2 steps down to 0.2 of the peak
    assert [r["lr"] for r in metrics(tmp_path / "run")] == pytest.approx([5e-4, 1e-3, 1e-3, 6e-4])


def test_diffusion_overrides_are_used_and_saved(tmp_path, data, fast_checkpoint):
    overrides = {"block_size": 4, "anneal_block_size": False}
    result = train(fast_checkpoint, data, tmp_path / "run", config(), diffusion_overrides=overrides, progress=False)
    assert [r["block_size"] for r in metrics(result.run_dir)] == [4, 4]
    saved = json.loads((result.model_dir / "config.json").read_text())["dvlm"]
    assert saved["block_size"] == 4 and saved["anneal_block_size"] is False
    assert dvlm.load(result.model_dir).diffusion.block_size == 4
    assert dvlm.load(fast_checkpoint).diffusion.block_size == 16  # the source is untouched


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"diffusion_overrides": {"no_such_key": 1}}, "no_such_key"),
        ({"diffusion_overrides": {"block_layout": "nope"}}, "block_layout"),
    ],
)
def test_invalid_diffusion_overrides_raise_before_writing(tmp_path, data, fast_checkpoint, options, match):
    with pytest.raises(ConfigError, match=match):
        train(fast_checkpoint, data, tmp_path / "run", config(), progress=False, **options)
    assert not (tmp_path / "run").exists()


def test_autoregressive_objective_rejects_diffusion_overrides(tmp_path, data, ar_checkpoint):
    with pytest.raises(ConfigError, match="objective='autoregressive'"):
        train(ar_checkpoint, data, tmp_path / "run", config(objective="autoregressive"),
              diffusion_overrides={"block_size": 4}, progress=False)
    assert not (tmp_path / "run").exists()


def test_gradient_checkpointing_gives_same_losses(tmp_path, data, fast_checkpoint):
    plain = train(fast_checkpoint, data, tmp_path / "plain", config(), progress=False)
    checkpointed = train(fast_checkpoint, data, tmp_path / "gc", config(gradient_checkpointing=True), progress=False)
    assert torch.allclose(torch.tensor(checkpointed.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-5)


def test_bfloat16_autocast_trains_with_fp32_master_weights(tmp_path, data, fast_checkpoint):
    fp32 = train(fast_checkpoint, data, tmp_path / "fp32", config(), progress=False)
    bf16 = train(fast_checkpoint, data, tmp_path / "bf16", config(dtype="bfloat16"), progress=False)
    assert all(math.isfinite(x) for x in bf16.losses)
    assert bf16.losses[0] == pytest.approx(fp32.losses[0], rel=0.05)  # same batch and noise
    assert bf16.losses[0] != fp32.losses[0]  # autocast really ran in bf16
    saved = weights(bf16.model_dir)
    assert {t.dtype for t in saved.values()} == {torch.float32}


PROJECTORS = {"Qwen2.5-VL": lambda model: model.model.visual.merger,
              "Qwen2-VL": lambda model: model.model.visual.merger,
              "Qwen3-VL": lambda model: model.model.visual.merger,
              "LLaVA-OneVision": lambda model: model.model.multi_modal_projector}
"""Per family (its display name): the module that projects vision features into the language model."""


def test_vision_learning_rate_gets_its_own_parameter_group(fast_checkpoint, adapter):
    from dvlm.config import TrainConfig
    from dvlm.train.loop import parameter_groups

    lm = dvlm.load(fast_checkpoint)
    assert len(parameter_groups(lm, TrainConfig())) == 1
    groups = parameter_groups(lm, TrainConfig(learning_rate=1e-3, vision_learning_rate=5e-3))
    vision = lm.adapter.vision_parameters(lm.model)
    assert groups[1]["lr"] == 5e-3 and len(groups[1]["params"]) == len(vision) > 0
    assert len(groups[0]["params"]) + len(vision) == len(list(lm.model.parameters()))
    projector = {id(p) for p in PROJECTORS[adapter.family](lm.model).parameters()}
    assert projector and not projector & {id(p) for p in vision}  # the projector trains with the language model
    frozen = parameter_groups(lm, TrainConfig(vision_learning_rate=0.0))
    assert len(frozen) == 1 and not any(p.requires_grad for p in vision)
