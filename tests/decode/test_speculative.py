"""Invariant 5: self-speculative greedy decoding (linear and quadratic) == AR greedy decoding;
the sampling accept rule; the quadratic variant's fused verify + draft pass."""

import pytest
import torch

import dvlm
from dvlm.config import ConfigError, DecodeConfig, Sampling
from dvlm.convert.verify import probe_image
from dvlm.decode.prefill import prefill
from dvlm.decode.prompts import plain_prompts
from dvlm.decode.sampling import RowSampler
from dvlm.decode.speculative import (
    accept_drafts,
    generate_speculative,
    generate_speculative_quadratic,
)
from dvlm.model.cache import KVContext, RecomputeContext

TEXTS = ["What colour is the circle?", "Read the digits.", "Describe the image. Where is the red square?", "Hi"]
IMAGES = [[probe_image()], [probe_image(84), probe_image()], [probe_image(112)], []]


@pytest.fixture(scope="module")
def lm(fast_checkpoint):
    return dvlm.load(fast_checkpoint)


@pytest.fixture(scope="module")
def ar_outputs(lm):
    return lm.generate(TEXTS, IMAGES, decoder="ar", max_new_tokens=24)


def spec_forwards(accept_lengths: list[int], fuse_prefill: bool = True) -> int:
    """The forwards `spec` runs for these blocks: the prefill, a verify pass per block and a draft
    pass per block whose drafts were not made beforehand: in the prefill (the first block, fused),
    or, after a verify pass over drafts made beforehand that accepted one token, in that pass."""
    forwards, premade = 1, fuse_prefill
    for accepted in accept_lengths:
        forwards += 1 if premade else 2
        premade = premade and accepted == 1
    return forwards


@pytest.mark.parametrize("block_size", [2, 3, 4, 8, 16, 32])
def test_speculative_greedy_equals_ar_greedy(lm, ar_outputs, block_size):
    spec = lm.generate(TEXTS, IMAGES, decoder="spec", block_size=block_size, max_new_tokens=24)
    assert [o.tokens for o in spec] == [o.tokens for o in ar_outputs]
    for out in spec:
        # Every block keeps at least 1 and at most B tokens.
        assert out.nfe == spec_forwards(out.accept_lengths)
        assert all(1 <= n <= block_size for n in out.accept_lengths)
        assert sum(out.accept_lengths) + 1 >= len(out.tokens)  # the last seed may end the answer without a block


@pytest.mark.parametrize("block_size", [2, 3, 8, 16])
def test_quadratic_greedy_equals_ar_greedy(lm, ar_outputs, block_size):
    spec = lm.generate(TEXTS, IMAGES, decoder="spec-quadratic", block_size=block_size, max_new_tokens=24)
    assert [o.tokens for o in spec] == [o.tokens for o in ar_outputs]
    for out in spec:
        # 1 prefill with the first draft + 1 fused verify-and-draft forward per block.
        assert out.nfe == 1 + len(out.accept_lengths)
        assert all(1 <= n <= block_size for n in out.accept_lengths)


@pytest.mark.parametrize("decoder", ["spec", "spec-quadratic"])
def test_speculative_rows_alone_equal_batched(lm, decoder):
    batched = lm.generate(TEXTS, IMAGES, decoder=decoder, block_size=4, max_new_tokens=16)
    alone = [lm.generate(t, i, decoder=decoder, block_size=4, max_new_tokens=16) for t, i in zip(TEXTS, IMAGES)]
    assert [o.tokens for o in batched] == [o.tokens for o in alone]
    assert [o.accept_lengths for o in batched] == [o.accept_lengths for o in alone]


@pytest.mark.parametrize("generate", [generate_speculative, generate_speculative_quadratic])
def test_speculative_cache_equals_recomputation(lm, generate):
    prompts = [lm.encode(t, i) for t, i in zip(TEXTS[:2], IMAGES[:2])]
    cfg = DecodeConfig(decoder="spec", block_size=4, max_new_tokens=16)
    cached = generate(lm, prompts, cfg)
    recomputed = generate(lm, prompts, cfg, context_cls=RecomputeContext)
    assert [o.tokens for o in cached] == [o.tokens for o in recomputed]
    assert [o.accept_lengths for o in cached] == [o.accept_lengths for o in recomputed]


