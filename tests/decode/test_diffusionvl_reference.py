"""The `diffusionvl` preset's block decoder == DiffusionVL's decoding rules, written out here as
plainly as possible (batch 1, no cache: every pass recomputes the sequence up to its block).

The rules (hustvl/DiffusionVL `generate_with_bd3lm`, reference/algorithms.md §2):
* the canvas is prompt + masks up to a multiple of B; if B >= P + G it is one block of P + G;
* blocks are absolute (position // B); the prompt's complete blocks are context, its tail opens
  the first decoded block; attention is block-causal;
* pass s of a block unmasks min(B // steps + (s < B % steps), masks left) positions, chosen by
  `torch.topk` over the block's confidences (-inf off the masks);
* after the last pass a commit forward writes the block (dvlm skips the last block's commit,
  which nothing reads: one forward fewer; and it runs the first block's first pass in the
  prefill forward: one more).
One deliberate difference: dvlm never produces the mask token (DiffusionVL could, and would then
treat the position as still masked), so the transcription bans it too.
"""

import dataclasses

import pytest
import torch

import dvlm
from dvlm.config import DecodeConfig
from dvlm.data.processor import IGNORE_INDEX, Encoded
from dvlm.decode.block import generate_block

from .conftest import sharpen


def _forward_logits(lm, ids: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """(T,) ids with (T,) block ids -> (T, V) logits under a block-causal mask, 1-D positions."""
    embeds = lm.adapter.embed(lm.model, ids[None])
    positions = torch.arange(len(ids))[None, None].expand(3, 1, -1)
    allowed = blocks[None, :] <= blocks[:, None]  # (T, T): key block <= query block
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    return lm.adapter.logits(lm.model, lm.adapter.hidden_states(lm.model, embeds, positions, mask))[0]


@torch.inference_mode()
def reference_decode(lm, prompt_ids: torch.Tensor, block_size: int, steps: int, gen_length: int):
    """DiffusionVL's decoding of one prompt: (the G new tokens, the forwards it runs)."""
    mask_id, n_prompt = lm.mask_token_id, len(prompt_ids)
    if block_size >= n_prompt + gen_length:
        total, n_blocks = n_prompt + gen_length, 1
    else:
        n_blocks = -(-(n_prompt + gen_length) // block_size)
        total = n_blocks * block_size
    ids = torch.full((total,), mask_id)
    ids[:n_prompt] = prompt_ids
    blocks = torch.arange(total) // block_size
    base, extra = divmod(block_size, steps)
    counts = [base + (1 if s < extra else 0) for s in range(steps)]
    forwards = 1 if n_prompt // block_size else 0  # the prefill of the complete prompt blocks
    for blk in range(n_prompt // block_size, n_blocks):
        lo, hi = blk * block_size, min((blk + 1) * block_size, total)
        for step in range(steps):
            masked = ids[lo:hi] == mask_id
            if not masked.any():
                break
            logits = _forward_logits(lm, ids[:hi], blocks[:hi])[lo:hi].float()
            forwards += 1
            logits[:, mask_id] = float("-inf")
            conf, tokens = torch.softmax(logits, dim=-1).max(dim=-1)
            conf = torch.where(masked, conf, float("-inf"))
            k = min(counts[step], int(masked.sum()))
            picked = torch.topk(conf, k).indices
            ids[lo + picked] = tokens[picked]
        forwards += 1  # the commit pass
    return ids[n_prompt:n_prompt + gen_length].tolist(), forwards


def _prompt(length: int, seed: int, vocab_limit: int) -> Encoded:
    ids = torch.randint(0, vocab_limit, (length,), generator=torch.Generator().manual_seed(seed))
    return Encoded(input_ids=ids, labels=torch.full((length,), IGNORE_INDEX),
                   mm_token_type_ids=torch.zeros(length, dtype=torch.long),
                   position_ids=torch.arange(length)[None].expand(3, -1).clone(), next_position=length,
                   vision=None)


@pytest.fixture(scope="module", params=["random", "confident"])
def diffusionvl_lm(request, dvlm_checkpoints):
    lm = dvlm.load(dvlm_checkpoints["diffusionvl"])
    return sharpen(lm) if request.param == "confident" else lm


@pytest.mark.parametrize("prompt_len,block_size,steps,gen_length", [
    (5, 8, 4, 16),  # the case: 3 masks in the first block, fewer steps than B
    (13, 8, 4, 11),  # a complete prompt block prefilled, then a 5-token tail
    (16, 8, 8, 16),  # the published setting, prompt a multiple of B
    (21, 8, 3, 12),
    (5, 64, 8, 6),  # B >= P + G: one block of P + G positions
])
def test_block_decoder_equals_diffusionvl_rules(diffusionvl_lm, monkeypatch, prompt_len, block_size, steps,
                                                gen_length):
    lm = diffusionvl_lm
    monkeypatch.setattr(lm.diffusion, "eos_token_ids", [])  # compare whole answers
    prompt = _prompt(prompt_len, seed=prompt_len, vocab_limit=lm.mask_token_id)
    expected, forwards = reference_decode(lm, prompt.input_ids, block_size, steps, gen_length)
    cfg = DecodeConfig(decoder="block", block_size=block_size, steps=steps, max_new_tokens=gen_length)
    out = generate_block(lm, [prompt], cfg)[0]
    assert out.tokens == expected
    # No commit after the last block, and the first pass runs in the prefill forward (where the
    # prompt has a complete block, so that there is a prefill).
    assert out.nfe == forwards - 1 - (prompt_len >= block_size)
    plain = generate_block(lm, [prompt], dataclasses.replace(cfg, fuse_prefill=False))[0]
    assert plain.tokens == expected and plain.nfe == forwards - 1
