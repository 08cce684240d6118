"""Autoregressive decoding with our own KV-cached loop: one token per forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DecodeConfig
from dvlm.data.processor import Encoded
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prefill import DraftOf, prefill
from dvlm.decode.prompts import PromptBatch
from dvlm.decode.rows import Listener
from dvlm.decode.sampling import RowSampler
from dvlm.decode.stepper import Stepper, generate_with
from dvlm.model.cache import DecodeContext, KVContext
from dvlm.model.loaded import LoadedModel
from dvlm.model.prefix_cache import CAUSAL, Stream


def next_token(lm: LoadedModel, hidden: torch.Tensor, sampler: RowSampler) -> torch.Tensor:
    """(R, D) hidden states -> (R,) next tokens, each row by its own sampling settings."""
    tokens, _ = sampler.select(lm.adapter.logits(lm.model, hidden))
    return tokens


@dataclass
class PendingDraft:
    """Speculative decoding: drafts of each row's next block made before its step (in the prefill
    forward, or alongside the last verify pass), for block positions 1..B-1."""

    tokens: torch.Tensor  # (R, B-1)
    logits: torch.Tensor  # (R, B-1, V) what they were drawn from
    ready: torch.Tensor  # (R,) bool: the row has one (rows that joined from a running batch have none)

    def select(self, keep: torch.Tensor) -> PendingDraft:
        return PendingDraft(self.tokens[keep], self.logits[keep], self.ready[keep])

    @staticmethod
    def joined(parts: list[tuple[PendingDraft | None, int]]) -> PendingDraft | None:
        """The drafts of several groups of rows (each (drafts or None, its row count)), in order."""
        known = next((d for d, _ in parts if d is not None), None)
        if known is None:
            return None
        full = [d if d is not None else PendingDraft(known.tokens.new_zeros(n, *known.tokens.shape[1:]),
                                                     known.logits.new_zeros(n, *known.logits.shape[1:]),
                                                     known.ready.new_zeros(n)) for d, n in parts]
        return PendingDraft(*(torch.cat([getattr(d, f) for d in full]) for f in ("tokens", "logits", "ready")))


@dataclass
class NextTokens:
    """Rows whose next token is known (AR and speculative decoding, between steps)."""

    context: DecodeContext
    token: torch.Tensor  # (R,) the next token of each row, not yet committed
    position: torch.Tensor  # (R,) its position id
    draft: PendingDraft | None = None  # speculative decoding: the next block's drafts, where already made

    def select(self, keep: torch.Tensor) -> NextTokens:
        self.context.select_rows(keep)
        draft = None if self.draft is None else self.draft.select(keep)
        return NextTokens(self.context, self.token[keep], self.position[keep], draft)

    def join(self, other: NextTokens) -> NextTokens:
        rows = (self.token.shape[0], other.token.shape[0])
        self.context.join(other.context)
        token, position = torch.cat([self.token, other.token]), torch.cat([self.position, other.position])
        return NextTokens(self.context, token, position, PendingDraft.joined(list(zip((self.draft, other.draft), rows))))


class NextTokenStepper(Stepper):
    """Prefill the prompts causally and pick each row's first token (AR and speculative decoding).

    A row's next token is committed as soon as it is known, so that it streams before the next
    forward rather than after it: the first one (from the prefill) in a step of its own that runs
    no forward, the step after the row joins (`_emit_joined`); later ones at the end of the step
    whose forward picked them. A token that ends the answer ends the row before any more forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._unsent: set[int] = set()  # rows that joined with their first token not committed yet

    def join(self, started) -> None:
        super().join(started)
        self._unsent.update(started.ids)

    def _prefill(self, prompts: PromptBatch, ids: list[int]) -> NextTokens:
        pre = prefill(self.lm, prompts, self.context_cls, draft=self._draft_in_prefill())
        sampler = self._sampler(ids)
        token = next_token(self.lm, pre.last_hidden, sampler)
        self.rows.count_forward_for(ids)
        state = NextTokens(pre.context, token, pre.next_position)
        if pre.draft_hidden is not None:
            logits = self.lm.adapter.logits(self.lm.model, pre.draft_hidden[:, 1:])  # output i drafts position p + i
            tokens, _ = sampler.select(logits)
            state.draft = PendingDraft(tokens, logits, torch.ones_like(token, dtype=torch.bool))
        return state

    def _draft_in_prefill(self) -> DraftOf | None:
        """The block that rides along the prefill forward (speculative decoding's first draft)."""
        return None

    def _prefix_stream(self) -> Stream:
        """A causal prefill, then causal commits (AR steps, verify passes): every committed entry."""
        return CAUSAL

    def _known(self) -> torch.Tensor:
        """(R,) each active row's known next token."""
        return self.state.token

    def _emit_known(self, only: set[int] | None = None) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """Commit each active row's known next token (only the rows `only`, when given): a row it
        ends (an end token, or its last allowed token) leaves the batch without running one more."""
        tokens = self._known().tolist()
        committed, done = self.rows.extend([[t] if only is None or row_id in only else []
                                            for row_id, t in zip(self.rows.active, tokens)])
        return committed, self._leave_finished(done)

    def _emit_joined(self) -> tuple[list[tuple[int, list[int]]], list[int]] | None:
        """A step without forward that commits the first tokens of the rows that joined since the
        last step; None when no row did."""
        if not self._unsent:
            return None
        unsent, self._unsent = self._unsent, set()
        return self._emit_known(unsent)

    def _then_known(self, committed: list[tuple[int, list[int]]], finished: list[int]):
        """A step's report after its forward: what it committed, then the next tokens it picked."""
        if self.state is None:
            return committed, finished
        known, ended = self._emit_known()
        merged: dict[int, list[int]] = {}
        for row_id, tokens in committed + known:  # each row's tokens in order
            merged.setdefault(row_id, []).extend(tokens)
        return list(merged.items()), finished + ended

    def _join(self, running: NextTokens, joining: NextTokens) -> NextTokens:
        return running.join(joining)

    def _select(self, state: NextTokens, keep: torch.Tensor) -> NextTokens:
        return state.select(keep)


class ARStepper(NextTokenStepper):
    """A step runs the forward that picks each row's next token and commits it."""

    decoder = "ar"

    def _advance(self) -> tuple[list[tuple[int, list[int]]], list[int]]:
        if (joined := self._emit_joined()) is not None:
            return joined
        with self.timer("decode"):
            self.state = self._forward(self.state)
            return self._then_known([], [])

    def _forward(self, state: NextTokens) -> NextTokens:
        ctx, token = state.context, state.token
        embeds = self.lm.adapter.embed(self.lm.model, token[:, None])
        valid = torch.ones_like(token[:, None], dtype=torch.bool)
        block = torch.full_like(token[:, None], ctx.next_block_id())
        hidden = ctx.commit(embeds, self.lm.positions.text(state.position, 1), valid, block, "causal")
        self.rows.count_forward()
        return NextTokens(ctx, next_token(self.lm, hidden[:, -1], self._sampler()), state.position + 1)


@torch.inference_mode()
def generate_ar(lm: LoadedModel, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
                listener: Listener | None = None) -> list[GenerationOutput]:
    """Greedy or sampled AR decoding of a batch; rows leave the batch when they finish."""
    return generate_with(ARStepper, lm, prompts, cfg, context_cls, listener)
