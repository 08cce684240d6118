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
be equal (spaces are kept, so "t - shirt" is not "t-shirt"); the mean is the accuracy.
"""

from __future__ import annotations

import string
from pathlib import Path

from dvlm.tasks.benchmarks.files import image_bytes, image_file, is_parquet, parquet_rows, read_json, require
from dvlm.tasks.benchmarks.items import SHORT_ANSWER, Benchmark, BenchmarkDataError, Item
from dvlm.tasks.benchmarks.letters import Parsed

SPLIT = "testdev"
QUESTIONS_CONFIG = "testdev_balanced_instructions"
IMAGES_CONFIG = "testdev_balanced_images"
IMAGE_FOLDER = "images"
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _parquet_images(path: Path) -> dict[str, bytes]:
    return {str(r["id"]): image_bytes(r["image"], f"{path}, image {r['id']}")
            for r in parquet_rows(path, SPLIT, ["id", "image"])}


def _read_parquet(questions: Path, images: Path) -> list[Item]:
    by_id = _parquet_images(images)
    items = []
    for r in parquet_rows(questions, SPLIT, ["id", "imageId", "question", "answer"]):
        if str(r["imageId"]) not in by_id:
            raise BenchmarkDataError(f"{questions}, question {r['id']}: image {r['imageId']} is not in {images}")
        items.append(Item(str(r["id"]), r["question"], [by_id[str(r["imageId"])]], r["answer"],
                          {"image": str(r["imageId"])}))
    return items


def _read_official(data: Path, images: Path) -> list[Item]:
    questions = read_json(data)
    if not isinstance(questions, dict):
        raise BenchmarkDataError(f"{data}: expected GQA's mapping from question id to question")
    items = []
    for question_id, record in questions.items():
        where = f"{data}, question {question_id}"
        require(record, ("imageId", "question", "answer"), where)
        items.append(Item(str(question_id), record["question"], [image_file(images, f"{record['imageId']}.jpg", where)],
                          record["answer"], {"image": str(record["imageId"])}))
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


def parse(prediction: str, item: Item) -> Parsed:
    return Parsed(normalize(prediction.strip()))


def score(prediction: str, item: Item) -> dict[str, float]:
    return {"exact_match": float(parse(prediction, item).answer == normalize(item.answer))}


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    return {"exact_match": sum(s["exact_match"] for s in scores) / len(scores)}


GQA = Benchmark("gqa", read, prompt, score, aggregate, ("exact_match",), max_new_tokens=16,
                layouts="lmms-lab/GQA parquet (testdev_balanced_instructions + testdev_balanced_images) or "
                        "testdev_balanced_questions.json (+ --images images/)")
