"""Block-diffusion decoding with KV-cache reuse (DESIGN.md §1, "Decoding").

Per block: fill the unknown positions with [MASK]; repeat a bidirectional forward over the block
(peeking at the cache, not writing it) and unmask the confident positions; then one commit pass
writes the finished block's keys/values with the clean-stream mask. With token shift the commit's
last output seeds the next block's first token (an AR step).

Two layouts, following the model's DiffusionConfig:
* token shift (Fast-dVLM): the whole prompt is prefilled causally; blocks start right after it.
* absolute blocks (DiffusionVL): only the prompt's complete blocks are prefilled (block-causal);
  the prompt's tail shares the first decoded block. Rows are padded so block boundaries line up.
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
from dvlm.decode.sampling import select_tokens, steps_schedule_count, unmask_by_count, unmask_by_threshold
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

    def select(self, rows: torch.Tensor) -> "Canvas":
        pick = (lambda x: None if x is None else x[rows])
        return Canvas(self.ids[rows], self.positions[:, rows], self.prompt_part[rows], pick(self.fixed),
                      pick(self.fixed_embeds))


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
            ctx, canvas, prefilled = _start_absolute(lm, prompts, block_size, context_cls)
            if prefilled:
                rows.count_forward()
    commit_kind = "causal" if dcfg.clean_attention == "causal" else "block_causal"
    while True:
        with timer("denoise"):
            _denoise(lm, ctx, canvas, cfg, dcfg, rows, generator)
        emitted = [ids[int(p):] for ids, p in zip(canvas.ids.tolist(), canvas.prompt_part)]
        done = rows.extend(emitted)
        if done.all():
            break
        if done.any():
            keep = rows.drop_finished(done).to(lm.device)
            ctx.select_rows(keep)
            canvas = canvas.select(keep)
        with timer("commit"):
            hidden = ctx.commit(_embed(lm, canvas), canvas.positions, torch.ones_like(canvas.ids, dtype=torch.bool),
                                torch.full_like(canvas.ids, ctx.next_block_id()), commit_kind)
            rows.count_forward()
            seed = next_token(lm, hidden[:, -1], cfg, generator) if dcfg.token_shift else None
        # Response layout: every row has generated equally many tokens, so the last block can be
        # cut to what remains. Absolute blocks keep their size (rows' prompt tails differ).
        width = min(block_size, rows.max_remaining()) if dcfg.block_layout == "response" else block_size
        canvas = _next_canvas(lm, canvas, seed, width)
    lengths = [len(p) for p in prompts]
    return rows.outputs(lm.processor.decode, "block", timer.as_dict(), lengths, block_size)


def _denoise(lm, ctx, canvas: Canvas, cfg: DecodeConfig, dcfg: DiffusionConfig, rows: RowTracker, generator) -> None:
    """Unmask the canvas in place, one bidirectional pass at a time, until no [MASK] is left."""
    threshold, steps = decode_policy(cfg, dcfg)
    masked = canvas.ids == lm.mask_token_id  # (R, Q): masked state is tracked by ids
    valid = torch.ones_like(masked)
    block = torch.full_like(canvas.ids, ctx.next_block_id())
    step = 0
    while masked.any():
        hidden = ctx.peek(_embed(lm, canvas), canvas.positions, valid, block, "bidirectional")
        logits = lm.adapter.logits(lm.model, hidden)  # (R, Q, V)
        if dcfg.token_shift:  # output j predicts position j + 1; position 0 is always known
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        tokens, conf = select_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator, lm.banned_token_ids)
        if steps is not None:
            chosen = unmask_by_count(conf, masked, steps_schedule_count(masked, steps - step))
        else:
            chosen = unmask_by_threshold(conf, masked, threshold)
        rows.count_forward(masked.any(dim=1))
        rows.record_steps(chosen.sum(dim=1))
        canvas.ids = torch.where(chosen, tokens, canvas.ids)
        masked &= ~chosen
        step += 1


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
    ids = torch.full((rows, block_size), lm.mask_token_id, dtype=torch.long, device=lm.device)
    if dcfg.token_shift:
        ids[:, 0] = next_token(lm, pre.last_hidden, cfg, generator)
    zeros = torch.zeros(rows, dtype=torch.long, device=lm.device)
    return pre.context, Canvas(ids, text_positions(pre.next_position, block_size), zeros)


def _start_absolute(lm, prompts, block_size: int, context_cls):
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
    q = torch.arange(block_size, device=lm.device)[None, :]
    is_tail = q < tail[:, None]  # (R, Q)
    source = (first + cut)[:, None] + q
    source = source.clamp(max=width - 1)
    ids = torch.where(is_tail, batch.input_ids.gather(1, source), lm.mask_token_id)
    start = lengths + batch.rope_deltas  # position of the first generated token
    generated = text_positions(start, block_size) - tail[None, :, None]
    positions = torch.where(is_tail[None], batch.position_ids.gather(2, source[None].expand(3, -1, -1)), generated)
    canvas = Canvas(ids, positions, tail, fixed=is_tail, fixed_embeds=_gather(embeds, source))
    return ctx, canvas, span > 0


def _gather(embeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """embeds (R, P, D) gathered at index (R, Q) -> (R, Q, D)."""
    return embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
