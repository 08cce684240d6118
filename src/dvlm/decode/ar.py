"""Autoregressive decoding with our own KV-cached loop: one token per forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DecodeConfig
from dvlm.data.processor import Encoded
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prefill import prefill
from dvlm.decode.rows import Listener
from dvlm.decode.sampling import RowSampler
from dvlm.decode.stepper import Stepper, generate_with
from dvlm.model.cache import DecodeContext, KVContext
from dvlm.model.loaded import LoadedModel


def next_token(lm: LoadedModel, hidden: torch.Tensor, sampler: RowSampler) -> torch.Tensor:
    """(R, D) hidden states -> (R,) next tokens, each row by its own sampling settings."""
    tokens, _ = sampler.select(lm.adapter.logits(lm.model, hidden))
    return tokens


@dataclass
class NextTokens:
    """Rows whose next token is known (AR and speculative decoding, between steps)."""

    context: DecodeContext
    token: torch.Tensor  # (R,) the next token of each row, not yet committed
    position: torch.Tensor  # (R,) its position id

    def select(self, keep: torch.Tensor) -> NextTokens:
        self.context.select_rows(keep)
        return NextTokens(self.context, self.token[keep], self.position[keep])

    def join(self, other: NextTokens) -> NextTokens:
        self.context.join(other.context)
        token, position = torch.cat([self.token, other.token]), torch.cat([self.position, other.position])
        return NextTokens(self.context, token, position)


class NextTokenStepper(Stepper):
    """Prefill the prompts causally and pick each row's first token (AR and speculative decoding)."""

    def _prefill(self, prompts: list[Encoded], ids: list[int]) -> NextTokens:
        pre = prefill(self.lm, prompts, self.context_cls)
        token = next_token(self.lm, pre.last_hidden, self._sampler(ids))
        self.rows.count_forward_for(ids)
        return NextTokens(pre.context, token, pre.next_position)

    def _join(self, running: NextTokens, joining: NextTokens) -> NextTokens:
        return running.join(joining)

    def _select(self, state: NextTokens, keep: torch.Tensor) -> NextTokens:
        return state.select(keep)


class ARStepper(NextTokenStepper):
    """A step commits each row's known token and, for the rows that go on, runs the forward that
    picks the next one."""

    decoder = "ar"

    def _advance(self) -> tuple[list[tuple[int, list[int]]], list[int]]:
        with self.timer("decode"):
            committed, done = self.rows.extend([[t] for t in self.state.token.tolist()])
            finished = self._leave_finished(done)
            if self.state is not None:
                self.state = self._forward(self.state)
        return committed, finished

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