@torch.inference_mode()
def test_commit_and_draft_equals_separate_passes(lm):
    """The fused pass's hidden states equal a commit followed by each draft block peeked alone
    over the context cut back to its prefix (RecomputeContext's reference semantics)."""
    prompts = [lm.encode(t, i) for t, i in zip(TEXTS[:2], IMAGES[:2])]
    gen = torch.Generator().manual_seed(0)
    width, n_drafts, d_len = 5, 3, 4
    block = torch.randint(0, lm.mask_token_id, (2, width), generator=gen)
    drafts = torch.randint(0, lm.mask_token_id, (2, n_drafts, d_len), generator=gen)
    prefix = torch.tensor([0, 2, 5])
    results = []
    for context_cls in (KVContext, RecomputeContext):
        pre = prefill(lm, plain_prompts(lm, prompts), context_cls)
        ctx, position = pre.context, pre.next_position
        offsets = prefix[None, :, None] + torch.arange(d_len)[None, None, :]
        d_positions = lm.positions.along_axes(position[:, None, None] + offsets)
        ids = torch.full_like(block, ctx.next_block_id())
        hidden, d_hidden = ctx.commit_and_draft(
            (lm.adapter.embed(lm.model, block), lm.positions.text(position, width), torch.ones_like(block, dtype=torch.bool), ids),
            (lm.adapter.embed(lm.model, drafts), d_positions, prefix, None),
        )
        after = ctx.peek(lm.adapter.embed(lm.model, block[:, :1]), lm.positions.text(position + width, 1),
                         torch.ones(2, 1, dtype=torch.bool), torch.full((2, 1), ctx.next_block_id()), "causal")
        results.append((hidden, d_hidden, after, ctx.length))
    (h1, d1, a1, n1), (h2, d2, a2, n2) = results
    assert n1 == n2  # only the committed block stayed in the context
    assert torch.allclose(h1, h2, atol=1e-5)
    assert torch.allclose(d1, d2, atol=1e-5)
    assert torch.allclose(a1, a2, atol=1e-5)
    # A draft that sees a different prefix gets different hidden states: the masks matter.
    assert not torch.allclose(d1[:, 0], d1[:, 1], atol=1e-3)


@pytest.mark.parametrize("decoder", ["spec", "spec-quadratic"])
def test_speculative_needs_the_fast_dvlm_recipe(dvlm_checkpoints, decoder):
    lm = dvlm.load(dvlm_checkpoints["diffusionvl"])
    with pytest.raises(ConfigError, match="token-shift"):
        lm.generate("Hi", decoder=decoder)


def test_greedy_accept_rule_literal():
    # Block [s, d1, d2, d3]; the verifier agrees with d1 only, then says 7 instead of d2.
    block = torch.tensor([[5, 1, 2, 3]])
    vocab = 10
    verify = torch.full((1, 4, vocab), -10.0)
    for i, tok in enumerate([1, 7, 3, 9]):
        verify[0, i, tok] = 10.0
    greedy = RowSampler([Sampling()], [None], [])
    accepted, seed = accept_drafts(block, None, verify, greedy)
    assert accepted.tolist() == [2] and seed.tolist() == [7]
    verify[0, 1, 7] = -10.0
    verify[0, 1, 2] = 10.0  # now all drafts agree: keep the whole block, the bonus token seeds the next
    accepted, seed = accept_drafts(block, None, verify, greedy)
    assert accepted.tolist() == [4] and seed.tolist() == [9]


def test_sampling_accept_rule_preserves_the_target_distribution():
    """With drafts sampled from q, the emitted token at position 1 is distributed as p."""
    torch.manual_seed(0)
    rows, vocab = 40000, 5
    p_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    q_logits = torch.tensor([0.0, 1.5, 0.0, 1.0, 0.0])
    gen = torch.Generator().manual_seed(1)
    q = torch.softmax(q_logits, -1)
    drafts = torch.multinomial(q.expand(rows, vocab), 1, replacement=True, generator=gen)
    block = torch.cat([torch.zeros(rows, 1, dtype=torch.long), drafts], dim=1)  # (R, 2)
    verify = torch.stack([p_logits, torch.zeros(vocab)])[None].expand(rows, -1, -1)
    sampler = RowSampler([Sampling(temperature=1.0)] * rows, [None] * rows, [])  # torch's global stream
    accepted, seed = accept_drafts(block, q_logits[None, None].expand(rows, 1, -1), verify, sampler)
    emitted = torch.where(accepted == 2, block[:, 1], seed)
    freq = torch.bincount(emitted, minlength=vocab).float() / rows
    assert torch.allclose(freq, torch.softmax(p_logits, -1), atol=0.01)
    assert 0.3 < (accepted == 2).float().mean() < 0.95  # the rule both accepts and rejects


@pytest.mark.parametrize("decoder", ["spec", "spec-quadratic"])
def test_speculative_sampling_is_reproducible(lm, decoder):
    kw = dict(decoder=decoder, temperature=1.0, max_new_tokens=12, block_size=4)
    assert lm.generate("Read the digits.", IMAGES[0], seed=3, **kw).tokens == \
        lm.generate("Read the digits.", IMAGES[0], seed=3, **kw).tokens
