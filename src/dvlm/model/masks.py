"""Every attention mask dvlm uses, as pure functions of block ids, validity and a mask kind.

Convention: boolean masks, `True` = the query may attend to the key. `to_additive` turns them into
the float 4-D masks transformers uses as-is (0 where allowed, `finfo.min` elsewhere; `-inf` would
turn a fully masked row into NaN in eager attention).

Blocks are contiguous runs of positions with non-decreasing ids, so "clean tokens strictly before
the first token of my block" is simply `key_block < query_block`.
"""

from __future__ import annotations

import torch

MASK_KINDS = ("causal", "block_causal", "bidirectional")


def absolute_block_ids(length: int, block_size: int, device: torch.device | None = None) -> torch.Tensor:
    """Block id = position // B over the whole sequence (DiffusionVL). Returns (L,) long.

    >>> absolute_block_ids(5, 2)
    tensor([0, 0, 1, 1, 2])
    """
    return torch.arange(length, device=device) // block_size


def response_block_ids(response: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks laid out per response, the last block truncated at the response end (Fast-dVLM).

    Each maximal run of response tokens is cut into blocks of `block_size` starting at its first
    token; each run of non-response tokens (system, vision, prompt, padding) is one context block.

    Args:
        response: (R, L) bool, True on response (labelled) tokens.
    Returns:
        (R, L) long block ids, non-decreasing along each row.

    Example, B=2, response = [0 0 1 1 1 0 1]:
        block ids          = [0 0 1 1 2 3 4]
    """
    _, length = response.shape
    index = torch.arange(length, device=response.device).expand_as(response)
    run_start = torch.ones_like(response)
    run_start[:, 1:] = response[:, 1:] != response[:, :-1]
    # Offset of each token inside its run: index minus the index where the run began.
    begin = torch.cummax(torch.where(run_start, index, torch.zeros_like(index)), dim=1).values
    offset = index - begin
    new_block = run_start | (response & (offset % block_size == 0))
    return torch.cumsum(new_block.long(), dim=1) - 1


def block_starts(block: torch.Tensor) -> torch.Tensor:
    """(R, L) bool: True at the first position of each block."""
    start = torch.ones_like(block, dtype=torch.bool)
    start[:, 1:] = block[:, 1:] != block[:, :-1]
    return start


def context_mask(
    query_block: torch.Tensor,
    key_block: torch.Tensor,
    key_valid: torch.Tensor,
    kind: str,
    query_offset: int = 0,
) -> torch.Tensor:
    """Attention among clean tokens: the AR model's own mask, or a block-causal one.

    Queries are the last Q positions of the K keys (a prefill has Q == K; a block forward over a
    KV cache of T entries has K = T + Q and query_offset = T).

    Args:
        query_block: (R, Q) block ids of the queries.
        key_block: (R, K) block ids of the keys.
        key_valid: (R, K) bool, False on padding.
        kind: `causal` (key index <= query index), `block_causal` (key block <= query block) or
            `bidirectional` (every valid key).
        query_offset: index of the first query among the keys.
    Returns:
        (R, Q, K) bool.

    Example, kind=block_causal, blocks [0 0 1], all valid:   causal:
        1 1 0                                                 1 0 0
        1 1 0                                                 1 1 0
        1 1 1                                                 1 1 1
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r} is not one of {MASK_KINDS}")
    bsz, q_len = query_block.shape
    k_len = key_block.shape[1]
    if kind == "causal":
        q_index = torch.arange(q_len, device=key_block.device) + query_offset
        k_index = torch.arange(k_len, device=key_block.device)
        allowed = (k_index[None, :] <= q_index[:, None]).expand(bsz, q_len, k_len)
    elif kind == "block_causal":
        allowed = key_block[:, None, :] <= query_block[:, :, None]
    else:
        allowed = torch.ones(bsz, q_len, k_len, dtype=torch.bool, device=key_block.device)
    return allowed & key_valid[:, None, :]


