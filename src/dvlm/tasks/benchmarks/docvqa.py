"""DocVQA (Mathew et al. 2021): questions about scanned documents, scored by ANLS.

Layouts read:
* the official annotation file `val_v1.0.json` (`{"data": [{"questionId", "question", "image":
  "documents/<file>.png", "answers": [...]}, ...]}`); images relative to the file's folder (or
  `--images`);
* the Hugging Face parquet that lmms-eval reads (lmms-lab/DocVQA, config DocVQA, split
  `validation`): `questionId`, `question`, `answers`, `image`. The root of the whole download also
  holds the InfographicVQA config: given the root, only its `DocVQA/` folder is read; a folder
  holding InfographicVQA's files without a `DocVQA/` folder is refused.

Rule (`answers.anls`, threshold 0.5): lmms_eval/api/metrics.py `anls`, which is the official
scorer's rule (the RRC challenge's DocVQA / InfographicVQA evaluation script, `evaluate_method`);
both names select it. The mean over questions is ANLS.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.answers import anls
from dvlm.tasks.benchmarks.files import (
    answer_text,
    answer_texts,
    config_folder,
    image_bytes,
    image_file,
    is_parquet,
    parquet_records,
    read_json,
    require,
    text,
)
from dvlm.tasks.benchmarks.items import (
    LMMS_EVAL,
    OFFICIAL,
    SHORT_ANSWER,
    Benchmark,
    BenchmarkDataError,
    Item,
    Score,
    mean_scores,
)

HF_CONFIG = "DocVQA"
OTHER_CONFIGS = ("InfographicVQA",)


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        folder = config_folder(data, HF_CONFIG, OTHER_CONFIGS)
        return [Item(answer_text(r, "questionId", where), text(r, "question", where), [image_bytes(r["image"], where)],
                     answer_texts(r, "answers", where))
                for where, r in parquet_records(folder, "validation", ["questionId", "question", "answers", "image"])]
    document = read_json(data)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise BenchmarkDataError(f"{data}: expected DocVQA's {{\"data\": [...]}} annotation file")
    items = []
    for k, record in enumerate(document["data"]):
        where = f"{data}, record {k}"
        require(record, ("questionId", "question", "image", "answers"), where)
        items.append(Item(answer_text(record, "questionId", where), text(record, "question", where),
                          [image_file(images or data.parent, text(record, "image", where), where)],
                          answer_texts(record, "answers", where)))
    return items


def prompt(item: Item) -> str:
    return f"{item.question}\n{SHORT_ANSWER}"


def score(prediction: str, item: Item, rule: str) -> Score:
    return Score({"anls": anls(prediction, item.answer)}, prediction)


DOCVQA = Benchmark("docvqa", read, prompt, score, mean_scores, ("anls",), max_new_tokens=32,
                   layouts="val_v1.0.json (+ documents/) or lmms-lab/DocVQA parquet (its DocVQA folder)",
                   rules={LMMS_EVAL: "lmms_eval/api/metrics.py, anls",
                          OFFICIAL: "the RRC DocVQA ANLS script, the same rule"})
