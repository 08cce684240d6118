"""Decoding contexts: the KV cache of everything decoded so far, with named semantics.

* `peek`: run a block over the context without keeping its keys/values (a denoising pass).
* `commit`: run a block and keep its keys/values (prefill, commit pass, AR step, verify pass).
* `commit_and_draft`: one forward that commits a block and peeks at blocks drafted after it
  (block decoding's fused commit, the quadratic speculative pass).
* `crop`: drop entries from the end; `crop_rows`: per row (rejected speculative tokens).
* `select_rows`: keep only some batch rows (finished rows leave the batch).
* `join`: append the rows of another context (rows that join a running batch between blocks).

Contexts are rectangular: (rows, entries) with per-entry validity (`key_valid`) and explicit
position ids, so rows of different lengths share one cache, padded with invalid entries.

`KVContext` is the real one. `RecomputeContext` has the same interface but keeps no cache: every
call recomputes the whole prefix from its embeddings. It is the reference that invariant 4
(cached decoding == uncached decoding) compares against.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer

from dvlm.model.adapters.base import Adapter
from dvlm.model.masks import (
    MASK_KINDS,
    commit_and_draft_mask,
    context_mask,
    to_additive,
)


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in buffers allocated once (doubled if outgrown).

    A forward writes its new entries in place, where DynamicLayer concatenates the whole cache
    (a copy of every cached entry, per layer, per forward); crop and row selection move an end
    index or index the buffers. `keys` / `values` are views of the first `length` entries.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.capacity, key_states.shape[3])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.capacity, value_states.shape[3])
        self.is_initialized = True
        self._views()

    def update(self, key_states, value_states, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.key_buffer.shape[-2]:
            self._grow(max(end, 2 * self.key_buffer.shape[-2]))
        self.key_buffer[..., self.length:end, :] = key_states
        self.value_buffer[..., self.length:end, :] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of entries to remove, got {tokens_to_remove}")
        if self.is_initialized:
            self.length = max(self.length + tokens_to_remove, 0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._views()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._views()

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` entries of every row (a view: no copy)."""
        if self.is_initialized and count:
            self.key_buffer, self.value_buffer = self.key_buffer[..., count:, :], self.value_buffer[..., count:, :]
            self.length -= count
            self._views()

    def _grow(self, size: int) -> None:
        def grown(buffer: torch.Tensor) -> torch.Tensor:
            new = buffer.new_empty(*buffer.shape[:2], size, buffer.shape[3])
            new[..., : self.length, :] = buffer[..., : self.length, :]
            return new

        self.key_buffer, self.value_buffer = grown(self.key_buffer), grown(self.value_buffer)

    def _views(self) -> None:
        self.keys = self.key_buffer[..., : self.length, :]
        self.values = self.value_buffer[..., : self.length, :]


def preallocate(cache: Any, capacity: int, layer_cls: type[PreallocatedLayer] = PreallocatedLayer) -> Any:
    """Swap a fresh cache's plain DynamicLayers for PreallocatedLayers (or a subclass; others are
    kept as they are)."""
    layers = getattr(cache, "layers", None)
    if layers and all(type(layer) is DynamicLayer and not layer.is_initialized for layer in layers):
        cache.layers = [layer_cls(capacity) for _ in layers]
    return cache


def joined_layer(first: Any, second: Any, rows: tuple[int, int], width: int) -> Any:
    """A cache layer holding the rows of `first`, then those of `second`, each row's entries
    right-aligned to `width` columns; the columns before a shorter layer's entries are zeros
    (finite: a masked entry still enters the attention product with weight 0).

    rows: (rows of first, rows of second). Returns a layer of `first`'s type.
    """
    for layer in (first, second):
        if type(layer) is not DynamicLayer and not isinstance(layer, PreallocatedLayer):
            raise NotImplementedError(f"joining cache layers of type {type(layer).__name__} (only full-attention "
                                      "DynamicLayer and PreallocatedLayer)")
    parts = [_entries(first), _entries(second)]
    joined = type(first)(max(first.capacity, width)) if isinstance(first, PreallocatedLayer) else DynamicLayer()
    known = next((p for p in parts if p is not None), None)
    if known is None:  # neither side has run a forward yet
        return joined
    keys, values = (t.new_zeros(rows[0] + rows[1], t.shape[1], width, t.shape[3]) for t in known)  # (R, H, T, hd)
    for part, start, count in zip(parts, (0, rows[0]), rows):
        if part is not None:
            length = part[0].shape[2]
            keys[start:start + count, :, width - length:] = part[0]
            values[start:start + count, :, width - length:] = part[1]
    joined.update(keys, values)
    return joined


