"""The prefix cache: keys/values of token sequences already run (a request's prompt and committed
answer), kept so that a later prompt starting with the same tokens starts from them (DESIGN.md §3,
"Reusing computed keys and values").

Identity. A sequence is keyed token by token (`sequence_key`): the token id, the identity of the
image the token shows (a hash of the image's tower inputs, `dvlm.model.vision_cache.image_digest`;
0 for text: image tokens all share one id, so ids alone cannot tell two pictures apart) and its
position ids. Equal keys up to n mean equal input embeddings and positions up to n.

Streams. Keys/values depend on the mask they were computed under, so entries are matched only
within their `Stream`:
* `causal`: every entry attended to the entries before it and itself (the AR model's mask: a
  causal prefill, AR steps, speculative verify passes, block commits of a causal clean stream).
  The entry of token i is a function of tokens 0..i: any prefix of the sequence is exactly what a
  causal prefill of those tokens computes.
* `absolute` (block size B): block-causal absolute blocks (DiffusionVL): the entries of block j
  attended to blocks 0..j whole. Only whole blocks, aligned at multiples of B from the sequence's
  start as a fresh prefill aligns them, are what that prefill computes.

Exactness is "the same computation": a reused entry equals the fresh one up to float rounding of
the forward's shape (as cached block decoding equals recomputed decoding, invariant 4), and the
answers are the same token for token (invariant 12).

Lookup. Kept prefixes are indexed by the hashes of their first C, 2C, 3C, ... key columns
(C = `index_chunk`, 16 by default): a prompt's lookup hashes its own key once and finds the
entries that share its longest run of whole chunks, then measures the exact common length with a
few of them (they all share the same whole chunks: they differ by less than C reused tokens). A
lookup costs one pass over the prompt whatever the store holds; a prompt sharing fewer than C
tokens with every kept prefix reuses nothing.

Bounded by bytes (keys and values), least recently used evicted first. Not thread-safe: one
owner (the server's engine loop, a chat session) uses it.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicLayer

from dvlm.model.cache import KVContext, PreallocatedLayer
from dvlm.model.vision_cache import CacheStats

TOKEN_ROW, IMAGE_ROW, POSITION_ROWS = 0, 1, 2  # the rows of a sequence key
INDEX_CHUNK = 16  # key columns per indexed chunk (module docstring, "Lookup")
MATCH_CANDIDATES = 8  # entries sharing a prompt's longest run of whole chunks whose exact common length is measured


def image_code(digest: bytes) -> int:
    """An image's id in a sequence key: a non-zero int64 from its digest (0 marks text)."""
    return int.from_bytes(digest[:8], "little", signed=True) | 1


