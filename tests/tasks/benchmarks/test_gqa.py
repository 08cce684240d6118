"""GQA: the readers on files in lmms-lab/GQA's and the official release's layouts; lmms-eval's rule."""

import io
import json

import pytest
from PIL import Image

from dvlm.tasks.benchmarks import BenchmarkDataError, get_benchmark
from dvlm.tasks.benchmarks.items import Item
from tests.tasks.benchmarks.test_readers import hf_image, one_line, png, write_parquet

# A testdev_balanced_instructions row: every column of lmms-lab/GQA's config, nested as published.
QUESTION = {
    "id": "201307251", "imageId": "n161313", "question": "Is it overcast?", "answer": "no",
    "fullAnswer": "No, it is clear.", "isBalanced": True,
    "groups": {"global": None, "local": "14-overcast_overcast"},
    "entailed": ["201307250"], "equivalent": ["201307251"],
    "types": {"structural": "verify", "semantic": "global", "detailed": "weatherVerify"},
    "semantic": [{"operation": "select", "argument": "scene", "dependencies": []},
                 {"operation": "verify weather", "argument": "overcast", "dependencies": [0]}],
    "semanticStr": "select: scene->verify weather: overcast [0]",
}


def gqa_download(root):
    write_parquet(root / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet", [
        QUESTION, {**QUESTION, "id": "20968379", "imageId": "n288870", "question": "What color is the bus?",
                   "answer": "white", "fullAnswer": "The bus is white."}])
    write_parquet(root / "testdev_balanced_images" / "testdev-00000-of-00001.parquet", [
        {"id": "n288870", "image": hf_image("white")}, {"id": "n161313", "image": hf_image("blue")}])
    # Other configs of the download must not be read as testdev's.
    write_parquet(root / "train_balanced_instructions" / "train-00000-of-00001.parquet", [{**QUESTION, "id": "1"}])


def test_gqa_parquet_joins_questions_and_images_on_image_id(tmp_path):
    gqa_download(tmp_path)
    items = get_benchmark("gqa").read(tmp_path, None)
    assert [(i.id, i.answer, i.meta["image"]) for i in items] == [("201307251", "no", "n161313"),
                                                                  ("20968379", "white", "n288870")]
    assert Image.open(io.BytesIO(items[0].images[0])).getpixel((0, 0)) == (0, 0, 255)
    assert get_benchmark("gqa").prompt(items[0]) == "Is it overcast?\nAnswer the question using a single word or phrase."


def test_gqa_parquet_questions_with_images_given_apart(tmp_path):
    gqa_download(tmp_path)
    items = get_benchmark("gqa").read(tmp_path / "testdev_balanced_instructions",
                                      tmp_path / "testdev_balanced_images")
    assert len(items) == 2
    with pytest.raises(BenchmarkDataError, match="--images"):
        get_benchmark("gqa").read(tmp_path / "testdev_balanced_instructions", None)


def test_gqa_parquet_refuses_a_question_whose_image_is_missing(tmp_path):
    write_parquet(tmp_path / "q" / "testdev-00000-of-00001.parquet", [QUESTION])
    write_parquet(tmp_path / "i" / "testdev-00000-of-00001.parquet", [{"id": "n1", "image": hf_image()}])
    with pytest.raises(BenchmarkDataError, match="image n161313"):
        get_benchmark("gqa").read(tmp_path / "q", tmp_path / "i")


def test_gqa_official_questions_file(tmp_path):
    png(tmp_path / "images" / "n161313.jpg")
    record = {k: v for k, v in QUESTION.items() if k != "id"}
    record["annotations"] = {"answer": {}, "question": {}, "fullAnswer": {}}
    (tmp_path / "testdev_balanced_questions.json").write_text(json.dumps({"201307251": record}))
    (item,) = get_benchmark("gqa").read(tmp_path / "testdev_balanced_questions.json", None)
    assert (item.id, item.answer, item.images) == ("201307251", "no", [tmp_path / "images" / "n161313.jpg"])


# lmms_eval/api/metrics.py exact_match_hf_evaluate with gqa.yaml's ignore_case and ignore_punctuation,
# after the generation is stripped (lmms_eval/api/task.py process_results).
@pytest.mark.parametrize("prediction, answer, expected", [
    ("Yes.", "yes", 1.0), ("No", "no", 1.0), ("white", "White", 1.0), ("T-Shirt", "t-shirt", 1.0),
    ("  left\n", "left", 1.0),
    ("yes .", "yes", 0.0),          # the space before the deleted period stays
    ("t-shirt", "t - shirt", 0.0),  # punctuation deleted, spaces kept: "tshirt" vs "t  shirt"
    ("the left", "left", 0.0),      # no article removal: exact match
])
def test_gqa_exact_match(prediction, answer, expected):
    score = get_benchmark("gqa").judge(prediction, Item("q", "?", [], answer), "lmms-eval")
    assert score.values == {"exact_match": expected} and not score.guessed


def test_gqa_records_the_normalised_answer():
    assert get_benchmark("gqa").judge(" T-Shirt.\n", Item("q", "?", [], "t-shirt"), "lmms-eval").parsed == "tshirt"


def test_gqa_accuracy_is_the_mean():
    items = [Item(str(k), "?", [], "no") for k in range(4)]
    scores = [{"exact_match": v} for v in (1.0, 0.0, 1.0, 1.0)]
    assert get_benchmark("gqa").aggregate(items, scores) == {"exact_match": 0.75}


def test_gqa_odd_values_are_one_line_errors_naming_the_record(tmp_path):
    png(tmp_path / "images" / "n161313.jpg")
    record = {k: v for k, v in QUESTION.items() if k != "id"}
    questions = tmp_path / "testdev_balanced_questions.json"
    questions.write_text(json.dumps({"201307251": {**record, "question": None}}))
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("gqa").read(questions, None)
    assert one_line(err) == f"{questions}, question 201307251: question must be text, got null"
    write_parquet(tmp_path / "q" / "testdev-00000-of-00001.parquet", [{**QUESTION, "answer": None}])
    write_parquet(tmp_path / "i" / "testdev-00000-of-00001.parquet", [{"id": "n161313", "image": hf_image()}])
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("gqa").read(tmp_path / "q", tmp_path / "i")
    assert one_line(err) == f"{tmp_path / 'q' / 'testdev-00000-of-00001.parquet'}, row 0: answer must be text, got null"
