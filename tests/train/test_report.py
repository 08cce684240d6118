"""--report-to tensorboard: the metrics people watch, in TensorBoard's event files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dvlm.config import ConfigError, TrainConfig
from dvlm.train.loop import METRICS_FILE, train
from dvlm.train.report import SCALARS, TENSORBOARD_DIR
from dvlm.tasks.builtin import export_llava, get_task

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return export_llava(get_task("shapes-qa").generate("train", 8, seed=0), tmp_path_factory.mktemp("data"))


def config(**changes) -> TrainConfig:
    return TrainConfig(**{"max_steps": 3, "batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                          "report_to": "tensorboard", **changes})


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs tensorboard (pip install 'dvlm[tensorboard]')")
def test_tensorboard_holds_the_metrics_of_each_step(tmp_path, data, fast_checkpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(fast_checkpoint, data, tmp_path / "run", config(), progress=False).run_dir
    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    lines = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    for name in ("loss", "diffusion_loss", "ar_loss", "lr", "tokens_per_second", "block_size"):
        logged = events.Scalars(f"train/{name}")
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([line[name] for line in lines], rel=1e-6)
    assert set(events.Tags()["scalars"]) == {f"train/{name}" for name in SCALARS}


@pytest.mark.skipif(HAS_TENSORBOARD, reason="checks the error shown without tensorboard")
def test_without_tensorboard_the_run_stops_before_loading_in_one_line(tmp_path, data):
    with pytest.raises(ConfigError, match=r"^report_to=tensorboard needs the tensorboard package: pip install"):
        train(tmp_path / "no-model-needed", data, tmp_path / "run", config(), progress=False)


def test_report_to_names_a_known_backend():
    with pytest.raises(ConfigError, match="report_to"):
        TrainConfig(report_to="wandb")
