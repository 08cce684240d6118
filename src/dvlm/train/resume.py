"""Training checkpoints: a loadable model directory plus optimizer, schedule, step and RNG state.

Checkpoints and the final model are written with `dvlm.atomic.atomic_directory`: assembled under
a temporary name and renamed into place, so a run killed while saving never leaves a half-written
directory under the final name. A write that fails (full disk, read-only folder) leaves no
temporary folder either, and raises one `WriteError` naming the directory and why.

Reading a checkpoint back checks every file resuming needs before anything is restored, so a
resume can pass over a corrupt newest checkpoint to an older one. Model weights are safetensors;
optimizer and RNG state are plain tensors/numbers read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from dvlm.atomic import first_line, written_whole
from dvlm.model.checkpoint_files import CheckpointError, check_weights
from dvlm.model.loaded import LoadedModel
from dvlm.train.lora import ADAPTER_FILE, parse_lora

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
CONFIG_FILE = "config.json"
UNUSABLE_SUFFIX = ".unusable"  # a corrupt checkpoint set aside: kept for a look, never listed
TRAIN_CONFIG_KEY = "train_config"  # in trainer_state.json: the run's TrainConfig


@dataclass
class Checkpoint:
    """A checkpoint read back whole: trainer state, optimizer + scheduler state and RNG state."""

    path: Path
    step: int
    state: dict[str, Any]
    optimizer: dict[str, Any]
    rng: dict[str, Any]


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in a run directory, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


# -- what a resume must not change -------------------------------------------------------------------


class _Unset:
    """A setting one side does not record (e.g. `group_by_length`, recorded only when on)."""

    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()


def setting_changes(recorded: Any, now: Any, name: str, prefix: str = "") -> list[str]:
    """Each leaf that differs between two JSON-like dicts, as "KEY was OLD in NAME, is NEW now"
    (dotted keys). A key that only one side has is `unset` on the other: recorded and since
    dropped counts as a change like any other (unset and None are the same setting)."""
    if not (isinstance(recorded, dict) and isinstance(now, dict)):
        if _or_none(recorded) == _or_none(now):
            return []
        return [f"{prefix} was {recorded!r} in {name}, is {now!r} now"]
    changes = []
    for key in [*now, *(k for k in recorded if k not in now)]:
        changes += setting_changes(recorded.get(key, UNSET), now.get(key, UNSET), name,
                                   f"{prefix}.{key}" if prefix else key)
    return changes


def _or_none(value: Any) -> Any:
    return None if value is UNSET else value


def check_lora_resume(checkpoint: Checkpoint, lora: str) -> None:
    """Refuse to resume a LoRA checkpoint with other LoRA settings: its adapter tensors have the
    run's rank `r` (another one cannot load), and alpha, dropout and targets decide what they mean.

    Raises:
        ValueError: "--resume: lora.r was 4 in checkpoint-000002, is 8 now; ..." (each change).
    """
    recorded = checkpoint.state.get(TRAIN_CONFIG_KEY, {}).get("lora")
    if recorded is None:  # not recorded: the adapter's shapes are still checked as it loads
        return
    settings = [json.loads(json.dumps(dataclasses.asdict(parse_lora(spec)))) for spec in (recorded, lora)]
    changes = setting_changes(settings[0], settings[1], checkpoint.path.name, "lora")
    if changes:
        raise ValueError(f"--resume: {'; '.join(changes)}; a resumed LoRA run continues the adapter it saved: "
                         "use the same --lora setting, or start a new run")


# -- writing -----------------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, lm: LoadedModel, optimizer, scheduler, state: dict[str, Any],
                    keep: int, write_weights: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint-<step> atomically and keep only the newest `keep` checkpoints.

    `write_weights` writes what trains into the checkpoint folder (default: the whole model, as
    `LoadedModel.save`; a LoRA run writes its adapter tensors, a sharded one its gathered weights)."""
    final = checkpoint_dir(run_dir, step)
    with written_whole(final) as tmp:
        if write_weights is None:
            lm.save(tmp)
        else:
            write_weights(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
        # numpy's state holds a uint32 array; stored as a tensor so weights_only loading accepts it.
        rng = rng_state()
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        rng["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
        torch.save(rng, tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2, allow_nan=False) + "\n")
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


# -- reading -----------------------------------------------------------------------------------------


def newest_usable_checkpoint(run_dir: Path, log: Callable[[str], None]) -> Checkpoint | None:
    """The newest checkpoint that reads back whole, or None when the run has none.

    Unusable newer ones are logged (one line each) and renamed `<name>.unusable`: left in place,
    they would count as the newest in the rotation and push out the good checkpoints to come.

    Raises:
        CheckpointError: the run has checkpoints but none is usable (each one's file and reason).
    """
    problems: list[tuple[Path, CheckpointError]] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as err:
            problems.append((path, err))
            continue
        for bad, err in problems:
            aside = bad.with_name(bad.name + UNUSABLE_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(bad, aside)
            log(f"{bad.name} is unusable ({err}); set aside as {aside.name}, resuming from {path.name}")
        return checkpoint
    if problems:
        reasons = "; ".join(f"{bad.name}: {err}" for bad, err in problems)
        raise CheckpointError(f"--resume: no usable checkpoint in {run_dir}: {reasons}")
    return None


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and check everything resuming from `path` needs (the weights are checked, not loaded).

    Raises:
        CheckpointError: "<file>: <why>" for the first file found missing or corrupt.
    """
    step = int(CHECKPOINT_PATTERN.match(path.name).group(1))
    state = _read_json(path / STATE_FILE)
    if not isinstance(state, dict) or state.get("step") != step:
        raise CheckpointError(f"{STATE_FILE}: not the trainer state of step {step}")
    _read_json(path / CONFIG_FILE)
    if (path / ADAPTER_FILE).exists():  # a LoRA run's checkpoint: the adapter tensors, not the model
        _check_safetensors(path / ADAPTER_FILE)
    else:
        check_weights(path)
    optimizer = _load_tensors(path / OPTIMIZER_FILE, ("optimizer", "scheduler"))
    rng = _load_tensors(path / RNG_FILE, ("python", "numpy", "torch", "cuda"))
    try:
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        rng["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
        rng["python"] = _as_python_state(rng["python"])
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{RNG_FILE}: not an RNG state ({err})") from err
    return Checkpoint(path, step, state, optimizer, rng)


def restore_training_state(checkpoint: Checkpoint, optimizer, scheduler) -> int:
    """Put a checkpoint's optimizer, scheduler and RNG state in place; returns its step."""
    try:
        optimizer.load_state_dict(checkpoint.optimizer["optimizer"])
        scheduler.load_state_dict(checkpoint.optimizer["scheduler"])
    except (ValueError, KeyError, TypeError) as err:  # e.g. another model's parameter groups
        raise CheckpointError(f"{checkpoint.path / OPTIMIZER_FILE}: does not fit this run's optimizer ({err})") from err
    try:
        set_rng_state(checkpoint.rng)
    except (RuntimeError, TypeError, ValueError) as err:
        raise CheckpointError(f"{checkpoint.path / RNG_FILE}: not an RNG state ({err})") from err
    return checkpoint.step


def _check_safetensors(file: Path) -> None:
    try:
        with safe_open(file, framework="pt") as f:
            f.keys()
    except Exception as err:  # safetensors raises its own error types for a torn or foreign file
        raise CheckpointError(f"{file.name}: not a readable safetensors file ({err})") from err


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{file.name}: missing") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file.name}: invalid JSON ({err})") from err


def _load_tensors(file: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    try:
        loaded = torch.load(file, weights_only=True)
    except FileNotFoundError as err:
        raise CheckpointError(f"{file.name}: missing") from err
    except pickle.UnpicklingError as err:  # its message advises weights_only=False: not for a corrupt file
        raise CheckpointError(f"{file.name}: unreadable (not a tensors-only torch file)") from err
    except (OSError, EOFError, RuntimeError) as err:
        raise CheckpointError(f"{file.name}: unreadable ({first_line(err)})") from err
    if not isinstance(loaded, dict) or not set(keys) <= set(loaded):
        raise CheckpointError(f"{file.name}: unreadable (expected the keys {', '.join(keys)})")
    return loaded


def _as_python_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
