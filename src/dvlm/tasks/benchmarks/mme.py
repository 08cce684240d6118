"""MME (Fu et al. 2023): yes/no questions in 14 categories, two per image.

Layouts read:
* the official release folder (`MME_Benchmark_release_version/`): one folder per category; its
  question files are `questions_answers_YN/<image>.txt` beside `images/<image>.jpg|png`, or, in the
  other categories, `<image>.txt` next to `<image>.jpg|png`. Each line of a question file is
  `question<TAB>Yes|No`.
* the Hugging Face parquet that lmms-eval reads (lmms-lab/MME, split `test`): columns
  `question_id` ("<category>/<image file>"), `question`, `answer`, `category`, `image`.

Rules (`answers.mme_yes_no`, `answers.mme_yes_no_official`): lmms-eval's answer reading or MME's
own tool's; both then score per category acc = questions right / questions and acc+ = images with
both questions right / images; the category's score is 100 * (acc + acc+); Perception sums its 10
categories (out of 2000), Cognition its 4 (out of 800). `acc` over all questions heads the table.
A limited run takes whole images (`group_key`), so acc+ still sees both questions of each.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from dvlm.tasks.benchmarks.answers import mme_label, mme_yes_no, mme_yes_no_official
from dvlm.tasks.benchmarks.files import answer_text, image_bytes, is_parquet, parquet_records, read_text, text
from dvlm.tasks.benchmarks.items import LMMS_EVAL, OFFICIAL, SHORT_ANSWER, Benchmark, BenchmarkDataError, Item, Score

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")
QUESTION_FOLDER = "questions_answers_YN"
# The questions already end with this; lmms-eval removes it, the space before it included, and
# appends SHORT_ANSWER (mme/utils.py `replace_prompt`).
BUILT_IN_INSTRUCTION = " Please answer yes or no."


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return _read_parquet(data)
    if not data.is_dir():
        raise BenchmarkDataError(f"{data}: MME takes the release folder or the parquet files")
    items = [item for category in sorted(p for p in data.iterdir() if p.is_dir()) for item in _read_category(category)]
    if not items:
        raise BenchmarkDataError(f"{data}: no MME category folders with question files")
    return items


def _read_category(folder: Path) -> list[Item]:
    questions = folder / QUESTION_FOLDER
    text_dir, image_dir = (questions, folder / "images") if questions.is_dir() else (folder, folder)
    items = []
    for text_file in sorted(text_dir.glob("*.txt")):
        image = _image_beside(image_dir, text_file.stem, text_file)
        for number, line in enumerate(read_text(text_file).splitlines()):
            if line.strip():
                question, answer = _question_line(line, f"{text_file}, line {number + 1}")
                items.append(Item(f"{folder.name}/{image.name}#{number}", question, [image], answer,
                                  {"category": folder.name, "image": f"{folder.name}/{image.name}"}))
    return items


def _image_beside(folder: Path, stem: str, where: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / (stem + suffix)).is_file():
            return folder / (stem + suffix)
    raise BenchmarkDataError(f"{where}: no image {stem}.jpg or .png in {folder}")


def _question_line(line: str, where: str) -> tuple[str, str]:
    parts = line.rstrip("\n").split("\t")
    if len(parts) < 2 or parts[-1].strip().lower() not in ("yes", "no"):
        raise BenchmarkDataError(f"{where}: expected 'question<TAB>Yes|No', got {line[:80]!r}")
    return "\t".join(parts[:-1]).strip(), parts[-1].strip()


def _read_parquet(data: Path) -> list[Item]:
    items = []
    counts: dict[str, int] = defaultdict(int)
    for where, row in parquet_records(data, "test", ["question_id", "question", "answer", "category", "image"]):
        image_key = answer_text(row, "question_id", where)  # "<category>/<image file>": one per image
        answer = answer_text(row, "answer", where)
        if mme_label(answer) not in ("yes", "no"):
            raise BenchmarkDataError(f"{where}: answer {answer!r} is neither Yes nor No")
        items.append(Item(f"{image_key}#{counts[image_key]}", text(row, "question", where),
                          [image_bytes(row["image"], where)], answer,
                          {"category": text(row, "category", where), "image": image_key}))
        counts[image_key] += 1
    return items


def prompt(item: Item) -> str:
    """lmms-eval's MME prompt: the question stripped, its " Please answer yes or no." (with the
    space before it) removed, then the short-answer instruction on a new line."""
    return f"{item.question.strip().replace(BUILT_IN_INSTRUCTION, '')}\n{SHORT_ANSWER}"


READERS = {LMMS_EVAL: mme_yes_no, OFFICIAL: mme_yes_no_official}


def score(prediction: str, item: Item, rule: str) -> Score:
    parsed = READERS[rule](prediction)
    return Score({"acc": float(parsed == mme_label(item.answer))}, parsed)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    by_category: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for item, s in zip(items, scores, strict=True):
        by_category[item.meta["category"]].append((item.meta["image"], s["acc"]))
    result = {"acc": sum(s["acc"] for s in scores) / len(scores)}
    category_scores = {}
    for category, marks in sorted(by_category.items()):
        per_image: dict[str, list[float]] = defaultdict(list)
        for image, mark in marks:
            per_image[image].append(mark)
        acc = sum(mark for _, mark in marks) / len(marks)
        acc_plus = sum(all(m == 1.0 for m in v) for v in per_image.values()) / len(per_image)
        category_scores[category] = 100 * (acc + acc_plus)
        result.update({f"{category}/acc": acc, f"{category}/acc_plus": acc_plus,
                       f"{category}/score": category_scores[category]})
    result["perception"] = sum(v for k, v in category_scores.items() if k in PERCEPTION)
    result["cognition"] = sum(v for k, v in category_scores.items() if k in COGNITION)
    return result


MME = Benchmark("mme", read, prompt, score, aggregate, ("acc", "perception", "cognition"), max_new_tokens=16,
                layouts="the official release folder (category/questions_answers_YN/*.txt + images) or "
                        "lmms-lab/MME parquet",
                rules={LMMS_EVAL: "lmms_eval/tasks/mme/utils.py",
                       OFFICIAL: "MME's eval_tool/calculation.py"},
                group_key="image")
