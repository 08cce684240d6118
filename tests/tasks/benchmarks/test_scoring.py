"""Benchmarks scoring answers end to end: stripping, each rule, aggregation, limited selections.

Worked examples whose expected values come from the references (named per test): MME's
calculation.py on LaVIN's answers that ship with it (eval_tool/LaVIN/count.txt, first 8 lines),
POPE's evaluate.py and lmms-eval's pope/utils.py aggregations, lmms-eval's mme/utils.py prompt.
"""

import io

import pytest
from PIL import Image

from dvlm.tasks.benchmarks import get_benchmark
from dvlm.tasks.benchmarks.items import Item, coverage

# eval_tool/LaVIN/count.txt, lines 1-8: (image, question, label, LaVIN's answer).
LAVIN_COUNT = [
    ("000000006040.jpg", "Is there a train in the picture? Please answer yes or no.", "Yes",
     "yes, there is a train in the picture. the train is a blue and white passenger train travel"),
    ("000000006040.jpg", "Are there a total of two trains in the picture? Please answer yes or no.", "No",
     "yes, there are a total of two trains in the picture. one train is a blue and white"),
    ("000000044279.jpg", "Is there a total of two people in the image? Please answer yes or no.", "Yes",
     "yes, there are a total of two people in the image. the two men are working together in"),
    ("000000044279.jpg", "Is there only one people in the image? Please answer yes or no.", "No",
     "no, there are two people in the image. they are both wearing white aprons and are"),
    ("000000067213.jpg", "Is there only one dog in the image? Please answer yes or no.", "Yes",
     "no, there are multiple dogs in the image. the main focus of the image is a dog jump"),
    ("000000067213.jpg", "Is there two dogs in the image? Please answer yes or no.", "No",
     "no, there is only one dog in the image. the dog is jumping into a body of"),
    ("000000071226.jpg", "Is there a total of two dogs in the image? Please answer yes or no.", "Yes",
     "yes, there are a total of two dogs in the image. the dogs are lying on a bed"),
    ("000000071226.jpg", "Is there only one dogs in the image? Please answer yes or no.", "No",
     "yes, there is only one dog in the image. the dog is lying on the bed with its"),
]


def lavin_items():
    return [Item(f"count/{image}#{k % 2}", question, [], label, {"category": "count", "image": f"count/{image}"})
            for k, (image, question, label, _) in enumerate(LAVIN_COUNT)]


@pytest.mark.parametrize("rule", ["lmms-eval", "official"])
def test_mme_on_lavins_answers_matches_mmes_tool(rule):
    # calculation.py on these 8 lines: acc 5/8, acc+ 1/4 (one image of four has both right), score 87.5.
    mme = get_benchmark("mme")
    items = lavin_items()
    scores = [mme.judge(answer, item, rule) for item, (*_, answer) in zip(items, LAVIN_COUNT)]
    assert [s.parsed for s in scores] == ["yes", "yes", "yes", "no", "no", "no", "yes", "yes"]
    result = mme.aggregate(items, [s.values for s in scores])
    assert result["count/acc"] == 0.625 and result["count/acc_plus"] == 0.25
    assert result["count/score"] == 87.5 and result["perception"] == 87.5 and result["cognition"] == 0.0


def test_mme_prompt_removes_only_the_spaced_instruction():
    mme = get_benchmark("mme")
    # lmms-eval strips the question, then deletes " Please answer yes or no." (with its space).
    line_12 = Item("x", "Is there only one display device in the image?  Please answer yes or no.", [], "No")
    assert mme.prompt(line_12) == ("Is there only one display device in the image? \n"
                                   "Answer the question using a single word or phrase.")
    glued = Item("y", "Is this a cat?Please answer yes or no.", [], "No")
    assert mme.prompt(glued) == ("Is this a cat?Please answer yes or no.\n"
                                 "Answer the question using a single word or phrase.")


def test_mme_aggregate_worked_example():
    # existence: image a both right, image b one of two -> acc 3/4, acc+ 1/2, score 125.
    # code_reasoning: image c both wrong -> 0. Perception 125, cognition 0, overall acc 3/6.
    def item(category, image, k):
        return Item(f"{category}/{image}#{k}", "q", [], "Yes", {"category": category, "image": f"{category}/{image}"})
    items = [item("existence", "a", 0), item("existence", "a", 1), item("existence", "b", 0),
             item("existence", "b", 1), item("code_reasoning", "c", 0), item("code_reasoning", "c", 1)]
    result = get_benchmark("mme").aggregate(items, [{"acc": v} for v in (1.0, 1.0, 1.0, 0.0, 0.0, 0.0)])
    assert result["acc"] == 0.5
    assert result["existence/acc"] == 0.75 and result["existence/acc_plus"] == 0.5
    assert result["existence/score"] == 125.0 and result["code_reasoning/score"] == 0.0
    assert result["perception"] == 125.0 and result["cognition"] == 0.0


