"""Joining decode contexts: rows of different lengths merge into one rectangular context, padded
with invalid entries (literally), and the cached join equals the recomputed join (invariant 4)."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import dvlm
from dvlm.convert.verify import probe_image
from dvlm.decode.prefill import prefill
from dvlm.decode.prompts import plain_prompts
from dvlm.model.cache import (
    KVContext,
    PreallocatedLayer,
    RecomputeContext,
    joined_layer,
)


@pytest.fixture(scope="module")
def lm(fast_checkpoint):
    return dvlm.load(fast_checkpoint)


def _states(rows, length, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 4, generator=gen), torch.randn(rows, 2, length, 4, generator=gen)


@pytest.mark.parametrize("layer_cls", [PreallocatedLayer, DynamicLayer])
def test_joined_layer_right_aligns_each_side_and_pads_with_zeros(layer_cls):
    """1 row of 3 entries joins 2 rows of 5: its entries sit in the last 3 columns, zeros before."""
    make = (lambda: PreallocatedLayer(capacity=4)) if layer_cls is PreallocatedLayer else DynamicLayer
    long, short = make(), make()
    long_k, long_v = _states(2, 5, 0)
    short_k, short_v = _states(1, 3, 1)
    long.update(long_k, long_v)
    short.update(short_k, short_v)
    joined = joined_layer(long, short, (2, 1), 5)
    assert type(joined) is layer_cls and joined.get_seq_length() == 5
    assert torch.equal(joined.keys[:2], long_k) and torch.equal(joined.values[:2], long_v)
    assert torch.equal(joined.keys[2, :, 2:], short_k[0]) and torch.equal(joined.values[2, :, 2:], short_v[0])
    assert not joined.keys[2, :, :2].any() and not joined.values[2, :, :2].any()
    more_k, more_v = _states(3, 2, 2)
    joined.update(more_k, more_v)  # the joined layer keeps growing like any other
    assert joined.get_seq_length() == 7 and torch.equal(joined.keys[:, :, 5:], more_k)


def _context(lm, context_cls, length, first_block=0):
    """A context of one row with `length` committed entries (random embeddings), its last entry
    at position length - 1."""
    gen = torch.Generator().manual_seed(length)
    ctx = context_cls(lm.adapter, lm.model, 1, torch.device("cpu"))
    embeds = torch.randn(1, length, lm.model.config.text_config.hidden_size, generator=gen)
    ctx.commit(embeds, lm.positions.text(torch.tensor([0]), length), torch.ones(1, length, dtype=torch.bool),
               torch.full((1, length), first_block), "causal")
    return ctx


@pytest.mark.parametrize("context_cls", [KVContext, RecomputeContext])
def test_join_of_lengths_3_and_5_literal(lm, context_cls):
    five, three = _context(lm, context_cls, 5, first_block=2), _context(lm, context_cls, 3)
    five.join(three)
    assert five.length == 5
    assert five.key_valid.int().tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert five.key_block.tolist() == [[2, 2, 2, 2, 2], [0, 0, 0, 0, 0]]
    assert five.next_block_id() == 3  # above every row's blocks
    three, five = _context(lm, context_cls, 3), _context(lm, context_cls, 5)
    three.join(five)  # the shorter context first: it is the one padded
    assert three.key_valid.int().tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


@torch.inference_mode()
def test_cached_join_equals_recomputed_join_and_each_row_alone(lm):
    """Two batches of prompts (different lengths, images) prefilled apart and joined; a block
    committed and a block peeked over the joined context give each row the hidden states it gets
    alone, in the cache and in the no-cache reference."""
    first = [lm.encode("Read the digits.", [probe_image(84), probe_image()]), lm.encode("Hi")]
    second = [lm.encode("What colour is the circle?", [probe_image()])]
    gen = torch.Generator().manual_seed(0)
    block = torch.randint(0, lm.mask_token_id, (3, 4), generator=gen)

    def run(context_cls, groups, rows):
        pres = [prefill(lm, plain_prompts(lm, g), context_cls) for g in groups]
        ctx, position = pres[0].context, torch.cat([p.next_position for p in pres])
        for pre in pres[1:]:
            ctx.join(pre.context)
        ids = block[rows]
        valid = torch.ones_like(ids, dtype=torch.bool)
        committed = ctx.commit(lm.adapter.embed(lm.model, ids), lm.positions.text(position, 4), valid,
                               torch.full_like(ids, ctx.next_block_id()), "causal")
        peeked = ctx.peek(lm.adapter.embed(lm.model, ids), lm.positions.text(position + 4, 4), valid,
                          torch.full_like(ids, ctx.next_block_id()), "bidirectional")
        return committed, peeked

    cached = run(KVContext, [first, second], [0, 1, 2])
    recomputed = run(RecomputeContext, [first, second], [0, 1, 2])
    alone = [run(KVContext, [[p]], [i]) for i, p in enumerate(first + second)]
    for a, b in zip(cached, recomputed):
        assert torch.allclose(a, b, atol=1e-5)
    for i, (committed, peeked) in enumerate(alone):
        assert torch.allclose(cached[0][i], committed[0], atol=1e-5)
        assert torch.allclose(cached[1][i], peeked[0], atol=1e-5)


@pytest.mark.parametrize("context_cls", [KVContext, RecomputeContext])
def test_rows_that_leave_take_their_width_with_them(lm, context_cls):
    """A short row joins a long one; when the long row leaves, the columns only it used go."""
    long, short = _context(lm, context_cls, 6), _context(lm, context_cls, 2)
    long.join(short)
    long.select_rows(torch.tensor([1]))
    assert long.length == 2 and long.key_valid.all()
    if context_cls is KVContext:
        assert all(layer.get_seq_length() == 2 for layer in long.cache.layers)
    else:
        assert long.embeds.shape[1] == 2 and long.key_kind.shape == (1, 2)


@pytest.mark.parametrize("context_cls", [KVContext, RecomputeContext])
def test_join_with_an_empty_context(lm, context_cls):
    """A context that committed nothing yet (DiffusionVL's prompt shorter than a block) joins and is joined."""
    empty = context_cls(lm.adapter, lm.model, 2, torch.device("cpu"))
    filled = _context(lm, context_cls, 4)
    filled.join(empty)
    assert filled.key_valid.int().tolist() == [[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    empty = context_cls(lm.adapter, lm.model, 1, torch.device("cpu"))
    empty.join(_context(lm, context_cls, 3))
    assert empty.key_valid.int().tolist() == [[0, 0, 0], [1, 1, 1]]
    both = context_cls(lm.adapter, lm.model, 1, torch.device("cpu"))
    both.join(context_cls(lm.adapter, lm.model, 1, torch.device("cpu")))
    assert both.key_valid.shape == (2, 0)


@torch.inference_mode()
@pytest.mark.parametrize("capacity", [None, 64])  # DynamicLayer, PreallocatedLayer
def test_peek_of_some_rows_equals_their_rows_of_a_whole_batch_peek(lm, capacity):
    """`peek_rows` (spec's draft pass for the rows without a draft) gives those rows' hidden states
    of a whole-batch peek, over rows of different lengths (a joined context), and leaves the
    context as it was: its entries, validity and a later commit's results."""
    def joined():
        ctx = KVContext(lm.adapter, lm.model, 1, torch.device("cpu"), capacity=capacity)
        gen = torch.Generator().manual_seed(7)
        hidden_size = lm.model.config.text_config.hidden_size
        ctx.commit(torch.randn(1, 6, hidden_size, generator=gen), lm.positions.text(torch.tensor([0]), 6),
                   torch.ones(1, 6, dtype=torch.bool), torch.zeros(1, 6, dtype=torch.long), "causal")
        for length in (3, 5):
            other = KVContext(lm.adapter, lm.model, 1, torch.device("cpu"), capacity=capacity)
            other.commit(torch.randn(1, length, hidden_size, generator=gen), lm.positions.text(torch.tensor([0]), length),
                         torch.ones(1, length, dtype=torch.bool), torch.zeros(1, length, dtype=torch.long), "causal")
            ctx.join(other)
        return ctx

    ctx = joined()
    block = torch.randint(0, lm.mask_token_id, (3, 4), generator=torch.Generator().manual_seed(1))
    query = (lm.adapter.embed(lm.model, block), lm.positions.text(torch.tensor([6, 3, 5]), 4),
             torch.ones_like(block, dtype=torch.bool), torch.full_like(block, ctx.next_block_id()))
    whole = ctx.peek(*query, "bidirectional")
    rows = torch.tensor([0, 2])
    some = ctx.peek_rows(rows, *query, "bidirectional")
    assert some.shape[0] == 2 and torch.allclose(some, whole[rows], atol=1e-5)
    assert not torch.equal(some[1], whole[1])  # row 2's own states, not row 1's
    assert ctx.length == 6 and all(layer.get_seq_length() == 6 for layer in ctx.cache.layers)
    reference = joined()
    assert torch.equal(ctx.commit(*query, "causal"), reference.commit(*query, "causal"))