COPYABLE_LAYERS = (DynamicLayer, PreallocatedLayer)
"""Cache layer types whose rows `selected_layer` copies (full attention; not the compiled path's
static buffers)."""


def selected_layer(layer: Any, rows: torch.Tensor) -> Any:
    """A new cache layer of `layer`'s type (one of COPYABLE_LAYERS) holding copies of the batch
    rows `rows` (R',) of its entries."""
    selected = PreallocatedLayer(layer.capacity) if isinstance(layer, PreallocatedLayer) else DynamicLayer()
    entries = _entries(layer)
    if entries is not None:
        selected.update(entries[0][rows], entries[1][rows])
    return selected


def _entries(layer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A layer's (keys, values), each (R, H, T, hd); None before its first forward."""
    if not layer.is_initialized or layer.get_seq_length() == 0:
        return None
    return layer.keys, layer.values


def _drop_leading_entries(layer: Any, count: int) -> None:
    if isinstance(layer, PreallocatedLayer):
        layer.drop_leading(count)
    elif layer.is_initialized and layer.get_seq_length():
        layer.keys, layer.values = layer.keys[..., count:, :], layer.values[..., count:, :]


def pad_left(x: torch.Tensor, width: int, value: Any, dim: int = -1) -> torch.Tensor:
    """`x` with `value` prepended along `dim` up to `width`."""
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim=dim)


def unused_leading_columns(key_valid: torch.Tensor) -> int:
    """How many leading columns no row uses (invalid in every row)."""
    used = key_valid.any(dim=0)  # (T,)
    if used.numel() == 0:
        return 0
    return int(torch.where(used.any(), used.long().argmax(), used.shape[0]))


INITIAL_CAPACITY = 1024  # entries per row; doubled when a context outgrows it


