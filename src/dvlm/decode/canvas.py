"""The canvas of block decoding: the block each row is decoding, and how each layout starts one.

Two layouts, following the model's DiffusionConfig:
* response (Fast-dVLM): the whole prompt is prefilled causally; blocks start right after it.
* absolute (DiffusionVL): only the prompt's complete blocks are prefilled (block-causal); the
  prompt's tail shares the first decoded block. Rows are padded so block boundaries line up.

Rows of one batch may need canvases of different widths (their budgets differ, or they joined the
batch at another time): a row's positions are a prefix of the canvas's columns and the columns
past its end are padding (`valid` False), never masked, never attended to, never emitted. A row's
canvas is therefore the one it would have decoded alone.

Widths (N2): in the response layout a row's block holds at most the tokens the row may still
generate, min(B, max_new_tokens - generated), for its first block as for its last; so a row that
joins a running batch gets the first block it gets alone, min(B, its own max_new_tokens), whatever
the other rows' widths. In the absolute layout a prompt whose answer fits in the first block
(P + max_new_tokens <= B) gets a first block of exactly P + max_new_tokens positions, as
DiffusionVL's decoder does; otherwise absolute blocks are B wide, like DiffusionVL's (which decodes
a last block past the answer's end too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DiffusionConfig
from dvlm.decode.ar import next_token
from dvlm.decode.prefill import DraftBlock, prefill
from dvlm.decode.prompts import PromptBatch
from dvlm.decode.sampling import RowSampler
from dvlm.diffusion.noising import clean_block_ids
from dvlm.model.loaded import LoadedModel


@dataclass
class Canvas:
    """The block being decoded, for the R rows in the batch."""

    ids: torch.Tensor  # (R, Q) token ids, mask_token_id where still unknown, pad past a row's end
    positions: torch.Tensor  # (A, R, Q), the family's position axes
    prompt_part: torch.Tensor  # (R,) leading positions that hold prompt tokens (not generated)
    fixed: torch.Tensor | None = None  # (R, Q) bool: positions whose embedding is given below
    fixed_embeds: torch.Tensor | None = None  # (R, Q, D) prompt-tail embeddings (may be vision)
    valid: torch.Tensor | None = None  # (R, Q) bool: False past a row's end (None: all valid)

    def validity(self) -> torch.Tensor:
        if self.valid is not None:
            return self.valid
        return torch.ones_like(self.ids, dtype=torch.bool)

    @property
    def ends(self) -> torch.Tensor:
        """(R,) index of each row's last position."""
        if self.valid is None:
            return torch.full_like(self.prompt_part, self.ids.shape[1] - 1)
        return self.valid.sum(dim=1) - 1

    def at_ends(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, Q, ...) at each row's last position -> (R, ...)."""
        return x[torch.arange(x.shape[0], device=x.device), self.ends.to(x.device)]

    def emitted(self) -> list[list[int]]:
        """Each row's generated tokens in this block."""
        return [ids[p:end + 1] for ids, p, end in zip(self.ids.tolist(), self.prompt_part.tolist(), self.ends.tolist())]

    def select(self, rows: torch.Tensor) -> Canvas:
        pick = (lambda x: None if x is None else x[rows])
        return Canvas(self.ids[rows], self.positions[:, rows], self.prompt_part[rows], pick(self.fixed),
                      pick(self.fixed_embeds), pick(self.valid))

    def join(self, other: Canvas, pad_token_id: int) -> Canvas:
        """This canvas's rows, then `other`'s, padded to the wider one."""
        width = max(self.ids.shape[1], other.ids.shape[1])
        parts = (self, other)
        ids = torch.cat([pad_right(c.ids, width, pad_token_id) for c in parts])
        positions = torch.cat([pad_right(c.positions, width, 0) for c in parts], dim=1)
        valid = torch.cat([pad_right(c.validity(), width, False) for c in parts])
        fixed = fixed_embeds = None
        known = self.fixed_embeds if self.fixed_embeds is not None else other.fixed_embeds
        if known is not None:
            fixed = torch.cat([pad_right(_fixed(c), width, False) for c in parts])
            fixed_embeds = torch.cat([pad_right(_fixed_embeds(c, known), width, 0.0, dim=1) for c in parts])
        return Canvas(ids, positions, torch.cat([self.prompt_part, other.prompt_part]), fixed, fixed_embeds,
                      None if bool(valid.all()) else valid)


