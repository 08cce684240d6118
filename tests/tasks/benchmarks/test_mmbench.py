"""MMBench (en dev): readers on lmms-lab/MMBench's parquet and the official TSV; lmms-eval's rule
without an LLM judge (`mmbench_en_dev_static`), circular evaluation included."""

import base64
import csv
import io

import pytest
from PIL import Image

from dvlm.tasks.benchmarks import BenchmarkDataError, get_benchmark
from dvlm.tasks.benchmarks.items import Item
from tests.tasks.benchmarks.test_readers import hf_image, one_line, png, write_parquet

HINT = ("Madelyn applied a thin layer of wax to the underside of her snowboard and rode the board straight down a "
        "hill. Then, she removed the wax and rode the snowboard straight down the hill again.")
ROW = {"index": 7, "question": "Identify the question that Madelyn's experiment can best answer.", "hint": HINT,
       "answer": "B", "A": "Does the snowboard slide faster with a thin or a thick layer of wax?",
       "B": "Does the snowboard slide faster with a layer of wax or without one?", "C": None, "D": None,
       "category": "identity_reasoning", "image": None, "source": "scienceqa", "L2-category": "attribute_reasoning",
       "comment": None, "split": "dev"}
ROTATED = {**ROW, "index": 1000007, "A": ROW["B"], "B": ROW["A"], "answer": "A"}


def test_mmbench_parquet_reads_english_dev_only(tmp_path):
    write_parquet(tmp_path / "en" / "dev-00000-of-00001.parquet",
                  [{**ROW, "image": hf_image("red")}, {**ROTATED, "image": hf_image("red")},
                   {**ROW, "index": 8, "hint": None, "question": "What is shown?", "A": "cat", "B": "dog",
                    "C": "bird", "D": "fish", "answer": "D", "category": "image_scene", "L2-category":
                    "coarse_perception", "image": hf_image("blue")}])
    write_parquet(tmp_path / "en" / "test-00000-of-00001.parquet", [{**ROW, "index": 9, "image": hf_image()}])
    write_parquet(tmp_path / "cn" / "dev-00000-of-00001.parquet", [{**ROW, "index": 10, "image": hf_image()}])
    items = get_benchmark("mmbench").read(tmp_path, None)
    assert [(i.id, i.answer, i.meta["circular"]) for i in items] == [("7", "B", 7), ("1000007", "A", 7), ("8", "D", 8)]
    assert items[0].meta["l2_category"] == "attribute_reasoning"
    assert Image.open(io.BytesIO(items[2].images[0])).getpixel((0, 0)) == (0, 0, 255)
    # en_utils.mmbench_doc_to_text: hint, question and options joined by spaces; missing options left out.
    assert get_benchmark("mmbench").prompt(items[0]) == (
        f"{HINT} {ROW['question']} There are several options:\nA. {ROW['A']}\nB. {ROW['B']}\n\n"
        "Answer with the option's letter from the given choices directly.")
    assert get_benchmark("mmbench").prompt(items[2]) == (
        "What is shown? There are several options:\nA. cat\nB. dog\nC. bird\nD. fish\n\n"
        "Answer with the option's letter from the given choices directly.")


def test_mmbench_parquet_refuses_a_root_without_english(tmp_path):
    write_parquet(tmp_path / "cn" / "dev-00000-of-00001.parquet", [{**ROW, "image": hf_image()}])
    with pytest.raises(BenchmarkDataError, match="no en/ folder"):
        get_benchmark("mmbench").read(tmp_path, None)


def test_mmbench_official_tsv_shares_images_between_rotated_copies(tmp_path):
    image = base64.b64encode(png(colour="green")).decode()
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source", "l2-category",
               "comment", "split"]
    with (tmp_path / "MMBench_DEV_EN.tsv").open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(columns)
        writer.writerow([7, ROW["question"], "", ROW["A"], ROW["B"], "", "", "B", "identity_reasoning", image,
                         "scienceqa", "attribute_reasoning", "", "dev"])
        writer.writerow([1000007, ROW["question"], "", ROW["B"], ROW["A"], "", "", "A", "identity_reasoning", "7",
                         "scienceqa", "attribute_reasoning", "", "dev"])
    first, copy = get_benchmark("mmbench").read(tmp_path / "MMBench_DEV_EN.tsv", None)
    assert copy.images == first.images and Image.open(io.BytesIO(copy.images[0])).getpixel((0, 0)) == (0, 128, 0)
    assert (copy.id, copy.meta["options"], copy.meta["hint"]) == ("1000007", {"A": ROW["B"], "B": ROW["A"], "C": None,
                                                                              "D": None}, None)
    assert get_benchmark("mmbench").prompt(copy).startswith(f"{ROW['question']} There are several options:\nA. ")


THREE = {"A": "cat", "B": "dog", "C": "bird", "D": None}


