"""Step-wise decoding: a decoder is a step function over a batch of rows (DESIGN.md §3, "The engine").

A `Stepper` prefills new rows (`start`), merges them into its running batch between blocks
(`join`: their KV contexts and per-row state), advances every row by one block (`step`: one token
for `ar`) reporting the tokens each row committed and the rows that finished, and lets rows leave
unfinished (`drop`). `generate_ar` / `generate_block` / `generate_speculative` drive a stepper to
completion (`run_to_completion`); the server's engine drives the same steppers while requests
join and leave. The step logic exists once.

Settings (`dvlm.decode.settings`): `GroupSettings` shape the forward (block size, fixed step count,
sub-blocks, the fused commit) and are shared by every row of a stepper; `RowSettings`
(max_new_tokens, sampling, threshold) are each row's own. `settings_for` resolves a `DecodeConfig`
against the model and splits it into both.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from dvlm.config import DecodeConfig
from dvlm.data.processor import Encoded
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prompts import Caches, PromptBatch, RowKey, open_prompts, remember
from dvlm.decode.rows import Listener, Rows
from dvlm.decode.sampling import RowSampler
from dvlm.decode.settings import GroupSettings, RowSettings, resolve, split
from dvlm.model.cache import KVContext
from dvlm.model.loaded import LoadedModel
from dvlm.model.prefix_cache import Stream, reusable_layers
from dvlm.runtime import Timer


@dataclass
class StepReport:
    """What one step did."""

    committed: list[tuple[int, list[int]]]  # (row id, tokens the row committed in this step)
    finished: list[int]  # rows that finished in this step (EOS or their max_new_tokens) and left the batch
    forwards: int  # model forwards the step ran


@dataclass
class Started:
    """Rows after their prefill, not yet in the running batch."""

    ids: list[int]
    state: Any  # the decoder's batch state of these rows


class Stepper:
    """One decoder over a batch whose rows join between blocks and leave when they finish.

    Subclasses implement `_prefill` (new rows -> their batch state), `_advance` (one block for
    every active row), `_join` / `_select` on their batch state, and `_prefix_stream` (how their
    contexts' entries are computed: which kept prefixes their prefills may reuse).

    `caches`: the vision features and prefixes it reuses (`dvlm.decode.prompts`); a row that leaves
    the batch leaves its prefix in `caches.prefixes`.
    """

    decoder = ""  # the name in DecodeConfig and GenerationOutput

    def __init__(self, lm: LoadedModel, group: GroupSettings, context_cls=KVContext,
                 caches: Caches | None = None) -> None:
        self.lm = lm
        self.group = group
        self.compiled = None  # the model's CompiledForward with group.compile
        if group.compile and context_cls is KVContext:
            from dvlm.decode.compiled import CompiledKVContext, compiled_forward  # torch.compile only when asked

            context_cls, self.compiled = CompiledKVContext, compiled_forward(lm.adapter, lm.model)
        self.context_cls = context_cls
        self.caches = caches or Caches()
        self.timer = Timer(lm.device)
        self.rows = Rows(lm.eos_token_ids, lm.banned_token_ids)
        self.state: Any = None  # batch state of the active rows; None when no row is active
        self._kept: dict[int, RowKey] = {}  # rows whose prefix is kept when they leave
        # Kept entries fill a KVContext (the recomputing reference keeps none) of full-attention layers.
        self._reuses_prefixes = (caches is not None and caches.prefixes is not None and issubclass(context_cls, KVContext)
                                 and reusable_layers(lm.adapter.new_cache(lm.model)))

    @classmethod
    def settings_for(cls, lm: LoadedModel, cfg: DecodeConfig) -> tuple[GroupSettings, RowSettings]:
        """The group and row settings `cfg` stands for with this decoder (the model's defaults
        filled in, `resolve`); raises ConfigError when this decoder cannot serve the model or the settings."""
        return split(resolve(dataclasses.replace(cfg, decoder=cls.decoder), lm.diffusion, lm.path))

    @property
    def num_active(self) -> int:
        return self.rows.num_active

    @property
    def warmup_s(self) -> float:
        """Seconds the compiled forward has spent compiling new shapes (0 when not compiled)."""
        return 0.0 if self.compiled is None else self.compiled.warmup_s

    @torch.inference_mode()
    def start(self, prompts: list[Encoded], settings: list[RowSettings], cache: list[bool] | None = None) -> Started:
        """Prefill new rows (one forward for all of them); they join the batch with `join`.
        `cache`: per row, whether it reads and fills the caches (default: all do)."""
        cache = [True] * len(prompts) if cache is None else cache
        if not len(prompts) == len(settings) == len(cache):
            raise ValueError(f"{len(prompts)} prompts, {len(settings)} row settings and {len(cache)} cache flags")
        ids = self.rows.add(settings, [len(p) for p in prompts], self.lm.device)
        try:
            with self.timer("prefill"):
                state = self._prefill(self._open(prompts, ids, cache), ids)
        except BaseException:
            self.forget(ids)
            raise
        return Started(ids, state)

    @torch.inference_mode()
    def join(self, started: Started) -> None:
        """Merge started rows into the running batch (between two steps)."""
        self.state = started.state if self.state is None else self._join(self.state, started.state)
        self.rows.enter(started.ids)

    @torch.inference_mode()
    def step(self) -> StepReport:
        """Advance every active row by one block (one token for ar); finished rows leave the batch."""
        before = self.rows.forwards
        committed, finished = self._advance()
        return StepReport(committed, finished, self.rows.forwards - before)

    @torch.inference_mode()
    def drop(self, ids: list[int]) -> None:
        """Rows leave the batch unfinished (cancelled, timed out); their records stay until `forget`."""
        leaving = set(ids)
        self._keep([i for i, row_id in enumerate(self.rows.active) if row_id not in leaving])

    def forget(self, ids: list[int]) -> None:
        self.rows.forget(ids)
        for row_id in ids:
            self._kept.pop(row_id, None)

    def output(self, row_id: int, timings: dict[str, float]) -> GenerationOutput:
        return self.rows.output(row_id, self.lm.processor.decode, self.decoder, timings, self.group)

    def _leave_finished(self, done: list[bool]) -> list[int]:
        """Finished rows leave the batch; returns their ids."""
        finished = [row_id for row_id, d in zip(self.rows.active, done) if d]
        if finished:
            self._keep([i for i, d in enumerate(done) if not d])
        return finished

    def _keep(self, indices: list[int]) -> None:
        if len(indices) == self.rows.num_active:
            return
        self._remember(sorted(set(range(self.rows.num_active)) - set(indices)))
        self.rows.keep(indices)
        # An empty batch holds no context: its memory goes back before the next rows start.
        self.state = self._select(self.state, torch.tensor(indices, device=self.lm.device)) if indices else None

    def _sampler(self, ids: list[int] | None = None) -> RowSampler:
        return self.rows.sampler(ids)

    def _open(self, prompts: list[Encoded], ids: list[int], cache: list[bool]) -> PromptBatch:
        """The new rows' prompts, with the kept prefixes they reuse; records what they will keep."""
        stream = self._prefix_stream() if self._reuses_prefixes else None
        batch, keys = open_prompts(self.lm, prompts, self.caches, cache, stream)
        for row_id, key, reused in zip(ids, keys, batch.reused_tokens):
            self.rows[row_id].cached_tokens = reused
            if key is not None:
                self._kept[row_id] = key
        return batch

    def _remember(self, leaving: list[int]) -> None:
        """Rows at these batch indices leave: each keeps its prefix (prompt and committed answer)."""
        store, stream = self.caches.prefixes, self._prefix_stream()
        for index in leaving:
            row_id = self.rows.active[index]
            key = self._kept.pop(row_id, None)
            if key is not None and store is not None and stream is not None:
                remember(store, stream, self.state.context, index, key, self.rows[row_id].tokens)

    def _prefix_stream(self) -> Stream | None:
        """How this decoder computes its contexts' entries (None: its prefills reuse no kept prefix)."""
        return None

    def _prefill(self, prompts: PromptBatch, ids: list[int]) -> Any:
        raise NotImplementedError

    def _advance(self) -> tuple[list[tuple[int, list[int]]], list[int]]:
        raise NotImplementedError

    def _join(self, running: Any, joining: Any) -> Any:
        raise NotImplementedError

    def _select(self, state: Any, keep: torch.Tensor) -> Any:
        raise NotImplementedError


def run_to_completion(stepper: Stepper, prompts: list[Encoded], row: RowSettings,
                      listener: Listener | None = None) -> list[GenerationOutput]:
    """Decode `prompts` as one batch, every row with the same settings: what `generate` does.

    Every output carries the batch's phase timings (seconds per phase for the whole batch) and its
    own `total_s`: the wall-clock seconds from the batch's start until the row finished, so its
    tokens per second are its own. Compiling (the compiled path's first calls of a shape) is left
    out of `total_s` and reported as `compile_s`."""
    start, warmup = time.perf_counter(), stepper.warmup_s
    started = stepper.start(prompts, [row] * len(prompts))
    stepper.join(started)
    index = {row_id: i for i, row_id in enumerate(started.ids)}
    finished_at = {}
    while stepper.num_active:
        report = stepper.step()  # its timer synchronises the device: the clock sees finished work
        now = time.perf_counter() - start - (stepper.warmup_s - warmup)
        finished_at.update((row_id, now) for row_id in report.finished)
        if listener is not None:
            for row_id, tokens in report.committed:
                listener(index[row_id], tokens)
    phases = stepper.timer.as_dict()
    compiling = {"compile_s": stepper.warmup_s - warmup} if stepper.compiled is not None else {}
    return [stepper.output(row_id, {**phases, **compiling, "total_s": finished_at.get(row_id, phases["total_s"])})
            for row_id in started.ids]


def generate_with(stepper_cls: type[Stepper], lm: LoadedModel, prompts: list[Encoded], cfg: DecodeConfig,
                  context_cls=KVContext, listener: Listener | None = None) -> list[GenerationOutput]:
    """`generate` for a step-wise decoder: its settings from `cfg`, then one batch to completion."""
    group, row = stepper_cls.settings_for(lm, cfg)
    return run_to_completion(stepper_cls(lm, group, context_cls), prompts, row, listener)
