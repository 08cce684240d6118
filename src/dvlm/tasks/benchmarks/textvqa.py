"""TextVQA (Singh et al. 2019): questions that need reading text in photos; 10 answers each.

Layouts read:
* the official annotation file `TextVQA_0.5.1_val.json` (`{"data": [{"question_id", "question",
  "image_id", "answers": [10 strings]}, ...]}`) with `--images` the `train_images/` folder
  (`<image_id>.jpg`; the validation images ship in it), by default `train_images/` beside the file;
* the Hugging Face parquet that lmms-eval reads (lmms-lab/textvqa, split `validation`):
  `question_id`, `question`, `answers`, `image`.

Prompt: lmms-eval's, which capitalises the question (`str.capitalize`, lowercasing the rest) and
adds the short-answer instruction, no OCR tokens. Scoring: `answers.vqa_accuracy`.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.answers import vqa_accuracy
from dvlm.tasks.benchmarks.files import image_bytes, image_file, is_parquet, parquet_rows, read_json, require
from dvlm.tasks.benchmarks.items import SHORT_ANSWER, Benchmark, BenchmarkDataError, Item, mean_scores

IMAGE_FOLDER = "train_images"


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [Item(str(r["question_id"]), r["question"], [image_bytes(r["image"], str(r["question_id"]))],
                     list(r["answers"]))
                for r in parquet_rows(data, "validation", ["question_id", "question", "answers", "image"])]
    document = read_json(data)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise BenchmarkDataError(f"{data}: expected TextVQA's {{\"data\": [...]}} annotation file")
    folder = images or data.parent / IMAGE_FOLDER
    items = []
    for k, record in enumerate(document["data"]):
        where = f"{data}, record {k}"
        require(record, ("question_id", "question", "image_id", "answers"), where)
        items.append(Item(str(record["question_id"]), record["question"],
                          [image_file(folder, f"{record['image_id']}.jpg", where)], list(record["answers"])))
    return items


def prompt(item: Item) -> str:
    return f"{item.question.capitalize()}\n{SHORT_ANSWER}"


def score(prediction: str, item: Item) -> dict[str, float]:
    return {"vqa_accuracy": vqa_accuracy(prediction, item.answer)}


TEXTVQA = Benchmark("textvqa", read, prompt, score, mean_scores, ("vqa_accuracy",), max_new_tokens=128,
                    layouts="TextVQA_0.5.1_val.json (+ --images train_images/) or lmms-lab/textvqa parquet")
