"""How long a run's samples are, and how long they may be, known before training starts.

`max_length` (TrainConfig) skips longer samples; by default it is the model's position limit, so
that every sample the model can place trains: one photo tiled at a published model's real
geometry can take about 2,900 tokens, past any fixed guess like 2048. Before the first step the
samples are encoded as training encodes them (all of them, or `SCAN_LIMIT` drawn at random from a
larger file) and the run says how many exceed `max_length` and how long the longest is; the
memory estimate is then bounded by the longest sample rather than by `max_length`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dvlm.config import ConfigError, TrainConfig
from dvlm.data.llava_json import LlavaJsonDataset, SampleError
from dvlm.model.adapters.registry import adapter_for_checkpoint

SCAN_LIMIT = 500
"""Samples encoded before training at most: a larger file is measured on a random draw of this many
(encoding one photo tiled at a published anyres geometry took ~0.1 s on a shared 2-core CPU)."""
POSITIONS = "the model's position limit"


def resolve_max_length(cfg: TrainConfig, max_positions: int | None,
                       recorded: int | None = None) -> tuple[TrainConfig, str]:
    """`cfg` with `max_length` decided, and where it came from: as given; else the run's own
    (`recorded` by the checkpoint a resume continues); else the model's position limit."""
    if cfg.max_length is not None:
        return cfg, "as set"
    if recorded is not None:
        return replace(cfg, max_length=recorded), "the resumed run's"
    if max_positions is None:
        raise ConfigError("the model's config states no position limit (max_position_embeddings): set max_length, "
                          "e.g. --set max_length=4096")
    return replace(cfg, max_length=max_positions), POSITIONS


@dataclass(frozen=True)
class LengthScan:
    """What encoding the samples (or a random draw of them) found."""

    total: int
    """Samples in the data."""
    measured: int
    """Samples encoded (all of them, or a draw of SCAN_LIMIT)."""
    lengths: tuple[int, ...]
    """Tokens of each measured sample that could be encoded (images included)."""
    max_length: int

    @property
    def too_long(self) -> int:
        return sum(length > self.max_length for length in self.lengths)

    @property
    def longest(self) -> int | None:
        return max(self.lengths, default=None)

    @property
    def unreadable(self) -> int:
        return self.measured - len(self.lengths)

    def describe(self, origin: str) -> str:
        """One line, e.g. `lengths: 0 of 12 samples exceed max_length 32,768 (the model's position
        limit); the longest has 2,958 tokens`."""
        which = f"{self.measured:,} samples drawn from {self.total:,}" if self.measured < self.total else \
            f"{self.measured:,} sample{'s' if self.measured != 1 else ''}"
        line = f"lengths: {self.too_long:,} of {which} exceed max_length {self.max_length:,} ({origin})"
        line += "; they will be skipped" if self.too_long else ""
        line += f"; the longest has {self.longest:,} tokens" if self.longest is not None else ""
        if self.unreadable:
            line += f"; {self.unreadable:,} cannot be used (skipped too, each reported with its reason when drawn)"
        return line

    def require_some_fit(self) -> None:
        """Refuse, before any weight loads, data whose every sample is too long (every one measured)."""
        if self.measured == self.total and self.lengths and self.too_long == len(self.lengths):
            raise ConfigError(f"every sample is longer than max_length {self.max_length:,} (the shortest has "
                              f"{min(self.lengths):,} tokens): nothing would train; raise max_length, e.g. "
                              f"--set max_length={min(self.lengths)}")


def scan_lengths(dataset: LlavaJsonDataset, max_length: int, seed: int, limit: int = SCAN_LIMIT) -> LengthScan:
    """Encode the samples of `dataset` (whose processor has no max_length), or `limit` of them drawn
    with `seed`, and measure them."""
    total = len(dataset)
    if total <= limit:
        indices: Any = range(total)
    else:
        generator = torch.Generator().manual_seed(seed)
        indices = torch.randperm(total, generator=generator)[:limit].tolist()
    lengths = []
    for index in indices:
        try:
            lengths.append(len(dataset[index]))
        except SampleError:
            continue  # an unreadable sample is skipped when drawn, with its reason
    return LengthScan(total, len(indices), tuple(lengths), max_length)


def measure(source: Path, data: str | Path, image_root: str | Path | None, records: Sequence[dict],
            cfg: TrainConfig, origin: str) -> LengthScan:
    """Encode `data`'s samples as training will, with `source`'s processor, say how many are longer
    than `cfg.max_length` (which came from `origin`), and refuse data of which none fits; no weight loads."""
    processor = adapter_for_checkpoint(source).load_processor(source)  # no max_length: every sample measured
    dataset = LlavaJsonDataset(data, processor, image_root=image_root, records=records)
    scan = scan_lengths(dataset, cfg.max_length, cfg.seed)
    tqdm.write(scan.describe(origin))
    scan.require_some_fit()
    return scan
