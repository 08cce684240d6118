"""Device, dtype, seeding and timing: decided here, once. Library code follows its input tensors."""

from __future__ import annotations

import functools
import random
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
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


FAST_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""/proc/cpuinfo flags of x86 CPUs with bfloat16 matrix instructions (AVX512-BF16, AMX). Without
them PyTorch emulates bf16 products, measured about 5x slower than float32 on an AVX2 CPU."""
CPUINFO = Path("/proc/cpuinfo")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX512-BF16 or AMX).

    `cpuinfo`: the text of /proc/cpuinfo (default: read it). Where there is none (not Linux),
    PyTorch's own CPU capability query answers; failing both, False (float32 is never slow)."""
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    if cpuinfo is not None:
        flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
        return bool(flags & FAST_BF16_CPU_FLAGS)
    return _torch_reports_fast_bf16()


@functools.lru_cache(maxsize=1)
def _read_cpuinfo() -> str | None:
    try:
        return CPUINFO.read_text()
    except OSError:
        return None


def _torch_reports_fast_bf16() -> bool:
    """PyTorch's CPU capability queries (private, present in 2.x); False where they are missing."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def slow_in_bf16(device: torch.device) -> bool:
    """Whether bfloat16 compute is slower than float32 on `device`: a CPU without bfloat16 instructions."""
    return device.type == "cpu" and not cpu_has_fast_bf16()


def pick_dtype(name: str | None, device: torch.device, saved: str | None = None) -> torch.dtype:
    """The dtype to compute in: the one rule for loading, generating, verifying a conversion and
    training. An explicit `name` (float32, bfloat16, float16) is obeyed.

    `auto`/None follows the dtype the weights were `saved` in, as far as `device` is fast in it:
    CUDA runs the saved dtype (bfloat16 when the checkpoint does not say); a CPU runs bfloat16 only
    where it has bfloat16 matrix instructions (AVX512-BF16 or AMX, `cpu_has_fast_bf16`), float16
    never (CPU fp16 kernels are few and slow), and float32 otherwise. Writing keeps the saved
    dtype whatever the compute dtype (`storage_dtype`)."""
    if name not in (None, "auto"):
        if name not in _DTYPES:
            raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.bfloat16 if saved == "bfloat16" and not slow_in_bf16(device) else torch.float32
    if saved in _DTYPES:
        return _DTYPES[saved]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def storage_dtype(name: str | None, saved: str | None) -> str:
    """The dtype to write a checkpoint in: `name` when given, else (`auto`/None) the one its source
    was saved in, float32 when the source does not say."""
    if name not in (None, "auto"):
        if name not in _DTYPES:
            raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
        return name
    return saved if saved is not None else "float32"


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the names config.json and the CLI use)."""
    return str(dtype).removeprefix("torch.")


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
