"""TextVQA (Singh et al. 2019): questions that need reading text in photos; 10 answers each.

Layouts read:
* the official annotation file `TextVQA_0.5.1_val.json` (`{"data": [{"question_id", "question",
  "image_id", "answers": [10 strings]}, ...]}`) with `--images` the `train_images/` folder
  (`<image_id>.jpg`; the validation images ship in it), by default `train_images/` beside the file;
* the Hugging Face parquet that lmms-eval reads (lmms-lab/textvqa, split `validation`):
  `question_id`, `question`, `answers`, `image`.

Prompt: lmms-eval's, which capitalises the question (`str.capitalize`, lowercasing the rest) and
adds the short-answer instruction, no OCR tokens. Rule (`vqa_accuracy.vqa_accuracy`): EvalAI's
TextVQA answer processor and VQA accuracy, which lmms-eval (lmms_eval/tasks/textvqa/utils.py,
_task_utils/vqa_eval_metric.py) and mmf's TextVQA evaluator both run; both names select it.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.files import (
    answer_text,
    answer_texts,
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
    OFFICIAL,
    SHORT_ANSWER,
    Benchmark,
    BenchmarkDataError,
    Item,
    Score,
    mean_scores,
)
from dvlm.tasks.benchmarks.vqa_accuracy import evalai_normalize, vqa_accuracy

IMAGE_FOLDER = "train_images"


def read(data: Path, images: Path | None) -> list[Item]:
    if is_parquet(data):
        return [Item(answer_text(r, "question_id", where), text(r, "question", where), [image_bytes(r["image"], where)],
                     answer_texts(r, "answers", where))
                for where, r in parquet_records(data, "validation", ["question_id", "question", "answers", "image"])]
    document = read_json(data)
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise BenchmarkDataError(f"{data}: expected TextVQA's {{\"data\": [...]}} annotation file")
    folder = images or data.parent / IMAGE_FOLDER
    items = []
    for k, record in enumerate(document["data"]):
        where = f"{data}, record {k}"
        require(record, ("question_id", "question", "image_id", "answers"), where)
        image = f"{answer_text(record, 'image_id', where)}.jpg"
        items.append(Item(answer_text(record, "question_id", where), text(record, "question", where),
                          [image_file(folder, image, where)], answer_texts(record, "answers", where)))
    return items


def prompt(item: Item) -> str:
    return f"{item.question.capitalize()}\n{SHORT_ANSWER}"


def score(prediction: str, item: Item, rule: str) -> Score:
    return Score({"vqa_accuracy": vqa_accuracy(prediction, item.answer)}, evalai_normalize(prediction))


TEXTVQA = Benchmark("textvqa", read, prompt, score, mean_scores, ("vqa_accuracy",), max_new_tokens=128,
                    layouts="TextVQA_0.5.1_val.json (+ --images train_images/) or lmms-lab/textvqa parquet",
                    rules={LMMS_EVAL: "lmms_eval/tasks/textvqa/utils.py and _task_utils/vqa_eval_metric.py",
                           OFFICIAL: "EvalAI's TextVQA processor and accuracy as mmf runs them, the same rule"})
