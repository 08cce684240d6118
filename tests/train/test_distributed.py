"""Data-parallel training: N processes with batch b train like one process with batch N*b.

The fast tests check the pieces (sharding, the plan of a step's passes); the `slow` ones start real
processes with `accelerate launch` (gloo on CPU, 2 processes, a few steps of the tiny model).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from dvlm.config import TrainConfig
from dvlm.train import distributed, step_data
from dvlm.train.resume import checkpoint_dir
from dvlm.train.loop import FINAL_DIR, METRICS_FILE, train
from dvlm.train.step_data import StepData
from dvlm.tasks.builtin import export_llava, get_task

STEPS, SAVE_EVERY = 4, 2
CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "accelerate"
LAUNCH_TIMEOUT = 300  # seconds: far above a healthy run, so only a hang reaches it


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """10 records, one with a broken image. With 2 processes x batch 2 x accumulation 2 a step
    takes 8 samples: the second step of each epoch has 2, all on rank 0, so rank 1 runs a stand-in."""
    samples = get_task("shapes-qa").generate("train", 6, seed=0) + get_task("multi-turn").generate("train", 4, seed=0)
    path = export_llava(samples, tmp_path_factory.mktemp("data"))
    (path.parent / json.loads(path.read_text())[3]["image"]).write_bytes(b"not an image")
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


# -- the pieces ----------------------------------------------------------------------------------------


class _Indices:
    """A dataset whose samples are their indices; index 5 is unusable."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        if index == 5:
            raise step_data.SampleError(index, None, "bad sample")
        return index


def test_processes_share_out_each_global_micro_batch_in_order(monkeypatch):
    monkeypatch.setattr(step_data, "collate", lambda samples, pad: samples)
    cfg = TrainConfig(batch_size=2, grad_accum=2)
    one = StepData(_Indices(), TrainConfig(batch_size=4, grad_accum=2), 0, step_data.SkipReport())
    ranks = [StepData(_Indices(), cfg, 0, step_data.SkipReport(), rank, 2) for rank in (0, 1)]
    for step in range(3):
        assert all(r.indices(step) == one.indices(step) for r in ranks)
        whole = one.micro_batches(step)
        for micro, batch in enumerate(whole):
            parts = [r.micro_batches(step)[micro] or [] for r in ranks]
            assert parts[0] + parts[1] == batch  # rank 0's rows, then rank 1's: the one-process batch
    assert ranks[0].steps_per_epoch == one.steps_per_epoch == 2


def test_a_step_plan_windows_each_share_and_stands_in_for_an_empty_one():
    rank1 = distributed.SingleProcess()
    rank1.rank, rank1.world_size = 1, 2
    # (rows, length, blocks) per process and micro-batch: micro 1 is empty everywhere, and rank 1
    # has nothing in micro 2 (its samples were all skipped).
    extents = torch.tensor([[[2, 10, 3], [0, 0, 0], [2, 7, 2]],
                            [[1, 12, 4], [0, 0, 0], [0, 0, 0]]])
    plan = distributed.plan_micro_steps(rank1, ["b0", None, None], extents, lambda micro: f"stand-in {micro}")
    assert [(p.batch, p.index, p.weight) for p in plan] == [("b0", 0, 1.0), ("stand-in 2", 1, 0.0)]
    assert plan[0].window == distributed.NoiseWindow(offset=2, rows=3, length=12, blocks=4)
    assert plan[1].window is None


