"""Autoregressive decoding with our own KV-cached loop: one token per forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dvlm.config import DecodeConfig
from dvlm.data.processor import Encoded
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prefill import make_generator, prefill, text_positions
from dvlm.decode.rows import Listener, RowTracker
from dvlm.decode.sampling import select_tokens
from dvlm.model.cache import KVContext
from dvlm.runtime import Timer


def next_token(lm, hidden: torch.Tensor, cfg: DecodeConfig, generator) -> torch.Tensor:
    """(R, D) hidden states -> (R,) sampled next tokens."""
    logits = lm.adapter.logits(lm.model, hidden)
    tokens, _ = select_tokens(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator, lm.banned_token_ids)
    return tokens


@dataclass
class ARStart:
    """A batch after its causal prefill: the first generated token of every row is known."""

    timer: Timer
    generator: torch.Generator | None
    rows: RowTracker
    context: KVContext
    token: torch.Tensor  # (R,) the first generated token
    position: torch.Tensor  # (R,) its position id


def start_ar(lm, prompts: list[Encoded], cfg: DecodeConfig, context_cls, listener: Listener | None) -> ARStart:
    """Prefill the prompts causally and pick each row's first token (AR and spec decoding)."""
    timer = Timer(lm.device)
    generator = make_generator(cfg.seed, lm.device)
    rows = RowTracker(len(prompts), cfg.max_new_tokens, lm.eos_token_ids, listener)
    with timer("prefill"):
        pre = prefill(lm, prompts, context_cls)
        token = next_token(lm, pre.last_hidden, cfg, generator)
    rows.count_forward()
    return ARStart(timer, generator, rows, pre.context, token, pre.next_position)


@torch.inference_mode()
def generate_ar(lm, prompts: list[Encoded], cfg: DecodeConfig, context_cls=KVContext,
        listener: Listener | None = None) -> list[GenerationOutput]:
    """Greedy or sampled AR decoding of a batch; rows leave the batch when they finish."""
    start = start_ar(lm, prompts, cfg, context_cls, listener)
    timer, generator, rows, ctx = start.timer, start.generator, start.rows, start.context
    token, position = start.token, start.position
    with timer("decode"):
        while True:
            done = rows.extend([[t] for t in token.tolist()])
            if done.all():
                break
            if done.any():
                keep = rows.drop_finished(done).to(lm.device)
                ctx.select_rows(keep)
                token, position = token[keep], position[keep]
            embeds = lm.adapter.embed(lm.model, token[:, None])
            valid = torch.ones_like(token[:, None], dtype=torch.bool)
            block = torch.full_like(token[:, None], ctx.next_block_id())
            hidden = ctx.commit(embeds, text_positions(position, 1), valid, block, "causal")
            rows.count_forward()
            token, position = next_token(lm, hidden[:, -1], cfg, generator), position + 1
    lengths = [len(p) for p in prompts]
    return rows.outputs(lm.processor.decode, "ar", timer.as_dict(), lengths)
