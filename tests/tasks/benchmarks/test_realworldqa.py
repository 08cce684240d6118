"""RealWorldQA: the reader on lmms-lab/RealWorldQA's parquet; lmms-eval's prompt and rule."""

import pytest

from dvlm.tasks.benchmarks import BenchmarkDataError, get_benchmark
from dvlm.tasks.benchmarks.items import Item
from tests.tasks.benchmarks.test_readers import hf_image, one_line, write_parquet

QUESTION = ("In which direction is the front wheel of the car on the right side facing?\n\nA. Left\nB. Straight\n"
            "C. Right\n\nPlease answer directly with only the letter of the correct option and nothing else.")


def test_realworldqa_parquet_shards_and_prompt(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00002.parquet",
                  [{"image": hf_image(), "question": QUESTION, "answer": "C"}])
    write_parquet(tmp_path / "data" / "test-00001-of-00002.parquet",
                  [{"image": hf_image(), "question": "How many cones are there? Please answer with a number.",
                    "answer": "3"}])
    first, second = get_benchmark("realworldqa").read(tmp_path, None)
    assert [(first.id, first.answer), (second.id, second.answer)] == [("realworldqa/0", "C"), ("realworldqa/1", "3")]
    # realworldqa/utils.py with the default (empty) post prompt: the question's own instruction stays.
    assert get_benchmark("realworldqa").prompt(first) == QUESTION


def test_realworldqa_refuses_other_files(tmp_path):
    (tmp_path / "annotations.json").write_text("[]")
    with pytest.raises(BenchmarkDataError, match="parquet"):
        get_benchmark("realworldqa").read(tmp_path / "annotations.json", None)


# lmms_eval/tasks/realworldqa/utils.py realworldqa_process_results on the stripped generation.
@pytest.mark.parametrize("prediction, answer, expected", [
    ("B", "B", 1.0), ("The answer is B.", "B", 1.0), ("C) 25", "C", 1.0),
    ("b", "B", 0.0),                 # extract_mcq_answer reads capital letters only
    ("A", " A ", 1.0),               # the reference is stripped
    ("3.", "3", 1.0), ("0..", "0", 1.0),   # open answers: trailing periods dropped
    ("Three", "3", 0.0), ("downhill", "Downhill", 1.0),
])
def test_realworldqa_exact_match(prediction, answer, expected):
    score = get_benchmark("realworldqa").judge(prediction, Item("q", "?", [], answer), "lmms-eval")
    assert score.values == {"exact_match": expected} and not score.guessed


def test_realworldqa_records_the_letter_or_the_cleaned_answer():
    realworldqa = get_benchmark("realworldqa")
    assert realworldqa.judge("The answer is B.", Item("q", "?", [], "B"), "lmms-eval").parsed == "B"
    assert realworldqa.judge("b", Item("q", "?", [], "B"), "lmms-eval").parsed == ""   # no capital letter: none
    assert realworldqa.judge("Downhill..", Item("q", "?", [], "downhill"), "lmms-eval").parsed == "downhill"


def test_realworldqa_null_question_is_a_one_line_error(tmp_path):
    file = write_parquet(tmp_path / "test-00000-of-00001.parquet",
                         [{"image": hf_image(), "question": "Which way?", "answer": "A"},
                          {"image": hf_image(), "question": None, "answer": "A"}])
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("realworldqa").read(tmp_path, None)
    assert one_line(err) == f"{file}, row 1: question must be text, got null"
