"""MMMU's answer parsing (Yue et al. 2024, the benchmark's evaluation rules), used by MMMU and AI2D.

Multiple choice (`parse_choice`): trim punctuation from the ends and pad with spaces, then look for
candidates in order of trust: letters in brackets "(B)"; else letters standing alone " B "; else,
for answers longer than five words, the options' texts. Several candidates: the one whose last
occurrence comes latest wins (models state the answer at the end). None: MMMU draws a random
option; dvlm draws it from a generator seeded by the question id, so reruns score the same.

Open questions (`parse_open` / `open_correct`): keep, from each line of the answer, the shortest
tail after an indicator ("is ", "so ", "therefore ", "answer ", ... and "=" on the last line),
add every number found in those tails, and normalise: numbers rounded to 2 decimals, text
lowercased (a one-character text padded with a space, so it must stand alone). A number matches
an equal reference number; a text matches when a normalised reference is inside it.
"""

from __future__ import annotations

import random
import re
import zlib

ENDS = ",.!?;:'"
LONG_ANSWER_WORDS = 5
OPEN_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
TRIVIAL_TAILS = (":", ",", ".", "!", "?", ";", "'")
_NUMBER = re.compile(
    r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?"   # 1,234,567(.89): digit groups
    r"|-?\d+(?:\.\d+)?[eE][+-]?\d+"     # 1.5e-3: scientific
    r"|-?(?:\d+\.\d+|\.\d+|\d+)"        # 12, 3.5, .5: plain
)


def option_letters(count: int) -> list[str]:
    return [chr(ord("A") + k) for k in range(count)]


def parse_choice(response: str, options: list[str], seed_text: str = "") -> str:
    """The option letter an answer names, by MMMU's rule (see the module doc)."""
    letters = option_letters(len(options))
    padded = f" {response.strip(ENDS)} "
    found = [x for x in letters if f"({x})" in padded]
    marker = "({})"
    if not found:
        found, marker = [x for x in letters if f" {x} " in padded], " {} "
    if found:
        return max(found, key=lambda x: padded.rfind(marker.format(x)))
    if len(padded.split()) > LONG_ANSWER_WORDS:
        lowered = padded.lower()
        by_text = [x for x, text in zip(letters, options) if text.lower() in lowered]
        if by_text:
            return max(by_text, key=lambda x: lowered.rfind(options[letters.index(x)].lower()))
    return random.Random(zlib.crc32(seed_text.encode())).choice(letters)


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
        return [round(number, 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def _key_tails(response: str) -> list[str]:
    # MMMU splits sentences with a pattern that needs a capital letter after ". ", but only after
    # lowercasing the answer, so in effect it splits on line breaks alone; so does this.
    lines = response.strip().strip(".").lower().split("\n")
    tails = []
    for index, line in enumerate(lines):
        indicators = OPEN_INDICATORS + (("=",) if index == len(lines) - 1 else ())
        candidates = [line.split(ind)[-1].strip() for ind in indicators if ind in line]
        if candidates:
            shortest = min(candidates, key=len)
            if shortest and shortest not in TRIVIAL_TAILS:
                tails.append(shortest)
    return tails or [response.strip().strip(".").lower()]


def parse_open(response: str) -> list[str | float]:
    """The normalised candidate answers an open response states."""
    tails = _key_tails(response)
    candidates: list[str] = [*tails, *(m for tail in tails for m in _NUMBER.findall(tail))]
    parsed: list[str | float] = []
    for candidate in candidates:
        parsed += [value for value in normalize_open(candidate) if value not in parsed]
    return parsed


def open_correct(response: str, references: list[str]) -> bool:
    """True when a parsed candidate matches a reference (numbers equal, texts contained)."""
    expected = [value for reference in references for value in normalize_open(reference)]
    for candidate in parse_open(response):
        if isinstance(candidate, str):
            if any(isinstance(e, str) and e in candidate for e in expected):
                return True
        elif candidate in expected:
            return True
    return False
