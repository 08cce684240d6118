"""DocVQA (Mathew et al. 2021): questions about scanned documents, scored by ANLS.

Layouts read:
* the official annotation file `val_v1.0.json` (`{"data": [{"questionId", "question", "image":
  "documents/<file>.png", "answers": [...]}, ...]}`); images relative to the file's folder (or
  `--images`);
* the Hugging Face parquet that lmms-eval reads (lmms-lab/DocVQA, config DocVQA, split
  `validation`): `questionId`, `question`, `answers`, `image`.

Scoring: `answers.anls` (threshold 0.5) against every accepted answer; the mean is ANLS.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.answers import anls
from dvlm.tasks.benchmarks.files import image_bytes, image_file, is_parquet, parquet_rows, read_json, require
from dvlm.tasks.benchmarks.items import SHORT_ANSWER, Benchmark, BenchmarkDataError, Item, mean_scores


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [Item(str(r["questionId"]), r["question"], [image_bytes(r["image"], str(r["questionId"]))],
                     list(r["answers"]))
                for r in parquet_rows(data, "validation", ["questionId", "question", "answers", "image"])]
    document = read_json(data)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise BenchmarkDataError(f"{data}: expected DocVQA's {{\"data\": [...]}} annotation file")
    items = []
    for k, record in enumerate(document["data"]):
        where = f"{data}, record {k}"
        require(record, ("questionId", "question", "image", "answers"), where)
        items.append(Item(str(record["questionId"]), record["question"],
                          [image_file(images or data.parent, record["image"], where)], list(record["answers"])))
    return items


def prompt(item: Item) -> str:
    return f"{item.question}\n{SHORT_ANSWER}"


def score(prediction: str, item: Item) -> dict[str, float]:
    return {"anls": anls(prediction, item.answer)}


DOCVQA = Benchmark("docvqa", read, prompt, score, mean_scores, ("anls",), max_new_tokens=32,
                   layouts="val_v1.0.json (+ documents/) or lmms-lab/DocVQA parquet")
