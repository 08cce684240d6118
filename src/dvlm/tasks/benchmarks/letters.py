"""lmms-eval's shared way of reading an option letter from an answer (lmms-eval v0.7.2,
`lmms_eval/tasks/_task_utils/mcq_extract.py`), used by the benchmarks that lmms-eval scores with
it. (Its MMMU parser, `_task_utils/mmmu_mcq_utils.py`, is `choices.parse_choice` by the lmms-eval
rule.)

* `extract_mcq_answer` (`mcq_extract.py`, used by RealWorldQA and MMBench's rule without an LLM
  judge): every letter found in one of eight forms is a candidate, ranked by its form: the answer
  opening with the letter (not followed by a letter), ending with it, the letter after an answer
  phrase ("the answer is", ...), "(B)", "B.", "B:", "B)", "B " (before a space); within a form the
  latest occurrence wins; with no candidate, any occurrence of a letter; else "" (no answer).

It trims the answer's ends one mark at a time, in a fixed order, as the reference does (so
"B.'" keeps its period: the quote is trimmed after the period's turn).
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_LETTERS = tuple("ABCDEFGH")
# The marks trimmed from the answer's ends, one after the other in this order.
MCQ_END_MARKS = (",", ".", "!", "?", ";", ":", "'", '"')
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


class Candidate(NamedTuple):
    letter: str
    position: int
    form: str


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
