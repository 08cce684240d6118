"""Metrics for the built-in tasks; ``score`` dispatches on the answer kind of the scored turn.

All metrics are in [0, 1] and return a dict. Every answer kind reports ``exact_match`` on
normalised text (lowercase, strip, collapse whitespace, drop one trailing period), so that key
is comparable across tasks; the others add:

* caption: ``fact_precision``, ``fact_recall``, ``fact_f1`` over the set of (colour, kind,
  position) facts. The prediction is split into sentences on "." and newlines; a sentence that
  parses as "a|an <colour> <kind> is in the <position>" (any case and spacing) is a fact. A
  sentence that does not parse but looks like a fact (starts with "a"/"an" or contains
  "is in the", e.g. "A pink circle is in the top left") counts as one wrong predicted fact, so
  malformed facts cost precision rather than vanish. Anything else (the count sentence "There
  are 3 shapes.", stray words) is ignored by F1 and only affects exact match. Repeated facts
  count once (set semantics).
* digits: ``digit_accuracy``, position-wise over the digit characters of prediction and
  reference (spaces and other characters are ignored, so "407" reads as 4, 0, 7) with
  denominator ``max(len(pred), len(ref))``: missing and extra digits both count as wrong.

Multi-turn samples are scored on their LAST answer (the harness feeds the reference history for
earlier turns and generates the last); use ``score_turn`` to score any other turn.
"""

from __future__ import annotations

import re
from collections import defaultdict

from dvlm.tasks.builtin import CAPTION, DIGITS, SHORT, TASKS, Sample
from dvlm.tasks.shapes import COLOURS, KINDS, POSITIONS

Fact = tuple[str, str, str]  # (colour, kind, position)


def _alternatives(words: tuple[str, ...] | list[str]) -> str:
    # Longest first, so "top left" wins over "top" inside the alternation.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"[.\n]+")
_DIGIT = re.compile(r"[0-9]")
_FACT = re.compile(
    rf"an? ({_alternatives(list(COLOURS))}) ({_alternatives(KINDS)}) "
    rf"is in the ({_alternatives(POSITIONS)})"
)
_FACT_LIKE = re.compile(r"^an? |\bis in the\b")


def normalize(text: str) -> str:
    """Lowercase, strip, collapse whitespace runs to one space, drop one trailing period."""
    text = _SPACES.sub(" ", text.lower()).strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize(prediction) == normalize(reference))


def parse_caption(text: str) -> tuple[set[Fact], int]:
    """The facts stated in ``text`` and the number of fact-like sentences that did not parse."""
    facts: set[Fact] = set()
    malformed = 0
    for sentence in _SENTENCE_END.split(text.lower()):
        sentence = _SPACES.sub(" ", sentence).strip()
        if not sentence:
            continue
        match = _FACT.fullmatch(sentence)
        if match:
            facts.add((match[1], match[2], match[3]))
        elif _FACT_LIKE.search(sentence):
            malformed += 1
    return facts, malformed


def caption_scores(prediction: str, reference: str) -> dict[str, float]:
    """Exact match plus precision / recall / F1 over (colour, kind, position) facts."""
    predicted, malformed = parse_caption(prediction)
    expected, _ = parse_caption(reference)
    correct = len(predicted & expected)
    n_predicted = len(predicted) + malformed
    # Empty against empty is a perfect match; empty against non-empty scores 0.
    precision = correct / n_predicted if n_predicted else float(not expected)
    recall = correct / len(expected) if expected else float(not n_predicted)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"exact_match": exact_match(prediction, reference), "fact_precision": precision,
            "fact_recall": recall, "fact_f1": f1}


def digit_scores(prediction: str, reference: str) -> dict[str, float]:
    """Sequence exact match plus position-wise digit accuracy over max(len(pred), len(ref))."""
    predicted, expected = _DIGIT.findall(prediction), _DIGIT.findall(reference)
    length = max(len(predicted), len(expected))
    hits = sum(p == e for p, e in zip(predicted, expected))  # zip stops at the shorter
    accuracy = hits / length if length else 1.0
    return {"exact_match": exact_match(prediction, reference), "digit_accuracy": accuracy}


def score_answer(prediction: str, reference: str, kind: str) -> dict[str, float]:
    """Score one answer with the metric of its answer kind."""
    if kind == SHORT:
        return {"exact_match": exact_match(prediction, reference)}
    if kind == CAPTION:
        return caption_scores(prediction, reference)
    if kind == DIGITS:
        return digit_scores(prediction, reference)
    raise ValueError(f"unknown answer kind {kind!r}; known: {SHORT}, {CAPTION}, {DIGITS}")


def score_turn(prediction: str, sample: Sample, turn: int) -> dict[str, float]:
    """Score ``prediction`` against answer number ``turn`` (0-based; negative counts back)."""
    return score_answer(prediction, sample.answers[turn], sample.answer_kinds[turn])


def score(task_name: str, prediction: str, sample: Sample) -> dict[str, float]:
    """Score a prediction of the sample's last answer with the task's metric."""
    if task_name not in TASKS:
        raise ValueError(f"unknown task {task_name!r}; known tasks: {', '.join(TASKS)}")
    if sample.task != task_name:
        raise ValueError(f"sample {sample.id} belongs to task {sample.task!r}, not {task_name!r}")
    return score_turn(prediction, sample, -1)


def aggregate(results: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over the results that report it (multi-turn mixes metric sets)."""
    if not results:
        raise ValueError("cannot aggregate an empty list of results")
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for result in results:
        for key, value in result.items():
            totals[key] += value
            counts[key] += 1
    return {key: totals[key] / counts[key] for key in totals}
