"""Self-speculative block decoding, "linear" (Fast-dVLM; reference/algorithms.md §6.3).

The same weights draft and verify. Per block of B positions starting with the known seed s:
  1. draft: one bidirectional pass over [s, MASK * (B-1)] fills every mask at once;
  2. verify: one causal pass over the drafted block writes its KV; its output i is the AR model's
     prediction for position i + 1;
  3. accept the longest draft prefix the AR model agrees with; the AR model's own token at the
     first disagreement (or after the last position) becomes the next block's seed;
  4. crop the KV of the rejected positions.
Two forwards per block. Greedy: the output equals AR greedy decoding token for token (invariant 5).
Sampling (temperature > 0): speculative sampling's accept rule (accept d with probability
min(1, p(d) / q(d)), else draw from max(0, p - q)), which leaves the output distributed exactly as
AR sampling from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DecodeConfig
from dvlm.data.collate import Batch
from dvlm.data.processor import Encoded
from dvlm.decode.ar import NextTokens, NextTokenStepper, PendingDraft
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prefill import DraftBlock, DraftOf
from dvlm.decode.prompts import PromptBatch
from dvlm.decode.rows import Listener
from dvlm.decode.sampling import RowSampler, greedy_tokens, sample_from
from dvlm.decode.stepper import generate_with
from dvlm.model.cache import DecodeContext, KVContext
from dvlm.model.loaded import LoadedModel


def _masked_blocks(lm: LoadedModel, first: torch.Tensor, block_size: int) -> torch.Tensor:
    """(*first.shape, block_size) blocks [first, MASK, ..., MASK]."""
    block = torch.full((*first.shape, block_size), lm.mask_token_id, dtype=torch.long, device=first.device)
    block[..., 0] = first
    return block


def _draft(lm: LoadedModel, ctx, block: torch.Tensor, positions: torch.Tensor, sampler: RowSampler,
           drawing: list[bool] | None = None) -> torch.Tensor:
    """Fill block[:, 1:] in place from one bidirectional pass; returns the draft logits (R, B-1, V).
    Only the rows `drawing` (None: all) draw, and only they are computed: the others' block
    positions and logits are left for the caller to fill (zeros)."""
    ids = torch.full_like(block, ctx.next_block_id())
    valid = torch.ones_like(block, dtype=torch.bool)
    embeds = lm.adapter.embed(lm.model, block)
    if drawing is None or all(drawing):
        hidden = ctx.peek(embeds, positions, valid, ids, "bidirectional")
        logits = lm.adapter.logits(lm.model, hidden[:, :-1])  # output j drafts position j + 1
    else:  # a batch where some rows have drafts made beforehand: a forward over the others only
        rows = torch.tensor([i for i, d in enumerate(drawing) if d], device=block.device)
        part = lm.adapter.logits(lm.model, ctx.peek_rows(rows, embeds, positions, valid, ids, "bidirectional")[:, :-1])
        logits = part.new_zeros(block.shape[0], *part.shape[1:])
        logits[rows] = part
    block[:, 1:], _ = sampler.select(logits, drawing)
    return logits


def first_draft(lm: LoadedModel, block_size: int) -> DraftOf:
    """The first draft, made in the prefill forward: the block [last prompt token, MASK * (B-1)]
    at positions p-1 .. p+B-2 (p: the seed's position), seeing the prompt before its last token.

    The seed is what the prefill's own causal output predicts, so no forward that computes it can
    also see it. This block is a token-shift block like every later one, one position earlier:
    its first token is clean (the prompt's last) and its output i drafts position p + i, so
    outputs 1..B-1 draft the block positions after the seed; the seed itself comes from the prefill,
    and the verify pass checks every draft as usual (greedy output is AR's either way)."""
    def draft(batch: Batch, embeds: torch.Tensor) -> DraftBlock:
        masks = torch.full((embeds.shape[0], block_size - 1), lm.mask_token_id, device=embeds.device)
        block = torch.cat([embeds[:, -1:], lm.adapter.embed(lm.model, masks)], dim=1)  # (R, B, F)
        positions = torch.cat([batch.position_ids[:, :, -1:], lm.positions.text(batch.next_positions, block_size - 1)],
                              dim=2)
        return DraftBlock(block, positions, prefix=batch.input_ids.shape[1] - 1)

    return draft


def _keep_accepted(rows, block: torch.Tensor, accepted: torch.Tensor):
    """Record the accepted prefixes and commit them after their seed (committed when it became
    known); returns rows.extend's (committed, done)."""
    counts = accepted.tolist()
    rows.record_accepts(counts)
    return rows.extend([b[1:n] for b, n in zip(block.tolist(), counts)])


class SpecStepper(NextTokenStepper):
    """A step drafts the rows' blocks after their seeds (committed as soon as known, as in `ar`),
    verifies them (committing their KV) and keeps the accepted prefixes; the verifier's token after
    each prefix is the next seed, committed at the step's end.

    With `fuse_prefill` a row's first draft is made in its prefill forward (`first_draft`), so its
    first step runs the verify pass only. Such a draft is made without the seed (it drafts two
    positions ahead of what it sees) and is more often rejected at once; so a verify pass over
    drafts made beforehand also drafts [seed, MASK * (B-1)] alongside, as a draft pass would, and
    where the verifier rejects the first draft (one token accepted, the next seed at p + 1) that
    draft's outputs 1..B-1 are the next block's drafts for positions p + 2 .. p + B (`_rolled`):
    that step needs no draft pass either. Greedy output is AR's whatever the drafts."""

    decoder = "spec"

    def _draft_in_prefill(self) -> DraftOf | None:
        return first_draft(self.lm, self.group.block_size) if self.group.fuse_prefill else None

    def _advance(self) -> tuple[list[tuple[int, list[int]]], list[int]]:
        if (joined := self._emit_joined()) is not None:
            return joined
        lm, state, block_size, sampler = self.lm, self.state, self.group.block_size, self._sampler()
        ctx = state.context
        block = _masked_blocks(lm, state.token, block_size)
        positions = lm.positions.text(state.position, block_size)
        with self.timer("draft"):
            draft_logits = self._drafts(ctx, block, positions, sampler, state.draft)
        with self.timer("verify"):
            block_start = ctx.length
            verified = (lm.adapter.embed(lm.model, block), positions, torch.ones_like(block, dtype=torch.bool),
                        torch.full_like(block, ctx.next_block_id()))
            redraft = None
            if state.draft is None:
                hidden = ctx.commit(*verified, "causal")
            else:  # the drafts were made beforehand: draft the block again alongside (see the class docstring)
                again = lm.adapter.embed(lm.model, _masked_blocks(lm, state.token, block_size))
                zero = torch.zeros(1, dtype=torch.long, device=block.device)  # it sees the context, not the verified block
                hidden, redraft = ctx.commit_and_draft(verified, (again[:, None], positions[:, :, None], zero, None))
            verify_logits = lm.adapter.logits(lm.model, hidden)  # (R, B, V): output i predicts i + 1
            accepted, seed = accept_drafts(block, draft_logits, verify_logits, sampler)
            ctx.crop_rows(block_start, accepted)
        self.rows.count_forward()
        committed, done = _keep_accepted(self.rows, block, accepted)
        rolled = None if redraft is None else self._rolled(redraft[:, 0], state.draft.ready & (accepted == 1), sampler)
        self.state = NextTokens(ctx, seed, state.position + accepted, rolled)
        return self._then_known(committed, self._leave_finished(done))

    def _rolled(self, redraft: torch.Tensor, use: torch.Tensor, sampler: RowSampler) -> PendingDraft | None:
        """The next block's drafts from a draft of [seed, MASK * (B-1)] (hidden (R, B, D)) where
        `use` (R,) (one token accepted: the next block starts one position after the seed)."""
        if not bool(use.any()):
            return None
        logits = self.lm.adapter.logits(self.lm.model, redraft[:, 1:])  # output j drafts position p + j + 1
        tokens, _ = sampler.select(logits, use.tolist())
        return PendingDraft(tokens, logits, use)

    def _drafts(self, ctx, block: torch.Tensor, positions: torch.Tensor, sampler: RowSampler,
                pending: PendingDraft | None) -> torch.Tensor:
        """Fill block[:, 1:] with each row's drafts: those made beforehand (in its prefill, or
        alongside its last verify pass) where it has them, else from a draft pass (run only when
        some row needs one). Returns the draft logits (R, B-1, V)."""
        if pending is not None and bool(pending.ready.all()):  # one host sync, only where drafts were made before
            block[:, 1:] = pending.tokens
            return pending.logits
        needs = None if pending is None else ~pending.ready
        logits = _draft(self.lm, ctx, block, positions, sampler, None if needs is None else needs.tolist())
        self.rows.count_forward(needs)
        if pending is None:
            return logits
        ready = pending.ready[:, None]
        block[:, 1:] = torch.where(ready, pending.tokens, block[:, 1:])
        return torch.where(ready[..., None], pending.logits, logits)


@torch.inference_mode()
def generate_speculative(lm: LoadedModel, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
                         listener: Listener | None = None) -> list[GenerationOutput]:
    return generate_with(SpecStepper, lm, prompts, cfg, context_cls, listener)


@dataclass
class DraftedBlocks:
    """Quadratic speculative decoding between steps: each row's drafted next block."""

    context: DecodeContext
    block: torch.Tensor  # (R, B) [seed, drafts]
    position: torch.Tensor  # (R,) position id of the seed
    draft_logits: torch.Tensor  # (R, B-1, V)

    def select(self, keep: torch.Tensor) -> DraftedBlocks:
        self.context.select_rows(keep)
        return DraftedBlocks(self.context, self.block[keep], self.position[keep], self.draft_logits[keep])

    def join(self, other: DraftedBlocks) -> DraftedBlocks:
        self.context.join(other.context)
        return DraftedBlocks(self.context, torch.cat([self.block, other.block]),
                             torch.cat([self.position, other.position]),
                             torch.cat([self.draft_logits, other.draft_logits]))


class QuadraticStepper(NextTokenStepper):
    """Experimental: self-speculative decoding with verify and next draft fused into one pass.

    The pass that verifies the block [d0 = s, d1 .. d(B-1)] also drafts the next block for every
    possible outcome: for each accepted length n in 1..B, a draft block [d(n-1), MASK * (B-1)] at
    positions p+n-1 .. p+n+B-2 that sees the context, the committed d0 .. d(n-2) and itself
    (the training layout of a token-shift block whose first token is clean). Once n is known, that
    candidate's outputs 1 .. B-1 draft positions p+n+1 .. p+n+B-1 behind the verifier's own token.
    One forward of B + B*B tokens per block (plus one initial draft, counted with the prefill),
    against two forwards of B tokens for `spec`. Acceptance is `spec`'s, so greedy output still
    equals AR greedy decoding. The drafts are a little weaker (the seed position is masked while
    they are drafted).
    """

    decoder = "spec-quadratic"

    def _draft_in_prefill(self) -> DraftOf | None:
        return first_draft(self.lm, self.group.block_size) if self.group.fuse_prefill else None

    def _prefill(self, prompts: PromptBatch, ids: list[int]) -> DraftedBlocks:
        start = super()._prefill(prompts, ids)
        block = _masked_blocks(self.lm, start.token, self.group.block_size)
        if start.draft is not None:
            block[:, 1:] = start.draft.tokens
            return DraftedBlocks(start.context, block, start.position, start.draft.logits)
        positions = self.lm.positions.text(start.position, self.group.block_size)
        draft_logits = _draft(self.lm, start.context, block, positions, self._sampler(ids))
        self.rows.count_forward_for(ids)
        return DraftedBlocks(start.context, block, start.position, draft_logits)

    def _known(self) -> torch.Tensor:
        return self.state.block[:, 0]

    def _advance(self) -> tuple[list[tuple[int, list[int]]], list[int]]:
        if (joined := self._emit_joined()) is not None:
            return joined
        lm, state, block_size, sampler = self.lm, self.state, self.group.block_size, self._sampler()
        ctx, block, position = state.context, state.block, state.position
        offsets = torch.arange(block_size, device=block.device)
        with self.timer("verify+draft"):
            block_start = ctx.length
            valid = torch.ones_like(block, dtype=torch.bool)
            ids = torch.full_like(block, ctx.next_block_id())
            candidates = _masked_blocks(lm, block, block_size)  # (R, C=B, L=B): candidate c starts with d_c
            cand_positions = (position[:, None, None] + offsets[None, :, None] + offsets[None, None, :])
            hidden, cand_hidden = ctx.commit_and_draft(
                (lm.adapter.embed(lm.model, block), lm.positions.text(position, block_size), valid, ids),
                (lm.adapter.embed(lm.model, candidates), lm.positions.along_axes(cand_positions), offsets, None),
            )
            verify_logits = lm.adapter.logits(lm.model, hidden)
            accepted, seed = accept_drafts(block, state.draft_logits, verify_logits, sampler)
            ctx.crop_rows(block_start, accepted)
            rows = torch.arange(block.shape[0], device=block.device)
            chosen = cand_hidden[rows, accepted - 1, 1:]  # (R, B-1, D)
            draft_logits = lm.adapter.logits(lm.model, chosen)
            next_block = _masked_blocks(lm, seed, block_size)
            next_block[:, 1:], _ = sampler.select(draft_logits)
        self.rows.count_forward()
        committed, done = _keep_accepted(self.rows, block, accepted)
        self.state = DraftedBlocks(ctx, next_block, position + accepted, draft_logits)
        return self._then_known(committed, self._leave_finished(done))


@torch.inference_mode()
def generate_speculative_quadratic(lm: LoadedModel, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
                                   listener: Listener | None = None) -> list[GenerationOutput]:
    return generate_with(QuadraticStepper, lm, prompts, cfg, context_cls, listener)


def accept_drafts(block: torch.Tensor, draft_logits: torch.Tensor | None, verify_logits: torch.Tensor,
                  sampler: RowSampler) -> tuple[torch.Tensor, torch.Tensor]:
    """How many block tokens each row keeps (R,), and the next seed (R,).

    block: (R, B) [seed, drafts]; draft_logits: (R, B-1, V) for positions 1..B-1;
    verify_logits: (R, B, V), output i = the AR distribution of position i + 1.
    Greedy rows keep the drafts the verifier's argmax agrees with; sampling rows use speculative
    sampling's rule (`_sampled_accept`).
    """
    target, _ = greedy_tokens(verify_logits, sampler.banned)  # (R, B)
    agree = (target[:, :-1] == block[:, 1:]).long()
    accepted = 1 + agree.cumprod(dim=1).sum(dim=1)  # (R,) in [1, B]
    seed = target.gather(1, (accepted - 1)[:, None]).squeeze(1)
    rows = sampler.sampling_rows()
    if not any(rows):
        return accepted, seed
    s_accepted, s_seed = _sampled_accept(block, draft_logits, verify_logits, sampler, rows)
    pick = torch.tensor(rows, device=block.device)
    return torch.where(pick, s_accepted, accepted), torch.where(pick, s_seed, seed)


def _sampled_accept(block, draft_logits, verify_logits, sampler: RowSampler, rows: list[bool]):
    """Speculative sampling: accept draft d with probability min(1, p(d) / q(d)); at the first
    rejection draw from max(0, p - q), after a fully accepted block from p. Each sampling row
    draws B uniforms from its own stream (B-1 tests and one draw)."""
    width = block.shape[1]
    u = sampler.uniforms(rows, width, block.device)  # (R, B)
    p = sampler.distribution(verify_logits)  # (R, B, V)
    q = sampler.distribution(draft_logits)  # (R, B-1, V)
    drafts = block[:, 1:, None]
    ratio = p[:, :-1].gather(2, drafts).squeeze(2) / q.gather(2, drafts).squeeze(2).clamp_min(1e-20)
    keep = (u[:, :-1] < ratio.clamp(max=1.0)).long()
    accepted = 1 + keep.cumprod(dim=1).sum(dim=1)
    index = torch.arange(block.shape[0], device=block.device)
    p_next = p[index, accepted - 1]  # (R, V): distribution of the token after the accepted prefix
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # nothing was drafted after position B-1
    residual = (p_next - q_pad[index, accepted - 1]).clamp_min(0)
    rejected = accepted < width
    dist = torch.where(rejected[:, None] & (residual.sum(-1, keepdim=True) > 0), residual, p_next)
    return accepted, sample_from(dist / dist.sum(-1, keepdim=True), u[:, -1])
