"""Exact forward counts, acceptance and per-pass counts on a model whose predictions are known
(tests/decode/scripted.py): what random weights cannot pin, because their drafts are rejected,
their guesses wrong and their confidences below any useful threshold."""

import pytest
import torch

from dvlm.config import DecodeConfig
from dvlm.decode.block import generate_block
from dvlm.decode.speculative import generate_speculative, generate_speculative_quadratic

from .scripted import prompt, script_token, scripted_lm

P = 8  # prompt length: the answer starts at position 8


def _script(start: int, n: int) -> list[int]:
    return script_token(torch.arange(start, start + n)).tolist()


@pytest.mark.parametrize("fuse_prefill", [True, False])
@pytest.mark.parametrize("block_size", [4, 8])
def test_speculative_accepts_every_draft_of_an_agreeing_model(block_size, fuse_prefill):
    """Every draft is accepted, the first one too: made in the prefill forward (fused), it
    drafts the positions after the seed (a draft one position off would be rejected)."""
    lm = scripted_lm()
    out = generate_speculative(lm, [prompt(P)], DecodeConfig(decoder="spec", block_size=block_size,
                                                               max_new_tokens=3 * block_size,
                                                               fuse_prefill=fuse_prefill))[0]
    assert out.tokens == _script(P, 3 * block_size)
    assert out.accept_lengths == [block_size] * 3  # a draft at the wrong positions is rejected
    # The prefill (with the first draft when fused), then a draft (unless made already) and a verify per block.
    assert out.nfe == (2 * 3 if fuse_prefill else 1 + 2 * 3)


@pytest.mark.parametrize("fuse_prefill", [True, False])
def test_quadratic_speculative_accepts_every_draft_of_an_agreeing_model(fuse_prefill):
    lm = scripted_lm()
    out = generate_speculative_quadratic(lm, [prompt(P)], DecodeConfig(decoder="spec-quadratic", block_size=4,
                                                                         max_new_tokens=12,
                                                                         fuse_prefill=fuse_prefill))[0]
    assert out.tokens == _script(P, 12)
    # Candidate n drafts behind the verifier's own token at its position: here always right.
    assert out.accept_lengths == [4, 4, 4]
    assert out.nfe == (1 + 3 if fuse_prefill else 1 + 1 + 3)


def test_threshold_unmasks_every_confident_position_in_one_pass():
    """B=8 from position 8: masks at 9..15, of which 12 is predicted with low confidence: the
    first pass unmasks the 6 others, the fallback unmasks 12 alone in the second."""
    lm = scripted_lm()
    cfg = DecodeConfig(decoder="block", block_size=8, threshold=0.9, max_new_tokens=24, fuse_commit=False)
    out = generate_block(lm, [prompt(P)], cfg)[0]
    assert out.tokens == _script(P, 24)
    assert out.tokens_per_step == [6, 1] * 3
    assert out.nfe == 1 + 3 * 2 + 2  # prefill, 2 passes per block, a commit between blocks
    # From position 10, masks at 11..17 hold two low-confidence positions (12 and 16).
    out = generate_block(lm, [prompt(10)], cfg)[0]
    assert out.tokens_per_step == [5, 1, 1] * 3


def test_sub_blocks_with_a_threshold():
    lm = scripted_lm()
    cfg = DecodeConfig(decoder="block", block_size=8, sub_block_size=4, threshold=0.9, max_new_tokens=8,
                       fuse_commit=False)
    # Sub-block 1 holds masks 9, 10, 11 (all confident); sub-block 2 holds 12 (low), 13, 14, 15.
    assert generate_block(lm, [prompt(P)], cfg)[0].tokens_per_step == [3, 3, 1]


def test_fused_commit_saves_one_forward_per_commit():
    """The last pass always guesses the next seed right here, so every commit is fused with
    the next block's first pass: exactly one forward saved per block after the first."""
    lm = scripted_lm()
    kw = dict(decoder="block", block_size=8, threshold=0.9, max_new_tokens=24)
    fused = generate_block(lm, [prompt(P)], DecodeConfig(**kw))[0]
    plain = generate_block(lm, [prompt(P)], DecodeConfig(fuse_commit=False, **kw))[0]
    assert fused.tokens == plain.tokens == _script(P, 24)
    assert fused.tokens_per_step == plain.tokens_per_step
    assert plain.nfe == 9
    assert fused.nfe == 7


def test_response_layout_first_block_is_cut_to_the_budget():
    """N2: B=64 with 6 new tokens decodes a first block of 6 positions, not 64: with one token
    per pass, 5 passes after the prefill (it took 63)."""
    lm = scripted_lm()
    cfg = DecodeConfig(decoder="block", block_size=64, steps=64, max_new_tokens=6)
    out = generate_block(lm, [prompt(P)], cfg)[0]
    assert out.tokens == _script(P, 6)
    assert out.tokens_per_step == [1] * 5
    assert out.nfe == 1 + 5


