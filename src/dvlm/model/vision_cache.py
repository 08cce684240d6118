"""The vision cache: each image's features from the vision tower, kept for the next request that
shows the same image (a chat's later turns, a shared picture), least recently used first out.

Key. An image is keyed by a hash of the tensors its family's tower takes for it alone
(`Adapter.split_images`: its processed pixels and their grid or tile sizes), not of the decoded
picture. Those tensors are all the tower reads, so two images with one key have the same features
bit for bit: the resize, normalisation and tiling of the image processor are already in them (a
change of processor settings changes the key), and nothing else can make two equal keys differ. A
key of the decoded picture would need the processor settings added to it and would still have to
trust that nothing else shapes the tower's input.

Exactness. Decoding always runs the tower per image (`dvlm.decode.prompts`), cache or no cache,
so a hit returns exactly the tensor a miss computes.

Bounded by bytes (`capacity_bytes`, the features' storage), least recently used evicted first;
an image larger than the whole cache is computed and not kept. Not thread-safe: one owner (the
server's engine loop, a chat session) uses it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dvlm.data.vision import VisionInputs

DIGEST_BYTES = 16


def image_digest(vision: VisionInputs) -> bytes:
    """A hash of one image's tower inputs: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for name in sorted(vision.tensors):
        tensor = vision.tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()


@dataclass
class CacheStats:
    """What a cache did since it was made (counts) and holds now (entries, bytes)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class VisionCache:
    """Image features by image digest, bounded by bytes, least recently used evicted first."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"the vision cache's capacity must be >= 0 bytes, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self.stats = CacheStats()
        self._features: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def features(self, digest: bytes, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The image's features: kept ones on a hit, else `compute()` (then kept if they fit)."""
        if digest in self._features:
            self._features.move_to_end(digest)
            self.stats.hits += 1
            return self._features[digest]
        self.stats.misses += 1
        features = compute()
        self._keep(digest, features)
        return features

    def clear(self) -> None:
        self._features.clear()
        self.stats.entries = self.stats.bytes = 0

    def _keep(self, digest: bytes, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.capacity_bytes:
            return
        while self.stats.bytes + size > self.capacity_bytes:
            _, old = self._features.popitem(last=False)
            self.stats.bytes -= old.numel() * old.element_size()
            self.stats.evictions += 1
        self._features[digest] = features
        self.stats.bytes += size
        self.stats.entries = len(self._features)