class KVContext:
    """A KV cache plus per-entry validity (padding) and block ids, for a batch of rows."""

    def __init__(self, adapter: Adapter, model: nn.Module, batch_size: int, device: torch.device,
                 capacity: int | None = INITIAL_CAPACITY) -> None:
        self.adapter = adapter
        self.model = model
        self.dtype = adapter.model_dtype(model)
        self.cache = adapter.new_cache(model)
        if capacity:
            preallocate(self.cache, capacity)
        self.key_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # (R, T)
        self.key_block = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # (R, T)

    @property
    def length(self) -> int:
        return self.key_valid.shape[1]

    def next_block_id(self) -> int:
        """A block id larger than every cached one, for the next committed block."""
        return int(self.key_block.max()) + 1 if self.length else 0

    def peek(self, embeds, position_ids, query_valid, query_block, kind: str) -> torch.Tensor:
        """Hidden states (R, Q, D) of a block attending to the context; the context is unchanged."""
        return self._forward(embeds, position_ids, query_valid, query_block, kind, keep=0)

    def peek_rows(self, rows: torch.Tensor, embeds, position_ids, query_valid, query_block, kind: str) -> torch.Tensor:
        """`peek` for the batch rows `rows` (R',) only (the arguments are the whole batch's): their
        hidden states (R', Q, D), from a forward over copies of those rows' keys/values, so the
        other rows cost nothing; the context is unchanged. Layers it cannot copy (the compiled
        path's static buffers, other attention kinds): a whole-batch peek, then those rows."""
        if any(type(layer) not in COPYABLE_LAYERS for layer in self.cache.layers):
            return self.peek(embeds, position_ids, query_valid, query_block, kind)[rows]
        sub = copy.copy(self)
        sub.cache = copy.copy(self.cache)
        sub.cache.layers = [selected_layer(layer, rows) for layer in self.cache.layers]
        sub.key_valid, sub.key_block = self.key_valid[rows], self.key_block[rows]
        return sub.peek(embeds[rows], position_ids[:, rows], query_valid[rows], query_block[rows], kind)

    def commit(self, embeds, position_ids, query_valid, query_block, kind: str) -> torch.Tensor:
        """Hidden states (R, Q, D) of a block that is appended to the context."""
        hidden = self._forward(embeds, position_ids, query_valid, query_block, kind, keep=embeds.shape[1])
        self.key_valid = torch.cat([self.key_valid, query_valid], dim=1)
        self.key_block = torch.cat([self.key_block, query_block], dim=1)
        return hidden

    def commit_and_draft(self, commit: tuple, drafts: tuple, kind: str = "causal") -> tuple[torch.Tensor, torch.Tensor]:
        """One forward that commits a block (with the clean mask `kind`) and peeks at C draft
        blocks branching off it.

        commit = (embeds (R, Q, F), position_ids (A, R, Q), valid (R, Q), block ids (R, Q));
        drafts = (embeds (R, C, L, F), position_ids (A, R, C, L), prefix (C,) long, valid (R, C, L)
        bool or None: all valid).
        Draft block c attends to the context, the first prefix[c] committed positions and the valid
        positions of itself (bidirectionally); drafts never see each other and only the committed
        block stays: the context afterwards is the one `commit` leaves. Returns the hidden states
        (R, Q, D) of the committed block and (R, C, L, D) of the drafts.
        """
        embeds, positions, valid, block = commit
        d_embeds, d_positions, prefix, d_valid = drafts
        n_drafts, d_len = d_embeds.shape[1:3]
        q1, q2 = embeds.shape[1], n_drafts * d_len
        mask = commit_and_draft_mask(self.key_valid, self.key_block, valid, block, prefix, d_len, kind)
        if d_valid is not None:  # a draft position past its row's end is no key for anyone
            mask[:, :, self.length + q1:] &= d_valid.flatten(1)[:, None, :]
        hidden = self._hidden(torch.cat([embeds, d_embeds.flatten(1, 2)], dim=1),
                              torch.cat([positions, d_positions.flatten(2, 3)], dim=2), mask, keep=q1)
        self.key_valid = torch.cat([self.key_valid, valid], dim=1)
        self.key_block = torch.cat([self.key_block, block], dim=1)
        return hidden[:, :q1], hidden[:, q1:].unflatten(1, (n_drafts, d_len))

    def crop(self, length: int) -> None:
        """Keep the first `length` entries."""
        drop = self.length - length
        if drop < 0:
            raise ValueError(f"cannot crop a context of {self.length} entries to {length}")
        if drop:
            self.cache.crop(-drop)
            self.key_valid = self.key_valid[:, :length]
            self.key_block = self.key_block[:, :length]

    def crop_rows(self, start: int, lengths: torch.Tensor) -> None:
        """Keep, for each row r, the entries before `start + lengths[r]`: the tail past the longest
        row is cropped; shorter rows' extra entries stay in the rectangular cache, masked out."""
        self.crop(start + int(lengths.max()))
        _mask_tail(self.key_valid, start, lengths)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep the given batch rows (R',), then drop the leading columns none of them uses (the
        padding that let a shorter row join longer ones), so the cache does not keep the width of
        rows that left."""
        self.cache.batch_select_indices(rows)
        self.key_valid = self.key_valid[rows]
        self.key_block = self.key_block[rows]
        unused = unused_leading_columns(self.key_valid)
        if unused:
            for layer in self.cache.layers:
                _drop_leading_entries(layer, unused)
            self.key_valid, self.key_block = self.key_valid[:, unused:], self.key_block[:, unused:]

    def join(self, other: KVContext) -> None:
        """Append the rows of `other` (a context of the same model) after this context's rows.

        Each row keeps its own entries; the shorter context is left-padded with invalid entries
        so that both end at the same column and the next block is appended at one index for all
        rows. Example, a row of 3 entries joins a row of 5:

            key_valid  [[1 1 1 1 1],
                        [0 0 1 1 1]]
        """
        width, rows = max(self.length, other.length), (self.key_valid.shape[0], other.key_valid.shape[0])
        self.cache.layers = [joined_layer(a, b, rows, width) for a, b in zip(self.cache.layers, other.cache.layers)]
        self.key_valid = torch.cat([pad_left(self.key_valid, width, False), pad_left(other.key_valid, width, False)])
        self.key_block = torch.cat([pad_left(self.key_block, width, 0), pad_left(other.key_block, width, 0)])

    def _forward(self, embeds, position_ids, query_valid, query_block, kind: str, keep: int) -> torch.Tensor:
        keys_valid = torch.cat([self.key_valid, query_valid], dim=1)
        keys_block = torch.cat([self.key_block, query_block], dim=1)
        mask = context_mask(query_block, keys_block, keys_valid, kind, query_offset=self.length)
        return self._hidden(embeds, position_ids, mask, keep)

    def _hidden(self, embeds, position_ids, mask: torch.Tensor, keep: int) -> torch.Tensor:
        """The forward of Q new tokens (R, Q, F) under `mask` (R, Q, T + Q) bool over the cache
        and themselves; of their keys/values the cache keeps the first `keep` (the rest are
        taken back out: a peek keeps none)."""
        hidden = self.adapter.hidden_states(self.model, embeds, position_ids, to_additive(mask, self.dtype),
                                            cache=self.cache)
        if keep < embeds.shape[1]:
            self.cache.crop(keep - embeds.shape[1])
        return hidden


class RecomputeContext:
    """Same interface as KVContext, without a cache: each call reruns the full prefix."""

    def __init__(self, adapter: Adapter, model: nn.Module, batch_size: int, device: torch.device) -> None:
        self.adapter = adapter
        self.model = model
        self.dtype = adapter.model_dtype(model)
        self.embeds: torch.Tensor | None = None  # (R, T, F)
        self.position_ids: torch.Tensor | None = None  # (A, R, T)
        self.key_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        self.key_block = torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        self.key_kind = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # (R, T) index into MASK_KINDS

    length = KVContext.length
    next_block_id = KVContext.next_block_id

    def commit_and_draft(self, commit: tuple, drafts: tuple, kind: str = "causal") -> tuple[torch.Tensor, torch.Tensor]:
        """The reference: a commit, then each draft block peeked alone over the context cut back
        to the draft's committed prefix."""
        embeds, positions, valid, block = commit
        start = self.length
        hidden = self.commit(embeds, positions, valid, block, kind)
        d_embeds, d_positions, prefix, d_valid = drafts
        if d_valid is None:
            d_valid = torch.ones(d_embeds.shape[:3], dtype=torch.bool, device=valid.device)
        full = (self.embeds, self.position_ids, self.key_valid, self.key_block, self.key_kind)
        outs = []
        for c in range(d_embeds.shape[1]):
            self.crop(start + int(prefix[c]))
            d_block = torch.full_like(d_valid[:, c], self.next_block_id(), dtype=torch.long)
            outs.append(self.peek(d_embeds[:, c], d_positions[:, :, c], d_valid[:, c], d_block, "bidirectional"))
            self.embeds, self.position_ids, self.key_valid, self.key_block, self.key_kind = full
        return hidden, torch.stack(outs, dim=1)

    def peek(self, embeds, position_ids, query_valid, query_block, kind: str) -> torch.Tensor:
        return self._forward(embeds, position_ids, query_valid, query_block, kind, keep=False)

    def peek_rows(self, rows: torch.Tensor, embeds, position_ids, query_valid, query_block, kind: str) -> torch.Tensor:
        return self.peek(embeds, position_ids, query_valid, query_block, kind)[rows]

    def commit(self, embeds, position_ids, query_valid, query_block, kind: str) -> torch.Tensor:
        return self._forward(embeds, position_ids, query_valid, query_block, kind, keep=True)

    def crop(self, length: int) -> None:
        self.embeds = None if self.embeds is None else self.embeds[:, :length]
        self.position_ids = None if self.position_ids is None else self.position_ids[:, :, :length]
        self.key_valid, self.key_block = self.key_valid[:, :length], self.key_block[:, :length]
        self.key_kind = self.key_kind[:, :length]

    def crop_rows(self, start: int, lengths: torch.Tensor) -> None:
        self.crop(start + int(lengths.max()))
        _mask_tail(self.key_valid, start, lengths)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.embeds is not None:
            self.embeds, self.position_ids = self.embeds[rows], self.position_ids[:, rows]
        self.key_valid, self.key_block, self.key_kind = self.key_valid[rows], self.key_block[rows], self.key_kind[rows]
        unused = unused_leading_columns(self.key_valid)
        if unused:
            if self.embeds is not None:
                self.embeds, self.position_ids = self.embeds[:, unused:], self.position_ids[:, :, unused:]
            self.key_valid, self.key_block = self.key_valid[:, unused:], self.key_block[:, unused:]
            self.key_kind = self.key_kind[:, unused:]

    def join(self, other: RecomputeContext) -> None:
        """KVContext.join without a cache: the kept embeddings and positions are padded instead."""
        width = max(self.length, other.length)
        known = (self.embeds, self.position_ids) if self.embeds is not None else (other.embeds, other.position_ids)
        if known[0] is not None:
            kept = [c._kept(*known) for c in (self, other)]
            self.embeds = torch.cat([pad_left(e, width, 0.0, dim=1) for e, _ in kept])
            self.position_ids = torch.cat([pad_left(p, width, 0, dim=2) for _, p in kept], dim=1)
        self.key_valid = torch.cat([pad_left(self.key_valid, width, False), pad_left(other.key_valid, width, False)])
        self.key_block = torch.cat([pad_left(self.key_block, width, 0), pad_left(other.key_block, width, 0)])
        self.key_kind = torch.cat([pad_left(self.key_kind, width, 0), pad_left(other.key_kind, width, 0)])

    def _kept(self, embeds_like: torch.Tensor, positions_like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (R, T, F), position_ids (A, R, T)) kept so far; empty ones (T = 0) before the first commit."""
        if self.embeds is not None:
            return self.embeds, self.position_ids
        rows = self.key_valid.shape[0]
        return embeds_like.new_zeros(rows, 0, embeds_like.shape[2]), positions_like.new_zeros(positions_like.shape[0], rows, 0)

    def _forward(self, embeds, position_ids, query_valid, query_block, kind: str, keep: bool) -> torch.Tensor:
        q_len = embeds.shape[1]
        all_embeds = embeds if self.embeds is None else torch.cat([self.embeds, embeds], dim=1)
        all_pos = position_ids if self.position_ids is None else torch.cat([self.position_ids, position_ids], 2)
        valid = torch.cat([self.key_valid, query_valid], dim=1)
        block = torch.cat([self.key_block, query_block], dim=1)
        code = torch.full_like(query_block, MASK_KINDS.index(kind))  # (R, Q)
        kinds = torch.cat([self.key_kind, code], dim=1)
        mask = _mixed_mask(block, valid, kinds)
        hidden = self.adapter.hidden_states(self.model, all_embeds, all_pos, to_additive(mask, self.dtype))
        if keep:
            self.embeds, self.position_ids = all_embeds, all_pos
            self.key_valid, self.key_block, self.key_kind = valid, block, kinds
        return hidden[:, -q_len:]


def _mask_tail(key_valid: torch.Tensor, start: int, lengths: torch.Tensor) -> None:
    width = key_valid.shape[1] - start
    keep = torch.arange(width, device=key_valid.device)[None, :] < lengths[:, None].to(key_valid.device)
    key_valid[:, start:] &= keep


def _mixed_mask(block: torch.Tensor, valid: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """(R, K, K) mask where each query row follows the mask kind its entry was written with (kinds (R, K))."""
    per_kind = torch.stack([context_mask(block, block, valid, kind) for kind in MASK_KINDS])  # (kinds, R, K, K)
    rows = kinds[:, :, None].expand(-1, -1, valid.shape[1])  # (R, K, K)
    return per_kind.gather(0, rows[None]).squeeze(0)


DecodeContext = Any  # KVContext | RecomputeContext
