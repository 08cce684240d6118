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

Rules (accuracy over all questions, MMMU's instance-level accuracy, and per subject):
* lmms-eval (the same file): standard, the letter `choices.parse_choice` reads by lmms-eval's
  MMMU parser (`_task_utils/mmmu_mcq_utils.py`; a random option when it reads none) must equal the
  answer; vision, lmms-eval does not parse at all (its rows have no `question`): the whole stripped
  answer must equal the answer letter ("B" is right, "B." and "Answer: B" are not).
* official (MMMU's `mmmu-pro/evaluate.py`, both settings): after the last "Answer:", the one
  option letter written there (as a substring, case kept: "Answer: B" and "Answer: (B)" give B,
  "Answer: B or C" none); failing that, the same parser as lmms-eval's standard rule.
A random option is drawn from a generator seeded by the question id (both references draw
unseeded) and recorded as guessed.

Item ids (the `id` of a predictions file): MMMU-Pro's question ids ("test_History_134"); the
standard and vision settings share them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dvlm.tasks.benchmarks.choices import option_letters, parse_choice
from dvlm.tasks.benchmarks.files import answer_text, image_bytes, is_parquet, parquet_records, text
from dvlm.tasks.benchmarks.items import LMMS_EVAL, OFFICIAL, Benchmark, BenchmarkDataError, Item, Score, grouped_means
from dvlm.tasks.benchmarks.mmmu import IMAGE_TAG, _literal_list

STANDARD_CONFIG = "standard (10 options)"
VISION_CONFIG = "vision"
CONFIGS = (STANDARD_CONFIG, "standard (4 options)", VISION_CONFIG)
SPLIT = "test"
# The post prompt of lmms-eval's mmmu_pro tasks ("option letter", unlike MMMU's "option's letter").
INSTRUCTION = "Answer with the option letter from the given choices directly."
FIELDS = ("id", "options", "answer", "subject")
ANSWER_MARKER = "Answer:"  # MMMU-Pro's evaluate.py reads the letter after the last one first
RULES = {LMMS_EVAL: "lmms_eval/tasks/mmmu_pro/utils.py with _task_utils/mmmu_mcq_utils.py",
         OFFICIAL: "MMMU's mmmu-pro/evaluate.py"}


def _setting_folder(data: Path, config: str) -> Path:
    if not is_parquet(data):
        raise BenchmarkDataError(f"{data}: MMMU-Pro takes MMMU/MMMU_Pro's parquet files")
    if (data / config).is_dir():
        return data / config
    if any((data / other).is_dir() for other in CONFIGS):  # the root, without this setting's folder
        raise BenchmarkDataError(f"{data}: no {config!r} folder")
    return data


def _item(record: dict[str, Any], question: str, options: list[str], images: list[bytes], where: str) -> Item:
    return Item(answer_text(record, "id", where), question, images, text(record, "answer", where),
                {"options": options, "subject": text(record, "subject", where)})


def _standard_images(record: dict[str, Any], question: str, options: list[str], where: str) -> list[bytes]:
    numbers = sorted({int(n) for n in IMAGE_TAG.findall(question + "".join(options))})
    return [image_bytes(record.get(f"image_{n}"), f"{where}, image_{n}") for n in numbers]


def read_standard(data: Path, images: Path | None) -> list[Item]:
    folder = _setting_folder(data, STANDARD_CONFIG)
    items = []
    for where, r in parquet_records(folder, SPLIT, [*FIELDS, "question"]):
        question, options = text(r, "question", where), _literal_list(r["options"], where)
        items.append(_item(r, question, options, _standard_images(r, question, options, where), where))
    return items


def read_vision(data: Path, images: Path | None) -> list[Item]:
    folder = _setting_folder(data, VISION_CONFIG)
    return [_item(r, "", _literal_list(r["options"], where), [image_bytes(r["image"], where)], where)
            for where, r in parquet_records(folder, SPLIT, [*FIELDS, "image"])]


def prompt_standard(item: Item) -> str:
    options = "\n".join(f"{x}. {o}" for x, o in zip(option_letters(len(item.meta["options"])), item.meta["options"]))
    return f"{item.question}\n{options}\n\n{INSTRUCTION}"


def prompt_vision(item: Item) -> str:
    return INSTRUCTION


def official_choice(prediction: str, options: list[str], seed_text: str) -> tuple[str, bool]:
    """(letter, guessed) by MMMU-Pro's evaluate.py: the one letter after the last "Answer:", else
    the MMMU parser it shares with lmms-eval."""
    marker = prediction.rfind(ANSWER_MARKER)
    if marker != -1:
        tail = prediction[marker + len(ANSWER_MARKER):].strip()
        named = [x for x in option_letters(len(options)) if x in tail]
        if len(named) == 1:
            return named[0], False
    return parse_choice(prediction, options, LMMS_EVAL, seed_text)


def _scored(letter: str, guessed: bool, item: Item) -> Score:
    return Score({"accuracy": float(letter == item.answer)}, letter, guessed)


def score_standard(prediction: str, item: Item, rule: str) -> Score:
    if rule == OFFICIAL:
        return _scored(*official_choice(prediction, item.meta["options"], item.id), item)
    return _scored(*parse_choice(prediction, item.meta["options"], LMMS_EVAL, item.id), item)


def score_vision(prediction: str, item: Item, rule: str) -> Score:
    if rule == OFFICIAL:
        return _scored(*official_choice(prediction, item.meta["options"], item.id), item)
    return _scored(prediction, False, item)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    overall = sum(s["accuracy"] for s in scores) / len(scores)
    return {"accuracy": overall, **grouped_means(items, scores, "accuracy", "subject")}


MMMU_PRO_STANDARD = Benchmark("mmmu_pro_standard", read_standard, prompt_standard, score_standard, aggregate,
                              ("accuracy",), max_new_tokens=256,
                              layouts="MMMU/MMMU_Pro parquet (the root or its 'standard (10 options)' folder)",
                              rules=RULES)
MMMU_PRO_VISION = Benchmark("mmmu_pro_vision", read_vision, prompt_vision, score_vision, aggregate, ("accuracy",),
                            max_new_tokens=256, layouts="MMMU/MMMU_Pro parquet (the root or its 'vision' folder)",
                            rules=RULES)
