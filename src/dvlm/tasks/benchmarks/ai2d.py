"""AI2D (Kembhavi et al. 2016): four-option questions about science diagrams.

Layouts read:
* the Hugging Face parquet that lmms-eval reads (lmms-lab/ai2d, split `test`): `question`,
  `options` (a list), `answer` (the right option's 0-based index, as text), `image`;
* the official release folder: `questions/<image>.json` (`imageName` and `questions`, a mapping
  from question text to `answerTexts`, `correctAnswer` (0-based) and `questionId`) and
  `images/<image>`; with `ai2d_test_ids.csv` in the folder (one image id a line), only the test
  images are read.

Prompt: lmms-eval's `mcq` format, options as "A. text" lines. Scoring: the letter parsed from the
answer by MMMU's rule (`choices.parse_choice`) against the right one; accuracy.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.choices import option_letters, parse_choice
from dvlm.tasks.benchmarks.files import image_bytes, image_file, is_parquet, parquet_rows, read_json, require
from dvlm.tasks.benchmarks.items import LETTER_ANSWER, Benchmark, BenchmarkDataError, Item

TEST_IDS_FILE = "ai2d_test_ids.csv"


def _item(item_id: str, question: str, options: list[str], right: int, image, where: str) -> Item:
    if not 0 <= right < len(options):
        raise BenchmarkDataError(f"{where}: answer index {right} for {len(options)} options")
    return Item(item_id, question, [image], option_letters(len(options))[right], {"options": list(options)})


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [_item(f"ai2d/{k}", r["question"], r["options"], int(r["answer"]), image_bytes(r["image"], f"row {k}"),
                      f"{data}, row {k}")
                for k, r in enumerate(parquet_rows(data, "test", ["question", "options", "answer", "image"]))]
    questions = data / "questions"
    if not questions.is_dir():
        raise BenchmarkDataError(f"{data}: AI2D takes the release folder (with questions/ and images/) or parquet")
    test_ids = _test_ids(data / TEST_IDS_FILE)
    items = []
    for file in sorted(questions.glob("*.json"), key=lambda f: (len(f.name), f.name)):
        record = read_json(file)
        require(record, ("imageName", "questions"), str(file))
        if test_ids is None or record["imageName"].split(".")[0] in test_ids:
            image = image_file(images or data / "images", record["imageName"], str(file))
            items += [_item(q.get("questionId", f"{record['imageName']}-{n}"), text, q["answerTexts"],
                            int(q["correctAnswer"]), image, f"{file}: {text[:40]!r}")
                      for n, (text, q) in enumerate(record["questions"].items())]
    return items


def _test_ids(path: Path) -> set[str] | None:
    if not path.is_file():
        return None
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def prompt(item: Item) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in
                        zip(option_letters(len(item.meta["options"])), item.meta["options"]))
    return f"{item.question}\n{options}\n{LETTER_ANSWER}"


def score(prediction: str, item: Item) -> dict[str, float]:
    return {"accuracy": float(parse_choice(prediction, item.meta["options"], item.id) == item.answer)}


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    return {"accuracy": sum(s["accuracy"] for s in scores) / len(scores)}


AI2D = Benchmark("ai2d", read, prompt, score, aggregate, ("accuracy",), max_new_tokens=16,
                 layouts="lmms-lab/ai2d parquet or the release folder (questions/*.json, images/, "
                         "ai2d_test_ids.csv)")
