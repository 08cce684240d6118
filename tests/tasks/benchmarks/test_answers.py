"""The answer-matching rules against worked examples computed by hand from each official rule."""

import pytest

from dvlm.tasks.benchmarks.answers import (
    anls,
    levenshtein,
    mme_yes_no,
    pope_yes_no,
    relaxed_correct,
    vqa_accuracy,
    vqa_normalize,
)


@pytest.mark.parametrize("answer, expected", [
    ("Yes", "yes"), ("No.", "no"), ("y", "yes"), ("N", "no"), ("x", "other"),
    ("Yes, there is a dog.", "yes"),      # "yes" inside the first four characters
    ("There is no dog.", "other"),        # "no" later than the first four characters
    ("Not sure", "no"),                   # "not " holds "no": MME's rule says no
    ("", "other"),
])
def test_mme_yes_no(answer, expected):
    assert mme_yes_no(answer) == expected


@pytest.mark.parametrize("answer, expected", [
    ("Yes.", "yes"), ("No, there is not.", "no"), ("There is a dog.", "yes"),
    ("I do not see one", "no"),
    ("Yes. But not clearly.", "yes"),     # only the first sentence counts
    ("NO", "yes"),                        # the words are matched case-sensitively: "NO" is not a negation
    ("Nothing", "yes"),                   # whole words only
    ("no,", "no"),                        # commas are dropped first
])
def test_pope_yes_no(answer, expected):
    assert pope_yes_no(answer) == expected


@pytest.mark.parametrize("prediction, target, expected", [
    ("12", "12.5", True),       # |12 - 12.5| / 12.5 = 0.04 <= 0.05
    ("11.8", "12.5", False),    # 0.7 / 12.5 = 0.056
    ("45%", "0.46", True),      # 0.45 against 0.46: 0.0217
    ("13.125", "12.5", True),   # exactly 5% over
    ("0", "0", True),           # a zero target: exact match
    ("0.01", "0", False),
    ("Yes", "yes", True), ("blue", "Blue ", True), ("red", "blue", False),
    ("12 apples", "12", False),  # not a number: exact match fails
    ("2018", "2019", True),      # years are numbers too: 1/2019 is within 5% (the official rule's quirk)
])
def test_chartqa_relaxed(prediction, target, expected):
    assert relaxed_correct(prediction, target) is expected


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("abc", "abc") == 0


@pytest.mark.parametrize("prediction, answers, expected", [
    ("hello", ["hallo"], 0.8),              # 1 edit / 5 characters
    ("abcde", ["abxye"], 0.6),              # 2 / 5 = 0.4 < 0.5
    ("abcd", ["abef"], 0.0),                # 2 / 4 = 0.5: at the threshold scores 0
    ("abc", ["xyz"], 0.0),
    ("hello", ["foo", " Hello "], 1.0),     # the best accepted answer; case and spaces ignored
    ("University  of Utah", ["university of utah"], 1.0),
    ("", [""], 1.0),
])
def test_anls(prediction, answers, expected):
    assert anls(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize("answer, expected", [
    ("The Two dogs.", "2 dogs"),            # articles dropped, number words as digits, final period gone
    ("100,978", "100978"),                  # digit-grouping comma
    ("dont", "don't"), ("3.5", "3.5"), ("5:30", "5:30"),
    ("t-shirt", "t shirt"),                 # a mark not beside a space becomes a space
    ("coca-cola, inc.", "coca cola inc"),   # "," stands beside a space: deleted; "-" does not: a space
    ("yes,no , x", "yesno x"),              # "," stands beside a space once: every "," is deleted
])
def test_vqa_normalize(answer, expected):
    assert vqa_normalize(answer) == expected


def test_vqa_accuracy_worked_examples():
    # 4 of 10 said "red": leaving out any one annotator still leaves >= 3 matches -> 1.0.
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("Red.", ["red"] * 4 + ["blue"] * 6) == 1.0
    # 2 of 10: leaving out a "red" leaves 1 match (1/3), leaving out a "blue" leaves 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("green", ["red"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