def test_absolute_layout_answer_that_fits_in_the_first_block():
    """DiffusionVL decodes P + G <= B as one block of exactly P + G positions: 6 masks, with
    DiffusionVL's counts for B=64 in 64 steps (1 per pass), no prefill (no complete block)."""
    lm = scripted_lm("diffusionvl", block_size=64, decode_steps=64)
    out = generate_block(lm, [prompt(P)], DecodeConfig(decoder="block", max_new_tokens=6))[0]
    assert out.tokens_per_step == [1] * 6
    assert out.nfe == 6
    # Without token shift, output p predicts p + 1, so the scripted answer is the script shifted by one.
    assert out.tokens == _script(P + 1, 6)


def test_absolute_layout_rows_of_both_kinds_in_one_batch():
    """Row 0's answer fits in its first block (3 + 4 <= 8), row 1's does not (7 + 4 > 8): decoded
    together, each row equals itself decoded alone."""
    lm = scripted_lm("diffusionvl", block_size=8, decode_steps=8)
    cfg = DecodeConfig(decoder="block", max_new_tokens=4)
    batched = generate_block(lm, [prompt(3), prompt(7)], cfg)
    alone = [generate_block(lm, [prompt(n)], cfg)[0] for n in (3, 7)]
    assert [o.tokens for o in batched] == [o.tokens for o in alone]
    # Row 0: 4 passes over its 7 positions. Row 1 (no complete prompt block, no prefill): its
    # first block [7 prompt tokens, 1 mask] takes 1 pass and a commit, the next block 8 passes.
    assert [o.nfe for o in batched] == [o.nfe for o in alone] == [4, 1 + 1 + 8]


@pytest.mark.parametrize("fuse_prefill", [True, False])
def test_absolute_layout_first_pass_in_the_prefill(fuse_prefill):
    """P=10, B=8: the prompt's complete block (8 tokens) is prefilled, its 2-token tail opens
    block 1 with 6 masks, one per pass (B=8 in 8 steps). Fused, the first of those passes runs in
    the prefill forward: 6 forwards in all, against the prefill + 6."""
    lm = scripted_lm("diffusionvl", block_size=8, decode_steps=8)
    out = generate_block(lm, [prompt(10)], DecodeConfig(decoder="block", max_new_tokens=4,
                                                         fuse_prefill=fuse_prefill))[0]
    assert out.tokens == _script(10 + 1, 4)  # no token shift: output p predicts p + 1 and lands there
    assert out.tokens_per_step == [1] * 6
    assert out.nfe == (6 if fuse_prefill else 1 + 6)


@pytest.mark.parametrize("fuse_prefill", [True, False])
def test_response_layout_without_token_shift_first_pass_in_the_prefill(fuse_prefill):
    """B=8 from position 8, no token shift: position q holds script(q + 1), predicted with low
    confidence at q = 11 and 15; the first pass unmasks the 6 others, then one per pass."""
    lm = scripted_lm(token_shift=False)
    cfg = DecodeConfig(decoder="block", block_size=8, threshold=0.9, max_new_tokens=8, fuse_prefill=fuse_prefill)
    out = generate_block(lm, [prompt(P)], cfg)[0]
    assert out.tokens == _script(P + 1, 8)
    assert out.tokens_per_step == [6, 1, 1]
    assert out.nfe == (3 if fuse_prefill else 1 + 3)


def test_a_draft_rejected_at_once_rolls_over_to_the_next_block():
    """Every draft gets position 9 wrong. The first draft, made in the prefill forward without the
    seed (position 8), drafts 9 from a mask and is rejected at once (1 token accepted); the verify
    pass also drafted [seed, MASK * 3], whose outputs draft 10..12 behind the verifier's token at
    9: the next block needs no draft pass and is accepted whole. Unfused, the draft sees the seed
    and drafts 9 from it: every block is accepted."""
    lm = scripted_lm(hard_positions=(P + 1,))
    cfg = dict(decoder="spec", block_size=4, max_new_tokens=12)
    fused = generate_speculative(lm, [prompt(P)], DecodeConfig(**cfg))[0]
    plain = generate_speculative(lm, [prompt(P)], DecodeConfig(fuse_prefill=False, **cfg))[0]
    assert fused.tokens == plain.tokens == _script(P, 12)
    assert fused.accept_lengths == [1, 4, 4, 4] and plain.accept_lengths == [4, 4, 4]
    # fused: prefill + first draft, verify (+ next draft), verify, draft + verify, draft + verify
    assert fused.nfe == 1 + 1 + 1 + 2 + 2
    assert plain.nfe == 1 + 3 * 2
