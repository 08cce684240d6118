"""AI2D (Kembhavi et al. 2016): four-option questions about science diagrams.

Layouts read:
* the Hugging Face parquet that lmms-eval reads (lmms-lab/ai2d, split `test`): `question`,
  `options` (a list), `answer` (the right option's 0-based index, as text), `image`;
* the official release folder: `questions/<image>.json` (`imageName` and `questions`, a mapping
  from question text to `answerTexts`, `correctAnswer` (0-based) and `questionId`) and
  `images/<image>`; with `ai2d_test_ids.csv` in the folder (one image id a line), only the test
  images are read.

Prompt: lmms-eval's `mcq` format, options as "A. text" lines. Rule (lmms-eval's, ai2d.yaml and
utils.py, `answers.ai2d_correct`): a leading "X." gives the letter X, otherwise the whole answer is
compared with the right letter, case and punctuation ignored; no guessing. AI2D has no scorer of its
own for generated answers, so lmms-eval's is the only rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvlm.tasks.benchmarks.answers import ai2d_correct, ai2d_extract
from dvlm.tasks.benchmarks.choices import option_letters
from dvlm.tasks.benchmarks.files import (
    answer_text,
    image_bytes,
    image_file,
    is_parquet,
    parquet_records,
    read_json,
    read_text,
    require,
    text,
)
from dvlm.tasks.benchmarks.items import LETTER_ANSWER, LMMS_EVAL, Benchmark, BenchmarkDataError, Item, Score

TEST_IDS_FILE = "ai2d_test_ids.csv"


def _item(item_id: str, question: str, options: Any, right: str, image, where: str) -> Item:
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
        raise BenchmarkDataError(f"{where}: options must be a list of strings")
    if not right.strip().isdigit() or int(right) >= len(options):
        raise BenchmarkDataError(f"{where}: answer index {right!r} for {len(options)} options")
    return Item(item_id, question, [image], option_letters(len(options))[int(right)], {"options": list(options)})


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [_item(f"ai2d/{k}", text(r, "question", where), r["options"], answer_text(r, "answer", where),
                      image_bytes(r["image"], where), where)
                for k, (where, r) in enumerate(parquet_records(data, "test",
                                                                ["question", "options", "answer", "image"]))]
    questions = data / "questions"
    if not questions.is_dir():
        raise BenchmarkDataError(f"{data}: AI2D takes the release folder (with questions/ and images/) or parquet")
    test_ids = _test_ids(data / TEST_IDS_FILE)
    items = []
    for file in sorted(questions.glob("*.json"), key=lambda f: (len(f.name), f.name)):
        items += _read_question_file(file, images or data / "images", test_ids)
    return items


def _read_question_file(file: Path, images: Path, test_ids: set[str] | None) -> list[Item]:
    record = read_json(file)
    require(record, ("imageName", "questions"), str(file))
    name = text(record, "imageName", str(file))
    if test_ids is not None and name.split(".")[0] not in test_ids:
        return []
    if not isinstance(record["questions"], dict):
        raise BenchmarkDataError(f"{file}: questions must be an object of question -> answers")
    image = image_file(images, name, str(file))
    items = []
    for n, (question, entry) in enumerate(record["questions"].items()):
        where = f"{file}: {question[:40]!r}"
        require(entry, ("answerTexts", "correctAnswer"), where)
        items.append(_item(str(entry.get("questionId", f"{name}-{n}")), question, entry["answerTexts"],
                           answer_text(entry, "correctAnswer", where), image, where))
    return items


def _test_ids(path: Path) -> set[str] | None:
    if not path.is_file():
        return None
    return {line.strip() for line in read_text(path).splitlines() if line.strip()}


def prompt(item: Item) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in
                        zip(option_letters(len(item.meta["options"])), item.meta["options"]))
    return f"{item.question}\n{options}\n{LETTER_ANSWER}"


def score(prediction: str, item: Item, rule: str) -> Score:
    extracted = ai2d_extract(prediction)
    return Score({"accuracy": float(ai2d_correct(extracted, item.answer))}, extracted)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    return {"accuracy": sum(s["accuracy"] for s in scores) / len(scores)}


AI2D = Benchmark("ai2d", read, prompt, score, aggregate, ("accuracy",), max_new_tokens=16,
                 layouts="lmms-lab/ai2d parquet or the release folder (questions/*.json, images/, "
                         "ai2d_test_ids.csv)",
                 rules={LMMS_EVAL: "lmms_eval/tasks/ai2d/ai2d.yaml and utils.py"})
