"""Block-diffusion decoding with KV-cache reuse (DESIGN.md §1, "Decoding").

Per block: fill the unknown positions with [MASK]; repeat a bidirectional forward over the block
(peeking at the cache, not writing it) and unmask the confident positions; then one commit pass
writes the finished block's keys/values with the clean-stream mask. With token shift the commit's
last output seeds the next block's first token (an AR step).

Two layouts, following the model's DiffusionConfig:
* token shift (Fast-dVLM): the whole prompt is prefilled causally; blocks start right after it.
* absolute blocks (DiffusionVL): only the prompt's complete blocks are prefilled (block-causal);
  the prompt's tail shares the first decoded block. Rows are padded so block boundaries line up.

The first block is never wider than the answer can be: in the response layout it holds at most
`max_new_tokens` positions (as the last block does); in the absolute layout a prompt whose answer
fits in the first block (P + max_new_tokens <= B) gets a first block of exactly P + max_new_tokens
positions, as DiffusionVL's decoder does; otherwise absolute blocks are B wide, like DiffusionVL's
(which decodes a last block past the answer's end too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DecodeConfig, DiffusionConfig
from dvlm.data.collate import collate
from dvlm.data.processor import Encoded
from dvlm.decode.ar import next_token
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prefill import make_generator, prefill, text_positions
from dvlm.decode.rows import Listener, RowTracker
from dvlm.decode.sampling import (
    block_schedule_count,
    select_tokens,
    steps_schedule_count,
    unmask_by_count,
    unmask_by_threshold,
    unmask_by_topk,
)
from dvlm.diffusion.noising import clean_block_ids
from dvlm.model.cache import KVContext
from dvlm.runtime import Timer


@dataclass
class Canvas:
    """The block being decoded, for the R rows in the batch."""

    ids: torch.Tensor  # (R, Q) token ids, mask_token_id where still unknown
    positions: torch.Tensor  # (3, R, Q)
    prompt_part: torch.Tensor  # (R,) leading positions that hold prompt tokens (not generated)
    fixed: torch.Tensor | None = None  # (R, Q) bool: positions whose embedding is given below
    fixed_embeds: torch.Tensor | None = None  # (R, Q, D) prompt-tail embeddings (may be vision)
    valid: torch.Tensor | None = None  # (R, Q) bool: False past a row's end (None: all valid)

    def select(self, rows: torch.Tensor) -> "Canvas":
        pick = (lambda x: None if x is None else x[rows])
        return Canvas(self.ids[rows], self.positions[:, rows], self.prompt_part[rows], pick(self.fixed),
                      pick(self.fixed_embeds), pick(self.valid))


def decode_policy(cfg: DecodeConfig, dcfg: DiffusionConfig) -> tuple[float | None, int | None]:
    """(threshold, steps): the request's, else the model's defaults."""
    if cfg.threshold is not None or cfg.steps is not None:
        return cfg.threshold, cfg.steps
    if dcfg.decode_threshold is None and dcfg.decode_steps is None:
        return 0.9, None
    return dcfg.decode_threshold, dcfg.decode_steps


@torch.inference_mode()
def generate_block(lm, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
        listener: Listener | None = None) -> list[GenerationOutput]:
    dcfg = lm.require_diffusion("block")
    block_size = cfg.block_size or dcfg.block_size
    timer = Timer(lm.device)
    generator = make_generator(cfg.seed, lm.device)
    rows = RowTracker(len(prompts), cfg.max_new_tokens, lm.eos_token_ids, listener)
    with timer("prefill"):
        if dcfg.block_layout == "response":
            ctx, canvas = _start_response(lm, prompts, dcfg, block_size, cfg, generator, context_cls)
            rows.count_forward()
        else:
            ctx, canvas, prefilled = _start_absolute(lm, prompts, block_size, cfg.max_new_tokens, context_cls)
            if prefilled:
                rows.count_forward()
    commit_kind = "causal" if dcfg.clean_attention == "causal" else "block_causal"
    fuse = cfg.fuse_commit and dcfg.token_shift and commit_kind == "causal"
    first_pass = None
    while True:
        with timer("denoise"):
            last_logits = _denoise(lm, ctx, canvas, cfg, dcfg, block_size, rows, generator, first_pass)
        emitted = [ids[int(p):] for ids, p in zip(canvas.ids.tolist(), canvas.prompt_part)]
        done = rows.extend(emitted)
        if done.all():
            break
        if done.any():
            keep = rows.drop_finished(done).to(lm.device)
            ctx.select_rows(keep)
            canvas = canvas.select(keep)
            last_logits = None if last_logits is None else last_logits[keep]
        # Response layout: every row has generated equally many tokens, so the last block can be
        # cut to what remains. Absolute blocks keep their size (rows' prompt tails differ).
        width = min(block_size, rows.max_remaining()) if dcfg.block_layout == "response" else block_size
        with timer("commit"):
            if fuse and last_logits is not None and width > 1:
                canvas, first_pass = _commit_fused(lm, ctx, canvas, last_logits, width, cfg, generator)
            else:
                hidden = ctx.commit(_embed(lm, canvas), canvas.positions, _valid(canvas), _block_ids(ctx, canvas),
                                    commit_kind)
                seed = next_token(lm, hidden[:, -1], cfg, generator) if dcfg.token_shift else None
                canvas, first_pass = _next_canvas(lm, canvas, seed, width), None
            rows.count_forward()
    lengths = [len(p) for p in prompts]
    return rows.outputs(lm.processor.decode, "block", timer.as_dict(), lengths, block_size)


def _denoise(lm, ctx, canvas: Canvas, cfg: DecodeConfig, dcfg: DiffusionConfig, block_size: int, rows: RowTracker,
             generator, first_pass: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """Unmask the canvas in place, one bidirectional pass at a time, until no [MASK] is left.

    `first_pass`: (logits (R, Q, V), valid (R,)) of the first pass from a fused commit, usable
    for the rows where `valid`; the other rows need that pass on their own.
    Returns the last pass's output at the block's last position (R, V): with token shift, a
    guess of the token after the block (None when no pass ran)."""
    threshold, steps = decode_policy(cfg, dcfg)
    masked = canvas.ids == lm.mask_token_id  # (R, Q): masked state is tracked by ids
    step, last = 0, None
    while masked.any():
        fused, usable = first_pass if first_pass is not None else (None, None)
        first_pass = None
        all_usable = usable is not None and bool(usable.all())  # one host sync, only after a fused commit
        if not all_usable:
            hidden = ctx.peek(_embed(lm, canvas), canvas.positions, _valid(canvas), _block_ids(ctx, canvas),
                              "bidirectional")
            logits = lm.adapter.logits(lm.model, hidden)  # (R, Q, V)
            needed = masked.any(dim=1) if usable is None else masked.any(dim=1) & ~usable
            rows.count_forward(needed)  # usable rows' pass was the fused commit
        if fused is not None:
            logits = fused if all_usable else torch.where(usable[:, None, None], fused, logits)
        # Per row, from the row's own last pass (a row may sit idle while others finish).
        active = masked.any(dim=1, keepdim=True)
        last = logits[:, -1] if last is None else torch.where(active, logits[:, -1], last)
        if dcfg.token_shift:  # output j predicts position j + 1; position 0 is always known
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        tokens, conf = select_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator, lm.banned_token_ids)
        open_ = masked if cfg.sub_block_size is None else current_sub_block(masked, cfg.sub_block_size)
        if steps is not None:
            chosen = fixed_steps_choice(conf, open_, masked, step, steps, block_size, dcfg)
        else:
            chosen = unmask_by_threshold(conf, open_, threshold)
        rows.record_steps(chosen.sum(dim=1))
        canvas.ids = torch.where(chosen, tokens, canvas.ids)
        masked &= ~chosen
        masked &= ~after_finished_answer(canvas, masked, lm.eos_token_ids)
        step += 1
    return last


def fixed_steps_choice(conf: torch.Tensor, open_: torch.Tensor, masked: torch.Tensor, step: int, steps: int,
                       block_size: int, dcfg: DiffusionConfig) -> torch.Tensor:
    """(R, Q) bool: the positions pass `step` of `steps` unmasks, by the recipe's schedule and tie rule.

    conf: (R, Q) confidences; open_: the masked positions that may be unmasked now; masked: all of
    the block's masks (the `masks_left` schedule spreads them over the steps left)."""
    if dcfg.decode_steps_schedule == "block_size":
        count = torch.full_like(masked[:, 0], block_schedule_count(block_size, steps, step), dtype=torch.long)
    else:
        count = steps_schedule_count(masked, steps - step)
    unmask = unmask_by_topk if dcfg.decode_tie_break == "topk" else unmask_by_count
    return unmask(conf, open_, count)


