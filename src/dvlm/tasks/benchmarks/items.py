"""The types every benchmark shares: one question (`Item`), one scored answer (`Score`), one
benchmark (`Benchmark`), its error.

Readers turn a benchmark's published files into `Item`s; `Benchmark.prompt` makes the text the
model sees; `Benchmark.judge` strips a generation and scores it by one of the benchmark's rules;
`Benchmark.aggregate` turns the per-item values into the benchmark's reported numbers;
`Benchmark.select` takes the first items of a limited run without splitting a group that is
scored together (an MME image's two questions). Everything here is plain Python: no model, no
dvlm imports.

The interface a benchmark module fills in (see `mme.py` for one with two rules):

* `read(data, images) -> list[Item]`, refusing a malformed record with `BenchmarkDataError`
  naming the file and the record;
* `prompt(item) -> str`, lmms-eval's prompt;
* `score(prediction, item, rule) -> Score`: `prediction` is already stripped; `rule` is one of
  the keys of `rules`; `Score.values` are the per-item numbers `aggregate` reads;
* `aggregate(items, values) -> dict[str, float]`, the first key the headline metric in [0, 1];
* `rules`: rule name -> the reference file it implements, `LMMS_EVAL` first (the default);
  `OFFICIAL` where the benchmark's own scorer is a second reference;
* `group_key`: the `meta` key whose items are only scored together (MME: "image"), or None.
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

# Rule names: lmms-eval's task code, or the benchmark's own published scorer.
LMMS_EVAL = "lmms-eval"
OFFICIAL = "official"
RULE_NAMES = (LMMS_EVAL, OFFICIAL)
DEFAULT_RULE = LMMS_EVAL  # the harness DiffusionVL reports with

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
class Score:
    """One answer as a rule read and scored it."""

    values: dict[str, float]
    """The per-item numbers `aggregate` reads (accuracy, anls, confusion counts, ...)."""
    parsed: Any = None
    """The answer as the rule read it ("yes"/"other", an option letter, candidate values), JSON-able."""
    guessed: bool = False
    """True when the rule found no answer and drew a random option (MMMU's fallback)."""


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: how to read it, prompt it, score one answer by a named rule and aggregate."""

    name: str
    read: Callable[[Path, Path | None], list[Item]]
    """(data path, image folder or None) -> items, in file order."""
    prompt: Callable[[Item], str]
    score: Callable[[str, Item, str], Score]
    """(stripped prediction, item, rule) -> Score; call `judge`, which strips and checks the rule."""
    aggregate: Callable[[list[Item], list[dict[str, float]]], dict[str, float]]
    """The reported numbers; the first key is the headline metric, in [0, 1]."""
    headline: tuple[str, ...]
    """The metrics a table shows (the JSON has all)."""
    max_new_tokens: int
    """lmms-eval's `generation_kwargs.max_new_tokens` for the task (128 where it sets none)."""
    layouts: str
    """The file layouts `read` accepts, for help texts and errors."""
    rules: dict[str, str]
    """Rule name -> the reference it implements; the first is the default."""
    group_key: str | None = None
    """`meta` key of items scored together (a limit never splits them), or None."""

    def check_rule(self, rule: str | None) -> str:
        """The rule to score with: `rule`, or the default when None; refused when not offered."""
        chosen = next(iter(self.rules)) if rule is None else rule
        if chosen not in self.rules:
            raise BenchmarkDataError(f"{self.name} has no {chosen!r} rule; its rules: {', '.join(self.rules)}")
        return chosen

    def judge(self, generation: str, item: Item, rule: str) -> Score:
        """Score a model's generation: stripped first, as lmms-eval does before every scorer."""
        return self.score(generation.strip(), item, self.check_rule(rule))

    def select(self, items: list[Item], limit: int | None) -> list[Item]:
        """The first `limit` items (all when None), extended to finish the last group."""
        if limit is None or limit >= len(items):
            return list(items)
        if self.group_key is None:
            return items[:limit]
        chosen = _first_groups(items, self.group_key, limit)
        return [item for item in items if item.meta[self.group_key] in chosen]


def _first_groups(items: list[Item], key: str, limit: int) -> set[Any]:
    """The groups, in order of first appearance, whose items first reach `limit`."""
    counts: dict[Any, int] = {}
    for item in items:
        counts[item.meta[key]] = counts.get(item.meta[key], 0) + 1
    chosen, total = set(), 0
    for group, count in counts.items():
        if total >= limit:
            break
        chosen.add(group)
        total += count
    return chosen


def coverage(scored: int, total: int) -> str:
    """'all 2374 items', or 'partial: 100 of 2374 items' for a limited run."""
    return f"all {total} items" if scored == total else f"partial: {scored} of {total} items"


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
