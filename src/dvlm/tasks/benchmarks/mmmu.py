"""MMMU (Yue et al. 2024): college-level questions, multiple choice or open, with up to 7 images.

Layouts read:
* the Hugging Face parquet (MMMU/MMMU per-subject folders, or lmms-lab/MMMU; split `validation`):
  `id`, `question`, `options` (a Python-literal list as text), `answer`, `question_type`
  (`multiple-choice` / `open`), `image_1` ... `image_7`;
* a JSON list (or JSON lines) of the same records with `image_k` file names relative to `--images`
  (default: the file's folder) and `options` a list or its text.

Prompt: lmms-eval's default (not interleaved): the question, "A. option" lines and the letter
instruction for multiple choice; the question and the short-answer instruction for open ones.
`<image k>` stays in the text; the images it names are given in the order of their numbers.
Rules (`choices`; accuracy overall and per question type):
* lmms-eval (lmms_eval/tasks/mmmu/utils.py with _task_utils/mmmu_mcq_utils.py): its option
  parsing, and open questions checked character by character, which scores them 0;
* official (MMMU's mmmu/utils/eval_utils.py): its option parsing and open-answer parsing.
A multiple-choice answer naming no option gets a random option under both (recorded as guessed).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from dvlm.tasks.benchmarks.choices import (
    lmms_eval_open_correct,
    open_correct,
    option_letters,
    parse_choice,
    parse_open,
)
from dvlm.tasks.benchmarks.files import (
    answer_text,
    image_bytes,
    image_file,
    is_parquet,
    parquet_records,
    read_json_lines,
    require,
    text,
)
from dvlm.tasks.benchmarks.items import (
    LETTER_ANSWER,
    LMMS_EVAL,
    OFFICIAL,
    SHORT_ANSWER,
    Benchmark,
    BenchmarkDataError,
    Item,
    Score,
    grouped_means,
)

MULTIPLE_CHOICE = "multiple-choice"
OPEN = "open"
IMAGE_TAG = re.compile(r"<image (\d+)>")
FIELDS = ("id", "question", "options", "answer", "question_type")


def _literal_list(value: Any, where: str) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    try:
        parsed = ast.literal_eval(value) if isinstance(value, str) and value.strip() else []
    except (ValueError, SyntaxError) as err:
        raise BenchmarkDataError(f"{where}: options {value[:60]!r} are not a list") from err
    if not isinstance(parsed, list):
        raise BenchmarkDataError(f"{where}: options must be a list, got {type(parsed).__name__}")
    return [str(v) for v in parsed]


def _references(answer: Any, where: str) -> list[str]:
    """Open answers may list several accepted values, written as a list literal (MMMU's answer
    file holds them as lists)."""
    if isinstance(answer, list):
        return [str(a) for a in answer]
    text_answer = answer_text({"answer": answer}, "answer", where)
    if text_answer.startswith("["):
        try:
            parsed = ast.literal_eval(text_answer)
        except (ValueError, SyntaxError):
            return [text_answer]
        if isinstance(parsed, list):
            return [str(a) for a in parsed]
    return [text_answer]


def _item(record: dict[str, Any], image_of, where: str) -> Item:
    require(record, FIELDS, where)
    kind = record["question_type"]
    if kind not in (MULTIPLE_CHOICE, OPEN):
        raise BenchmarkDataError(f"{where}: question_type {kind!r} is neither {MULTIPLE_CHOICE} nor {OPEN}")
    item_id, question = answer_text(record, "id", where), text(record, "question", where)
    options = _literal_list(record["options"], where) if kind == MULTIPLE_CHOICE else []
    numbers = sorted({int(n) for n in IMAGE_TAG.findall(question + "".join(options))})
    images = [image_of(record, n, where) for n in numbers]
    if kind == MULTIPLE_CHOICE and not options:
        raise BenchmarkDataError(f"{where}: a multiple-choice question without options")
    answer = answer_text(record, "answer", where) if kind == MULTIPLE_CHOICE else _references(record["answer"], where)
    return Item(item_id, question, images, answer,
                {"question_type": kind, "options": options, "answer_text": record["answer"],
                 "subject": "_".join(item_id.split("_")[1:-1])})


def _parquet_image(record: dict[str, Any], number: int, where: str) -> bytes:
    return image_bytes(record.get(f"image_{number}"), f"{where}, image_{number}")


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [_item(r, _parquet_image, where) for where, r in parquet_records(data, "validation")]
    folder = images or data.parent

    def from_file(record: dict[str, Any], number: int, where: str) -> Path:
        name = record.get(f"image_{number}")
        if not name or not isinstance(name, str):
            raise BenchmarkDataError(f"{where}: <image {number}> is named but image_{number} is not a file name")
        return image_file(folder, name, where)

    return [_item(r, from_file, f"{data}, record {k}") for k, r in enumerate(read_json_lines(data))]


def prompt(item: Item) -> str:
    if item.meta["question_type"] == MULTIPLE_CHOICE:
        options = "\n".join(f"{x}. {o}" for x, o in zip(option_letters(len(item.meta["options"])),
                                                        item.meta["options"]))
        return f"{item.question}\n{options}\n\n{LETTER_ANSWER}"
    return f"{item.question}\n\n{SHORT_ANSWER}"


def score(prediction: str, item: Item, rule: str) -> Score:
    if item.meta["question_type"] == MULTIPLE_CHOICE:
        letter, guessed = parse_choice(prediction, item.meta["options"], rule, item.id)
        return Score({"accuracy": float(letter == item.answer)}, letter, guessed)
    candidates = parse_open(prediction)
    if rule == OFFICIAL:
        correct = open_correct(candidates, item.answer)
    else:
        correct = lmms_eval_open_correct(candidates, item.meta["answer_text"])
    return Score({"accuracy": float(correct)}, candidates)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    overall = sum(s["accuracy"] for s in scores) / len(scores)
    return {"accuracy": overall, **grouped_means(items, scores, "accuracy", "question_type")}


MMMU = Benchmark("mmmu", read, prompt, score, aggregate, ("accuracy",), max_new_tokens=128,
                 layouts="MMMU/MMMU or lmms-lab/MMMU parquet (validation), or JSON records with image_k file names",
                 rules={LMMS_EVAL: "lmms_eval/tasks/mmmu/utils.py and _task_utils/mmmu_mcq_utils.py",
                        OFFICIAL: "MMMU's mmmu/utils/eval_utils.py"})
