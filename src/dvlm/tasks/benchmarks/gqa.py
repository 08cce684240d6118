"""GQA (Hudson & Manning 2019): compositional questions about real images; testdev-balanced.

Layouts read:
* the Hugging Face parquet that lmms-eval reads (lmms-lab/GQA, split `testdev`): the questions in
  config `testdev_balanced_instructions` (`id`, `imageId`, `question`, `answer`, ...) and the
  images in config `testdev_balanced_images` (`id`, `image`), joined on `imageId` = `id`.
  `--data` is the dataset's root (holding both folders) or the instructions' parquet, with
  `--images` the images' parquet (file or folder);
* the official release: `testdev_balanced_questions.json` (a mapping from question id to
  `{"imageId", "question", "answer", ...}`) with `--images` the `images/` folder
  (`<imageId>.jpg`), by default `images/` beside the file.

Prompt: lmms-eval's (`gqa/utils.py`), the question and the short-answer instruction. Scoring:
lmms-eval's `exact_match` with `ignore_case` and `ignore_punctuation` (`api/metrics.py`): the
stripped answer and the reference, lowercased and with every ASCII punctuation mark deleted, must
be equal (spaces are kept, so "t - shirt" is not "t-shirt"); the mean is the accuracy. The only
rule offered: GQA's own eval.py (its accuracy with consistency, validity and plausibility, which
need the scene graphs and choices files) is not implemented.

Item ids (the `id` of a predictions file): GQA's question ids ("201307251").
"""

from __future__ import annotations

import string
from pathlib import Path

from dvlm.tasks.benchmarks.files import (
    answer_text,
    image_bytes,
    image_file,
    is_parquet,
    parquet_records,
    read_json,
    require,
    text,
)
from dvlm.tasks.benchmarks.items import LMMS_EVAL, SHORT_ANSWER, Benchmark, BenchmarkDataError, Item, Score

SPLIT = "testdev"
QUESTIONS_CONFIG = "testdev_balanced_instructions"
IMAGES_CONFIG = "testdev_balanced_images"
IMAGE_FOLDER = "images"
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _parquet_images(path: Path) -> dict[str, bytes]:
    return {answer_text(r, "id", where): image_bytes(r["image"], where)
            for where, r in parquet_records(path, SPLIT, ["id", "image"])}


def _item(question_id: str, record: dict, image, where: str) -> Item:
    return Item(question_id, text(record, "question", where), [image], answer_text(record, "answer", where),
                {"image": answer_text(record, "imageId", where)})


def _read_parquet(questions: Path, images: Path) -> list[Item]:
    by_id = _parquet_images(images)
    items = []
    for where, r in parquet_records(questions, SPLIT, ["id", "imageId", "question", "answer"]):
        image_id = answer_text(r, "imageId", where)
        if image_id not in by_id:
            raise BenchmarkDataError(f"{where}: image {image_id} is not in {images}")
        items.append(_item(answer_text(r, "id", where), r, by_id[image_id], where))
    return items


def _read_official(data: Path, images: Path) -> list[Item]:
    questions = read_json(data)
    if not isinstance(questions, dict):
        raise BenchmarkDataError(f"{data}: expected GQA's mapping from question id to question")
    items = []
    for question_id, record in questions.items():
        where = f"{data}, question {question_id}"
        require(record, ("imageId", "question", "answer"), where)
        image = image_file(images, f"{answer_text(record, 'imageId', where)}.jpg", where)
        items.append(_item(str(question_id), record, image, where))
    return items


def read(data: Path, images: Path | None) -> list[Item]:
    if data.is_dir() and (data / QUESTIONS_CONFIG).is_dir():
        return _read_parquet(data / QUESTIONS_CONFIG, images or data / IMAGES_CONFIG)
    if is_parquet(data):
        if images is None:
            raise BenchmarkDataError(f"{data}: give the {IMAGES_CONFIG} parquet with --images, or give the GQA "
                                     f"folder holding {QUESTIONS_CONFIG}/ and {IMAGES_CONFIG}/ as --data")
        return _read_parquet(data, images)
    if data.suffix != ".json":
        raise BenchmarkDataError(f"{data}: GQA takes lmms-lab/GQA's parquet or testdev_balanced_questions.json")
    return _read_official(data, images or data.parent / IMAGE_FOLDER)


def prompt(item: Item) -> str:
    return f"{item.question}\n{SHORT_ANSWER}"


def normalize(text: str) -> str:
    """lmms-eval's exact-match normalisation: lowercase, ASCII punctuation deleted."""
    return text.lower().translate(_NO_PUNCTUATION)


def score(prediction: str, item: Item, rule: str) -> Score:
    parsed = normalize(prediction)
    return Score({"exact_match": float(parsed == normalize(item.answer))}, parsed)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    return {"exact_match": sum(s["exact_match"] for s in scores) / len(scores)}


GQA = Benchmark("gqa", read, prompt, score, aggregate, ("exact_match",), max_new_tokens=16,
                layouts="lmms-lab/GQA parquet (testdev_balanced_instructions + testdev_balanced_images) or "
                        "testdev_balanced_questions.json (+ --images images/)",
                rules={LMMS_EVAL: "lmms_eval/tasks/gqa/gqa.yaml with lmms_eval/api/metrics.py exact_match"})
