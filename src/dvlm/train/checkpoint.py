"""Training checkpoints: a loadable model directory plus optimizer, schedule, step and RNG state.

A checkpoint is written to a temporary directory and renamed into place, so a run killed while
saving never leaves a half-written checkpoint behind. Model weights are safetensors; optimizer and
RNG state are plain tensors/numbers read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"


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


def save_checkpoint(run_dir: Path, step: int, lm, optimizer, scheduler, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint-<step> atomically and keep only the newest `keep` checkpoints."""
    final = checkpoint_dir(run_dir, step)
    tmp = run_dir / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(lm, tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIMIZER_FILE)
    # numpy's state holds a uint32 array; stored as a tensor so weights_only loading accepts it.
    rng = rng_state()
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    rng["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    torch.save(rng, tmp / RNG_FILE)
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
    # Replacing a checkpoint of the same step: move the old one aside first, so a crash at any
    # point leaves a complete checkpoint under the final name or the aside one.
    aside = run_dir / f".{final.name}.old"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_training_state(path: Path, optimizer, scheduler) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG from a checkpoint; returns its trainer state."""
    opt = torch.load(path / OPTIMIZER_FILE, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    scheduler.load_state_dict(opt["scheduler"])
    rng = torch.load(path / RNG_FILE, weights_only=True)
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    rng["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    rng["python"] = _as_python_state(rng["python"])
    set_rng_state(rng)
    return json.loads((path / STATE_FILE).read_text())


def _as_python_state(state: Any) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def save_model(lm, out: Path) -> None:
    """A complete, loadable checkpoint: safetensors weights, config, tokenizer, image processor."""
    out.mkdir(parents=True, exist_ok=True)
    lm.model.save_pretrained(out, safe_serialization=True)
    lm.processor.tokenizer.save_pretrained(out)
    lm.processor.image_processor.save_pretrained(out)
