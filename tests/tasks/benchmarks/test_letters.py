"""lmms-eval's shared letter extractor against worked examples of the reference's behaviour.

The expected letters are what lmms-eval v0.7.2's own function returns on these answers:
`lmms_eval/tasks/_task_utils/mcq_extract.py` (`extract_mcq_answer`). (Its MMMU parser is tested
with `choices.parse_choice` in test_choices.py.)
"""

import pytest

from dvlm.tasks.benchmarks.letters import extract_mcq_answer

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
