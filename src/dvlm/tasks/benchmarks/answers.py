"""Answer-matching rules of the benchmarks, each written from its reference's code (named per rule).

Every function takes the generation already stripped (`Benchmark.judge` strips it, as lmms-eval
does before every scorer since 0.4).

* MME, `mme_yes_no` (lmms-eval, lmms_eval/tasks/mme/utils.py `parse_pred_ans`, from Otter):
  lowercase, strip, remove periods; "yes"/"no" whole, a lone "y"/"n", else "yes"/"no" inside the
  first four characters; anything else is "other" (wrong for both labels).
  `mme_yes_no_official` (MME's eval_tool/calculation.py): lowercase only; "yes"/"no" whole, else
  inside the first four characters (no period removal, no one-letter answers).
* POPE, `pope_yes_no_official` (POPE's evaluate.py): the first sentence, commas dropped, is "no"
  when one of its space-separated words is exactly "No", "no" or "not"; every other answer is
  "yes". `pope_yes_no_lmms_eval` (lmms_eval/tasks/pope/utils.py): the lowercased answer itself,
  which counts only when it is exactly "yes" or "no".
* AI2D, `ai2d_correct` (lmms-eval: ai2d.yaml's `MultiChoiceRegexFilter` then the `exact_match`
  metric with ignore_case and ignore_punctuation): a leading "X." gives the letter X, otherwise
  the whole answer; compared with the option letter, case and ASCII punctuation ignored.
* ChartQA, `relaxed_correct` (lmms_eval/tasks/chartqa/utils.py `relaxed_correctness`, as in
  Pix2Struct's metrics): both sides read as numbers (every trailing "%" removed, then / 100)
  must be within 5% of a non-zero target; otherwise the texts must be equal ignoring case. The
  target is used as the dataset gives it (lmms-eval does not strip it).
* DocVQA, `anls` (lmms_eval/api/metrics.py `anls`, the RRC scorer's rule): per accepted answer the
  normalised edit distance NL = distance(normalised texts) / max(len(answer.upper()),
  len(prediction.upper())) with the raw lengths; the score is 1 - min NL, set to 0 below 0.5
  (exactly 0.5 is kept).
"""

from __future__ import annotations

import re
import string

# -- MME -----------------------------------------------------------------------------------------
MME_PREFIX_CHARS = 4  # "yes"/"no" must open the answer: both rules look at its first 4 characters


def mme_yes_no(answer: str) -> str:
    """'yes', 'no' or 'other', by lmms-eval's MME rule."""
    text = answer.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return _yes_no_in_prefix(text)


def mme_yes_no_official(answer: str) -> str:
    """'yes', 'no' or 'other', by MME's own calculation.py."""
    text = answer.lower()
    return text if text in ("yes", "no") else _yes_no_in_prefix(text)


def _yes_no_in_prefix(text: str) -> str:
    head = text[:MME_PREFIX_CHARS]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_label(answer: str) -> str:
    """A ground-truth label as both MME rules read it: lowercased, periods removed."""
    return answer.lower().strip().replace(".", "")


# -- POPE ----------------------------------------------------------------------------------------
POPE_NO_WORDS = ("No", "no", "not")


def pope_yes_no_official(answer: str) -> str:
    """'yes' or 'no', by POPE's evaluate.py: a negation word in the first sentence means no."""
    first_sentence = answer.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if any(word in POPE_NO_WORDS for word in words) else "yes"


def pope_yes_no_lmms_eval(answer: str) -> str:
    """'yes', 'no' or 'other', by lmms-eval's POPE rule: the whole answer, lowercased."""
    text = answer.lower().strip()
    return text if text in ("yes", "no") else "other"


# -- AI2D ----------------------------------------------------------------------------------------
_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def ai2d_extract(answer: str) -> str:
    """lmms-eval's AI2D filter: the letter of a leading "X.", otherwise the answer unchanged."""
    match = _LEADING_LETTER.match(answer)
    return match.group(1) if match else answer


def _exact_match_text(text: str) -> str:
    # lmms-eval's exact_match lowercases and deletes string.punctuation through numpy string
    # arrays, which also drop trailing NUL characters.
    return text.lower().translate(_NO_PUNCTUATION).rstrip("\x00")


def ai2d_correct(extracted: str, letter: str) -> bool:
    return _exact_match_text(extracted) == _exact_match_text(letter)


# -- ChartQA -------------------------------------------------------------------------------------
RELAXED_TOLERANCE = 0.05


def _as_number(text: str) -> float | None:
    # float() itself accepts surrounding spaces, signs, exponents, "inf", "nan" and "1_000", as
    # the reference's float() does.
    try:
        return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_correct(prediction: str, target: str) -> bool:
    """ChartQA's relaxed match: within 5% of a non-zero numeric target, else equal ignoring case."""
    predicted, expected = _as_number(prediction), _as_number(target)
    if predicted is not None and expected:  # a target of 0 has no relative error: the text rule
        return abs(predicted - expected) / abs(expected) <= RELAXED_TOLERANCE
    return prediction.lower() == target.lower()


# -- DocVQA --------------------------------------------------------------------------------------
ANLS_THRESHOLD = 0.5


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
    """1 - the smallest NL over the accepted answers; 0 when that is below the threshold."""
    predicted = _anls_text(prediction)
    distances = []
    for answer in answers:
        # The denominator is the raw texts' length (uppercased, as the reference measures it),
        # not the normalised texts' the distance is taken on.
        longer = max(len(answer.upper()), len(prediction.upper()))
        distances.append(levenshtein(_anls_text(answer), predicted) / longer if longer else 0.0)
    similarity = 1 - min(distances)
    return 0.0 if similarity < threshold else similarity
