"""POPE (Li et al. 2023): "Is there a <object> in the image?" on COCO val2014, half yes, half no.

Layouts read:
* the official question files `coco_pope_{random,popular,adversarial}.json` (one JSON object a
  line: `question_id`, `image` (a COCO file name), `text`, `label`), a file or the folder holding
  them, with `--images` the COCO val2014 folder (default: the files' folder);
* the Hugging Face parquet that lmms-eval reads (lmms-lab/POPE, split `test`): `question_id`,
  `question`, `answer`, `category`, `image`.

Scoring (POPE's script): answers read as yes/no by `pope_yes_no`; "yes" is the positive class;
accuracy, precision, recall, F1 and the share of yes answers, overall and per category.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.answers import pope_yes_no
from dvlm.tasks.benchmarks.files import image_bytes, image_file, is_parquet, parquet_rows, read_json_lines, require
from dvlm.tasks.benchmarks.items import SHORT_ANSWER, Benchmark, BenchmarkDataError, Item

FILE_PATTERN = "coco_pope_*.json"


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [Item(str(r["question_id"]), r["question"], [image_bytes(r["image"], str(r["question_id"]))],
                     r["answer"].strip().lower(), {"category": r["category"]})
                for r in parquet_rows(data, "test", ["question_id", "question", "answer", "category", "image"])]
    files = sorted(data.glob(FILE_PATTERN)) if data.is_dir() else [data]
    if not files:
        raise BenchmarkDataError(f"{data}: no {FILE_PATTERN} question files")
    return [item for file in files for item in _read_file(file, images or file.parent)]


def _read_file(file: Path, images: Path) -> list[Item]:
    category = file.stem.removeprefix("coco_pope_")
    items = []
    for number, record in enumerate(read_json_lines(file), 1):
        where = f"{file}, record {number}"
        require(record, ("question_id", "image", "text", "label"), where)
        items.append(Item(f"{category}/{record['question_id']}", record["text"],
                          [image_file(images, record["image"], where)], record["label"].strip().lower(),
                          {"category": category}))
    return items


def prompt(item: Item) -> str:
    return f"{item.question.strip()}\n{SHORT_ANSWER}"


def score(prediction: str, item: Item) -> dict[str, float]:
    said_yes = pope_yes_no(prediction) == "yes"
    return {"accuracy": float(said_yes == (item.answer == "yes")), "said_yes": float(said_yes),
            "is_yes": float(item.answer == "yes")}


def _confusion(scores: list[dict[str, float]]) -> dict[str, float]:
    tp = sum(s["said_yes"] * s["is_yes"] for s in scores)
    fp = sum(s["said_yes"] * (1 - s["is_yes"]) for s in scores)
    fn = sum((1 - s["said_yes"]) * s["is_yes"] for s in scores)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": sum(s["accuracy"] for s in scores) / len(scores), "f1": f1, "precision": precision,
            "recall": recall, "yes_ratio": sum(s["said_yes"] for s in scores) / len(scores)}


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    result = _confusion(scores)
    for category in sorted({item.meta["category"] for item in items}):
        part = _confusion([s for item, s in zip(items, scores, strict=True) if item.meta["category"] == category])
        result.update({f"{category}/accuracy": part["accuracy"], f"{category}/f1": part["f1"]})
    return result


POPE = Benchmark("pope", read, prompt, score, aggregate, ("accuracy", "f1", "yes_ratio"), max_new_tokens=128,
                 layouts="coco_pope_{random,popular,adversarial}.json (+ --images COCO val2014) or lmms-lab/POPE "
                         "parquet")