def sequence_key(input_ids: torch.Tensor, image_codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(2 + A, L) long: token ids (L,), image codes (L,) and position ids (A, L), row by row."""
    return torch.cat([input_ids[None], image_codes[None], positions]).long().cpu()


def text_key(tokens: list[int], start: int, axes: int) -> torch.Tensor:
    """The key of text tokens decoded after a prompt: positions start, start + 1, ... on every axis."""
    ids = torch.tensor(tokens, dtype=torch.long)
    positions = (start + torch.arange(len(tokens)))[None].expand(axes, -1)
    return sequence_key(ids, torch.zeros_like(ids), positions)


def chunk_digests(key: torch.Tensor, chunk: int) -> list[bytes]:
    """Hashes of the key's first `chunk`, 2 * `chunk`, ... columns (whole chunks only)."""
    data = key.t().contiguous().numpy().tobytes()  # column by column: one token's rows together
    width = len(data) // key.shape[1] if key.shape[1] else 0
    running, digests = hashlib.blake2b(digest_size=16), []
    for end in range(chunk, key.shape[1] + 1, chunk):
        running.update(data[(end - chunk) * width:end * width])
        digests.append(running.copy().digest())
    return digests


def common_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading columns two keys share."""
    n = min(a.shape[1], b.shape[1])
    differ = (a[:, :n] != b[:, :n]).any(dim=0).nonzero()
    return int(differ[0]) if len(differ) else n


@dataclass(frozen=True)
class Stream:
    """How a context's entries were computed (module docstring): `causal`, or `absolute` blocks of `align` tokens."""

    kind: str
    align: int = 1

    def blocks(self, count: int, device: torch.device) -> torch.Tensor:
        """(count,) the block ids a fresh prefill gives the first `count` entries (causal: one block)."""
        index = torch.arange(count, device=device)
        return index // self.align if self.kind == "absolute" else torch.zeros_like(index)


CAUSAL = Stream("causal")


def usable_length(matched: int, key: torch.Tensor, limit: int, align: int) -> int:
    """How many of `matched` leading entries a prompt of key `key` may reuse: at most `limit`, a
    multiple of `align`, and never ending inside a run of image tokens (the rest of the prompt is
    prefilled with its whole images)."""
    images = key[IMAGE_ROW] != 0
    n = min(matched, limit)
    while True:
        cut = n
        while 0 < cut < key.shape[1] and images[cut] and images[cut - 1]:
            cut -= 1
        cut -= cut % align
        if cut == n:
            return n
        n = cut


@dataclass
class Prefix:
    """The keys/values of one token sequence, one row, with its key."""

    stream: Stream
    key: torch.Tensor  # (2 + A, n) long, on the CPU
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (1, H, n, hd)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def __len__(self) -> int:
        return int(self.key.shape[1])


@dataclass
class PrefixStats(CacheStats):
    hit_tokens: int = 0  # prompt tokens whose keys/values were reused


class PrefixStore:
    """Prefixes by LRU, bounded by bytes (and by `max_entries`, when given: a chat session keeps
    one), found through their chunks' hashes (module docstring, "Lookup")."""

    def __init__(self, capacity_bytes: int, max_entries: int | None = None, index_chunk: int = INDEX_CHUNK) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"the prefix cache's capacity must be >= 0 bytes, got {capacity_bytes}")
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.capacity_bytes = capacity_bytes
        self.max_entries = max_entries
        self.index_chunk = index_chunk
        self.stats = PrefixStats()
        self._entries: OrderedDict[int, Prefix] = OrderedDict()
        self._index: dict[tuple[Stream, bytes], set[int]] = {}  # (stream, chunk hash) -> entries
        self._digests: dict[int, list[bytes]] = {}
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, stream: Stream, key: torch.Tensor, limit: int) -> tuple[Prefix, int] | None:
        """The entry of `stream` whose first n entries a prompt of key `key` may reuse, n largest
        (`usable_length`, at most `limit`) among the entries sharing the prompt's longest run of
        whole chunks, and n; None when no entry gives n > 0. Counted as a hit or a miss."""
        best, best_n, best_id = None, 0, None
        for entry_id in self._candidates(stream, key):
            prefix = self._entries[entry_id]
            n = usable_length(common_length(prefix.key, key), key, limit, stream.align)
            if n > best_n:
                best, best_n, best_id = prefix, n, entry_id
        if best is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(best_id)
        self.stats.hits += 1
        self.stats.hit_tokens += best_n
        return best, best_n

    def add(self, prefix: Prefix) -> None:
        """Keep `prefix`, evicting least recently used entries to make room. A kept entry whose key
        starts the new one's goes (the new one serves every prompt it served); a new key that starts
        a kept one's only refreshes that one; a prefix larger than the whole store is not kept."""
        if prefix.nbytes > self.capacity_bytes:
            return
        for entry_id in self._candidates(prefix.stream, prefix.key):
            shared = common_length(self._entries[entry_id].key, prefix.key)
            if shared == len(prefix):
                self._entries.move_to_end(entry_id)
                return
            if shared == len(self._entries[entry_id]):
                self._remove(entry_id)
        while self._entries and (self.stats.bytes + prefix.nbytes > self.capacity_bytes
                                 or (self.max_entries is not None and len(self._entries) >= self.max_entries)):
            self._remove(next(iter(self._entries)))
            self.stats.evictions += 1
        entry_id = next(self._ids)
        self._entries[entry_id] = prefix
        self._digests[entry_id] = chunk_digests(prefix.key, self.index_chunk)
        for digest in self._digests[entry_id]:
            self._index.setdefault((prefix.stream, digest), set()).add(entry_id)
        self.stats.bytes += prefix.nbytes
        self.stats.entries = len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self._digests.clear()
        self.stats.entries = self.stats.bytes = 0

    def _candidates(self, stream: Stream, key: torch.Tensor) -> list[int]:
        """The newest few entries sharing the key's longest run of whole chunks (none: nothing shares a chunk)."""
        for digest in reversed(chunk_digests(key, self.index_chunk)):
            found = self._index.get((stream, digest))
            if found:
                return heapq.nlargest(MATCH_CANDIDATES, found)
        return []

    def _remove(self, entry_id: int) -> None:
        prefix = self._entries.pop(entry_id)
        for digest in self._digests.pop(entry_id):
            entries = self._index[(prefix.stream, digest)]
            entries.discard(entry_id)
            if not entries:
                del self._index[(prefix.stream, digest)]
        self.stats.bytes -= prefix.nbytes
        self.stats.entries = len(self._entries)


