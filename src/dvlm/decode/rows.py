"""Per-row bookkeeping of a running batch whose rows join and leave at different times."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dvlm.decode.output import GenerationOutput
from dvlm.decode.sampling import RowSampler
from dvlm.decode.settings import GroupSettings, RowSettings, joined
from dvlm.runtime import seeded_generator

Listener = Callable[[int, list[int]], None]  # (prompt index, tokens just committed): for streaming


@dataclass
class Row:
    """One row's settings, random stream, committed tokens and statistics."""

    settings: RowSettings
    prompt_tokens: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None  # "stop" (EOS) or "length" once finished
    stop_token: int | None = None  # the end token that finished the row ("stop" only)
    nfe: int = 0
    steps: list[int] = field(default_factory=list)  # tokens unmasked by each denoising pass
    accepts: list[int] = field(default_factory=list)  # speculative decoding: tokens accepted per block
    cached_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache

    @property
    def remaining(self) -> int:
        return self.settings.max_new_tokens - len(self.tokens)


class Rows:
    """The rows of one decoder: `active` lists the row id at each batch index.

    Rows are created by `add` (their prefill), enter the batch with `enter`, append committed
    tokens with `extend` (which stops a row at EOS or its own max_new_tokens) and leave with
    `keep` (finished or cancelled rows). Per-pass statistics given as device tensors stay on the
    device until the next `extend` (once per block), so denoising passes do not each wait for a
    host copy.
    """

    def __init__(self, eos_token_ids: list[int], banned_token_ids: list[int]) -> None:
        self.eos = set(eos_token_ids)
        self.banned = banned_token_ids
        self.rows: dict[int, Row] = {}
        self.active: list[int] = []
        self.forwards = 0  # model forwards run for this batch, whatever rows they served
        self._next_id = 0
        self._pending_forwards: torch.Tensor | None = None  # (R,) long
        self._pending_steps: list[torch.Tensor] = []  # each (R,)

    def __getitem__(self, row_id: int) -> Row:
        return self.rows[row_id]

    @property
    def num_active(self) -> int:
        return len(self.active)

    def add(self, settings: list[RowSettings], prompt_lengths: list[int], device: torch.device) -> list[int]:
        """New rows (not yet in the batch); returns their ids."""
        ids = list(range(self._next_id, self._next_id + len(settings)))
        self._next_id += len(settings)
        for row_id, s, length in zip(ids, settings, prompt_lengths):
            self.rows[row_id] = Row(s, length, seeded_generator(s.sampling.seed, device))
        return ids

    def enter(self, ids: list[int]) -> None:
        """The rows `ids` join the batch, after the active ones."""
        self._flush()
        self.active = self.active + ids

    def keep(self, indices: list[int]) -> None:
        """Only the rows at these batch indices stay in the batch."""
        self._flush()
        self.active = [self.active[i] for i in indices]

    def forget(self, ids: list[int]) -> None:
        """Drop the records of rows that are no longer in the batch."""
        for row_id in ids:
            self.rows.pop(row_id, None)

    def sampler(self, ids: list[int] | None = None) -> RowSampler:
        """Token selection for the active rows (or the rows `ids`), each with its sampling and stream."""
        rows = [self.rows[i] for i in (self.active if ids is None else ids)]
        return RowSampler([r.settings.sampling for r in rows], [r.generator for r in rows], self.banned)

    def count_forward(self, rows: torch.Tensor | None = None) -> None:
        """One model forward did work for the active rows (or those where `rows` (R,) is True)."""
        self.forwards += 1
        if rows is None:
            for row_id in self.active:
                self.rows[row_id].nfe += 1
            return
        counted = rows.long()
        self._pending_forwards = counted if self._pending_forwards is None else self._pending_forwards + counted

    def count_forward_for(self, ids: list[int]) -> None:
        """One model forward did work for the rows `ids` (the prefill of rows not yet in the batch)."""
        self.forwards += 1
        for row_id in ids:
            self.rows[row_id].nfe += 1

    def record_steps(self, counts: torch.Tensor) -> None:
        """Tokens unmasked per active row by one denoising pass (R,)."""
        self._pending_steps.append(counts)

    def record_accepts(self, accepted: list[int]) -> None:
        for row_id, n in zip(self.active, accepted):
            self.rows[row_id].accepts.append(n)

    def _flush(self) -> None:
        """Move the pending per-pass statistics to the host: one copy per block."""
        if self._pending_forwards is not None:
            for row_id, n in zip(self.active, self._pending_forwards.tolist()):
                self.rows[row_id].nfe += n
            self._pending_forwards = None
        if self._pending_steps:
            per_pass = torch.stack(self._pending_steps, dim=1).tolist()  # (R, passes)
            for row_id, counts in zip(self.active, per_pass):
                self.rows[row_id].steps.extend(n for n in counts if n)
            self._pending_steps = []

    def extend(self, new_tokens: list[list[int]]) -> tuple[list[tuple[int, list[int]]], list[bool]]:
        """Append each active row's new tokens, stopping at EOS or the row's length limit.

        Returns the (row id, tokens appended) of rows that got tokens, and per batch index
        whether the row finished now."""
        self._flush()
        committed, done = [], []
        for row_id, toks in zip(self.active, new_tokens):
            row = self.rows[row_id]
            before = len(row.tokens)
            for tok in toks:
                if tok in self.eos:
                    row.finish, row.stop_token = "stop", tok
                    break
                row.tokens.append(tok)
                if row.remaining <= 0:
                    row.finish = "length"
                    break
            if len(row.tokens) > before:
                committed.append((row_id, row.tokens[before:]))
            done.append(row.finish is not None)
        return committed, done

    def output(self, row_id: int, decode_text, decoder: str, timings: dict[str, float],
               group: GroupSettings) -> GenerationOutput:
        """The row's GenerationOutput; its settings are the resolved ones it ran with."""
        self._flush()
        row = self.rows[row_id]
        return GenerationOutput(
            text=decode_text(row.tokens), tokens=list(row.tokens), finish_reason=row.finish or "length",
            stop_token=row.stop_token, decoder=decoder, nfe=row.nfe, prompt_tokens=row.prompt_tokens, timings=dict(timings),
            settings=dataclasses.asdict(joined(decoder, group, row.settings)), tokens_per_step=list(row.steps),
            accept_lengths=list(row.accepts), cached_tokens=row.cached_tokens,
        )
