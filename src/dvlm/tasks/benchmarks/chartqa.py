"""ChartQA (Masry et al. 2022): questions about charts, scored by relaxed accuracy.

Layouts read:
* the official release: `test/test_human.json` and `test/test_augmented.json` (lists of
  `{"imgname", "query", "label"}`), a file or the `test` folder, images in `test/png/` (or
  `--images`);
* the Hugging Face parquet that lmms-eval reads (lmms-lab/ChartQA, split `test`): `question`,
  `answer`, `type` (`human_test` / `augmented_test`), `image`.

Rule (lmms_eval/tasks/chartqa/utils.py, Pix2Struct's relaxed accuracy as lmms-eval copies it;
ChartQA's release has no scorer of its own): `answers.relaxed_correct`, the
target as the dataset gives it (not stripped); relaxed accuracy overall and per split (human,
augmented).
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.answers import relaxed_correct
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
    LMMS_EVAL,
    SINGLE_WORD,
    Benchmark,
    BenchmarkDataError,
    Item,
    Score,
    grouped_means,
)

OFFICIAL_FILES = ("test_human.json", "test_augmented.json")


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [Item(f"chartqa/{k}", text(r, "question", where), [image_bytes(r["image"], where)],
                     answer_text(r, "answer", where), {"type": text(r, "type", where).removesuffix("_test")})
                for k, (where, r) in enumerate(parquet_records(data, "test", ["question", "answer", "type", "image"]))]
    files = [data / name for name in OFFICIAL_FILES if (data / name).is_file()] if data.is_dir() else [data]
    if not files:
        raise BenchmarkDataError(f"{data}: no {' or '.join(OFFICIAL_FILES)}")
    return [item for file in files for item in _read_file(file, images or file.parent / "png")]


def _read_file(file: Path, images: Path) -> list[Item]:
    kind = file.stem.removeprefix("test_")
    records = read_json(file)
    if not isinstance(records, list):
        raise BenchmarkDataError(f"{file}: expected a JSON list of {{imgname, query, label}}")
    items = []
    for k, record in enumerate(records):
        where = f"{file}, record {k}"
        require(record, ("imgname", "query", "label"), where)
        items.append(Item(f"{kind}/{k}", text(record, "query", where),
                          [image_file(images, text(record, "imgname", where), where)],
                          answer_text(record, "label", where), {"type": kind}))
    return items


def prompt(item: Item) -> str:
    return f"{item.question}\n{SINGLE_WORD}"


def score(prediction: str, item: Item, rule: str) -> Score:
    return Score({"relaxed_accuracy": float(relaxed_correct(prediction, item.answer))}, prediction)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    overall = sum(s["relaxed_accuracy"] for s in scores) / len(scores)
    return {"relaxed_accuracy": overall, **grouped_means(items, scores, "relaxed_accuracy", "type")}


CHARTQA = Benchmark("chartqa", read, prompt, score, aggregate, ("relaxed_accuracy",), max_new_tokens=16,
                    layouts="test/test_human.json + test_augmented.json (images in test/png) or lmms-lab/ChartQA "
                            "parquet",
                    rules={LMMS_EVAL: "lmms_eval/tasks/chartqa/utils.py"})
