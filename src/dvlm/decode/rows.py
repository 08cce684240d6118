"""Per-prompt bookkeeping while the rows of a batch finish at different times."""

from __future__ import annotations

from typing import Callable

import torch

from dvlm.decode.output import GenerationOutput

Listener = Callable[[int, list[int]], None]  # (prompt index, tokens just committed): for streaming


class RowTracker:
    """Maps the rows still in the batch to their prompts and collects each prompt's tokens.

    Finished rows leave the batch: `extend` reports which rows just finished and `drop_finished`
    returns the batch indices to keep (for `context.select_rows`).
    """

    def __init__(self, num_prompts: int, max_new_tokens: int, eos_token_ids: list[int],
                 listener: Listener | None = None) -> None:
        self.listener = listener
        self.active = list(range(num_prompts))  # prompt index of each batch row
        self.max_new_tokens = max_new_tokens
        self.eos = set(eos_token_ids)
        self.tokens: list[list[int]] = [[] for _ in range(num_prompts)]
        self.finish: list[str | None] = [None] * num_prompts
        self.nfe = [0] * num_prompts
        self.steps: list[list[int]] = [[] for _ in range(num_prompts)]
        self.accepts: list[list[int]] = [[] for _ in range(num_prompts)]
        # Per-pass statistics given as device tensors stay on the device until the next `extend`
        # (once per block), so denoising passes do not each wait for a host copy.
        self._pending_forwards: torch.Tensor | None = None  # (R,) long
        self._pending_steps: list[torch.Tensor] = []  # each (R,)

    @property
    def num_active(self) -> int:
        return len(self.active)

    def max_remaining(self) -> int:
        """The most tokens any active row may still generate."""
        return max(self.max_new_tokens - len(self.tokens[p]) for p in self.active)

    def count_forward(self, rows: torch.Tensor | None = None) -> None:
        """One model forward did work for the active rows (or those where `rows` (R,) is True)."""
        if rows is None:
            for prompt in self.active:
                self.nfe[prompt] += 1
        else:
            counted = rows.long()
            self._pending_forwards = counted if self._pending_forwards is None else self._pending_forwards + counted

    def record_steps(self, counts: torch.Tensor) -> None:
        """Tokens unmasked per active row by one denoising pass (R,)."""
        self._pending_steps.append(counts)

    def _flush(self) -> None:
        """Move the pending per-pass statistics to the host: one copy per block."""
        if self._pending_forwards is not None:
            for prompt, n in zip(self.active, self._pending_forwards.tolist()):
                self.nfe[prompt] += n
            self._pending_forwards = None
        if self._pending_steps:
            per_pass = torch.stack(self._pending_steps, dim=1).tolist()  # (R, passes)
            for prompt, counts in zip(self.active, per_pass):
                self.steps[prompt].extend(n for n in counts if n)
            self._pending_steps = []

    def extend(self, new_tokens: list[list[int]]) -> torch.Tensor:
        """Append each active row's new tokens, stopping at EOS or the length limit.

        Returns (R,) bool: True for rows that finished now."""
        self._flush()
        done = []
        for prompt, toks in zip(self.active, new_tokens):
            out = self.tokens[prompt]
            before = len(out)
            for tok in toks:
                if tok in self.eos:
                    self.finish[prompt] = "stop"
                    break
                out.append(tok)
                if len(out) >= self.max_new_tokens:
                    self.finish[prompt] = "length"
                    break
            if self.listener is not None and len(out) > before:
                self.listener(prompt, out[before:])
            done.append(self.finish[prompt] is not None)
        return torch.tensor(done, dtype=torch.bool)

    def drop_finished(self, done: torch.Tensor) -> torch.Tensor:
        """Forget finished rows; returns the (R',) batch indices of the rows that go on."""
        keep = (~done).nonzero(as_tuple=True)[0]
        self.active = [self.active[i] for i in keep.tolist()]
        return keep

    def outputs(self, decode_text, decoder: str, timings: dict[str, float], prompt_lengths: list[int],
                block_size: int | None = None) -> list[GenerationOutput]:
        self._flush()
        return [
            GenerationOutput(
                text=decode_text(self.tokens[i]), tokens=self.tokens[i], finish_reason=self.finish[i] or "length",
                decoder=decoder, nfe=self.nfe[i], prompt_tokens=prompt_lengths[i], timings=dict(timings),
                block_size=block_size, tokens_per_step=self.steps[i], accept_lengths=self.accepts[i],
            )
            for i in range(len(self.tokens))
        ]
