"""The answer-matching rules against worked examples read off each reference's code.

Where each expected value comes from (the files cited in `dvlm/tasks/benchmarks/answers.py`):
* MME lmms-eval: lmms_eval/tasks/mme/utils.py `parse_pred_ans` (lower, strip, delete ".", exact
  yes/no, a lone y/n, else "yes"/"no" inside [:4]). MME official: eval_tool/calculation.py
  `parse_pred_ans` on the lowercased answer (exact yes/no, else inside [:4]; nothing else).
* POPE official: POPE's evaluate.py (text before the first ".", "," deleted, split on " ", "no"
  if one word is "No"/"no"/"not"). POPE lmms-eval: lmms_eval/tasks/pope/utils.py (lowercased
  answer compared with the label).
* AI2D: lmms_eval/tasks/ai2d (regex ^\\s*([A-Z])\\. else the answer; exact_match with
  ignore_case and ignore_punctuation = lowercase, delete string.punctuation).
* ChartQA: lmms_eval/tasks/chartqa/utils.py `relaxed_correctness` (rstrip("%") / 100, float(),
  |p - t| / |t| <= 0.05 for a non-zero target, else p.lower() == t.lower(), target unstripped).
* DocVQA: lmms_eval/api/metrics.py `anls` = the RRC script (NL = distance of the normalised
  texts / max(len(answer.upper()), len(prediction.upper())); 1 - min NL, 0 when < 0.5).
Every case was also run through the reference's own function (lmms-eval at 75571cf, MME's
eval_tool.zip, POPE at its repository head), which gave the values below.
"""

import pytest

from dvlm.tasks.benchmarks.answers import (
    ai2d_correct,
    ai2d_extract,
    anls,
    levenshtein,
    mme_yes_no,
    mme_yes_no_official,
    pope_yes_no_lmms_eval,
    pope_yes_no_official,
    relaxed_correct,
)


@pytest.mark.parametrize("answer, lmms_eval, official", [
    ("Yes", "yes", "yes"), ("No.", "no", "no"),
    ("y", "yes", "other"), ("N", "no", "other"),       # one letter: only lmms-eval (Otter's rule) reads it
    ("x", "other", "other"),
    ("Yes, there is a dog.", "yes", "yes"),           # "yes" inside the first four characters
    ("There is no dog.", "other", "other"),           # "no" later than the first four characters
    ("Not sure", "no", "no"),                         # "not " holds "no"
    ("", "other", "other"),
    ("..yes", "yes", "other"),                        # lmms-eval deletes periods first; MME sees "..ye"
    ("y.", "yes", "other"), ("n.o", "no", "other"),
    ("YES!", "yes", "yes"),
])
def test_mme_yes_no_by_rule(answer, lmms_eval, official):
    assert mme_yes_no(answer) == lmms_eval
    assert mme_yes_no_official(answer) == official


@pytest.mark.parametrize("answer, expected", [
    ("Yes.", "yes"), ("No, there is not.", "no"), ("There is a dog.", "yes"),
    ("I do not see one", "no"),
    ("Yes. But not clearly.", "yes"),     # only the first sentence counts
    ("NO", "yes"),                        # the words are matched case-sensitively: "NO" is not a negation
    ("Nothing", "yes"),                   # whole words only
    ("no,", "no"),                        # commas are dropped first
    ("No\nthere is none", "yes"),         # split on " " only: the word is "No\nthere"
])
def test_pope_official_yes_no(answer, expected):
    assert pope_yes_no_official(answer) == expected


@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"), ("no", "no"), ("NO", "no"),
    ("Yes.", "other"), ("No, there is not.", "other"),  # anything but the bare word counts as neither
])
def test_pope_lmms_eval_reads_only_the_bare_word(answer, expected):
    assert pope_yes_no_lmms_eval(answer) == expected


@pytest.mark.parametrize("answer, letter, expected", [
    ("B", "B", True), ("B)", "B", True), ("b", "B", True), ("(B)", "B", True),   # punctuation and case ignored
    (" B.", "B", True), ("B. A.", "B", True),          # a leading "X." gives X
    ("b.", "B", True),                                  # no capital for the regex: the whole answer, "b"
    ("A. cat", "B", False), ("A. cat", "A", True),
    ("The answer is B", "B", False), ("Option B", "B", False), ("B C", "B", False), ("BB", "B", False),
])
def test_ai2d_lmms_eval_rule(answer, letter, expected):
    assert ai2d_correct(ai2d_extract(answer), letter) is expected


def test_ai2d_extract_returns_the_letter_or_the_answer():
    assert ai2d_extract("C. a frog") == "C"
    assert ai2d_extract("The answer is B") == "The answer is B"


@pytest.mark.parametrize("prediction, target, expected", [
    ("12", "12.5", True),       # |12 - 12.5| / 12.5 = 0.04 <= 0.05
    ("11.8", "12.5", False),    # 0.7 / 12.5 = 0.056
    ("11.875", "12.5", True),   # exactly 5% of the target (of the prediction it would be 5.26%)
    ("13.125", "12.5", True),   # exactly 5% over
    ("95.2", "100", True),      # 4.8% of the target; 5.04% of the prediction
    ("45%", "0.46", True),      # 0.45 against 0.46: 0.0217
    ("45%%", "0.45", True),     # every trailing "%" goes
    ("0", "0", True),           # a zero target: the texts must match ...
    ("0.0", "0", False),        # ... exactly
    ("0.01", "0", False),
    ("Yes", "yes", True), ("blue", "Blue", True), ("red", "blue", False),
    ("blue", "Blue ", False),   # the target is not stripped
    ("12 apples", "12", False),  # not a number: the texts differ
    ("2018", "2019", True),      # years are numbers too: 1/2019 is within 5%
    ("1_000", "1000", True),     # float() reads "1_000"
])
def test_chartqa_relaxed(prediction, target, expected):
    assert relaxed_correct(prediction, target) is expected


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("prediction, answers, expected", [
    ("hello", ["hallo"], 0.8),              # 1 edit / 5 characters
    ("abcde", ["abxye"], 0.6),              # 2 / 5 = 0.4
    ("abcd", ["abef"], 0.5),                # 2 / 4 = 0.5: exactly at the threshold is kept
    ("1.", ["1"], 0.5),                     # 1 / 2
    ("12/04", ["12/04/1998"], 0.5),         # 5 / 10
    ("ab", ["abcde"], 0.0),                 # 3 / 5 = 0.6 > 0.5: 0
    ("abc", ["xyz"], 0.0),
    ("hello", ["foo", " Hello "], 1.0),     # the best accepted answer; case and spaces ignored
    ("University  of Utah", ["university of utah"], 1.0),
    ("Dr. Smyth", ["Dr.  Smith"], 0.9),     # 1 edit over the raw answer's 10 characters, not 9
    ("ss", ["ßß"], 0.5),                    # 2 edits over len("ßß".upper()) = len("SSSS") = 4
    ("", [""], 1.0),
])
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)
