"""The prefix store and the vision cache as data structures: which entries a prompt may reuse
(literal cases), whole absolute blocks, least-recently-used eviction by bytes, and the image hash."""

import pytest
import torch

from dvlm.data.vision import VisionInputs
from dvlm.model.prefix_cache import (
    CAUSAL,
    Prefix,
    PrefixStore,
    Stream,
    common_length,
    sequence_key,
    usable_length,
    whole_blocks,
)
from dvlm.model.vision_cache import VisionCache, image_digest

ABSOLUTE_4 = Stream("absolute", 4)


def key(ids, images=None, positions=None):
    """A one-axis key of the given token ids (image codes 0 unless given; positions 0, 1, ...)."""
    ids = torch.tensor(ids)
    images = torch.zeros_like(ids) if images is None else torch.tensor(images)
    positions = torch.arange(len(ids))[None] if positions is None else torch.tensor(positions)[None]
    return sequence_key(ids, images, positions)


def prefix(ids, stream=CAUSAL, entry_bytes=4):
    """A prefix of len(ids) entries of `entry_bytes` bytes each (one layer of uint8 keys and values)."""
    n = len(ids)
    half = entry_bytes // 2  # keys and values, one byte each per element
    layers = [(torch.zeros(1, 1, n, half, dtype=torch.uint8), torch.zeros(1, 1, n, half, dtype=torch.uint8))]
    return Prefix(stream, key(ids), layers)


def test_common_length_compares_every_row_of_the_key():
    assert common_length(key([1, 2, 3]), key([1, 2, 4])) == 2
    assert common_length(key([1, 2, 3]), key([1, 2])) == 2
    assert common_length(key([1, 2, 3], images=[0, 7, 7]), key([1, 2, 3], images=[0, 8, 8])) == 1
    assert common_length(key([1, 2, 3], positions=[0, 1, 2]), key([1, 2, 3], positions=[0, 1, 5])) == 2


@pytest.mark.parametrize("matched, limit, align, expected", [
    (9, 9, 1, 9),  # text after the image: all of it
    (9, 7, 1, 7),  # the prompt's limit
    (9, 5, 1, 2),  # the limit ends inside the image
    (5, 9, 1, 2),  # ends inside the image (tokens 2..5): back to its first token
    (6, 9, 1, 6),  # ends right after the image
    (9, 9, 4, 8),  # whole blocks of 4
    (7, 9, 4, 0),  # 4 would end inside the image: back to 2, then to 0
    (2, 9, 4, 0),
])
def test_usable_length(matched, limit, align, expected):
    #         text text image image image image text text text text
    k = key([1, 2, 5, 5, 5, 5, 3, 4, 6, 7], images=[0, 0, 9, 9, 9, 9, 0, 0, 0, 0])
    assert usable_length(matched, k, limit, align) == expected


def test_whole_blocks_counts_aligned_blocks_that_end_where_their_chunk_ends():
    assert whole_blocks(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]), 10, 4) == 8
    assert whole_blocks(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2]), 7, 4) == 4
    assert whole_blocks(torch.tensor([0, 0, 0, 0, 0, 1, 1, 1]), 8, 4) == 0  # the first block runs past 4 entries
    assert whole_blocks(torch.tensor([0, 0, 1, 1, 2, 2, 2, 2]), 8, 4) == 0  # two blocks in the first chunk
    assert whole_blocks(torch.tensor([3, 3, 3, 3, 7, 7, 7, 7]), 8, 4) == 8  # ids need only differ
    assert whole_blocks(torch.tensor([0, 0, 0]), 3, 4) == 0


def test_match_takes_the_longest_usable_entry_and_counts_hits():
    store = PrefixStore(1000, index_chunk=1)
    store.add(prefix([1, 2, 3, 4, 5]))
    store.add(prefix([1, 2, 9]))
    assert store.match(CAUSAL, key([1, 2, 3, 4, 8, 8]), limit=5)[1] == 4
    assert store.match(CAUSAL, key([1, 2, 9, 9]), limit=3)[1] == 3
    assert store.match(CAUSAL, key([1, 2, 3, 4, 5, 6]), limit=2)[1] == 2  # the prompt's limit
    assert store.match(CAUSAL, key([7, 1]), limit=1) is None
    assert store.match(ABSOLUTE_4, key([1, 2, 3, 4, 5]), limit=4) is None  # another stream's entries
    assert (store.stats.hits, store.stats.misses, store.stats.hit_tokens) == (3, 2, 9)


