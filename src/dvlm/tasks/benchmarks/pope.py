"""POPE (Li et al. 2023): "Is there a <object> in the image?" on COCO val2014, half yes, half no.

Layouts read:
* the official question files `coco_pope_{random,popular,adversarial}.json` (one JSON object a
  line: `question_id`, `image` (a COCO file name), `text`, `label`), a file or the folder holding
  them, with `--images` the COCO val2014 folder (default: the files' folder);
* the Hugging Face parquet that lmms-eval reads (lmms-lab/POPE, split `test`): `question_id`,
  `question`, `answer`, `category`, `image`.

Rules ("yes" is the positive class; accuracy, precision, recall, F1 and the yes ratio, overall
and per category):
* lmms-eval (lmms_eval/tasks/pope/utils.py): an answer counts only when it is exactly "yes" or
  "no" (lowercased); precision counts the "yes" answers, recall the answers to "yes" questions
  that are "yes" or "no" (any other answer is in neither), and the yes ratio is the share of
  questions whose label is yes (the ground truth's, 0.5 on POPE's balanced files);
* official (POPE's evaluate.py, `answers.pope_yes_no_official`): every answer reads as yes or no,
  and the yes ratio is the share of answers read as yes.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.answers import pope_yes_no_lmms_eval, pope_yes_no_official
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
from dvlm.tasks.benchmarks.items import LMMS_EVAL, OFFICIAL, SHORT_ANSWER, Benchmark, BenchmarkDataError, Item, Score

FILE_PATTERN = "coco_pope_*.json"


def _label(record: dict, key: str, where: str) -> str:
    label = answer_text(record, key, where).strip().lower()
    if label not in ("yes", "no"):
        raise BenchmarkDataError(f"{where}: {key} {record[key]!r} is neither yes nor no")
    return label


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [Item(answer_text(r, "question_id", where), text(r, "question", where), [image_bytes(r["image"], where)],
                     _label(r, "answer", where), {"category": text(r, "category", where)})
                for where, r in parquet_records(data, "test", ["question_id", "question", "answer", "category",
                                                               "image"])]
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
        items.append(Item(f"{category}/{answer_text(record, 'question_id', where)}", text(record, "text", where),
                          [image_file(images, text(record, "image", where), where)], _label(record, "label", where),
                          {"category": category}))
    return items


def prompt(item: Item) -> str:
    return f"{item.question.strip()}\n{SHORT_ANSWER}"


def score(prediction: str, item: Item, rule: str) -> Score:
    """Per item: accuracy, its share of the confusion counts, and what the yes ratio counts."""
    is_yes = item.answer == "yes"
    if rule == OFFICIAL:
        parsed = pope_yes_no_official(prediction)
        said_yes, said_no, counted_yes = parsed == "yes", parsed == "no", parsed == "yes"
    else:
        parsed = pope_yes_no_lmms_eval(prediction)
        said_yes, said_no, counted_yes = parsed == "yes", parsed == "no", is_yes
    values = {"accuracy": float(parsed == item.answer), "tp": float(said_yes and is_yes),
              "fp": float(said_yes and not is_yes), "fn": float(said_no and is_yes), "yes": float(counted_yes)}
    return Score(values, parsed)


def _confusion(scores: list[dict[str, float]]) -> dict[str, float]:
    tp, fp, fn = (sum(s[k] for s in scores) for k in ("tp", "fp", "fn"))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": sum(s["accuracy"] for s in scores) / len(scores), "f1": f1, "precision": precision,
            "recall": recall, "yes_ratio": sum(s["yes"] for s in scores) / len(scores)}


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    result = _confusion(scores)
    for category in sorted({item.meta["category"] for item in items}):
        part = _confusion([s for item, s in zip(items, scores, strict=True) if item.meta["category"] == category])
        result.update({f"{category}/{name}": value for name, value in part.items()})
    return result


POPE = Benchmark("pope", read, prompt, score, aggregate, ("accuracy", "f1", "yes_ratio"), max_new_tokens=128,
                 layouts="coco_pope_{random,popular,adversarial}.json (+ --images COCO val2014) or lmms-lab/POPE "
                         "parquet",
                 rules={LMMS_EVAL: "lmms_eval/tasks/pope/utils.py", OFFICIAL: "POPE's evaluate.py"})