def test_one_process_runs_without_accelerate(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert type(distributed.start("cpu", TrainConfig())) is distributed.SingleProcess


def _trained_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    objective = distributed.Objective(model, loss=None)
    optimizer = torch.optim.AdamW([{"params": [model[1].weight]}, {"params": [model[0].weight, model[0].bias,
                                                                             model[1].bias], "lr": 0.1}])
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    return objective, optimizer


def test_the_full_optimizer_state_has_the_one_process_layout():
    """What FSDP2 checkpoints hold (gathered by name, renumbered) equals a plain optimizer's state,
    so checkpoints move between backends and process counts; and it loads back."""
    objective, optimizer = _trained_optimizer()
    full, plain = distributed.full_optimizer_state(objective, optimizer), optimizer.state_dict()
    groups = [g["params"] for g in full["param_groups"]]
    assert groups == [g["params"] for g in plain["param_groups"]] == [[0], [1, 2, 3]]
    assert sorted(full["state"]) == sorted(plain["state"]) == [0, 1, 2, 3]
    for index, moments in plain["state"].items():
        assert all(torch.equal(full["state"][index][k], v) for k, v in moments.items())
    other, fresh = _trained_optimizer()
    distributed.load_full_optimizer_state(other, fresh, full)
    assert all(torch.equal(fresh.state_dict()["state"][3][k], v) for k, v in plain["state"][3].items())


# -- real processes ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", distributed.COLLECTIVE_TIMEOUT_ENV: "60"}
    src = str(Path(distributed.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    return env


def _train_args(model: Path, data: Path, out: Path, batch_size: int, *extra: str, device: str = "cpu") -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch-size", str(batch_size), "--grad-accum", "2", "--lr", "1e-3", "--device", device,
            "--set", "warmup_ratio=0", "--set", f"save_every={SAVE_EVERY}", "--set", "keep_checkpoints=5", *extra]


def _accelerate(config: str, processes: int = 2) -> list[str]:
    """`accelerate launch` with one of the shipped configs (examples/accelerate/CONFIG.yaml)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{config}.yaml"),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()), "-m", "dvlm"]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _one_process_config(**changes) -> TrainConfig:
    base = dict(max_steps=STEPS, batch_size=4, grad_accum=2, learning_rate=1e-3, warmup_ratio=0.0,
                save_every=SAVE_EVERY, keep_checkpoints=5)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data, fast_checkpoint) -> dict[str, Path]:
    """The same run in one process (batch 4) and in two (batch 2 each, through --num-processes)."""
    root = tmp_path_factory.mktemp("runs")
    train(fast_checkpoint, data, root / "one", _one_process_config(), progress=False, device="cpu")
    _run([sys.executable, "-m", "dvlm", *_train_args(fast_checkpoint, data, root / "two", 2), "--num-processes", "2"])
    return {"one": root / "one", "two": root / "two"}


def _same_curve(run: list[dict], reference: list[dict], rel: float = 1e-3,
                losses: tuple[str, ...] = ("loss", "diffusion_loss", "ar_loss", "grad_norm")) -> None:
    """Same samples and noise (the counts are equal) and the same losses to float tolerance."""
    for key in ("step", "response_tokens", "masked_tokens", "block_size"):
        assert [r[key] for r in run] == [r[key] for r in reference], key
    for key in losses:
        assert [r[key] for r in run] == pytest.approx([r[key] for r in reference], rel=rel), key


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_global_batch(runs):
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert len(two) == STEPS
    _same_curve(two, one)
    assert two[-1]["loss"] != two[0]["loss"]  # the model did change
    ours = dict(torch.load(checkpoint_dir(runs["two"], STEPS) / "optimizer.pt", weights_only=True)["scheduler"])
    assert ours["last_epoch"] == STEPS  # the schedule stepped once per step, not once per process


def _interrupted(run: Path, into: Path) -> Path:
    """A copy of `run` as it was when killed after its step-SAVE_EVERY checkpoint."""
    shutil.copytree(run, into)
    for later in range(SAVE_EVERY + 1, STEPS + 1):
        shutil.rmtree(checkpoint_dir(into, later), ignore_errors=True)
    shutil.rmtree(into / FINAL_DIR)
    return into


@pytest.mark.slow
def test_two_processes_resume_mid_run_on_the_uninterrupted_curve(runs, tmp_path, data, fast_checkpoint):
    resumed = _interrupted(runs["two"], tmp_path / "two")
    _run(_accelerate("ddp") + _train_args(fast_checkpoint, data, resumed, 2, "--resume"))
    _same_curve(metrics(resumed), metrics(runs["two"]), rel=1e-6)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_exactly_in_one_process(runs, tmp_path, data, fast_checkpoint):
    resumed = _interrupted(runs["two"], tmp_path / "two")
    train(fast_checkpoint, data, resumed, _one_process_config(), resume=True, progress=False, device="cpu")
    _same_curve(metrics(resumed), metrics(runs["one"]))


@pytest.mark.slow
def test_resume_with_another_global_batch_is_refused(runs, tmp_path, data, fast_checkpoint):
    resumed = _interrupted(runs["two"], tmp_path / "two")
    with pytest.raises(ValueError, match=r"^--resume: batch_size was 4 in checkpoint-000002, is 2 now"):
        train(fast_checkpoint, data, resumed, _one_process_config(batch_size=2), resume=True, progress=False,
              device="cpu")


@pytest.mark.slow
def test_a_killed_process_ends_the_run_with_an_error(tmp_path, data, fast_checkpoint):
    run = tmp_path / "run"
    args = _train_args(fast_checkpoint, data, run, 2, "--steps", "100000", "--set", "save_every=0")
    launcher = subprocess.Popen(_accelerate("ddp") + args, env=_environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not (run / METRICS_FILE).exists() or not (run / METRICS_FILE).read_text():  # training is under way
            assert launcher.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "dvlm" in p.cmdline()]
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert time.monotonic() - killed < 120
    assert "ChildFailedError" in stderr or "failed" in stderr.lower()
    assert not (run / FINAL_DIR).exists()


@pytest.mark.slow
def test_fsdp_on_cpu_processes_is_refused_in_one_line(tmp_path, data, fast_checkpoint):
    command = _accelerate("fsdp2") + _train_args(fast_checkpoint, data, tmp_path / "run", 2)
    done = subprocess.run(command, env=_environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode != 0
    assert "dvlm train: error: accelerate runs FSDP on GPUs only; these processes are MULTI_CPU" in done.stderr


def test_a_checkpoint_without_optimizer_state_is_refused_clearly(tmp_path, data, fast_checkpoint):
    """DeepSpeed checkpoints hold the weights but not the sharded optimizer state."""
    run = tmp_path / "run"
    train(fast_checkpoint, data, run, _one_process_config(max_steps=2, save_every=1), progress=False, device="cpu")
    saved = torch.load(checkpoint_dir(run, 1) / "optimizer.pt", weights_only=True)
    torch.save({**saved, "optimizer": None}, checkpoint_dir(run, 1) / "optimizer.pt")  # as under DeepSpeed
    shutil.rmtree(checkpoint_dir(run, 2))
    with pytest.raises(ValueError, match="written under DeepSpeed, without its optimizer state"):
        train(fast_checkpoint, data, run, _one_process_config(max_steps=2, save_every=1), resume=True,
              progress=False, device="cpu")


# -- GPUs (run with -m gpu) -------------------------------------------------------------------------


def _gpu_backends() -> list:
    marks = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
    deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
    return [pytest.param("ddp", marks=marks), pytest.param("fsdp2", marks=marks),
            pytest.param("zero2", marks=[*marks, deepspeed]), pytest.param("zero3", marks=[*marks, deepspeed])]


@pytest.mark.parametrize("config", _gpu_backends())
def test_each_shipped_config_trains_like_one_process_on_gpus(config, tmp_path, data, fast_checkpoint):
    """A few steps under each backend: the same samples and noise as one process with the global
    batch, losses to GPU tolerance (ZeRO trains bf16 weights: looser), a loadable final model."""
    import dvlm

    processes = min(2, torch.cuda.device_count())
    one = tmp_path / "one"
    train(fast_checkpoint, data, one, _one_process_config(batch_size=2 * processes), progress=False, device="cuda")
    run = tmp_path / config
    _run(_accelerate(config, processes) + _train_args(fast_checkpoint, data, run, 2, device="cuda"))
    if config.startswith("zero"):  # bf16 weights; DeepSpeed measures the gradient norm in its own step
        _same_curve(metrics(run), metrics(one), rel=5e-2, losses=("loss",))
    else:
        _same_curve(metrics(run), metrics(one))
    assert dvlm.load(run / FINAL_DIR).diffusion is not None