# -- between a store and a context -------------------------------------------------------------------


def seed_context(ctx: KVContext, reused: list[tuple[Prefix, int] | None], stream: Stream) -> None:
    """Fill a fresh context with each row's reused entries: row r holds the first n_r entries of its
    prefix, right-aligned (rows without one, or shorter ones, are padded with invalid entries), with
    the block ids a fresh prefill gives them. The prompts' remaining tokens are committed after them."""
    counts = [0 if r is None else r[1] for r in reused]
    width = max(counts)
    if width == 0:
        return
    known = next(prefix for prefix, n in filter(None, reused))
    for index, layer in enumerate(ctx.cache.layers):
        _check_layer(layer)
        like = known.layers[index][0]  # (1, H, n, hd)
        keys, values = (like.new_zeros(len(reused), like.shape[1], width, like.shape[3]) for _ in range(2))
        for row, item in enumerate(reused):
            if item is not None:
                prefix, n = item
                keys[row, :, width - n:] = prefix.layers[index][0][0, :, :n]
                values[row, :, width - n:] = prefix.layers[index][1][0, :, :n]
        layer.update(keys, values)
    device = ctx.key_valid.device
    start = width - torch.tensor(counts, device=device)[:, None]  # (R, 1)
    index = torch.arange(width, device=device)[None, :] - start  # (R, width): entry index within its row
    ctx.key_valid = index >= 0
    ctx.key_block = torch.where(index >= 0, stream.blocks(width, device)[index.clamp(min=0)], 0)


def row_prefix(ctx: KVContext, row: int, key: torch.Tensor, stream: Stream) -> Prefix | None:
    """The prefix one row of a context holds: its valid entries in order, which hold the tokens of
    `key` (prompt, then committed answer), as many as both have; under an absolute stream only its
    leading whole aligned blocks. None when nothing is left."""
    valid = ctx.key_valid[row].nonzero().squeeze(1)
    count = min(len(valid), key.shape[1])
    if stream.kind == "absolute":
        count = whole_blocks(ctx.key_block[row, valid], count, stream.align)
    if count == 0:
        return None
    index = valid[:count]
    layers = []
    for layer in ctx.cache.layers:
        _check_layer(layer)
        layers.append((layer.keys[row:row + 1, :, index], layer.values[row:row + 1, :, index]))
    return Prefix(stream, key[:, :count].clone(), layers)


def whole_blocks(blocks: torch.Tensor, count: int, align: int) -> int:
    """How many of the first `count` entries (block ids `blocks`, (T,) of all the row's entries) form
    whole blocks of exactly `align` entries each: the largest multiple of `align` whose chunks each
    hold one block id, distinct from its neighbours' (so no block runs past its chunk)."""
    chunks = blocks[:count // align * align].view(-1, align)  # (n, align)
    if chunks.shape[0] == 0:
        return 0
    uniform = (chunks == chunks[:, :1]).all(dim=1)
    ends = torch.cat([blocks[align::align][:chunks.shape[0]], blocks.new_full((1,), -1)])[:chunks.shape[0]]
    closed = chunks[:, -1] != ends  # the entry after the chunk starts another block (or there is none)
    return int((uniform & closed).long().cumprod(dim=0).sum()) * align


def reusable_layers(cache) -> bool:
    """Whether a new cache's layers can be filled with kept entries (full-attention layers only)."""
    return all(type(layer) is DynamicLayer or isinstance(layer, PreallocatedLayer) for layer in cache.layers)


def _check_layer(layer) -> None:
    if type(layer) is not DynamicLayer and not isinstance(layer, PreallocatedLayer):
        raise NotImplementedError(f"prefix reuse of cache layers of type {type(layer).__name__} (only full-attention "
                                  "DynamicLayer and PreallocatedLayer)")
