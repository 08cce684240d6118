"""Metrics of the built-in tasks: known good answers score 1, known errors cost what they should."""

from __future__ import annotations

import pytest

from dvlm.tasks.builtin import TASKS
from dvlm.tasks.metrics import (
    aggregate,
    caption_scores,
    digit_scores,
    exact_match,
    normalize,
    parse_caption,
    score,
    score_turn,
)

CAPTION = ("There are 3 shapes. A red circle is in the top left. An orange star is in the center. "
           "A green triangle is in the bottom right.")


def test_normalize():
    assert normalize("  Top   Left. ") == "top left"
    assert normalize("top left..") == "top left."  # only one trailing period goes
    assert normalize("3\n") == "3"


@pytest.mark.parametrize(("prediction", "expected"), [
    ("red", 1.0), ("Red.", 1.0), (" red ", 1.0), ("dark red", 0.0), ("", 0.0),
])
def test_exact_match(prediction, expected):
    assert exact_match(prediction, "red") == expected


def test_parse_caption_is_robust_to_case_and_spaces():
    facts, malformed = parse_caption("there ARE 3 shapes.  a  RED circle is in the Top  Left .")
    assert facts == {("red", "circle", "top left")} and malformed == 0


def test_reference_caption_scores_one():
    assert caption_scores(CAPTION, CAPTION) == {
        "exact_match": 1.0, "fact_precision": 1.0, "fact_recall": 1.0, "fact_f1": 1.0}


def test_swapped_colour_costs_one_fact_of_three():
    wrong = CAPTION.replace("A green triangle", "A blue triangle")
    scores = caption_scores(wrong, CAPTION)
    assert scores["exact_match"] == 0.0
    assert scores["fact_precision"] == pytest.approx(2 / 3)
    assert scores["fact_recall"] == pytest.approx(2 / 3)
    assert scores["fact_f1"] == pytest.approx(2 / 3)


def test_missing_fact_costs_recall_only():
    scores = caption_scores(CAPTION.removesuffix(" A green triangle is in the bottom right."),
                            CAPTION)
    assert scores["fact_precision"] == 1.0
    assert scores["fact_recall"] == pytest.approx(2 / 3)
    assert scores["fact_f1"] == pytest.approx(0.8)


def test_malformed_fact_costs_precision_and_count_sentence_is_ignored():
    extra = CAPTION.replace("There are 3", "There are 4") + " A pink circle is in the top."
    scores = caption_scores(extra, CAPTION)
    assert scores["fact_recall"] == 1.0
    assert scores["fact_precision"] == pytest.approx(3 / 4)
    assert caption_scores("garbage", CAPTION)["fact_f1"] == 0.0


def test_repeated_fact_counts_once():
    doubled = CAPTION + " A red circle is in the top left."
    assert caption_scores(doubled, CAPTION)["fact_f1"] == 1.0


@pytest.mark.parametrize(("prediction", "match", "accuracy"), [
    ("4 0 7", 1.0, 1.0),
    ("407", 0.0, 1.0),  # digits are read even without spaces
    ("4 1 7", 0.0, 2 / 3),
    ("4 0", 0.0, 2 / 3),  # a missing digit is wrong
    ("4 0 7 7", 0.0, 3 / 4),  # an extra digit is wrong: denominator max(len)
    ("0 7", 0.0, 0.0),  # position-wise, no alignment
    ("", 0.0, 0.0),
])
def test_digit_scores(prediction, match, accuracy):
    scores = digit_scores(prediction, "4 0 7")
    assert scores["exact_match"] == match
    assert scores["digit_accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_scores_its_references_perfectly(name):
    for sample in TASKS[name].generate("test", 20):
        result = score(name, sample.answers[-1], sample)
        assert result["exact_match"] == 1.0 and all(v == 1.0 for v in result.values())
        for turn, answer in enumerate(sample.answers):
            assert score_turn(answer, sample, turn)["exact_match"] == 1.0


def test_score_dispatches_on_the_last_answer_kind():
    sample = TASKS["digits-read"].generate("test", 1)[0]
    assert set(score("digits-read", "", sample)) == {"exact_match", "digit_accuracy"}
    sample = TASKS["shapes-caption"].generate("test", 1)[0]
    assert "fact_f1" in score("shapes-caption", "", sample)
    with pytest.raises(ValueError, match="belongs to task"):
        score("shapes-qa", "", sample)
    with pytest.raises(ValueError, match="known tasks"):
        score("nope", "", sample)


def test_aggregate_means_each_key_over_results_that_have_it():
    results = [{"exact_match": 1.0, "digit_accuracy": 0.5},
               {"exact_match": 0.0},
               {"exact_match": 1.0, "digit_accuracy": 1.0}]
    assert aggregate(results) == {"exact_match": pytest.approx(2 / 3), "digit_accuracy": 0.75}
    with pytest.raises(ValueError):
        aggregate([])