def commit_and_draft_mask(
    key_valid: torch.Tensor,
    key_block: torch.Tensor,
    commit_valid: torch.Tensor,
    commit_block: torch.Tensor,
    prefix: torch.Tensor,
    draft_len: int,
    kind: str = "causal",
) -> torch.Tensor:
    """One forward over a KV cache that commits a block and drafts C blocks branching off it.

    Keys: the T cached entries, the Q committed tokens, then C draft blocks of `draft_len` tokens.
    The committed tokens attend to the cache and themselves with the clean mask `kind` (`causal`:
    the AR model's; `block_causal`: by their block ids, as a block-causal prefill); draft block c
    sees the cache, the first prefix[c] committed tokens and itself (bidirectionally), never
    another draft.

    Args:
        key_valid, key_block: (R, T) of the cache.
        commit_valid, commit_block: (R, Q) of the committed block.
        prefix: (C,) long, committed tokens each draft block sees.
    Returns:
        (R, Q + C * draft_len, T + Q + C * draft_len) bool.

    Example, T=1, Q=2, two drafts of 1 token, prefix [0, 2]  (keys: cache, c0, c1, d0, d1):
        c0  1 1 0 0 0
        c1  1 1 1 0 0
        d0  1 0 0 1 0
        d1  1 1 1 0 1
    """
    rows, q_len = commit_valid.shape
    cached = key_valid.shape[1]
    n_drafts = prefix.shape[0]
    d_total = n_drafts * draft_len
    keys_valid = torch.cat([key_valid, commit_valid], dim=1)
    keys_block = torch.cat([key_block, commit_block], dim=1)
    commit_rows = context_mask(commit_block, keys_block, keys_valid, kind, query_offset=cached)
    commit_rows = torch.cat([commit_rows, commit_rows.new_zeros(rows, q_len, d_total)], dim=2)
    sees_committed = torch.arange(q_len, device=prefix.device)[None, :] < prefix[:, None]  # (C, Q)
    draft_id = torch.arange(n_drafts, device=prefix.device).repeat_interleave(draft_len)  # (C*L,)
    draft_rows = torch.cat([
        key_valid[:, None, :].expand(-1, d_total, -1),
        sees_committed.repeat_interleave(draft_len, dim=0)[None] & commit_valid[:, None, :],
        (draft_id[:, None] == draft_id[None, :])[None].expand(rows, -1, -1),
    ], dim=2)
    return torch.cat([commit_rows, draft_rows], dim=1)


def two_stream_mask(
    noisy_block: torch.Tensor,
    noisy_group: torch.Tensor,
    noisy_valid: torch.Tensor,
    clean_block: torch.Tensor,
    clean_valid: torch.Tensor,
    clean_kind: str,
) -> torch.Tensor:
    """The training mask over `[noisy stream ; clean stream]` (BD3-LM's vectorised layout).

    * N2N: a noisy token sees the noisy tokens of its own group (its block, in its copy).
    * N2C: a noisy token sees clean tokens of strictly earlier blocks.
    * C2C: `context_mask(clean_kind)`: token-causal (Fast-dVLM) or block-causal (BD3-LM).
    * Clean tokens never see noisy ones.

    Args:
        noisy_block: (R, N) block id (in the clean sequence) of each noisy token.
        noisy_group: (R, N) N2N group: the block id, made distinct per complementary copy.
        noisy_valid: (R, N) bool.
        clean_block: (R, L) block ids of the clean sequence.
        clean_valid: (R, L) bool.
        clean_kind: `causal` or `block_causal`.
    Returns:
        (R, N + L, N + L) bool.

    Example, B=2, clean = [p p r r r] with blocks [0 0 1 1 2], noisy = the 3 response tokens,
    causal clean stream (rows/cols: n1 n2 n3 | c0 c1 c2 c3 c4):
        n1  1 1 0 | 1 1 0 0 0
        n2  1 1 0 | 1 1 0 0 0
        n3  0 0 1 | 1 1 1 1 0
        c0  0 0 0 | 1 0 0 0 0
        ...         (lower-triangular)
    """
    bsz, n_noisy = noisy_block.shape
    n_clean = clean_block.shape[1]
    n2n = noisy_group[:, :, None] == noisy_group[:, None, :]  # (R, N, N)
    n2c = clean_block[:, None, :] < noisy_block[:, :, None]  # (R, N, L)
    c2c = context_mask(clean_block, clean_block, torch.ones_like(clean_valid), clean_kind)
    c2n = torch.zeros(bsz, n_clean, n_noisy, dtype=torch.bool, device=noisy_block.device)
    mask = torch.cat([torch.cat([n2n, n2c], dim=2), torch.cat([c2n, c2c], dim=2)], dim=1)
    key_valid = torch.cat([noisy_valid, clean_valid], dim=1)
    return mask & key_valid[:, None, :]


def to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R, Q, K) bool -> (R, 1, Q, K) float: 0 where allowed, the dtype's most negative value elsewhere."""
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    additive.masked_fill_(~mask, torch.finfo(dtype).min)
    return additive[:, None]
