"""SEED-Bench-2-Plus: readers on the parquet lmms-eval reads and the official release; its rule."""

import json

import pytest

from dvlm.tasks.benchmarks import BenchmarkDataError, get_benchmark
from dvlm.tasks.benchmarks.items import Item
from tests.tasks.benchmarks.test_readers import hf_image, one_line, png, write_parquet

RECORD = {"data_id": "text_rich/chart/0001.png", "question_id": "0", "question_image_type": "chart",
          "question_image_subtype": "bar chart", "question": "Which year had the highest sales?",
          "choice_A": "2019", "choice_B": "2020", "choice_C": "2021", "choice_D": "sales_2022.png", "answer": "B",
          "data_source": "SEED-Bench v2 plus", "data_type": "Single Image", "level": "L1", "subpart": "Chart",
          "version": "v2"}


def test_seedbench_2_plus_parquet_and_prompt(tmp_path):
    write_parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [
        {**RECORD, "image": hf_image()},
        {**RECORD, "question_id": "1", "question_image_type": "web", "answer": "A", "image": hf_image()}])
    chart, web = get_benchmark("seedbench_2_plus").read(tmp_path, None)
    assert [(i.id, i.answer, i.meta["type"]) for i in (chart, web)] == [("0", "B", "Chart"), ("1", "A", "Web")]
    # seedbench_2_plus/utils.py seed_doc_to_text: an option naming a .png is shown as <image>.
    assert get_benchmark("seedbench_2_plus").prompt(chart) == (
        "Which year had the highest sales?\nA. 2019\nB. 2020\nC. 2021\nD. <image>\n"
        "Answer with the option's letter from the given choices directly.")


def test_seedbench_2_plus_official_json(tmp_path):
    png(tmp_path / "text_rich" / "chart" / "0001.png")
    (tmp_path / "SEED-Bench-2-plus-text-rich.json").write_text(json.dumps({"questions": [RECORD]}))
    (item,) = get_benchmark("seedbench_2_plus").read(tmp_path / "SEED-Bench-2-plus-text-rich.json", None)
    assert (item.id, item.images) == ("0", [tmp_path / "text_rich" / "chart" / "0001.png"])


# lmms_eval/tasks/seedbench_2_plus/utils.py seed_process_result + seed_aggregation_result.
@pytest.mark.parametrize("prediction, expected", [
    ("B", 1.0), ("b) 2020", 1.0), (" B\n", 1.0),
    ("The answer is B", 0.0),   # its first character, "T", is the answer
    ("(B)", 0.0), ("", 0.0),
])
def test_seedbench_2_plus_first_character(prediction, expected):
    item = Item("0", "q", [], "B", {"options": ["a", "b", "c", "d"], "type": "Chart"})
    score = get_benchmark("seedbench_2_plus").judge(prediction, item, "lmms-eval")
    assert score.values == {"accuracy": expected} and score.parsed == prediction.strip()[:1]


def test_seedbench_2_plus_accuracy_per_image_type():
    items = [Item(str(k), "q", [], "A", {"options": [], "type": t}) for k, t in enumerate(["Chart", "Chart", "Map", "Web"])]
    scores = [{"accuracy": v} for v in (1.0, 0.0, 1.0, 1.0)]
    assert get_benchmark("seedbench_2_plus").aggregate(items, scores) == {
        "accuracy": 0.75, "Chart/accuracy": 0.5, "Map/accuracy": 1.0, "Web/accuracy": 1.0}


def test_seedbench_2_plus_odd_records_are_one_line_errors(tmp_path):
    data = tmp_path / "SEED-Bench-2-plus-text-rich.json"
    for record, message in (("a question", "record 1: expected an object with question_id, question"),
                            ({**RECORD, "answer": None}, "record 1: answer must be text, got null"),
                            ({**RECORD, "data_id": 7}, "record 1: data_id must be text, got an int (7)")):
        data.write_text(json.dumps([RECORD, record]))
        png(tmp_path / "text_rich" / "chart" / "0001.png")
        with pytest.raises(BenchmarkDataError) as err:
            get_benchmark("seedbench_2_plus").read(data, None)
        assert one_line(err).startswith(f"{data}, {message}")
