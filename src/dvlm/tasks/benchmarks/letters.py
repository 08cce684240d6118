"""lmms-eval's shared ways of reading an option letter from an answer (lmms-eval v0.7.2,
`lmms_eval/tasks/_task_utils/`), used by the benchmarks that lmms-eval scores with them.

* `extract_mcq_answer` (`mcq_extract.py`, used by RealWorldQA and MMBench's rule without an LLM
  judge): every letter found in one of eight forms is a candidate, ranked by its form: the answer
  opening with the letter (not followed by a letter), ending with it, the letter after an answer
  phrase ("the answer is", ...), "(B)", "B.", "B:", "B)", "B " (before a space); within a form the
  latest occurrence wins; with no candidate, any occurrence of a letter; else "" (no answer).
* `parse_mmmu_choice` (`mmmu_mcq_utils.py`, used by MMMU-Pro): MMMU's parser as lmms-eval ships
  it, which differs from MMMU's own `eval_utils.py` (`choices.parse_choice`) in its second and
  third steps: "(B)" anywhere; else "B" before a space (no space needed before it); else "B.";
  else, for answers longer than five words, the options' texts; several candidates: the latest
  " B " / "(B)" / option text wins; none: a random option, which dvlm draws from a generator
  seeded by the question id (lmms-eval's draw is unseeded) and reports as guessed.

Both trim the answer's ends one mark at a time, in a fixed order, as the reference does (so
"B.'" keeps its period: the quote is trimmed after the period's turn).
"""

from __future__ import annotations

import random
import zlib
from typing import NamedTuple

DEFAULT_LETTERS = tuple("ABCDEFGH")
# The marks trimmed from the answer's ends, one after the other in this order.
MCQ_END_MARKS = (",", ".", "!", "?", ";", ":", "'", '"')
MMMU_END_MARKS = (",", ".", "!", "?", ";", ":", "'")
# The phrases after which the first letter found counts (mcq_extract.py's list, in its order).
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
    "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)
# How much each form of a letter is trusted (higher wins; then the later position).
FORM_RANK = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}
# The forms found by substring search, with the text around the letter.
MARKED_FORMS = (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                ("space", "{} "))
MMMU_LONG_ANSWER_WORDS = 5


class Candidate(NamedTuple):
    letter: str
    position: int
    form: str


class Parsed(NamedTuple):
    """What a scorer read from an answer: the answer it compares and whether it was a random draw."""

    answer: str
    guessed: bool = False


def _strip_marks(text: str, marks: tuple[str, ...]) -> str:
    for mark in marks:
        text = text.strip(mark)
    return text


def _phrase_candidates(padded: str, letters: tuple[str, ...]) -> list[Candidate]:
    lowered = padded.lower()
    found = []
    for phrase in ANSWER_PHRASES:
        start = lowered.find(phrase)
        if start != -1:
            after = start + len(phrase)  # the first of each letter after the phrase, even inside a word
            found += [Candidate(x, padded.find(x, after), "phrase") for x in letters if padded.find(x, after) != -1]
    return found


def _edge_candidates(padded: str, letters: tuple[str, ...]) -> list[Candidate]:
    text = padded.strip()
    found = [Candidate(x, 0, "start") for x in letters
             if text.startswith(x) and (len(text) == 1 or not text[1].isalpha())]
    return found + [Candidate(x, len(padded) - 1, "end") for x in letters
                    if text.endswith(x) and (len(text) == 1 or not text[-2].isalpha())]


def extract_mcq_answer(response: str, letters: tuple[str, ...] | list[str] | None = None) -> str:
    """The option letter lmms-eval's `extract_mcq_answer` reads, or "" when it finds none."""
    if not response.strip():
        return ""
    letters = tuple(letters or DEFAULT_LETTERS)
    padded = f" {_strip_marks(response.strip(), MCQ_END_MARKS)} "
    candidates = [Candidate(x, padded.rfind(form.format(x)), name) for name, form in MARKED_FORMS
                  for x in letters if form.format(x) in padded]
    candidates += _phrase_candidates(padded, letters) + _edge_candidates(padded, letters)
    if not candidates:
        candidates = [Candidate(x, padded.rfind(x), "fallback") for x in letters if x in padded]
    if not candidates:
        return ""
    # The most trusted form, then the latest position; the first listed wins a tie, as in the
    # reference's stable sort.
    return max(candidates, key=lambda c: (FORM_RANK[c.form], c.position)).letter


def _latest(candidates: list[str], position) -> str:
    positions = [position(x) for x in candidates]
    return candidates[positions.index(max(positions))]  # the first of equal positions, as numpy's argmax


def parse_mmmu_choice(response: str, options: list[str], seed_text: str) -> Parsed:
    """The option letter lmms-eval's MMMU parser reads (see the module doc)."""
    letters = [chr(ord("A") + k) for k in range(len(options))]
    padded = f" {_strip_marks(response, MMMU_END_MARKS)} "
    found = [x for x in letters if f"({x})" in padded]
    if found:
        return Parsed(_latest(found, lambda x: padded.rfind(f"({x})")) if len(found) > 1 else found[0])
    found = [x for x in letters if f"{x} " in padded] or [x for x in letters if f"{x}." in padded]
    if found:
        return Parsed(_latest(found, lambda x: padded.rfind(f" {x} ")) if len(found) > 1 else found[0])
    if len(padded.split()) > MMMU_LONG_ANSWER_WORDS:
        lowered = padded.lower()
        found = [x for x, text in zip(letters, options) if text.lower() in lowered]
        if found:
            return Parsed(_latest(found, lambda x: lowered.rfind(options[letters.index(x)].lower()))
                          if len(found) > 1 else found[0])
    return Parsed(random.Random(zlib.crc32(seed_text.encode())).choice(letters), guessed=True)
