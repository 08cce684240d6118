"""MMMU's answer parsing, two rules (used by MMMU and MMMU-Pro).

Official (MMMU's mmmu/utils/eval_utils.py) and lmms-eval (lmms_eval/tasks/_task_utils/
mmmu_mcq_utils.py and lmms_eval/tasks/mmmu/utils.py) share most steps and differ where noted.

Multiple choice (`parse_choice`): strip the characters , . ! ? ; : ' from both ends, one after the
other in that order (so "B,." keeps its comma), and pad with spaces; then look for candidates in
order of trust, stopping at the first step that finds one:
1. letters in brackets "(B)";
2. official: letters standing alone " B "; lmms-eval: letters followed by a space "B " (so "DNA"
   names A), then, if none, letters followed by a period "B.";
3. for answers of more than five words, the options' texts (case ignored).
Several candidates: the one whose last occurrence ("(B)", " B " or the option text) comes latest
wins; ties and candidates without such an occurrence go to the first. None: both references draw
a random option (`random.choice`, seeded once per run); dvlm draws it from a generator seeded by
the question id, so reruns score the same, and records that it guessed.

Open questions (`parse_open`, the official rule): lowercase the stripped answer (trailing periods
removed) and split it into lines (the reference's sentence split needs a capital letter, which
lowercasing has removed); from each line keep the shortest tail after an indicator ("could be ",
"so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", and "=" on the last line), the
way the reference's loop keeps it; add the numbers its three patterns find in those tails
(grouped "1,234", scientific "1e-3", simple "3.5"); normalise: a number rounded to 2 decimals, a
text lowercased, a one-character text padded with a space. A number matches an equal reference
number; a text matches when a normalised reference text is inside it.
lmms-eval keeps one of those candidates as text and hands it to the same check where a list is
expected, so the check runs over its characters: a reference matches only when it is contained
in a single character, which a normalised answer never is (`lmms_eval_open_correct`).
"""

from __future__ import annotations

import random
import re
import zlib

from dvlm.tasks.benchmarks.items import OFFICIAL

END_CHARACTERS = (",", ".", "!", "?", ";", ":", "'")  # stripped one after the other, in this order
LONG_ANSWER_WORDS = 5
OPEN_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
LAST_LINE_INDICATOR = "="
TRIVIAL_TAILS = (":", ",", ".", "!", "?", ";", "'")
ROUND_DIGITS = 2
_GROUPED = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def option_letters(count: int) -> list[str]:
    return [chr(ord("A") + k) for k in range(count)]


# -- multiple choice -----------------------------------------------------------------------------
def parse_choice(response: str, options: list[str], rule: str, seed_text: str = "") -> tuple[str, bool]:
    """(the option letter an answer names, whether it was drawn at random), by `rule`."""
    letters = option_letters(len(options))
    for char in END_CHARACTERS:
        response = response.strip(char)
    padded = f" {response} "
    found = [x for x in letters if f"({x})" in padded]
    if found:
        return _latest(found, [padded.rfind(f"({x})") for x in found]), False
    found = _letter_candidates(padded, letters, rule)
    if found:
        return _latest(found, [padded.rfind(f" {x} ") for x in found]), False
    if len(padded.split()) > LONG_ANSWER_WORDS:
        lowered = padded.lower()
        found = [x for x, text in zip(letters, options) if text.lower() in lowered]
        if found:
            return _latest(found, [lowered.rfind(options[letters.index(x)].lower()) for x in found]), False
    return random.Random(zlib.crc32(seed_text.encode())).choice(letters), True


def _letter_candidates(padded: str, letters: list[str], rule: str) -> list[str]:
    if rule == OFFICIAL:
        return [x for x in letters if f" {x} " in padded]
    found = [x for x in letters if f"{x} " in padded]
    return found or [x for x in letters if f"{x}." in padded]


def _latest(candidates: list[str], positions: list[int]) -> str:
    """The candidate at the largest position; the first of equal ones (numpy's argmax)."""
    return candidates[positions.index(max(positions))]


# -- open questions ------------------------------------------------------------------------------
def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def normalize_open(text: str) -> list[str | float]:
    """A number -> [it rounded to 2 decimals]; a text -> [lowercased], one character padded."""
    text = text.strip()
    number = _number(text)
    if number is not None:
        return [round(number, ROUND_DIGITS)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _shortest_tail(line: str, indicators: tuple[str, ...]) -> str | None:
    # The reference's loop: the first tail found is kept while it is empty; a later tail replaces
    # a kept one only when strictly shorter (an empty tail included, which the next tail found
    # then replaces again).
    kept: str | None = None
    for indicator in indicators:
        if indicator in line:
            tail = line.split(indicator)[-1].strip()
            if not kept or len(tail) < len(kept):
                kept = tail
    return kept


def _key_tails(response: str) -> list[str]:
    text = response.strip().strip(".").lower()
    lines = text.split("\n")
    tails = []
    for index, line in enumerate(lines):
        last = index == len(lines) - 1
        tail = _shortest_tail(line, OPEN_INDICATORS + ((LAST_LINE_INDICATOR,) if last else ()))
        if tail and tail.strip() not in TRIVIAL_TAILS:
            tails.append(tail)
    return tails or [text]


def extract_numbers(text: str) -> list[str]:
    """The numbers of a text, by the reference's three patterns in turn (a number may be found twice)."""
    return _GROUPED.findall(text) + _SCIENTIFIC.findall(text) + _SIMPLE.findall(text)


def parse_open(response: str) -> list[str | float]:
    """The normalised candidate answers an open response states (each once, in a fixed order)."""
    tails = _key_tails(response)
    candidates = [*tails, *(number for tail in tails for number in extract_numbers(tail))]
    parsed: list[str | float] = []
    for candidate in candidates:
        parsed += [value for value in normalize_open(candidate) if value not in parsed]
    return parsed


def open_correct(candidates: list[str | float], references: list[str]) -> bool:
    """The official check: a number equal to a reference number, or a reference text inside a text."""
    expected = [value for reference in references for value in normalize_open(reference)]
    for candidate in candidates:
        if isinstance(candidate, str):
            if any(isinstance(e, str) and e in candidate for e in expected):
                return True
        elif candidate in expected:
            return True
    return False


def lmms_eval_open_correct(candidates: list[str | float], answer: str | list[str]) -> bool:
    """lmms-eval's check: one candidate as text, its characters each checked against the answer as
    the dataset gives it (a list-literal string stays one string)."""
    text = str(candidates[0]) if candidates else ""
    expected = [v for a in ([answer] if isinstance(answer, str) else answer) for v in normalize_open(a)]
    return any(isinstance(e, str) and e in character for character in text for e in expected)

