"""The prompts a stepper prefills, and what it reuses of earlier work (DESIGN.md §3, "Reusing
computed keys and values").

`open_prompts` turns encoded prompts into a `PromptBatch`: each prompt's images one by one (the
vision tower runs per image, cached or not: `dvlm.model.vision_cache`), and, where the prefix
cache holds keys/values of the prompt's first tokens (`dvlm.model.prefix_cache`), those entries
and the part of the prompt left to prefill. The prefill then commits the parts after the reused
entries (`PromptBatch.context`), with the positions and block ids the whole prompts give them.

Which entries a prompt may reuse, `Stream` by stream (`usable_length`): the entries of its first
n tokens with n at most P - 1 (the prompt's last token is always run: its output seeds the answer),
never ending inside an image's tokens, and under absolute blocks a multiple of the block size.

When a row leaves its batch, `remember` keeps what its context holds (its prompt and committed
answer) for later prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dvlm.data.collate import Batch, collate
from dvlm.data.images import MIB
from dvlm.data.processor import Encoded
from dvlm.model.adapters.base import ImageInputs
from dvlm.model.cache import KVContext
from dvlm.model.loaded import LoadedModel
from dvlm.model.prefix_cache import (
    POSITION_ROWS,
    Prefix,
    PrefixStore,
    Stream,
    image_code,
    row_prefix,
    seed_context,
    sequence_key,
    text_key,
)
from dvlm.model.vision_cache import VisionCache, image_digest


VISION_CACHE_MB = 256.0
"""Default memory of a vision cache (`dvlm serve`, `dvlm chat`, `model.chat()`)."""
PREFIX_CACHE_MB = 1024.0
"""Default memory of a prefix cache (`dvlm serve`, `dvlm chat`, `model.chat()`)."""


@dataclass
class Caches:
    """What the steppers of one owner (the server's engine, a chat session) reuse across requests."""

    prefixes: PrefixStore | None = None
    vision: VisionCache | None = None

    @classmethod
    def sized(cls, vision_mb: float, prefix_mb: float, max_prefixes: int | None = None) -> Caches:
        """Caches of these sizes in MiB (0: that cache is off); `max_prefixes` bounds the prefixes kept."""
        if not (0 <= vision_mb < float("inf") and 0 <= prefix_mb < float("inf")):
            raise ValueError(f"cache sizes must be >= 0 MiB, got {vision_mb} (vision) and {prefix_mb} (prefix)")
        vision, prefixes = int(vision_mb * MIB), int(prefix_mb * MIB)
        return cls(PrefixStore(prefixes, max_prefixes) if prefixes else None, VisionCache(vision) if vision else None)

    def clear(self) -> None:
        for cache in (self.prefixes, self.vision):
            if cache is not None:
                cache.clear()


@dataclass
class PromptImage:
    """One image of a prompt."""

    inputs: ImageInputs
    start: int  # index of its first image token in the prompt
    digest: bytes | None = None  # its hash (`image_digest`); None: not looked up in any cache


@dataclass
class RowKey:
    """What a row needs to leave its prefix in the store: its prompt's key and next position."""

    key: torch.Tensor  # (2 + A, P)
    next_position: int

    def with_answer(self, tokens: list[int]) -> torch.Tensor:
        """The key of the prompt followed by the answer's committed tokens."""
        axes = self.key.shape[0] - POSITION_ROWS
        return torch.cat([self.key, text_key(tokens, self.next_position, axes)], dim=1)


@dataclass
class PromptBatch:
    """Prompts ready to prefill: each row's part past its reused entries, and that part's images."""

    parts: list[Encoded]  # each prompt from its first token not reused (images travel in `images`)
    images: list[list[PromptImage]]  # per row, the images of its part, in order
    reused: list[tuple[Prefix, int] | None]  # per row: the prefix and how many of its entries are reused
    stream: Stream | None = None
    vision_cache: VisionCache | None = None

    @property
    def reused_tokens(self) -> list[int]:
        return [0 if r is None else r[1] for r in self.reused]

    def collate(self, lm: LoadedModel) -> Batch:
        """The parts, left-padded, on the model's device."""
        return collate(self.parts, lm.processor.pad_token_id, padding_side="left").to(lm.device)

    def context(self, lm: LoadedModel, context_cls):
        """A new context for these rows, holding each row's reused entries."""
        ctx = context_cls(lm.adapter, lm.model, len(self.parts), lm.device)
        if any(self.reused):
            seed_context(ctx, self.reused, self.stream)
        return ctx

    def block_offsets(self, device: torch.device) -> torch.Tensor:
        """(R,) the blocks each row's reused entries fill (absolute blocks; 0 otherwise): the parts' blocks come after."""
        per_row = [n // self.stream.align if self.stream is not None and self.stream.kind == "absolute" else 0
                   for n in self.reused_tokens]
        return torch.tensor(per_row, dtype=torch.long, device=device)

    def embed(self, lm: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
        """(R, L) ids of the collated parts -> (R, L, F) input features, each image's features from
        its own tower call (or the vision cache)."""
        features = [self._features(lm, image) for row in self.images for image in row]
        if not features:
            return lm.adapter.embed(lm.model, input_ids)
        return lm.adapter.embed_with_features(lm.model, input_ids, torch.cat(features))

    def _features(self, lm: LoadedModel, image: PromptImage) -> torch.Tensor:
        def compute() -> torch.Tensor:
            return lm.adapter.image_features(lm.model, image.inputs.vision.to(lm.device))

        if self.vision_cache is None or image.digest is None:
            return compute()
        return self.vision_cache.features(image.digest, compute)


def plain_prompts(lm: LoadedModel, prompts: list[Encoded]) -> PromptBatch:
    """Prompts with nothing reused and no cache."""
    return open_prompts(lm, prompts, Caches(), [False] * len(prompts), None)[0]


def open_prompts(lm: LoadedModel, prompts: list[Encoded], caches: Caches, use: list[bool],
                 stream: Stream | None) -> tuple[PromptBatch, list[RowKey | None]]:
    """The batch to prefill, and per row the key under which its prefix is kept when it leaves (None:
    not kept). Rows with `use` False neither read nor fill a cache; `stream` None: no prefix reuse
    (the decoder's context cannot start from kept entries)."""
    store = caches.prefixes if stream is not None else None
    parts, images, reused, keys = [], [], [], []
    for prompt, cached in zip(prompts, use):
        row_images = prompt_images(lm, prompt, digests=cached and (store is not None or caches.vision is not None))
        key = prompt_key(prompt, row_images) if cached and store is not None else None
        match = None if key is None else store.match(stream, key, len(prompt) - 1)
        n = 0 if match is None else match[1]
        parts.append(part_after(prompt, n))
        images.append([image for image in row_images if image.start >= n])
        reused.append(match)
        keys.append(None if key is None else RowKey(key, prompt.next_position))
    return PromptBatch(parts, images, reused, stream, caches.vision), keys


def prompt_images(lm: LoadedModel, prompt: Encoded, digests: bool) -> list[PromptImage]:
    """The prompt's images one by one, with where their tokens start (and their hashes)."""
    if prompt.vision is None:
        return []
    inputs = lm.adapter.split_images(lm.model, prompt.vision)
    slots = (prompt.mm_token_type_ids == 1).nonzero().squeeze(1).tolist()  # the image tokens, in order
    if sum(image.tokens for image in inputs) != len(slots):
        raise ValueError(f"{len(slots)} image tokens in the prompt but its images fill "
                         f"{sum(image.tokens for image in inputs)}")
    starts, first = [], 0
    for image in inputs:
        starts.append(slots[first])
        first += image.tokens
    return [PromptImage(image, start, image_digest(image.vision) if digests else None)
            for image, start in zip(inputs, starts)]


def prompt_key(prompt: Encoded, images: list[PromptImage]) -> torch.Tensor:
    """(2 + A, P) the identity of every prompt token: its id, its image's code (0: text), its positions."""
    codes = torch.zeros_like(prompt.input_ids)
    slots = (prompt.mm_token_type_ids == 1).nonzero().squeeze(1)
    first = 0
    for image in images:
        codes[slots[first:first + image.inputs.tokens]] = image_code(image.digest)
        first += image.inputs.tokens
    return sequence_key(prompt.input_ids, codes, prompt.position_ids)


def part_after(prompt: Encoded, n: int) -> Encoded:
    """The prompt from token n on (its own positions; the next position is the whole prompt's);
    its images travel beside it."""
    return dataclasses.replace(prompt, input_ids=prompt.input_ids[n:], labels=prompt.labels[n:],
                               mm_token_type_ids=prompt.mm_token_type_ids[n:], position_ids=prompt.position_ids[:, n:],
                               vision=None)


def remember(store: PrefixStore, stream: Stream, ctx: KVContext, index: int, row: RowKey, tokens: list[int]) -> None:
    """Keep the prefix that batch row `index` of `ctx` holds (its prompt, then `tokens` of its answer)."""
    prefix = row_prefix(ctx, index, row.with_answer(tokens), stream)
    if prefix is not None:
        store.add(prefix)
