"""SEED-Bench-2-Plus (Li et al. 2024): four-option questions about text-rich charts, maps and webs.

Layouts read:
* the Hugging Face parquet that lmms-eval reads (doolayer/SEED-Bench-2-Plus, split `test`):
  `question_id`, `question`, `choice_A` ... `choice_D`, `answer` (a letter),
  `question_image_type` (`chart`, `map`, `web`), `image`, and provenance columns;
* the official release (AILab-CVC/SEED-Bench-2-plus): `SEED-Bench-2-plus-text-rich.json` (a list
  of the same records, or `{"questions": [...]}`, each naming its image in `data_id`) with the
  images of `text_rich.zip` under `--images` (default: the file's folder), at `data_id`.

Prompt: lmms-eval's (`seedbench_2_plus/utils.py`): the question, "A. ..." to "D. ..." lines (an
option naming a .jpg/.png file is shown as "<image>") and the letter instruction. Scoring (the same
file): the stripped answer's first character, lowercased, must equal the reference letter
lowercased, so "B. cat" counts as B and "The answer is B" as T. Accuracy over all questions and
per image type (Chart, Map, Web). The only rule offered: the release's own evaluation code is not
implemented.

Item ids (the `id` of a predictions file): the benchmark's `question_id`s ("0", "1", ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from dvlm.tasks.benchmarks.items import (
    LETTER_ANSWER,
    LMMS_EVAL,
    Benchmark,
    BenchmarkDataError,
    Item,
    Score,
    grouped_means,
)

OPTION_COLUMNS = ("choice_A", "choice_B", "choice_C", "choice_D")
FIELDS = ("question_id", "question", *OPTION_COLUMNS, "answer", "question_image_type")
IMAGE_OPTION_MARKERS = ("jpg", "png")
IMAGE_TOKEN = "<image>"


def _item(record: dict[str, Any], image, where: str) -> Item:
    return Item(answer_text(record, "question_id", where), text(record, "question", where), [image],
                text(record, "answer", where), {"options": [answer_text(record, c, where) for c in OPTION_COLUMNS],
                                                "type": text(record, "question_image_type", where).capitalize()})


def _official_records(data: Path) -> list[dict[str, Any]]:
    document = read_json(data)
    records = document.get("questions") if isinstance(document, dict) else document
    if not isinstance(records, list):
        raise BenchmarkDataError(f"{data}: expected a JSON list of SEED-Bench-2-Plus questions")
    return records


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [_item(r, image_bytes(r["image"], where), where)
                for where, r in parquet_records(data, "test", [*FIELDS, "image"])]
    folder = images or data.parent
    items = []
    for k, record in enumerate(_official_records(data)):
        where = f"{data}, record {k}"
        require(record, (*FIELDS, "data_id"), where)
        items.append(_item(record, image_file(folder, text(record, "data_id", where), where), where))
    return items


def _shown(option: str) -> str:
    return IMAGE_TOKEN if any(marker in option for marker in IMAGE_OPTION_MARKERS) else option


def prompt(item: Item) -> str:
    options = "\n".join(f"{letter}. {_shown(text)}" for letter, text in zip("ABCD", item.meta["options"]))
    return f"{item.question}\n{options}\n{LETTER_ANSWER}"


def score(prediction: str, item: Item, rule: str) -> Score:
    parsed = prediction[:1]
    return Score({"accuracy": float(parsed.lower().strip() == item.answer.lower().strip())}, parsed)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    overall = sum(s["accuracy"] for s in scores) / len(scores)
    return {"accuracy": overall, **grouped_means(items, scores, "accuracy", "type")}


SEEDBENCH_2_PLUS = Benchmark("seedbench_2_plus", read, prompt, score, aggregate, ("accuracy",), max_new_tokens=16,
                             layouts="doolayer/SEED-Bench-2-Plus parquet (test) or SEED-Bench-2-plus-text-rich.json "
                                     "(+ --images, the folder text_rich.zip unpacks into)",
                             rules={LMMS_EVAL: "lmms_eval/tasks/seedbench_2_plus/utils.py"})
