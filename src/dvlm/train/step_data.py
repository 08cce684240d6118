"""The samples of each optimizer step: a pure function of (seed, step), shared out by rank.

Each epoch is a seeded permutation of the data; step k of the epoch takes the next
`batch_size * processes * grad_accum` samples of it (optionally grouped by length), cut into
global micro-batches of `batch_size * processes`, of which each process takes its `batch_size`
rows by rank. With `num_workers`, DataLoader workers read, decode and encode the coming steps'
shares ahead of the training loop; they compute exactly what the loop would.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dvlm.config import TrainConfig
from dvlm.runtime import seeded_generator
from dvlm.data.collate import Batch, collate
from dvlm.data.llava_json import LlavaJsonDataset, SampleError, SkipReport, record_length

LENGTH_WINDOW_STEPS = 64  # group_by_length sorts windows of this many steps' samples


class StepData:
    """The micro-batches of each optimizer step, determined by (seed, step) alone.

    With several processes a step's global micro-batches hold `batch_size * world_size` samples
    each and every process takes its `batch_size` of them, by rank (`distributed`)."""

    def __init__(self, dataset: LlavaJsonDataset, cfg: TrainConfig, pad_token_id: int, skips: SkipReport,
                 rank: int = 0, world_size: int = 1):
        self.dataset, self.cfg, self.pad = dataset, cfg, pad_token_id
        self.skips = skips
        self.rank, self.global_batch = rank, cfg.batch_size * world_size
        self.samples_per_step = self.global_batch * cfg.grad_accum
        self.steps_per_epoch = max(1, math.ceil(len(dataset) / self.samples_per_step))
        self._seen_bad: set[int] = set()
        self._epoch_order: tuple[int, torch.Tensor] | None = None
        self._lengths = record_lengths(dataset) if cfg.group_by_length else None
        self._prefetched: Iterator | None = None

    def total_steps(self) -> int:
        return self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        """The dataset indices of a step's samples: a slice of the epoch's seeded permutation."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        if self._lengths is None:
            return order[index * self.samples_per_step:(index + 1) * self.samples_per_step].tolist()
        return self._grouped_indices(epoch, order, index)

    def micro_batches(self, step: int) -> list[Batch | None]:
        """This process's rows of each of the step's global micro-batches (None: none of its
        samples loads)."""
        shares = []
        for micro in range(self._micro_count(step)):
            if self._prefetched is None:
                share, errors = self._share(step, micro)
            else:
                key, share, errors = next(self._prefetched)
                assert key == (step, micro), f"prefetched {key}, expected {(step, micro)}"
            for index, sample_id, reason in errors:
                self._record(SampleError(index, sample_id, reason))
            shares.append(share)
        return shares

    def prefetch(self, start: int, total: int) -> None:
        """Have `num_workers` DataLoader workers prepare the shares of steps start..total ahead."""
        if self.cfg.num_workers == 0:
            return
        # the workers are forked after the tokenizer ran: keep its thread pool out of them
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(_Shares(self), sampler=_ShareKeys(self, start, total), batch_size=None,
                            num_workers=self.cfg.num_workers, collate_fn=_unchanged)
        self._prefetched = iter(loader)

    def close(self) -> None:
        """Let the workers end (the training loop has drawn every step)."""
        if self._prefetched is not None:
            for _ in self._prefetched:  # nothing is left: this ends the iterator and its workers
                pass
            self._prefetched = None

    def stand_in(self, step: int, micro: int) -> Batch:
        """One loadable sample of a global micro-batch, for a process whose share of it is empty:
        it runs a forward and backward with weight 0 so that the collectives of the others match."""
        for index in self._global_micro_batches(step)[micro]:
            try:
                return collate([self.dataset[index]], self.pad)
            except SampleError:
                continue  # reported by the process it belongs to
        raise RuntimeError(f"step {step + 1}: no sample of micro-batch {micro + 1} loads here, "
                           "though one did on another process")

    def _share(self, step: int, micro: int) -> tuple[Batch | None, list[tuple]]:
        """This process's rows of one global micro-batch, and (index, id, reason) of its bad samples."""
        chunk = self._global_micro_batches(step)[micro]
        samples, errors = [], []
        for index in chunk[self.rank * self.cfg.batch_size:(self.rank + 1) * self.cfg.batch_size]:
            try:
                samples.append(self.dataset[index])
            except SampleError as err:  # plain values: the error crosses from a worker by pickle
                errors.append((err.index, err.sample_id, err.reason))
        return (collate(samples, self.pad) if samples else None), errors

    def _micro_count(self, step: int) -> int:
        index = step % self.steps_per_epoch
        in_step = min(self.samples_per_step, len(self.dataset) - index * self.samples_per_step)
        return math.ceil(in_step / self.global_batch)

    def _global_micro_batches(self, step: int) -> list[list[int]]:
        chosen = self.indices(step)
        return [chosen[start:start + self.global_batch] for start in range(0, len(chosen), self.global_batch)]

    def _order(self, epoch: int) -> torch.Tensor:
        """The epoch's seeded permutation (the last one is kept: steps ask for it in turn)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            seeded = seeded_generator(self.cfg.seed + epoch)
            self._epoch_order = (epoch, torch.randperm(len(self.dataset), generator=seeded))
        return self._epoch_order[1]

    def _grouped_indices(self, epoch: int, order: torch.Tensor, index: int) -> list[int]:
        """group_by_length: the epoch's order is cut into windows of LENGTH_WINDOW_STEPS steps; a
        window's samples are sorted by length, longest first, cut into steps, and the steps dealt
        out in a seeded order (the first window's longest step first: too little memory shows at once)."""
        window, within = divmod(index, LENGTH_WINDOW_STEPS)
        size = LENGTH_WINDOW_STEPS * self.samples_per_step
        chunk = order[window * size:(window + 1) * size]
        chunk = chunk[torch.sort(self._lengths[chunk], descending=True, stable=True).indices]
        steps = math.ceil(len(chunk) / self.samples_per_step)
        seeded = seeded_generator(self.cfg.seed * 1_000_003 + epoch * 1_009 + window)
        dealt = torch.randperm(steps, generator=seeded)
        if window == 0:  # the longest step first
            dealt = torch.cat([torch.tensor([0]), dealt[dealt != 0]])
        slot = int(dealt[within])
        return chunk[slot * self.samples_per_step:(slot + 1) * self.samples_per_step].tolist()

    def _record(self, err: SampleError) -> None:
        if err.index not in self._seen_bad:  # report each bad sample once, however often it is drawn
            self._seen_bad.add(err.index)
            self.skips.record(err)


def record_lengths(dataset: LlavaJsonDataset) -> torch.Tensor:
    """(N,) long: every record's `record_length` (one pass over the data; 0 for a malformed record)."""
    lengths = torch.zeros(len(dataset), dtype=torch.long)
    for index in range(len(dataset)):
        try:
            lengths[index] = record_length(dataset.records[index])
        except ValueError:
            pass  # an unreadable line: skipped when drawn; its length does not matter
    return lengths


class _Shares(Dataset):
    """(step, micro) -> (key, this process's share, its bad samples), computed in a worker."""

    def __init__(self, steps: StepData):
        self.steps = steps

    def __getitem__(self, key: tuple[int, int]):
        return (key, *self.steps._share(*key))


class _ShareKeys(Sampler):
    """(step, micro) of every global micro-batch of steps start..total, in training order."""

    def __init__(self, steps: StepData, start: int, total: int):
        self.steps, self.start, self.total = steps, start, total

    def __iter__(self):
        for step in range(self.start, self.total):
            for micro in range(self.steps._micro_count(step)):
                yield step, micro

    def __len__(self) -> int:
        return sum(self.steps._micro_count(step) for step in range(self.start, self.total))


def _unchanged(item):
    return item