def test_entries_are_evicted_least_recently_used_first_by_bytes():
    store = PrefixStore(capacity_bytes=40, index_chunk=1)  # 4 bytes per entry: 10 entries
    store.add(prefix([1, 1, 1, 1]))  # 16 bytes
    store.add(prefix([2, 2, 2, 2]))  # 32
    store.match(CAUSAL, key([1, 1, 1, 1, 0]), limit=4)  # [1...] is now the most recently used
    store.add(prefix([3, 3, 3]))  # 44 > 40: [2...] goes
    assert store.match(CAUSAL, key([2, 2, 2, 0]), limit=3) is None
    assert store.match(CAUSAL, key([1, 1, 1, 0]), limit=3)[1] == 3
    assert (store.stats.evictions, store.stats.entries, store.stats.bytes) == (1, 2, 28)
    store.add(prefix(list(range(11))))  # 44 bytes: larger than the store, not kept, nothing evicted
    assert (store.stats.evictions, store.stats.entries, store.stats.bytes) == (1, 2, 28)
    store.add(prefix(list(range(10))))  # exactly 40 bytes: both others go
    assert (store.stats.evictions, store.stats.entries, store.stats.bytes) == (3, 1, 40)


def test_an_entry_that_starts_another_is_not_kept_twice():
    store = PrefixStore(1000, index_chunk=1)
    store.add(prefix([1, 2, 3]))
    store.add(prefix([1, 2, 3, 4, 5]))  # extends the first: the first goes
    assert (len(store), store.stats.bytes, store.stats.evictions) == (1, 20, 0)
    store.add(prefix([1, 2]))  # starts the kept one: nothing new is kept
    assert (len(store), store.stats.bytes) == (1, 20)
    store.add(prefix([1, 2, 3], stream=ABSOLUTE_4))  # the same tokens under another stream
    assert len(store) == 2


def test_max_entries_keeps_the_newest():
    store = PrefixStore(1000, max_entries=1, index_chunk=1)
    store.add(prefix([1, 2]))
    store.add(prefix([3, 4]))
    assert store.match(CAUSAL, key([1, 2, 0]), limit=2) is None and store.match(CAUSAL, key([3, 4, 0]), limit=2)
    assert store.stats.evictions == 1


def test_lookups_go_through_whole_chunks():
    """Entries are found by the hashes of their first 4, 8, ... tokens (chunks of 4): a prompt that
    shares fewer than 4 tokens with every entry reuses nothing; among entries sharing its longest
    run of whole chunks the one sharing most is taken."""
    store = PrefixStore(1000, index_chunk=4)
    store.add(prefix([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    store.add(prefix([1, 2, 3, 4, 5, 6, 0, 0]))
    store.add(prefix([1, 2, 3, 7]))
    assert store.match(CAUSAL, key([1, 2, 3, 9, 9]), limit=4) is None  # 3 shared: no whole chunk
    assert store.match(CAUSAL, key([1, 2, 3, 4, 5, 6, 7, 0, 0]), limit=8)[1] == 7
    assert store.match(CAUSAL, key([1, 2, 3, 4, 5, 6, 0, 5, 5]), limit=8)[1] == 7
    assert store.match(CAUSAL, key([1, 2, 3, 7, 7]), limit=4)[1] == 4
    store.add(prefix([1, 2, 3, 4, 5, 6, 0, 0, 1, 2]))  # extends the second entry, which goes
    assert len(store) == 3 and store.match(CAUSAL, key([1, 2, 3, 4, 5, 6, 0, 0, 1, 2, 3]), limit=10)[1] == 10


def test_vision_cache_lru_by_bytes():
    cache = VisionCache(capacity_bytes=64)
    computed = []

    def features(value, count=4):  # count float32 values: 4 bytes each
        def compute():
            computed.append(value)
            return torch.full((count,), float(value))
        return compute

    a = cache.features(b"a", features(1))
    assert cache.features(b"a", features(99)) is a and computed == [1]  # a hit returns the kept tensor
    cache.features(b"b", features(2, 8))  # 16 + 32 = 48 bytes
    cache.features(b"a", features(99))  # a is the most recently used now
    cache.features(b"c", features(3, 8))  # 80 > 64: b goes
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions, cache.stats.bytes) == (2, 3, 1, 48)
    cache.features(b"b", features(4, 8))
    assert computed == [1, 2, 3, 4]
    cache.features(b"big", features(5, 17))  # 68 bytes: computed, never kept
    assert b"big" not in cache._features and cache.stats.bytes == 64


def test_image_digest_covers_every_tensor_its_dtype_and_shape():
    pixels = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    base = image_digest(VisionInputs({"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 1, 2]])}))
    assert base == image_digest(VisionInputs({"image_grid_thw": torch.tensor([[1, 1, 2]]), "pixel_values": pixels.clone()}))
    others = [
        {"pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 2, 1]])},  # the same pixels on another grid
        {"pixel_values": pixels.reshape(3, 4), "image_grid_thw": torch.tensor([[1, 1, 2]])},
        {"pixel_values": pixels.to(torch.float64), "image_grid_thw": torch.tensor([[1, 1, 2]])},
        {"pixel_values": pixels + 1e-6, "image_grid_thw": torch.tensor([[1, 1, 2]])},
    ]
    assert len({base, *(image_digest(VisionInputs(t)) for t in others)}) == 5
