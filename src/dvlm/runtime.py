"""Device, dtype, seeding and timing: decided here, once. Library code follows its input tensors."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    """The requested device, or CUDA when available, else CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(name: str | None, device: torch.device, saved: str | None = None) -> torch.dtype:
    """The dtype to run a model in.

    `auto`/None: the dtype its weights were `saved` in (a bf16 checkpoint runs in bf16, half the
    memory of fp32), except float16 on CPU, which runs in float32 (CPU fp16 kernels are few and
    slow). A checkpoint that does not say: bfloat16 on CUDA, float32 on CPU."""
    if name in (None, "auto"):
        if saved in _DTYPES:
            return torch.float32 if saved == "float16" and device.type == "cpu" else _DTYPES[saved]
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialisation)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A private torch generator seeded with `seed` (None: none, use torch's global stream)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@contextmanager
def seeded_global_rng(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch's global generator for the duration (for code that samples from it, such as HF
    `generate`) and restore the caller's state afterwards, as private generators leave it."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings measure work rather than launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Accumulates wall-clock seconds per named phase: `with timer("prefill"): ...`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.seconds[phase] += time.perf_counter() - start

    def as_dict(self) -> dict[str, float]:
        out = {f"{k}_s": v for k, v in self.seconds.items()}
        out["total_s"] = sum(self.seconds.values())
        return out
