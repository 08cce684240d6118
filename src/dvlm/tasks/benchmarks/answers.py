"""Answer-matching rules of the benchmarks, each implemented from its published definition.

* `mme_yes_no`: MME's evaluation tool reads "yes"/"no" from an answer: the whole answer, a
  one-letter "y"/"n", or else "yes"/"no" inside its first four characters; anything else is
  "other" (wrong for both labels).
* `pope_yes_no`: POPE's evaluation script keeps the first sentence, drops commas, and reads "no"
  when one of its space-separated words is exactly "No", "no" or "not"; every other answer is "yes".
* `relaxed_correct`: ChartQA's relaxed accuracy (Masry et al. 2022, after Methani et al. 2020):
  numbers (a trailing "%" divides by 100) may be off by 5% of a non-zero target; anything else
  must match exactly, ignoring case.
* `anls`: DocVQA's Average Normalized Levenshtein Similarity (Biten et al. 2019): per question the
  best over the accepted answers of 1 - NL, where NL is the edit distance over the longer
  length, and 0 once NL reaches the threshold 0.5; answers compared lowercased and trimmed.
* `vqa_accuracy`: the VQA accuracy TextVQA uses: min(1, humans who gave the answer / 3), averaged
  over the 10 leave-one-annotator-out subsets, after the VQA answer normalisation
  (`vqa_normalize`).
"""

from __future__ import annotations

import re

ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
VQA_HUMANS_FOR_FULL_CREDIT = 3


# -- yes / no ------------------------------------------------------------------------------------
def mme_yes_no(answer: str) -> str:
    """'yes', 'no' or 'other', by MME's rule (periods removed, lowercased)."""
    text = answer.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]  # "yes" or "no" must open the answer, not appear anywhere
    return "yes" if "yes" in head else "no" if "no" in head else "other"


POPE_NO_WORDS = ("No", "no", "not")


def pope_yes_no(answer: str) -> str:
    """'yes' or 'no', by POPE's rule: a negation word in the first sentence means no."""
    first_sentence = answer.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in POPE_NO_WORDS for word in words) else "yes"


# -- ChartQA -------------------------------------------------------------------------------------
def _as_number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str) -> bool:
    """ChartQA's relaxed match: within 5% of a non-zero numeric target, else exact (case-blind)."""
    predicted, expected = _as_number(prediction), _as_number(target)
    if predicted is not None and expected:  # a target of 0 has no relative error: exact match below
        return abs(predicted - expected) / abs(expected) <= RELAXED_TOLERANCE
    return prediction.strip().lower() == target.strip().lower()


# -- DocVQA --------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    """The best similarity 1 - NL over the accepted answers; 0 where NL >= threshold."""
    predicted = _anls_text(prediction)
    best = 0.0
    for answer in answers:
        expected = _anls_text(answer)
        longer = max(len(predicted), len(expected))
        distance = levenshtein(predicted, expected) / longer if longer else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


# -- VQA accuracy (TextVQA) ----------------------------------------------------------------------
# The VQA rule's punctuation marks; the apostrophe and colon are not among them ("don't", "5:30").
VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
# Contractions written without their apostrophe, restored (the VQA rule's "dont" -> "don't").
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's",
    "theres": "there's", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't",
    "whats": "what's", "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't",
    "wouldve": "would've", "youre": "you're", "youve": "you've",
}
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text: str) -> str:
    # The VQA rule: a mark that stands next to a space somewhere in the answer, or any mark of an
    # answer holding a digit-grouping comma ("100,978"), is deleted; otherwise it becomes a space.
    # Both tests look at the answer as given, not as rewritten by earlier marks.
    grouped_number = bool(_DIGIT_COMMA_DIGIT.search(text))
    out = text
    for mark in VQA_PUNCTUATION:
        beside_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if beside_space or grouped_number else " ")
    return _PERIOD_NOT_DECIMAL.sub("", out)  # a period stays only before a digit ("3.5")


def vqa_normalize(answer: str) -> str:
    """The VQA answer normalisation: lowercase; punctuation removed (decimal points, apostrophes
    and colons kept); number words zero-ten as digits; articles dropped; contractions restored."""
    text = _vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip().lower())
    words = [NUMBER_WORDS.get(word, word) for word in text.split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """min(1, matches among the other annotators / 3), averaged over leaving each annotator out."""
    if not answers:
        raise ValueError("VQA accuracy needs the annotators' answers")
    predicted = vqa_normalize(prediction)
    humans = [vqa_normalize(answer) for answer in answers]
    total = 0.0
    for left_out in range(len(humans)):
        matches = sum(h == predicted for k, h in enumerate(humans) if k != left_out)
        total += min(1.0, matches / VQA_HUMANS_FOR_FULL_CREDIT)
    return total / len(humans)
