"""Shared first steps of every cached decoder: lay out the prompts and prefill the context.

The prefill may carry a block behind the prompts in the same forward (`DraftBlock`): block
decoding's first denoising pass or speculative decoding's first draft. It attends to the prompts
and to itself bidirectionally and is not kept in the context, exactly as a later `peek` of it
would be, so the decoder's first pass costs no forward of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dvlm.data.collate import Batch
from dvlm.decode.prompts import PromptBatch
from dvlm.model.cache import DecodeContext
from dvlm.model.loaded import LoadedModel


@dataclass
class DraftBlock:
    """A block that rides along a prefill forward (peeked, never kept)."""

    embeds: torch.Tensor  # (R, L, F)
    positions: torch.Tensor  # (A, R, L)
    prefix: int  # it sees the first `prefix` prompt columns (left-padded: every row's prompt ends at the last)
    valid: torch.Tensor | None = None  # (R, L) bool; None: all valid


DraftOf = Callable[[Batch, torch.Tensor], DraftBlock]  # (the laid-out prompts, their embeddings) -> the block


@dataclass
class Prefilled:
    context: DecodeContext
    batch: Batch  # the left-padded prompts
    last_hidden: torch.Tensor  # (R, D) hidden state of each prompt's last token
    next_position: torch.Tensor  # (R,) position id of the first generated token
    draft_hidden: torch.Tensor | None = None  # (R, L, D) the hidden states of the block that rode along


def prefill(lm: LoadedModel, prompts: PromptBatch, context_cls, kind: str = "causal",
            block_ids: torch.Tensor | None = None, draft: DraftOf | None = None) -> Prefilled:
    """Encode the left-padded prompts (with images) and commit them to a new context.

    Left padding puts every prompt's last token in the last column, so the next token of every
    row is predicted from `hidden[:, -1]` and generated blocks stay aligned across rows. `draft`
    builds the block that rides along the same forward (None: the prompts alone). A row that
    reuses kept entries (`PromptBatch`) starts from them and commits the rest of its prompt:
    `batch` then holds those parts, at the whole prompts' positions.
    """
    batch = prompts.collate(lm)
    ctx = prompts.context(lm, context_cls)
    embeds = prompts.embed(lm, batch.input_ids)
    blocks = torch.zeros_like(batch.input_ids) if block_ids is None else block_ids
    committed = (embeds, batch.position_ids, batch.attention_mask, blocks)
    if draft is None:
        hidden = ctx.commit(*committed, kind)
        return Prefilled(ctx, batch, hidden[:, -1], batch.next_positions)
    block = draft(batch, embeds)
    prefix = torch.tensor([block.prefix], device=lm.device)
    valid = None if block.valid is None else block.valid[:, None]
    hidden, drafted = ctx.commit_and_draft(committed, (block.embeds[:, None], block.positions[:, :, None], prefix,
                                                       valid), kind)
    return Prefilled(ctx, batch, hidden[:, -1], batch.next_positions, drafted[:, 0])
