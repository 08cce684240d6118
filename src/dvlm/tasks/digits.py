"""Strips of real handwritten digits from scikit-learn's bundled ``load_digits()`` (no download).

Image format (fixed): each source image is 8x8 with values 0..16; it is scaled to 0..255 grey
(``round(v * 255 / 16)``), enlarged to 28x28 with bilinear resampling, and 1-8 such digits are
placed left to right with no gap on black. The strip is RGB (grey replicated), 28 px high and
28 x (number of digits) px wide.

Text: the prompt "Read the digits." is answered by the labels in order separated by single
spaces ("4 0 7"); multi-turn dialogues also ask "How many digits are there?", "What is the first
digit?" and "What is the last digit?".

Which of the 1797 source images a split may use is decided by the caller through ``buckets``
on the source index (``index % num_buckets``; see ``dvlm.tasks.builtin``), so held-out splits use
handwriting never seen in training.
"""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache

import numpy as np
from PIL import Image

DIGIT_SIDE = 28
SOURCE_MAX = 16  # load_digits() pixel values lie in 0..16
PIXEL_MAX = 255
MIN_DIGITS = 1
MAX_DIGITS = 8
NUM_CLASSES = 10

READ_PROMPT = "Read the digits."
COUNT_PROMPT = "How many digits are there?"
FIRST_PROMPT = "What is the first digit?"
LAST_PROMPT = "What is the last digit?"


@lru_cache(maxsize=1)
def load_source() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 source digits: images (N, 8, 8) float in 0..16 and labels (N,) int."""
    from sklearn.datasets import (
        load_digits,  # imported here: only the digits tasks need it
    )

    data = load_digits()
    return data.images, data.target


def indices_in_buckets(buckets: Collection[int], num_buckets: int) -> np.ndarray:
    """Source indices ``i`` with ``i % num_buckets in buckets``, ascending."""
    images, _ = load_source()
    index = np.arange(len(images))
    return index[np.isin(index % num_buckets, list(buckets))]


@lru_cache(maxsize=None)
def render_digit(index: int) -> np.ndarray:
    """One source digit as a (28, 28) uint8 grey array."""
    images, _ = load_source()
    grey = np.round(images[index] * (PIXEL_MAX / SOURCE_MAX)).astype(np.uint8)
    big = Image.fromarray(grey).resize(
        (DIGIT_SIDE, DIGIT_SIDE), Image.Resampling.BILINEAR
    )
    return np.asarray(big)


def render_strip(indices: list[int]) -> Image.Image:
    """Digits side by side, no gap: an RGB image of size (28 * len(indices), 28)."""
    if not indices:
        raise ValueError("a digit strip needs at least one digit")
    strip = np.concatenate([render_digit(i) for i in indices], axis=1)  # (28, 28 * n)
    return Image.fromarray(strip).convert("RGB")


def sample_strip(rng: np.random.Generator, pool: np.ndarray) -> list[int]:
    """Draw 1-8 source indices (with replacement) from ``pool``."""
    n = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    return [int(i) for i in rng.choice(pool, size=n)]


def labels(indices: list[int]) -> list[int]:
    """The digit shown by each source index."""
    _, target = load_source()
    return [int(target[i]) for i in indices]


def strip_text(indices: list[int]) -> str:
    """The reference reading: labels separated by single spaces, e.g. "4 0 7"."""
    return " ".join(str(d) for d in labels(indices))


def questions(indices: list[int]) -> list[tuple[str, str]]:
    """Short questions about a strip, with their answers (used by multi-turn dialogues)."""
    digits = labels(indices)
    return [
        (COUNT_PROMPT, str(len(digits))),
        (FIRST_PROMPT, str(digits[0])),
        (LAST_PROMPT, str(digits[-1])),
    ]


def vocabulary_texts() -> list[str]:
    """Every string this module can produce, enumerated from the constants (not sampled)."""
    return [READ_PROMPT, COUNT_PROMPT, FIRST_PROMPT, LAST_PROMPT,
            " ".join(str(d) for d in range(NUM_CLASSES))]