# lmms_eval/tasks/mmbench/mmbench_evals.py: can_infer, then (eval_method="static")
# lmms_eval/tasks/_task_utils/mcq_extract.py over the present options.
@pytest.mark.parametrize("prediction, letter", [
    ("B", "B"),
    ("A dog", "A"),                              # a lone "A" in a short answer is the option
    ("A cat is shown in this picture", "A"),     # here "A" may be the article: the option text decides
    ("I see a bird and a dog", ""),              # two option texts, no capital letter: nothing read
    ("It is (C).", "C"), ("Answer: B, the dog", "B"),
    ("E", "E"),                                  # read, though no question has an E
    ("Option B or C", "C"),                      # two lone letters: mcq_extract, the ending one
    ("the bird", "C"),
    ("Failed to obtain answer via API: dog", "B"),   # the matcher's failure marker: option text only
])
def test_mmbench_letter(prediction, letter):
    mmbench = get_benchmark("mmbench")
    item = Item("5", "q", [], "B", {"index": 5, "circular": 5, "hint": None, "options": THREE, "category": "c",
                                    "l2_category": "l"})
    score = mmbench.judge(prediction, item, "lmms-eval")
    assert (score.parsed, score.values, score.guessed) == (letter, {"accuracy": float(letter == "B")}, False)


def mmbench_item(index, answer, options, category, l2):
    return Item(str(index), "Which animal is this?", [], answer,
                {"index": index, "circular": index % 1_000_000, "hint": None, "options": options, "category": category,
                 "l2_category": l2})


def test_mmbench_circular_accuracy_worked_example():
    # mmbench_evals.py eval_result(eval_method="static") on these eight rows returns 2/3 overall,
    # image_scene 1.0 and ocr 0.5 (question 8 fails on its first rotation, "A dog" read as A).
    rows = [(7, "B", THREE, "image_scene", "coarse_perception", "B"),
            (1000007, "C", {"A": "bird", "B": "cat", "C": "dog", "D": None}, "image_scene", "coarse_perception",
             "The answer is C"),
            (2000007, "A", {"A": "dog", "B": "bird", "C": "cat", "D": None}, "image_scene", "coarse_perception", "a dog"),
            (8, "B", THREE, "ocr", "finegrained_perception (instance-level)", "B"),
            (1000008, "C", {"A": "bird", "B": "cat", "C": "dog", "D": None}, "ocr",
             "finegrained_perception (instance-level)", "A dog"),
            (2000008, "A", {"A": "dog", "B": "bird", "C": "cat", "D": None}, "ocr",
             "finegrained_perception (instance-level)", "A"),
            (9, "A", {"A": "yes", "B": "no", "C": None, "D": None}, "ocr", "finegrained_perception (instance-level)",
             "yes"),
            (1000009, "B", {"A": "no", "B": "yes", "C": None, "D": None}, "ocr",
             "finegrained_perception (instance-level)", "Yes")]
    mmbench = get_benchmark("mmbench")
    items = [mmbench_item(*row[:5]) for row in rows]
    scores = [mmbench.judge(row[5], item, "lmms-eval").values for row, item in zip(rows, items)]
    assert [s["accuracy"] for s in scores] == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]
    assert mmbench.aggregate(items, scores) == pytest.approx({
        "accuracy": 2 / 3, "image_scene/accuracy": 1.0, "ocr/accuracy": 0.5, "L2 coarse_perception/accuracy": 1.0,
        "L2 finegrained_perception (instance-level)/accuracy": 0.5})


def test_mmbench_tsv_without_its_columns_is_refused(tmp_path):
    (tmp_path / "MMBench_DEV_EN.tsv").write_text("question\tanswer\nWhat?\tA\n")
    with pytest.raises(BenchmarkDataError, match="no column"):
        get_benchmark("mmbench").read(tmp_path / "MMBench_DEV_EN.tsv", None)


def test_mmbench_limit_takes_every_rotated_copy_of_a_question():
    # In the file the copies of question 7 follow all the first rotations; a limit of 1 or 3 still
    # takes question 7 whole (its verdict needs every copy), 4 adds question 8 whole.
    mmbench = get_benchmark("mmbench")
    items = [mmbench_item(index, "A", THREE, "c", "l") for index in (7, 8, 1000007, 1000008, 2000007)]
    for limit, expected in ((1, ["7", "1000007", "2000007"]), (3, ["7", "1000007", "2000007"]),
                            (4, ["7", "8", "1000007", "1000008", "2000007"])):
        assert [item.id for item in mmbench.select(items, limit)] == expected


def write_tsv(path, rows):
    columns = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def test_mmbench_odd_files_are_one_line_errors(tmp_path):
    image = base64.b64encode(png(colour="green")).decode()
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", [["seven", "What?", "", "cat", "dog", "", "", "A", "c", image,
                                                       "l"]])
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("mmbench").read(tsv, None)
    assert one_line(err) == f"{tsv}, index seven: index must be an integer, got 'seven'"
    tsv.write_bytes(b"index\tquestion\n\xff\xfe\t?\n")
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("mmbench").read(tsv, None)
    assert one_line(err).startswith(f"{tsv}: not UTF-8 text")
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("mmbench").read(tmp_path / "missing.tsv", None)
    assert one_line(err) == f"{tmp_path / 'missing.tsv'}: no such file"
    file = write_parquet(tmp_path / "en" / "dev-00000-of-00001.parquet",
                         [{**ROW, "question": None, "image": hf_image()}])
    with pytest.raises(BenchmarkDataError) as err:
        get_benchmark("mmbench").read(tmp_path, None)
    assert one_line(err) == f"{file}, row 0: question must be text, got null"
