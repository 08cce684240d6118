"""The types every benchmark shares: one question (`Item`), one benchmark (`Benchmark`), its error.

Readers turn a benchmark's published files into `Item`s; `Benchmark.prompt` makes the text the
model sees; `Benchmark.score` scores one answer; `Benchmark.aggregate` turns the per-item scores
into the benchmark's reported numbers. Everything here is plain Python: no model, no dvlm imports.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# The instructions lmms-eval appends to questions (lmms_eval/tasks/*/*.yaml, `post_prompt`,
# `multiple_choice_prompt`, `open_ended_prompt` of the `default` model kwargs, version 0.7.3).
SHORT_ANSWER = "Answer the question using a single word or phrase."  # mme, pope, docvqa, textvqa, mmmu open
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."  # ai2d, mmmu multiple choice
SINGLE_WORD = "Answer the question with a single word."  # chartqa

Image = Any  # a file path (Path) or the encoded bytes of an image; both go to `generate` as they are


class BenchmarkDataError(ValueError):
    """A benchmark file is missing, unreadable or not in a layout the reader knows."""


@dataclass(frozen=True)
class Item:
    """One benchmark question with what its scorer needs."""

    id: str
    """Stable id: the benchmark's own question id where it has one."""
    question: str
    """The question as the benchmark states it (before the harness's instruction)."""
    images: list[Image]
    """The images of the question, in the order the prompt refers to them."""
    answer: Any
    """The reference: a string, a list of accepted strings (DocVQA, TextVQA) or an option letter."""
    meta: dict[str, Any] = field(default_factory=dict)
    """What aggregation groups by (category, image, question type) and MC options."""


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: how to read it, prompt it, score one answer and aggregate."""

    name: str
    read: Callable[[Path, Path | None], list[Item]]
    """(data path, image folder or None) -> items, in file order."""
    prompt: Callable[[Item], str]
    score: Callable[[str, Item], dict[str, float]]
    aggregate: Callable[[list[Item], list[dict[str, float]]], dict[str, float]]
    """The reported numbers; the first key is the headline metric, in [0, 1]."""
    headline: tuple[str, ...]
    """The metrics a table shows (the JSON has all)."""
    max_new_tokens: int
    """lmms-eval's `generation_kwargs.max_new_tokens` for the task (128 where it sets none)."""
    layouts: str
    """The file layouts `read` accepts, for help texts and errors."""


def mean_scores(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    """The mean of every per-item metric (the aggregation of most benchmarks)."""
    if not scores:
        raise BenchmarkDataError("no items to aggregate")
    totals: dict[str, float] = defaultdict(float)
    for score in scores:
        for key, value in score.items():
            totals[key] += value
    return {key: total / len(scores) for key, total in totals.items()}


def grouped_means(items: list[Item], scores: list[dict[str, float]], metric: str, by: str) -> dict[str, float]:
    """`metric` averaged within each value of `meta[by]`: {"<value>/<metric>": mean}."""
    groups: dict[str, list[float]] = defaultdict(list)
    for item, score in zip(items, scores, strict=True):
        if item.meta.get(by) is not None:
            groups[str(item.meta[by])].append(score[metric])
    return {f"{group}/{metric}": sum(values) / len(values) for group, values in sorted(groups.items())}
