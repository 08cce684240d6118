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


@torch.inference_mode()
def generate_speculative(lm, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
        listener: Listener | None = None) -> list[GenerationOutput]:
    dcfg = lm.require_diffusion("spec")
    if not dcfg.token_shift or dcfg.clean_attention != "causal":
        raise ConfigError("decoder='spec' needs a token-shift model with a causal clean stream (the fast-dvlm recipe)")
    block_size = cfg.block_size or dcfg.block_size
    if block_size < 2:
        raise ConfigError("decoder='spec' needs block_size >= 2")
    start = start_ar(lm, prompts, cfg, context_cls, listener)
    timer, generator, rows, ctx = start.timer, start.generator, start.rows, start.context
    seed, position = start.token, start.position
    while True:
        block = torch.full((seed.shape[0], block_size), lm.mask_token_id, dtype=torch.long, device=lm.device)
        block[:, 0] = seed
        positions = text_positions(position, block_size)
        valid = torch.ones_like(block, dtype=torch.bool)
        with timer("draft"):
            ids = torch.full_like(block, ctx.next_block_id())
            hidden = ctx.peek(lm.adapter.embed(lm.model, block), positions, valid, ids, "bidirectional")
            draft_logits = lm.adapter.logits(lm.model, hidden[:, :-1])  # output j drafts position j + 1
            block[:, 1:], _ = select_tokens(draft_logits, cfg.temperature, cfg.top_k, cfg.top_p, generator,
                                            lm.banned_token_ids)
        rows.count_forward()
        with timer("verify"):
            start = ctx.length
            hidden = ctx.commit(lm.adapter.embed(lm.model, block), positions, valid, ids, "causal")
            verify_logits = lm.adapter.logits(lm.model, hidden)  # (R, B, V): output i predicts i + 1
            accepted, seed = accept_drafts(block, draft_logits, verify_logits, cfg, generator, lm.banned_token_ids)
            ctx.crop_rows(start, accepted)
        rows.count_forward()
        for prompt, n in zip(rows.active, accepted.tolist()):
            rows.accepts[prompt].append(n)
        done = rows.extend([b[:n] for b, n in zip(block.tolist(), accepted.tolist())])
        position = position + accepted
        if done.all():
            break
        if done.any():
            keep = rows.drop_finished(done).to(lm.device)
            ctx.select_rows(keep)
            seed, position = seed[keep], position[keep]
    lengths = [len(p) for p in prompts]
    return rows.outputs(lm.processor.decode, "spec", timer.as_dict(), lengths, block_size)


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
