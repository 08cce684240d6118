"""Invariant 6: every mask equals a literal expected matrix in a small case."""

import torch

from dvlm.model.masks import (
    absolute_block_ids,
    block_starts,
    commit_and_draft_mask,
    context_mask,
    response_block_ids,
    to_additive,
    two_stream_mask,
)

T = torch.tensor


def test_absolute_block_ids():
    assert absolute_block_ids(5, 2).tolist() == [0, 0, 1, 1, 2]


def test_response_block_ids_truncate_at_response_end():
    # B=2; context run, a 3-token response (blocks of 2 then a truncated 1), context, response.
    response = T([[0, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    assert response_block_ids(response, 2).tolist() == [[0, 0, 1, 1, 2, 3, 4]]


def test_response_block_ids_two_turns_never_share_a_block():
    response = T([[0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert response_block_ids(response, 4).tolist() == [[0, 1, 1, 2, 2, 3, 3, 3, 3, 4, 5]]


def test_block_starts():
    assert block_starts(T([[0, 0, 1, 1, 2]])).tolist() == [[True, False, True, False, True]]


def test_context_mask_causal_with_padding():
    blocks = T([[0, 0, 0]])
    valid = T([[False, True, True]])  # left padding
    expected = T([[[0, 0, 0],
                   [0, 1, 0],
                   [0, 1, 1]]], dtype=torch.bool)
    assert torch.equal(context_mask(blocks, blocks, valid, "causal"), expected)


def test_context_mask_block_causal():
    blocks = T([[0, 0, 1]])
    expected = T([[[1, 1, 0],
                   [1, 1, 0],
                   [1, 1, 1]]], dtype=torch.bool)
    assert torch.equal(context_mask(blocks, blocks, torch.ones(1, 3, dtype=torch.bool), "block_causal"), expected)


def test_context_mask_block_over_cache():
    # Two cached entries, then a 2-token block at query_offset 2.
    keys = T([[0, 0, 1, 1]])
    valid = torch.ones(1, 4, dtype=torch.bool)
    causal = context_mask(T([[1, 1]]), keys, valid, "causal", query_offset=2)
    bidir = context_mask(T([[1, 1]]), keys, valid, "bidirectional", query_offset=2)
    assert causal.tolist() == [[[1, 1, 1, 0], [1, 1, 1, 1]]]
    assert bidir.tolist() == [[[1, 1, 1, 1], [1, 1, 1, 1]]]


def _docstring_case(clean_kind):
    # clean = [p p r r r], B=2, response blocks [1 1 2]; noisy = the 3 response tokens.
    clean_block = T([[0, 0, 1, 1, 2]])
    noisy_block = T([[1, 1, 2]])
    ones = lambda n: torch.ones(1, n, dtype=torch.bool)  # noqa: E731
    return two_stream_mask(noisy_block, noisy_block, ones(3), clean_block, ones(5), clean_kind)


def test_two_stream_mask_token_causal_clean():
    expected = T([[
        # n1 n2 n3 | c0 c1 c2 c3 c4
        [1, 1, 0, 1, 1, 0, 0, 0],  # n1: own block + clean before its block (the prompt)
        [1, 1, 0, 1, 1, 0, 0, 0],  # n2
        [0, 0, 1, 1, 1, 1, 1, 0],  # n3: own block + clean blocks 0, 1
        [0, 0, 0, 1, 0, 0, 0, 0],  # clean: token-causal, never noisy
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ]], dtype=torch.bool)
    assert torch.equal(_docstring_case("causal"), expected)


def test_two_stream_mask_block_causal_clean():
    got = _docstring_case("block_causal")
    clean_rows = T([
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(got[0, 3:], clean_rows)


def test_two_stream_mask_complementary_copies_do_not_see_each_other():
    # Two copies of the same 2-token block (groups 1 and 11), clean = [p r r].
    clean_block = T([[0, 1, 1]])
    noisy_block = T([[1, 1, 1, 1]])
    group = T([[1, 1, 11, 11]])
    mask = two_stream_mask(noisy_block, group, torch.ones(1, 4, dtype=torch.bool), clean_block,
                           torch.ones(1, 3, dtype=torch.bool), "causal")
    assert mask[0, :4, :4].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert mask[0, :4, 4:].tolist() == [[1, 0, 0]] * 4


def test_two_stream_mask_padding_keys_invisible():
    clean_block = T([[0, 1, 1]])
    mask = two_stream_mask(T([[1, 1]]), T([[1, -1]]), T([[True, False]]), clean_block,
                           T([[True, True, False]]), "causal")
    assert not mask[:, :, 1].any() and not mask[:, :, 4].any()


def test_commit_and_draft_mask():
    # Cache of 2 entries (the first is padding), 2 committed tokens, drafts of 2 tokens seeing
    # 0 and 2 committed tokens.
    mask = commit_and_draft_mask(T([[0, 1]], dtype=torch.bool), T([[0, 0]]), T([[1, 1]], dtype=torch.bool),
                                 T([[1, 1]]), prefix=T([0, 2]), draft_len=2)
    expected = T([[
        # p  k  c0 c1 d0 d0 d1 d1
        [0, 1, 1, 0, 0, 0, 0, 0],  # c0: causal
        [0, 1, 1, 1, 0, 0, 0, 0],  # c1
        [0, 1, 0, 0, 1, 1, 0, 0],  # draft 0: cache and itself
        [0, 1, 0, 0, 1, 1, 0, 0],
        [0, 1, 1, 1, 0, 0, 1, 1],  # draft 1: cache, both committed tokens, itself
        [0, 1, 1, 1, 0, 0, 1, 1],
    ]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_commit_and_draft_mask_block_causal_commit():
    # A block-causal prefill of 3 tokens (blocks 1, 1, 2) after 1 cached entry, with the first
    # block's first pass (2 tokens) drafted after all 3: a block sees its whole self.
    mask = commit_and_draft_mask(T([[1]], dtype=torch.bool), T([[0]]), T([[1, 1, 1]], dtype=torch.bool),
                                 T([[1, 1, 2]]), prefix=T([3]), draft_len=2, kind="block_causal")
    expected = T([[
        # k  c0 c1 c2 d0 d1
        [1, 1, 1, 0, 0, 0],  # c0: block 1 sees block 1 whole
        [1, 1, 1, 0, 0, 0],  # c1
        [1, 1, 1, 1, 0, 0],  # c2: block 2
        [1, 1, 1, 1, 1, 1],  # the draft: cache, every committed token, itself
        [1, 1, 1, 1, 1, 1],
    ]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_to_additive():
    out = to_additive(T([[[True, False]]]), torch.float32)
    assert out.shape == (1, 1, 1, 2)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 1] == torch.finfo(torch.float32).min
