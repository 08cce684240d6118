"""Shared first steps of every cached decoder: lay out the prompts and prefill the context."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.data.collate import Batch, collate
from dvlm.data.processor import Encoded
from dvlm.model.cache import DecodeContext
from dvlm.model.loaded import LoadedModel


@dataclass
class Prefilled:
    context: DecodeContext
    batch: Batch  # the left-padded prompts
    last_hidden: torch.Tensor  # (R, D) hidden state of each prompt's last token
    next_position: torch.Tensor  # (R,) position id of the first generated token


def prefill(lm: LoadedModel, prompts: list[Encoded], context_cls, kind: str = "causal",
            block_ids: torch.Tensor | None = None) -> Prefilled:
    """Encode the left-padded prompts (with images) and commit them to a new context.

    Left padding puts every prompt's last token in the last column, so the next token of every
    row is predicted from `hidden[:, -1]` and generated blocks stay aligned across rows.
    """
    batch = collate(prompts, lm.processor.pad_token_id, padding_side="left").to(lm.device)
    ctx = context_cls(lm.adapter, lm.model, len(prompts), lm.device)
    embeds = lm.adapter.embed(lm.model, batch.input_ids, batch.vision)
    blocks = torch.zeros_like(batch.input_ids) if block_ids is None else block_ids
    hidden = ctx.commit(embeds, batch.position_ids, batch.attention_mask, blocks, kind)
    return Prefilled(ctx, batch, hidden[:, -1], batch.next_positions)