def _fixed(canvas: Canvas) -> torch.Tensor:
    return canvas.fixed if canvas.fixed is not None else torch.zeros_like(canvas.ids, dtype=torch.bool)


def _fixed_embeds(canvas: Canvas, like: torch.Tensor) -> torch.Tensor:
    if canvas.fixed_embeds is not None:
        return canvas.fixed_embeds
    return like.new_zeros(*canvas.ids.shape, like.shape[-1])


def pad_right(x: torch.Tensor, width: int, value, dim: int = -1) -> torch.Tensor:
    """`x` with `value` appended along `dim` up to `width`."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim)


def masked_canvas(lm: LoadedModel, seed: torch.Tensor | None, start: torch.Tensor, widths: list[int]) -> Canvas:
    """Row r's block: [seed, MASK, ...] with token shift, else all [MASK], `widths[r]` positions
    from position id start[r] (R,); narrower rows are padded to the widest."""
    rows, width = len(widths), max(widths)
    device = start.device
    ids = torch.full((rows, width), lm.mask_token_id, dtype=torch.long, device=device)
    if seed is not None:
        ids[:, 0] = seed
    valid = None
    if min(widths) < width:
        valid = torch.arange(width, device=device)[None, :] < torch.tensor(widths, device=device)[:, None]
        ids = torch.where(valid, ids, lm.processor.pad_token_id)
    zeros = torch.zeros(rows, dtype=torch.long, device=device)
    return Canvas(ids, lm.positions.text(start, width), zeros, valid=valid)


def next_canvas(lm: LoadedModel, canvas: Canvas, seed: torch.Tensor | None, widths: list[int]) -> Canvas:
    """The block after `canvas`: positions continue after each row's last one (text: every axis
    holds the same position, so the first axis says where the text is)."""
    start = canvas.at_ends(canvas.positions[0]) + 1
    return masked_canvas(lm, seed, start, widths)


def canvas_embeds(lm: LoadedModel, canvas: Canvas) -> torch.Tensor:
    """(R, Q, F) input features of the canvas: its ids' embeddings, the given ones where fixed."""
    embeds = lm.adapter.embed(lm.model, canvas.ids)  # (R, Q, F)
    if canvas.fixed is None:
        return embeds
    return torch.where(canvas.fixed[..., None], canvas.fixed_embeds.to(embeds.dtype), embeds)


def start_response(lm: LoadedModel, prompts: PromptBatch, dcfg: DiffusionConfig, block_size: int, budgets: list[int],
                   sampler: RowSampler, context_cls, fuse: bool = False):
    """Prefill the whole prompt; with token shift its last output is the AR seed of block 1.

    Row r's first block has min(B, budgets[r]) positions: every one of them is emitted. Without
    token shift the block is all masks and, with `fuse`, its first denoising pass runs in the
    prefill forward (it sees the whole prompt and itself, as its own pass would).
    Returns (context, canvas, the first pass's hidden states (R, Q, D) or None)."""
    kind, blocks = "causal", None
    if dcfg.clean_attention == "block_causal":
        kind = "block_causal"
        batch = prompts.collate(lm)
        blocks = clean_block_ids(batch.labels, batch.attention_mask, dcfg, block_size)
    widths = [min(block_size, b) for b in budgets]

    def first_block(batch, embeds) -> DraftBlock:
        canvas = masked_canvas(lm, None, batch.next_positions, widths)
        return DraftBlock(canvas_embeds(lm, canvas), canvas.positions, batch.input_ids.shape[1], canvas.valid)

    fused = fuse and not dcfg.token_shift  # a token-shift block opens with the seed this forward predicts
    pre = prefill(lm, prompts, context_cls, kind, blocks, first_block if fused else None)
    seed = next_token(lm, pre.last_hidden, sampler) if dcfg.token_shift else None
    return pre.context, masked_canvas(lm, seed, pre.next_position, widths), pre.draft_hidden


