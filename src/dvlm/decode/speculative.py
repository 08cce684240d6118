"""Self-speculative block decoding, "linear" (Fast-dVLM; reference/algorithms.md §6.3).

The same weights draft and verify. Per block of B positions starting with the known seed x0:
  1. draft: one bidirectional pass over [x0, MASK * (B-1)] fills every mask at once;
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

import torch

from dvlm.config import ConfigError, DecodeConfig
from dvlm.data.processor import Encoded
from dvlm.decode.ar import start_ar
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prefill import text_positions
from dvlm.decode.rows import Listener
from dvlm.decode.sampling import sampling_distribution, select_tokens
from dvlm.model.cache import KVContext


def _check(lm, cfg: DecodeConfig, name: str) -> int:
    """The block size, after refusing models and settings speculative decoding cannot serve."""
    dcfg = lm.require_diffusion(name)
    if not dcfg.token_shift or dcfg.clean_attention != "causal":
        raise ConfigError(f"decoder={name!r} needs a token-shift model with a causal clean stream "
                          "(the fast-dvlm recipe)")
    block_size = cfg.block_size or dcfg.block_size
    if block_size < 2:
        raise ConfigError(f"decoder={name!r} needs block_size >= 2")
    return block_size


def _masked_blocks(lm, first: torch.Tensor, block_size: int) -> torch.Tensor:
    """(*first.shape, block_size) blocks [first, MASK, ..., MASK]."""
    block = torch.full((*first.shape, block_size), lm.mask_token_id, dtype=torch.long, device=lm.device)
    block[..., 0] = first
    return block


def _draft(lm, ctx, block: torch.Tensor, positions: torch.Tensor, cfg: DecodeConfig, generator) -> torch.Tensor:
    """Fill block[:, 1:] in place from one bidirectional pass; returns the draft logits (R, B-1, V)."""
    ids = torch.full_like(block, ctx.next_block_id())
    valid = torch.ones_like(block, dtype=torch.bool)
    hidden = ctx.peek(lm.adapter.embed(lm.model, block), positions, valid, ids, "bidirectional")
    logits = lm.adapter.logits(lm.model, hidden[:, :-1])  # output j drafts position j + 1
    block[:, 1:], _ = select_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator, lm.banned_token_ids)
    return logits


def _keep(rows, block: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    """Record the accepted prefixes; returns (R,) True for rows that finished."""
    for prompt, n in zip(rows.active, accepted.tolist()):
        rows.accepts[prompt].append(n)
    return rows.extend([b[:n] for b, n in zip(block.tolist(), accepted.tolist())])


@torch.inference_mode()
def generate_speculative(lm, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
        listener: Listener | None = None) -> list[GenerationOutput]:
    block_size = _check(lm, cfg, "spec")
    start = start_ar(lm, prompts, cfg, context_cls, listener)
    timer, generator, rows, ctx = start.timer, start.generator, start.rows, start.context
    seed, position = start.token, start.position
    while True:
        block = _masked_blocks(lm, seed, block_size)
        positions = text_positions(position, block_size)
        with timer("draft"):
            draft_logits = _draft(lm, ctx, block, positions, cfg, generator)
        rows.count_forward()
        with timer("verify"):
            block_start = ctx.length
            valid = torch.ones_like(block, dtype=torch.bool)
            ids = torch.full_like(block, ctx.next_block_id())
            hidden = ctx.commit(lm.adapter.embed(lm.model, block), positions, valid, ids, "causal")
            verify_logits = lm.adapter.logits(lm.model, hidden)  # (R, B, V): output i predicts i + 1
            accepted, seed = accept_drafts(block, draft_logits, verify_logits, cfg, generator, lm.banned_token_ids)
            ctx.crop_rows(block_start, accepted)
        rows.count_forward()
        done = _keep(rows, block, accepted)
        position = position + accepted
        if done.all():
            break
        if done.any():
            keep = rows.drop_finished(done).to(lm.device)
            ctx.select_rows(keep)
            seed, position = seed[keep], position[keep]
    lengths = [len(p) for p in prompts]
    return rows.outputs(lm.processor.decode, "spec", timer.as_dict(), lengths, block_size)


@torch.inference_mode()
def generate_speculative_quadratic(lm, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
        listener: Listener | None = None) -> list[GenerationOutput]:
    """Experimental: self-speculative decoding with verify and next draft fused into one pass.

    The pass that verifies the block [x0, d1 .. d(B-1)] also drafts the next block for every
    possible outcome: for each accepted length n in 1..B, a draft block [d(n-1), MASK * (B-1)] at
    positions p+n-1 .. p+n+B-2 that sees the context, the committed d0 .. d(n-2) and itself
    (the training layout of a token-shift block whose first token is clean). Once n is known, that
    candidate's outputs 1 .. B-1 draft positions p+n+1 .. p+n+B-1 behind the verifier's own token.
    One forward of B + B*B tokens per block (plus one initial draft), against two forwards of B
    tokens for `spec`. Acceptance is `spec`'s, so greedy output still equals AR greedy decoding.
    The drafts are a little weaker (the seed position is masked while they are drafted).
    """
    block_size = _check(lm, cfg, "spec-quadratic")
    start = start_ar(lm, prompts, cfg, context_cls, listener)
    timer, generator, rows, ctx = start.timer, start.generator, start.rows, start.context
    position = start.position
    block = _masked_blocks(lm, start.token, block_size)
    with timer("draft"):
        draft_logits = _draft(lm, ctx, block, text_positions(position, block_size), cfg, generator)
    rows.count_forward()
    offsets = torch.arange(block_size, device=lm.device)
    while True:
        with timer("verify+draft"):
            block_start = ctx.length
            n_rows = block.shape[0]
            valid = torch.ones_like(block, dtype=torch.bool)
            ids = torch.full_like(block, ctx.next_block_id())
            candidates = _masked_blocks(lm, block, block_size)  # (R, C=B, L=B): candidate c starts with d_c
            cand_positions = (position[:, None, None] + offsets[None, :, None] + offsets[None, None, :])
            hidden, cand_hidden = ctx.commit_and_draft(
                (lm.adapter.embed(lm.model, block), text_positions(position, block_size), valid, ids),
                (lm.adapter.embed(lm.model, candidates), cand_positions[None].expand(3, -1, -1, -1), offsets),
            )
            verify_logits = lm.adapter.logits(lm.model, hidden)
            accepted, seed = accept_drafts(block, draft_logits, verify_logits, cfg, generator, lm.banned_token_ids)
            ctx.crop_rows(block_start, accepted)
            chosen = cand_hidden[torch.arange(n_rows, device=lm.device), accepted - 1, 1:]  # (R, B-1, D)
            draft_logits = lm.adapter.logits(lm.model, chosen)
            next_block = _masked_blocks(lm, seed, block_size)
            next_block[:, 1:], _ = select_tokens(draft_logits, cfg.temperature, cfg.top_k, cfg.top_p, generator,
                                                 lm.banned_token_ids)
        rows.count_forward()
        done = _keep(rows, block, accepted)
        block, position = next_block, position + accepted
        if done.all():
            break
        if done.any():
            keep = rows.drop_finished(done).to(lm.device)
            ctx.select_rows(keep)
            block, position, draft_logits = block[keep], position[keep], draft_logits[keep]
    lengths = [len(p) for p in prompts]
    return rows.outputs(lm.processor.decode, "spec-quadratic", timer.as_dict(), lengths, block_size)


def accept_drafts(block, draft_logits, verify_logits, cfg: DecodeConfig, generator, banned):
    """How many block tokens each row keeps (R,), and the next seed (R,).

    block: (R, B) [seed, drafts]; draft_logits: (R, B-1, V) for positions 1..B-1;
    verify_logits: (R, B, V), output i = the AR distribution of position i + 1.
    """
    if cfg.temperature == 0.0:
        target, _ = select_tokens(verify_logits, banned=banned)  # (R, B)
        agree = (target[:, :-1] == block[:, 1:]).long()
        accepted = 1 + agree.cumprod(dim=1).sum(dim=1)  # (R,) in [1, B]
        return accepted, target.gather(1, (accepted - 1)[:, None]).squeeze(1)
    p = sampling_distribution(verify_logits, cfg.temperature, cfg.top_k, cfg.top_p, banned)  # (R, B, V)
    q = sampling_distribution(draft_logits, cfg.temperature, cfg.top_k, cfg.top_p, banned)  # (R, B-1, V)
    drafts = block[:, 1:, None]
    ratio = p[:, :-1].gather(2, drafts).squeeze(2) / q.gather(2, drafts).squeeze(2).clamp_min(1e-20)
    u = torch.rand(ratio.shape, generator=generator, device=ratio.device)
    keep = (u < ratio.clamp(max=1.0)).long()
    accepted = 1 + keep.cumprod(dim=1).sum(dim=1)
    rows = torch.arange(block.shape[0], device=block.device)
    p_next = p[rows, accepted - 1]  # (R, V): distribution of the token after the accepted prefix
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # nothing was drafted after position B-1
    residual = (p_next - q_pad[rows, accepted - 1]).clamp_min(0)
    rejected = accepted < block.shape[1]
    dist = torch.where(rejected[:, None] & (residual.sum(-1, keepdim=True) > 0), residual, p_next)
    seed = torch.multinomial(dist / dist.sum(-1, keepdim=True), 1, generator=generator).squeeze(1)
    return accepted, seed
