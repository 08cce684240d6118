"""Block-diffusion decoding with KV-cache reuse (DESIGN.md §1, "Decoding").

Per block: fill the unknown positions with [MASK]; repeat a bidirectional forward over the block
(peeking at the cache, not writing it) and unmask the confident positions; then one commit pass
writes the finished block's keys/values with the clean-stream mask. With token shift the commit's
last output seeds the next block's first token (an AR step). The layouts and block widths are in
`dvlm.decode.canvas`.

`BlockStepper.step` decodes one block for every row of the batch and commits it; rows join
between blocks with their own first block, and the fused commit (the commit run together with
the next block's first denoising pass) is per row: a row without one runs that pass itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DecodeConfig, DiffusionConfig
from dvlm.data.processor import Encoded
from dvlm.decode.ar import next_token
from dvlm.decode.canvas import (
    Canvas,
    canvas_embeds,
    next_canvas,
    pad_right,
    start_absolute,
    start_response,
)
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prompts import Caches, PromptBatch
from dvlm.decode.rows import Listener
from dvlm.decode.sampling import (
    RowSampler,
    block_schedule_count,
    greedy_tokens,
    steps_schedule_count,
    unmask_by_count,
    unmask_by_threshold,
    unmask_by_topk,
)
from dvlm.decode.settings import GroupSettings
from dvlm.decode.stepper import Stepper, generate_with
from dvlm.model.cache import DecodeContext, KVContext
from dvlm.model.loaded import LoadedModel
from dvlm.model.prefix_cache import CAUSAL, Stream

FirstPass = tuple[torch.Tensor, torch.Tensor]  # (logits (R, Q, V), usable (R,) bool) from a fused commit


@dataclass
class NextBlock:
    """A block-decoding batch between two steps: everything committed, and each row's next block."""

    context: DecodeContext
    canvas: Canvas
    first_pass: FirstPass | None = None  # the next block's first pass, from a fused commit
    guess_logits: torch.Tensor | None = None  # (R, V) set by denoising: each row's last pass at the block's end

    def select(self, keep: torch.Tensor) -> NextBlock:
        self.context.select_rows(keep)
        first = None if self.first_pass is None else (self.first_pass[0][keep], self.first_pass[1][keep])
        guess = None if self.guess_logits is None else self.guess_logits[keep]
        return NextBlock(self.context, self.canvas.select(keep), first, guess)

    def join(self, other: NextBlock, pad_token_id: int) -> NextBlock:
        """Rows that just started join; each side's first passes (from a fused commit or a fused
        prefill) stay with their rows, and rows without one run that pass themselves."""
        self.context.join(other.context)
        canvas = self.canvas.join(other.canvas, pad_token_id)
        parts = [(self.first_pass, self.canvas.ids.shape[0]), (other.first_pass, other.canvas.ids.shape[0])]
        known = next((p for p, _ in parts if p is not None), None)
        if known is None:
            return NextBlock(self.context, canvas)
        width, vocab = canvas.ids.shape[1], known[0].shape[-1]
        logits = [pad_right(p[0], width, 0.0, dim=1) if p is not None else known[0].new_zeros(n, width, vocab)
                  for p, n in parts]
        usable = [p[1] if p is not None else known[1].new_zeros(n) for p, n in parts]
        return NextBlock(self.context, canvas, (torch.cat(logits), torch.cat(usable)))