def after_finished_answer(canvas: Canvas, masked: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """(R, Q) bool: masked positions after an EOS that has no mask before it.

    The answer ends there, so those positions are never emitted: they need no denoising pass.
    (Short answers would otherwise pay for filling the rest of the block.)"""
    q = torch.arange(canvas.ids.shape[1], device=canvas.ids.device)
    generated = q[None, :] >= canvas.prompt_part[:, None]
    is_eos = torch.isin(canvas.ids, torch.tensor(eos_token_ids, device=canvas.ids.device)) & generated & ~masked
    big = canvas.ids.shape[1]
    first_eos = torch.where(is_eos, q[None, :], big).min(dim=1, keepdim=True).values  # (R, 1)
    first_mask = torch.where(masked, q[None, :], big).min(dim=1, keepdim=True).values
    return masked & (first_eos < first_mask) & (q[None, :] > first_eos)


def current_sub_block(masked: torch.Tensor, size: int) -> torch.Tensor:
    """(R, Q) bool: the masked positions of each row's first sub-block that still has masks."""
    sub = torch.arange(masked.shape[1], device=masked.device) // size  # (Q,)
    big = masked.shape[1]  # larger than any sub-block index
    first = torch.where(masked, sub[None, :], big).min(dim=1, keepdim=True).values  # (R, 1)
    return masked & (sub[None, :] == first)


def _commit_fused(lm, ctx, canvas: Canvas, last_logits: torch.Tensor, width: int, cfg: DecodeConfig, generator):
    """Commit the finished block and run the next block's first denoising pass in one forward.

    The next block starts with the seed the commit will produce, which is not known before the
    forward; the last denoising pass already guessed it. In each row whose guess equals the seed
    the commit produced, the second half of the forward is exactly the next block's first pass
    and is kept; in the other rows it is dropped and that pass runs on its own. Outputs are unchanged;
    only forwards are saved. Returns (next canvas, first-pass logits or None)."""
    guess, _ = select_tokens(last_logits, banned=lm.banned_token_ids)  # (R,)
    nxt = _next_canvas(lm, canvas, guess, width)
    whole = torch.tensor([canvas.ids.shape[1]], device=canvas.ids.device)  # the next block sees all of this one
    hidden, peeked = ctx.commit_and_draft(
        (_embed(lm, canvas), canvas.positions, _valid(canvas), _block_ids(ctx, canvas)),
        (_embed(lm, nxt)[:, None], nxt.positions[:, :, None], whole),
    )
    peeked = peeked[:, 0]
    seed = next_token(lm, hidden[:, -1], cfg, generator)
    nxt.ids[:, 0] = seed
    return nxt, (lm.adapter.logits(lm.model, peeked), seed == guess)


def _valid(canvas: Canvas) -> torch.Tensor:
    if canvas.valid is not None:
        return canvas.valid
    return torch.ones_like(canvas.ids, dtype=torch.bool)


def _block_ids(ctx, canvas: Canvas) -> torch.Tensor:
    """A fresh block id (above every cached one) for all canvas positions."""
    return torch.full_like(canvas.ids, ctx.next_block_id())


def _embed(lm, canvas: Canvas) -> torch.Tensor:
    embeds = lm.adapter.embed(lm.model, canvas.ids)  # (R, Q, D)
    if canvas.fixed is None:
        return embeds
    return torch.where(canvas.fixed[..., None], canvas.fixed_embeds.to(embeds.dtype), embeds)


def _next_canvas(lm, canvas: Canvas, seed: torch.Tensor | None, block_size: int) -> Canvas:
    """The next block: [seed, MASK, ...] with token shift, else all [MASK]; positions continue.

    `block_size` is cut down for the last block when fewer tokens remain to be generated: a
    truncated block is what training's auto-truncation shows the model, and it saves forwards."""
    rows = canvas.ids.shape[0]
    ids = torch.full((rows, block_size), lm.mask_token_id, dtype=torch.long, device=canvas.ids.device)
    if seed is not None:
        ids[:, 0] = seed
    start = canvas.positions[0, :, -1] + 1
    zeros = torch.zeros(rows, dtype=torch.long, device=ids.device)
    return Canvas(ids, text_positions(start, block_size), zeros)


def _start_response(lm, prompts, dcfg, block_size, cfg, generator, context_cls):
    """Prefill the whole prompt; with token shift its last output is the AR seed of block 1."""
    kind, blocks = "causal", None
    if dcfg.clean_attention == "block_causal":
        kind = "block_causal"
        batch = collate(prompts, lm.processor.pad_token_id, padding_side="left").to(lm.device)
        blocks = clean_block_ids(batch.labels, batch.attention_mask, dcfg, block_size)
    pre = prefill(lm, prompts, context_cls, kind, blocks)
    rows = len(prompts)
    width = min(block_size, cfg.max_new_tokens)  # every position of the first block is emitted
    ids = torch.full((rows, width), lm.mask_token_id, dtype=torch.long, device=lm.device)
    if dcfg.token_shift:
        ids[:, 0] = next_token(lm, pre.last_hidden, cfg, generator)
    zeros = torch.zeros(rows, dtype=torch.long, device=lm.device)
    return pre.context, Canvas(ids, text_positions(pre.next_position, width), zeros)


def _start_absolute(lm, prompts, block_size: int, max_new_tokens: int, context_cls):
    """Prefill each prompt's complete absolute blocks (block-causal); its tail opens block 1.

    Row r has P_r prompt tokens: its first cut_r = floor(P_r / B) * B go to the cache, its last
    P_r - cut_r tokens sit at the front of the first canvas. Prefixes are right-aligned to the
    longest one, so all rows' canvases start at the same cache index.
    Returns (context, canvas, whether a prefill forward ran).
    """
    batch = collate(prompts, lm.processor.pad_token_id, padding_side="left").to(lm.device)
    embeds = lm.adapter.embed(lm.model, batch.input_ids, batch.pixel_values, batch.image_grid_thw)  # (R, P, D)
    width = batch.input_ids.shape[1]
    lengths = batch.attention_mask.sum(dim=1)  # (R,)
    cut = lengths // block_size * block_size
    first = width - lengths  # column of each row's first real token
    span = int(cut.max())
    ctx = context_cls(lm.adapter, lm.model, len(prompts), lm.device)
    if span:
        col = torch.arange(span, device=lm.device)[None, :]
        real_index = col - (span - cut)[:, None]  # index of the token within its prompt (< 0: padding)
        source = (first[:, None] + real_index).clamp(min=0, max=width - 1)
        ctx.commit(_gather(embeds, source), batch.position_ids.gather(2, source[None].expand(3, -1, -1)),
                   real_index >= 0, real_index.clamp(min=0) // block_size, "block_causal")
    tail = lengths - cut
    # DiffusionVL decodes a prompt whose answer fits in the first block (P + G <= B) as one block
    # of exactly P + G positions (its "full diffusion" case); other first blocks are B wide.
    end = torch.where(lengths + max_new_tokens <= block_size, lengths + max_new_tokens, block_size)  # (R,)
    q = torch.arange(int(end.max()), device=lm.device)[None, :]
    is_tail = q < tail[:, None]  # (R, Q)
    valid = q < end[:, None]
    source = ((first + cut)[:, None] + q).clamp(max=width - 1)
    ids = torch.where(is_tail, batch.input_ids.gather(1, source), lm.mask_token_id)
    ids = torch.where(valid, ids, lm.processor.pad_token_id)  # past a row's end: never masked, never seen
    start = lengths + batch.rope_deltas  # position of the first generated token
    generated = text_positions(start, q.shape[1]) - tail[None, :, None]
    positions = torch.where(is_tail[None], batch.position_ids.gather(2, source[None].expand(3, -1, -1)), generated)
    canvas = Canvas(ids, positions, tail, fixed=is_tail, fixed_embeds=_gather(embeds, source),
                    valid=None if bool(valid.all()) else valid)
    return ctx, canvas, span > 0


def _gather(embeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """embeds (R, P, D) gathered at index (R, Q) -> (R, Q, D)."""
    return embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