def test_mme_parquet_questions_of_one_image_are_scored_as_a_pair(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    image = {"bytes": buffer.getvalue(), "path": None}
    rows = [{"question_id": f"OCR/{name}", "question": f"Is it {word}? Please answer yes or no.", "answer": label,
             "category": "OCR", "image": image}
            for name, word, label in [("5.jpg", "STOP", "Yes"), ("5.jpg", "GO", "No"), ("6.jpg", "EXIT", "Yes"),
                                      ("6.jpg", "ENTER", "No")]]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "data" / "test-00000-of-00001.parquet")
    mme = get_benchmark("mme")
    items = mme.read(tmp_path, None)
    assert [i.meta["image"] for i in items] == ["OCR/5.jpg", "OCR/5.jpg", "OCR/6.jpg", "OCR/6.jpg"]
    answers = ["Yes", "No", "Yes", "Yes"]  # image 5 both right, image 6 one of two
    result = mme.aggregate(items, [mme.judge(a, i, "lmms-eval").values for a, i in zip(answers, items)])
    assert result["OCR/acc"] == 0.75 and result["OCR/acc_plus"] == 0.5 and result["OCR/score"] == 125.0


def test_a_limit_never_splits_an_mme_image():
    mme = get_benchmark("mme")
    items = lavin_items()
    assert len(mme.select(items, 3)) == 4       # the second image's pair is finished
    assert len(mme.select(items, 4)) == 4 and len(mme.select(items, 1)) == 2
    assert mme.select(items, None) == items and mme.select(items, 100) == items
    assert len(get_benchmark("pope").select(items, 3)) == 3   # POPE has no pairs
    assert coverage(4, 8) == "partial: 4 of 8 items" and coverage(8, 8) == "all 8 items"


POPE_LABELS = ["yes", "yes", "yes", "no", "no"]
POPE_ANSWERS = ["Yes", "Yes.", "No", "No", "There is no cat."]


@pytest.mark.parametrize("rule, expected", [
    # evaluate.py: read as yes, yes, no, no, no -> TP 2, FN 1, FP 0, TN 2.
    ("official", {"accuracy": 0.8, "precision": 1.0, "recall": 2 / 3, "f1": 0.8, "yes_ratio": 0.4}),
    # pope/utils.py: "yes", "yes.", "no", "no", "there is no cat." -> right: 1st, 4th; precision
    # 1/1 ("yes." is no "yes"); recall 1/2 (TP 1, FN 1: "yes." is neither); yes ratio of the labels.
    ("lmms-eval", {"accuracy": 0.4, "precision": 1.0, "recall": 0.5, "f1": 2 / 3, "yes_ratio": 0.6}),
])
def test_pope_aggregate_by_rule(rule, expected):
    pope = get_benchmark("pope")
    items = [Item(str(k), "q", [], label, {"category": "random"}) for k, label in enumerate(POPE_LABELS)]
    result = pope.aggregate(items, [pope.judge(a, i, rule).values for a, i in zip(POPE_ANSWERS, items)])
    assert {k: result[k] for k in expected} == pytest.approx(expected)
    assert result["random/recall"] == pytest.approx(expected["recall"])


def test_every_generation_is_stripped_before_scoring():
    pope = get_benchmark("pope")
    item = Item("1", "Is there a cat?", [], "no", {"category": "random"})
    # Unstripped, POPE's rule reads the word "No\n" as no negation, hence yes.
    assert pope.judge("No\n", item, "official").parsed == "no"
    assert pope.judge(" no ", item, "lmms-eval").values["accuracy"] == 1.0
    ai2d = get_benchmark("ai2d")
    assert ai2d.judge("A\n", Item("2", "q", [], "A", {"options": ["x", "y"]}), "lmms-eval").values["accuracy"] == 1.0
    chartqa = get_benchmark("chartqa")
    assert chartqa.judge(" 12\n", Item("3", "q", [], "12", {"type": "human"}), "lmms-eval").parsed == "12"
