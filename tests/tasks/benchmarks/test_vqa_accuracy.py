"""TextVQA's answer processor and accuracy against worked examples of EvalAI's processor.

Expected values read off lmms_eval/tasks/_task_utils/vqa_eval_metric.py (`EvalAIAnswerProcessor`,
copied there from mmf) and lmms_eval/tasks/textvqa/utils.py (`textvqa_process_results`), and
confirmed by running that processor on each case.
"""

import pytest

from dvlm.tasks.benchmarks.vqa_accuracy import CONTRACTIONS, evalai_normalize, vqa_accuracy


@pytest.mark.parametrize("answer, expected", [
    ("The Two dogs.", "2 dogs"),            # articles dropped, number words as digits, the period gone
    ("none", "0"),
    ("100,978", "100978"),                  # every comma is deleted first
    ("yes,no , x", "yesno x"),
    ("what?", "what"),                      # so is every "?"
    ("it's", "it 's"),                      # "'s" is split off
    ("dont", "don't"), ("Dont", "don't"), ("hed", "he'd"), ("youll", "you'll"),
    ("Im", "im"), ("ive", "ive"), ("lets", "lets"),   # EvalAI's table has "Im", "Ive", "let's": never matched
    ("somebody'd", "somebodyd"),            # EvalAI's table maps this one the other way round
    ("3.5", "3.5"), ("5:30", "5:30"),       # a period before a digit and the colon stay
    ("a.b.c", "abc"),
    ("t-shirt", "t shirt"),                 # a mark not beside a space becomes a space
    ("coca-cola, inc.", "coca cola inc"),
    ("(a) b", "b"),                         # "(" becomes a space, ") " is deleted, "a" is an article
    ("1/2", "1 2"), ("1 / 2", "1 2"),
    ("x" + "." * 40, "x" + "." * 8),        # the reference removes at most 32 periods (re.UNICODE as count)
])
def test_evalai_normalize(answer, expected):
    assert evalai_normalize(answer) == expected


def test_the_contraction_table_is_evalais():
    # EvalAI's table has 120 entries (counted in vqa_eval_metric.py); spot-check both ends and
    # the entries the previous VQA-v2 table lacked.
    assert len(CONTRACTIONS) == 120
    assert CONTRACTIONS["aint"] == "ain't" and CONTRACTIONS["youve"] == "you've"
    assert CONTRACTIONS["oclock"] == "o'clock" and CONTRACTIONS["twas"] == "'twas"
    assert "im" not in CONTRACTIONS and "lets" not in CONTRACTIONS


def test_vqa_accuracy_worked_examples():
    # 4 of 10 said "red": leaving out any one annotator still leaves >= 3 matches -> 1.0.
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("Red.", ["red"] * 4 + ["blue"] * 6) == 1.0
    # 2 of 10: leaving out a "red" leaves 1 match (1/3), leaving out a "blue" leaves 2 (2/3):
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("green", ["red"] * 10) == 0.0
    assert vqa_accuracy("two", ["2"] * 10) == 1.0
    # Annotators' answers go through the same processor: "Coca-Cola" and "coca cola" agree.
    assert vqa_accuracy("coca cola", ["Coca-Cola"] * 3 + ["pepsi"] * 7) == pytest.approx(0.9)