class BlockStepper(Stepper):
    decoder = "block"

    def __init__(self, lm: LoadedModel, group: GroupSettings, context_cls=KVContext, caches: Caches | None = None) -> None:
        super().__init__(lm, group, context_cls, caches)
        self.dcfg = lm.require_diffusion("block")
        self.commit_kind = "causal" if self.dcfg.clean_attention == "causal" else "block_causal"

    def _prefill(self, prompts: PromptBatch, ids: list[int]) -> NextBlock:
        """The rows' context and first block; with `fuse_prefill` (no token shift) the block's first
        denoising pass ran in the prefill forward, for every row (`first_pass`)."""
        budgets, fuse = [self.rows[i].settings.max_new_tokens for i in ids], self.group.fuse_prefill
        if self.dcfg.block_layout == "response":
            ctx, canvas, first = start_response(self.lm, prompts, self.dcfg, self.group.block_size, budgets,
                                                self._sampler(ids), self.context_cls, fuse)
            self.rows.count_forward_for(ids)
        else:
            ctx, canvas, first, prefilled = start_absolute(self.lm, prompts, self.group.block_size, budgets,
                                                           self.context_cls, fuse)
            if first is not None:  # every row's first pass was in that forward
                self.rows.count_forward_for(ids)
            elif any(prefilled):  # only rows with a complete prompt block had work in that forward
                self.rows.count_forward_for([i for i, p in zip(ids, prefilled) if p])
        if first is None:
            return NextBlock(ctx, canvas)
        usable = torch.ones(len(ids), dtype=torch.bool, device=canvas.ids.device)
        return NextBlock(ctx, canvas, (self.lm.adapter.logits(self.lm.model, first), usable))

    def _prefix_stream(self) -> Stream | None:
        """The response layout over a causal clean stream commits causally (the prompt, then each
        block); absolute blocks commit whole blocks block-causally. (Response blocks over a
        block-causal clean stream reuse nothing: their prompt blocks follow the prompt's labels.)"""
        if self.dcfg.block_layout == "response":
            return CAUSAL if self.commit_kind == "causal" else None
        return Stream("absolute", self.group.block_size) if self.commit_kind == "block_causal" else None

    def _join(self, running: NextBlock, joining: NextBlock) -> NextBlock:
        return running.join(joining, self.lm.processor.pad_token_id)

    def _select(self, state: NextBlock, keep: torch.Tensor) -> NextBlock:
        return state.select(keep)

    def _advance(self) -> tuple[list[tuple[int, list[int]]], list[int]]:
        """Denoise every row's block, emit it, and commit it for the rows that go on."""
        with self.timer("denoise"):
            self.state.guess_logits = self._denoise(self.state, self._sampler())
        committed, done = self.rows.extend(self.state.canvas.emitted())
        finished = self._leave_finished(done)
        if self.state is not None:
            with self.timer("commit"):
                self.state = self._commit(self.state)
        return committed, finished

    def _next_widths(self) -> list[int]:
        """Each row's next block: in the response layout no wider than what the row may still
        generate (a truncated last block is what training's auto-truncation shows the model, and it
        saves forwards); absolute blocks keep their size (rows' prompt tails differ)."""
        if self.dcfg.block_layout == "response":
            return [min(self.group.block_size, self.rows[i].remaining) for i in self.rows.active]
        return [self.group.block_size] * self.rows.num_active

    def _commit(self, state: NextBlock) -> NextBlock:
        """One forward writes the finished blocks' keys/values; with token shift it seeds the next."""
        lm, ctx, canvas = self.lm, state.context, state.canvas
        widths, sampler = self._next_widths(), self._sampler()
        if self.group.fuse_commit and state.guess_logits is not None and max(widths) > 1:
            canvas, first_pass = _commit_fused(lm, ctx, canvas, state.guess_logits, widths, sampler)
        else:
            hidden = ctx.commit(canvas_embeds(lm, canvas), canvas.positions, canvas.validity(), _block_ids(ctx, canvas),
                                self.commit_kind)
            seed = next_token(lm, canvas.at_ends(hidden), sampler) if self.dcfg.token_shift else None
            canvas, first_pass = next_canvas(lm, canvas, seed, widths), None
        self.rows.count_forward()
        return NextBlock(ctx, canvas, first_pass)

    def _thresholds(self, device: torch.device) -> torch.Tensor:
        """(R, 1) float32: each active row's threshold (the confidences' dtype)."""
        values = [[self.rows[i].settings.threshold] for i in self.rows.active]
        return torch.tensor(values, dtype=torch.float32, device=device)

    def _denoise(self, state: NextBlock, sampler: RowSampler) -> torch.Tensor | None:
        """Unmask the canvas in place, one bidirectional pass at a time, until no [MASK] is left.

        `state.first_pass`: the first pass from a fused commit, usable for the rows where `usable`;
        the other rows need that pass on their own. Returns each row's last pass's output at its
        block's last position (R, V): with token shift, a guess of the token after the block (None
        when no pass ran)."""
        lm, ctx, canvas, group, rows = self.lm, state.context, state.canvas, self.group, self.rows
        thresholds = self._thresholds(canvas.ids.device) if group.steps is None else None
        masked = canvas.ids == lm.mask_token_id  # (R, Q): masked state is tracked by ids
        masked &= ~after_finished_answer(canvas, masked, lm.eos_token_ids)  # a seed that ends the answer
        step, last, first_pass = 0, None, state.first_pass
        while masked.any():
            fused, usable = first_pass if first_pass is not None else (None, None)
            first_pass = None
            needs_pass = masked.any(dim=1) if usable is None else masked.any(dim=1) & ~usable
            run = usable is None or bool(needs_pass.any())  # one host sync, only after a fused commit
            if run:
                hidden = ctx.peek(canvas_embeds(lm, canvas), canvas.positions, canvas.validity(), _block_ids(ctx, canvas),
                                  "bidirectional")
                logits = lm.adapter.logits(lm.model, hidden)  # (R, Q, V)
                rows.count_forward(needs_pass)  # usable rows' pass was the fused commit
            if fused is not None:
                logits = torch.where(usable[:, None, None], fused, logits) if run else fused
            # Per row, from the row's own last pass (a row may sit idle while others finish).
            active = masked.any(dim=1, keepdim=True)
            last = canvas.at_ends(logits) if last is None else torch.where(active, canvas.at_ends(logits), last)
            if self.dcfg.token_shift:  # output j predicts position j + 1; position 0 is always known
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            drawing = None if sampler.greedy else active[:, 0].tolist()  # idle rows draw nothing
            tokens, conf = sampler.select(logits, drawing, draws_per_row=group.block_size)
            open_ = masked if group.sub_block_size is None else current_sub_block(masked, group.sub_block_size)
            if group.steps is not None:
                chosen = fixed_steps_choice(conf, open_, masked, step, group.steps, group.block_size, self.dcfg)
            else:
                chosen = unmask_by_threshold(conf, open_, thresholds)
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


