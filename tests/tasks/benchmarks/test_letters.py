"""lmms-eval's shared letter extractors against worked examples of the reference's behaviour.

The expected letters are what lmms-eval v0.7.2's own functions return on these answers:
`lmms_eval/tasks/_task_utils/mcq_extract.py` (`extract_mcq_answer`) and
`lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py` (`parse_mmmu_multi_choice_response`).
"""

import pytest

from dvlm.tasks.benchmarks.letters import Parsed, extract_mcq_answer, parse_mmmu_choice

ABCD = ["A", "B", "C", "D"]


# lmms_eval/tasks/_task_utils/mcq_extract.py
@pytest.mark.parametrize("response, letters, expected", [
    ("The correct answer is (B).", ABCD, "B"),
    ("B", ABCD, "B"),
    ("I think it's A, not C.", ABCD, "C"),           # "C" ends the answer (its period trimmed): ranks above "A,"
    ("DATA.", ABCD, "A"),                            # "A" before the padding space, inside a word
    ("Answer: C", ABCD, "C"),
    ("", ABCD, ""),
    ("none of them", ABCD, ""),                      # only capital letters count
    ("b", ABCD, ""),
    ("答案是B", ABCD, "B"),                           # one of its non-English answer phrases
    ("C) because B is wrong", ABCD, "C"),            # opening letter outranks "B " later
    ("Option D is the best choice.", ABCD, "D"),
    ("The best option is C, since B fails.", ABCD, "B"),   # after a phrase, the latest letter found wins
    ("(A) or (D)", ABCD, "D"),
    ("E", None, "E"),                                # no letters given: A to H
    ("ABC", ABCD, "C"),                              # only "C " (before the padding) is a form: no start/end

])
def test_extract_mcq_answer(response, letters, expected):
    assert extract_mcq_answer(response, letters) == expected


TEN = ["cat", "dog", "bird", "red fish", "ant", "bee", "cow", "elk", "fox", "gnu"]


# lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py
@pytest.mark.parametrize("response, expected", [
    ("B", "B"), ("(C) bird", "C"), ("I think B", "B"),     # "I " and "B " found; " B " is the later
    ("The answer is J.", "J"),
    ("A. cat", "A"),                                  # no "X " anywhere: the "A." step
    ("Answer: H", "H"), ("Answer: (H)", "H"),
    ("I'm sorry, I can't help with that.", "I"),     # option I exists among ten: ", I can't"
    ("It is clearly the red fish in the picture", "D"),   # six words, no letter: the option's text
    ("B.'", "B"),                                     # the quote trimmed after the period's turn
    ("(B) or (E)", "E"),
    ("D.E.", "E"),                                    # several "X." candidates, none " X ": the first max
])
def test_parse_mmmu_choice(response, expected):
    assert parse_mmmu_choice(response, TEN, "q") == Parsed(expected, guessed=False)


def test_parse_mmmu_choice_without_candidates_guesses_reproducibly():
    # "dog" is one word: no letter and too short for option texts, so lmms-eval draws at random.
    first = parse_mmmu_choice("dog", TEN, "test_History_1")
    assert first.guessed and first.answer in "ABCDEFGHIJ"
    assert parse_mmmu_choice("dog", TEN, "test_History_1") == first
