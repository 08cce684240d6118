"""LoRA training: only the adapter and the mask token's rows train, the final model is merged and
plain, and a resumed LoRA run is the uninterrupted one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dvlm
from dvlm.config import ConfigError, TrainConfig
from dvlm.train.loop import METRICS_FILE, train
from dvlm.train.lora import ADAPTER_FILE, LoraSpecError, parse_lora
from dvlm.tasks.builtin import export_llava, get_task


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return export_llava(
        get_task("shapes-qa").generate("train", 8, seed=1),
        tmp_path_factory.mktemp("lora-data"),
    )


def config(**changes) -> TrainConfig:
    base = dict(
        max_steps=3,
        batch_size=4,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        lora="r=4,alpha=8",
    )
    return TrainConfig(**{**base, **changes})


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def test_parse_lora_reads_every_setting_and_refuses_bad_ones():
    assert parse_lora("r=8,alpha=16,dropout=0.1,targets=q_proj+v_proj").targets == (
        "q_proj",
        "v_proj",
    )
    assert parse_lora("default").r == 16 and parse_lora("default").alpha == 32
    for bad, match in [
        ("r=0", "r >= 1"),
        ("rank=4", "unknown LoRA setting"),
        ("r", "key=value"),
        ("alpha=x", "must be a number"),
    ]:
        with pytest.raises(LoraSpecError, match=match):
            parse_lora(bad)
    with pytest.raises(ConfigError, match="lora"):
        TrainConfig(lora="r=-1")


QWEN_VL_NAMES = ("merger.mlp", "visual.blocks")
CHECKPOINT_NAMES = {"Qwen2.5-VL": QWEN_VL_NAMES, "Qwen2-VL": QWEN_VL_NAMES,
                    "Qwen3-VL": ("merger", "visual.blocks"),  # merger.linear_fc*, deepstack_merger_list.*
                    "LLaVA-OneVision": ("multi_modal_projector.linear_", "vision_tower.encoder.layers")}
"""Per family (its display name): what names its projectors' linear layers and its vision encoder's
blocks in a checkpoint."""


def test_lora_changes_only_adapted_layers_and_the_mask_row(tmp_path, data, fast_checkpoint, adapter):
    projector, vision_blocks = CHECKPOINT_NAMES[adapter.family]
    result = train(fast_checkpoint, data, tmp_path / "run", config(), progress=False)
    before, after = weights(Path(fast_checkpoint)), weights(result.model_dir)
    assert before.keys() == after.keys()  # merged: no peft names left, a plain checkpoint
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith("_proj.weight") or projector in k or "embed_tokens" in k for k in changed)
    assert not any(vision_blocks in k or "norm" in k for k in changed)  # the vision encoder and norms frozen
    assert any(vision_blocks in k for k in before)
    embedding = next(k for k in changed if k.endswith("embed_tokens.weight"))
    rows = (before[embedding] != after[embedding]).any(dim=1).nonzero().flatten().tolist()
    mask_id = dvlm.load(fast_checkpoint).diffusion.mask_token_id
    assert rows == [mask_id]  # of the vocabulary, only the mask token's row trained
    reloaded = dvlm.load(result.model_dir)
    assert reloaded.generate("How many shapes are there?", images=[_image(data)], max_new_tokens=4).text is not None


def test_lora_resume_equals_the_uninterrupted_run(tmp_path, data, fast_checkpoint):
    cfg = config(max_steps=4, save_every=2)
    full = train(fast_checkpoint, data, tmp_path / "a", cfg, progress=False)

    def stop_at_3(step: int, record: dict) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            fast_checkpoint,
            data,
            tmp_path / "b",
            cfg,
            progress=False,
            on_step=stop_at_3,
        )
    checkpoint = tmp_path / "b" / "checkpoint-000002"
    assert (checkpoint / ADAPTER_FILE).is_file() and not (checkpoint / "model.safetensors").exists()
    resumed = train(fast_checkpoint, data, tmp_path / "b", cfg, progress=False, resume=True)
    assert resumed.losses == full.losses[2:]
    lines = [json.loads(line) for line in (tmp_path / "b" / METRICS_FILE).read_text().splitlines()]
    assert [r["loss"] for r in lines] == full.losses
    a, b = weights(full.model_dir), weights(resumed.model_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="LoRA checkpoint"):
        train(
            fast_checkpoint,
            data,
            tmp_path / "b",
            TrainConfig(**{**cfg.__dict__, "lora": None, "max_steps": 6}),
            progress=False,
            resume=True,
        )


def _image(data: Path) -> Path:
    record = json.loads(data.read_text())[0]
    return data.parent / record["image"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, data, reference_checkpoints) -> Path:
    """A 2-step LoRA run (r=4, alpha=8) of the reference family, with its step-2 checkpoint."""
    run = tmp_path_factory.mktemp("lora") / "run"
    train(reference_checkpoints["fast-dvlm"], data, run, config(max_steps=2), progress=False)
    return run


@pytest.mark.parametrize(("lora", "said"), [
    ("r=8,alpha=8", "lora.r was 4 in checkpoint-000002, is 8 now"),
    ("r=4,alpha=16", "lora.alpha was 8.0 in checkpoint-000002, is 16.0 now"),
    ("r=4,alpha=8,targets=q_proj", "lora.targets was [] in checkpoint-000002, is ['q_proj'] now"),
])
def test_lora_resume_with_other_settings_is_refused_in_one_line(tmp_path, lora_run, data, reference_checkpoints,
                                                                lora, said):
    """Another r used to fail deep in peft with torch's multi-line size-mismatch traceback."""
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    with pytest.raises(ValueError, match=rf"^--resume: {re.escape(said)}; a resumed LoRA run continues"):
        train(reference_checkpoints["fast-dvlm"], data, run, config(max_steps=3, lora=lora), progress=False,
              resume=True)
    train(reference_checkpoints["fast-dvlm"], data, run, config(max_steps=3, lora="alpha=8,r=4"), progress=False,
          resume=True)  # the same setting written another way resumes


def test_lora_resume_with_another_rank_from_the_command_line(capsys, tmp_path, lora_run, data, reference_checkpoints):
    from tests.test_cli import one_line_error, run as run_cli

    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    code, _, err = run_cli(capsys, "train", "--model", reference_checkpoints["fast-dvlm"], "--data", data,
                           "--out", run, "--steps", 3, "--batch-size", 4, "--lr", "5e-3", "--lora", "r=8,alpha=8",
                           "--set", "warmup_ratio=0", "--resume")
    assert code == 2
    assert one_line_error(err, "train").startswith("dvlm train: error: --resume: lora.r was 4 in checkpoint-000002, "
                                                   "is 8 now; ")


def test_an_adapter_of_another_rank_is_refused_without_a_record(tmp_path, lora_run, data, reference_checkpoints):
    """A checkpoint whose trainer state does not record the LoRA setting: the adapter's own shapes
    are checked as it loads, and the mismatch is one line naming the file."""
    run = Path(shutil.copytree(lora_run, tmp_path / "run"))
    state_file = run / "checkpoint-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["train_config"]["lora"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError) as err:
        train(reference_checkpoints["fast-dvlm"], data, run, config(max_steps=3, lora="r=8,alpha=8"), progress=False,
              resume=True)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{run / 'checkpoint-000002' / ADAPTER_FILE} does not match this LoRA setting "
                              "(size mismatch for ")
    assert "torch.Size([4, " in message and "torch.Size([8, " in message