def _commit_fused(lm: LoadedModel, ctx, canvas: Canvas, guess_logits: torch.Tensor, widths: list[int],
                  sampler: RowSampler) -> tuple[Canvas, FirstPass]:
    """Commit the finished block and run the next block's first denoising pass in one forward.

    The next block starts with the seed the commit will produce, which is not known before the
    forward; the last denoising pass already guessed it. In each row whose guess equals the seed
    the commit produced, the second half of the forward is exactly the next block's first pass
    and is kept; in the other rows it is dropped and that pass runs on its own. Outputs are unchanged;
    only forwards are saved. Returns (next canvas, first-pass logits and where they are usable)."""
    guess, _ = greedy_tokens(guess_logits, lm.banned_token_ids)  # (R,)
    nxt = next_canvas(lm, canvas, guess, widths)
    whole = torch.tensor([canvas.ids.shape[1]], device=canvas.ids.device)  # the next block sees all of this one
    hidden, peeked = ctx.commit_and_draft(
        (canvas_embeds(lm, canvas), canvas.positions, canvas.validity(), _block_ids(ctx, canvas)),
        (canvas_embeds(lm, nxt)[:, None], nxt.positions[:, :, None], whole, None if nxt.valid is None else nxt.valid[:, None]),
    )
    seed = next_token(lm, canvas.at_ends(hidden), sampler)
    nxt.ids[:, 0] = seed
    return nxt, (lm.adapter.logits(lm.model, peeked[:, 0]), seed == guess)


def _block_ids(ctx, canvas: Canvas) -> torch.Tensor:
    """A fresh block id (above every cached one) for all canvas positions."""
    return torch.full_like(canvas.ids, ctx.next_block_id())


@torch.inference_mode()
def generate_block(lm: LoadedModel, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
                   listener: Listener | None = None) -> list[GenerationOutput]:
    return generate_with(BlockStepper, lm, prompts, cfg, context_cls, listener)
