"""MMMU-Pro (Yue et al. 2024): MMMU's questions made harder, in two of its settings.

* `mmmu_pro_standard`: up to ten options per question (config `standard (10 options)`);
* `mmmu_pro_vision`: the question and its options are rendered inside one screenshot (config
  `vision`); the model gets only the image and the instruction.

Layout read: the Hugging Face parquet that lmms-eval reads (MMMU/MMMU_Pro, split `test`); `--data`
is the dataset's root (the setting's folder is read) or that folder. Standard rows: `id`,
`question`, `options` (a Python-literal list as text), `answer` (a letter), `subject`,
`image_1` ... `image_7`; vision rows: `id`, `image`, `options`, `answer`, `subject`.

Prompt (lmms-eval's `mmmu_pro/utils.py`, `default` kwargs, not interleaved): standard, the
question, "A. option" lines and "Answer with the option letter from the given choices
directly." after a blank line, `<image k>` left in the text and the images it names given in the
order of their numbers; vision, that instruction alone.

Scoring (the same file): standard, the letter `letters.parse_mmmu_choice` reads (lmms-eval's MMMU
parser, random when it finds none) must equal the answer; vision, lmms-eval does not parse at all:
the whole stripped answer must equal the answer letter ("B" is right, "B." and "Answer: B" are
not). Accuracy over all questions (MMMU's instance-level accuracy) and per subject.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvlm.tasks.benchmarks.choices import option_letters
from dvlm.tasks.benchmarks.files import image_bytes, is_parquet, parquet_rows
from dvlm.tasks.benchmarks.items import Benchmark, BenchmarkDataError, Item, grouped_means
from dvlm.tasks.benchmarks.letters import Parsed, parse_mmmu_choice
from dvlm.tasks.benchmarks.mmmu import IMAGE_TAG, _literal_list

STANDARD_CONFIG = "standard (10 options)"
VISION_CONFIG = "vision"
CONFIGS = (STANDARD_CONFIG, "standard (4 options)", VISION_CONFIG)
SPLIT = "test"
# The post prompt of lmms-eval's mmmu_pro tasks ("option letter", unlike MMMU's "option's letter").
INSTRUCTION = "Answer with the option letter from the given choices directly."
FIELDS = ("id", "options", "answer", "subject")


def _setting_folder(data: Path, config: str) -> Path:
    if not is_parquet(data):
        raise BenchmarkDataError(f"{data}: MMMU-Pro takes MMMU/MMMU_Pro's parquet files")
    if (data / config).is_dir():
        return data / config
    if any((data / other).is_dir() for other in CONFIGS):  # the root, without this setting's folder
        raise BenchmarkDataError(f"{data}: no {config!r} folder")
    return data


def _item(record: dict[str, Any], images: list[bytes], where: str) -> Item:
    return Item(str(record["id"]), record.get("question", ""), images, str(record["answer"]),
                {"options": _literal_list(record["options"], where), "subject": record["subject"]})


def _standard_images(record: dict[str, Any], options: list[str], where: str) -> list[bytes]:
    numbers = sorted({int(n) for n in IMAGE_TAG.findall(record["question"] + "".join(options))})
    return [image_bytes(record.get(f"image_{n}"), f"{where}, image_{n}") for n in numbers]


def read_standard(data: Path, images: Path | None) -> list[Item]:
    folder = _setting_folder(data, STANDARD_CONFIG)
    items = []
    for k, r in enumerate(parquet_rows(folder, SPLIT, [*FIELDS, "question"])):
        where = f"{folder}, row {k}"
        items.append(_item(r, _standard_images(r, _literal_list(r["options"], where), where), where))
    return items


def read_vision(data: Path, images: Path | None) -> list[Item]:
    folder = _setting_folder(data, VISION_CONFIG)
    return [_item(r, [image_bytes(r["image"], f"{folder}, row {k}")], f"{folder}, row {k}")
            for k, r in enumerate(parquet_rows(folder, SPLIT, [*FIELDS, "image"]))]


def prompt_standard(item: Item) -> str:
    options = "\n".join(f"{x}. {o}" for x, o in zip(option_letters(len(item.meta["options"])), item.meta["options"]))
    return f"{item.question}\n{options}\n\n{INSTRUCTION}"


def prompt_vision(item: Item) -> str:
    return INSTRUCTION


def parse_standard(prediction: str, item: Item) -> Parsed:
    return parse_mmmu_choice(prediction.strip(), item.meta["options"], item.id)


def parse_vision(prediction: str, item: Item) -> Parsed:
    return Parsed(prediction.strip())


def score_standard(prediction: str, item: Item) -> dict[str, float]:
    return {"accuracy": float(parse_standard(prediction, item).answer == item.answer)}


def score_vision(prediction: str, item: Item) -> dict[str, float]:
    return {"accuracy": float(parse_vision(prediction, item).answer == item.answer)}


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    overall = sum(s["accuracy"] for s in scores) / len(scores)
    return {"accuracy": overall, **grouped_means(items, scores, "accuracy", "subject")}


MMMU_PRO_STANDARD = Benchmark("mmmu_pro_standard", read_standard, prompt_standard, score_standard, aggregate,
                              ("accuracy",), max_new_tokens=256,
                              layouts="MMMU/MMMU_Pro parquet (the root or its 'standard (10 options)' folder)")
MMMU_PRO_VISION = Benchmark("mmmu_pro_vision", read_vision, prompt_vision, score_vision, aggregate, ("accuracy",),
                            max_new_tokens=256, layouts="MMMU/MMMU_Pro parquet (the root or its 'vision' folder)")