def start_absolute(lm: LoadedModel, prompts: PromptBatch, block_size: int, budgets: list[int], context_cls,
                   fuse: bool = False):
    """Prefill each prompt's complete absolute blocks (block-causal); its tail opens block 1.

    Row r has P_r prompt tokens: its first cut_r = floor(P_r / B) * B go to the cache, its last
    P_r - cut_r tokens sit at the front of the first canvas. Prefixes are right-aligned to the
    longest one, so all rows' canvases start at the same cache index. With `fuse`, block 1's first
    denoising pass runs in the prefill forward: under the block-causal mask the canvas is simply
    the block after the prompt's blocks, seeing them all and itself.
    Returns (context, canvas, the first pass's hidden states (R, Q, D) or None, per row whether
    the prefill forward held any of its tokens (R,) list). With no complete block in any row there
    is no prefill forward (and nothing to fuse). A row that reuses kept entries (whole blocks,
    `PromptBatch`) starts from them: its prompt here is the rest, whose blocks follow the reused ones.
    """
    batch = prompts.collate(lm)
    embeds = prompts.embed(lm, batch.input_ids)  # (R, P, F)
    width = batch.input_ids.shape[1]
    lengths = batch.attention_mask.sum(dim=1)  # (R,)
    cut = lengths // block_size * block_size
    first = width - lengths  # column of each row's first real token
    span = int(cut.max())
    ctx = prompts.context(lm, context_cls)
    committed = None
    if span:
        col = torch.arange(span, device=lm.device)[None, :]
        real_index = col - (span - cut)[:, None]  # index of the token within its prompt (< 0: padding)
        source = (first[:, None] + real_index).clamp(min=0, max=width - 1)
        committed = (_gather(embeds, source), _gather_positions(batch.position_ids, source), real_index >= 0,
                     real_index.clamp(min=0) // block_size + prompts.block_offsets(lm.device)[:, None])
        if not fuse:
            ctx.commit(*committed, "block_causal")
    tail = lengths - cut
    # DiffusionVL decodes a prompt whose answer fits in the first block (P + G <= B) as one block
    # of exactly P + G positions (its "full diffusion" case); other first blocks are B wide.
    budget = torch.tensor(budgets, device=lm.device)
    end = torch.where(lengths + budget <= block_size, lengths + budget, block_size)  # (R,)
    q = torch.arange(int(end.max()), device=lm.device)[None, :]
    is_tail = q < tail[:, None]  # (R, Q)
    valid = q < end[:, None]
    source = ((first + cut)[:, None] + q).clamp(max=width - 1)
    ids = torch.where(is_tail, batch.input_ids.gather(1, source), lm.mask_token_id)
    ids = torch.where(valid, ids, lm.processor.pad_token_id)  # past a row's end: never masked, never seen
    # The prompt tail keeps its own positions (images included); the rest continue it as text.
    generated = lm.positions.text(batch.next_positions - tail, q.shape[1])
    positions = torch.where(is_tail[None], _gather_positions(batch.position_ids, source), generated)
    canvas = Canvas(ids, positions, tail, fixed=is_tail, fixed_embeds=_gather(embeds, source),
                    valid=None if bool(valid.all()) else valid)
    first_pass = None
    if fuse and committed is not None:
        drafts = (canvas_embeds(lm, canvas)[:, None], canvas.positions[:, :, None], torch.tensor([span], device=lm.device),
                  None if canvas.valid is None else canvas.valid[:, None])
        first_pass = ctx.commit_and_draft(committed, drafts, "block_causal")[1][:, 0]
    return ctx, canvas, first_pass, (cut > 0).tolist()


def _gather(embeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """embeds (R, P, F) gathered at index (R, Q) -> (R, Q, F)."""
    return embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))


def _gather_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """positions (A, R, P) gathered at index (R, Q) -> (A, R, Q)."""
    return positions.gather(2, index[None].expand(positions.shape[0], -1, -1))
