"""RealWorldQA (xAI 2024): questions about real-world photographs, mostly multiple choice.

Layout read: the Hugging Face parquet that lmms-eval reads (lmms-lab/RealWorldQA, split `test`):
`image`, `question` (options and instruction already in it), `answer`.

Prompt: lmms-eval's (`realworldqa/utils.py`, `default` kwargs): the stripped question as it is;
its empty post prompt leaves the question's own instruction ("Please answer directly with only
the letter of the correct option and nothing else.") in place. Scoring (the same file): when the
stripped reference is a letter A-D, the letter `letters.extract_mcq_answer` reads from the answer
among A-D must equal it; otherwise the answer, lowercased, stripped and without its trailing
periods, must equal the reference lowercased. The mean is `exact_match`. RealWorldQA ships no
scorer of its own, so lmms-eval's is the only rule.

Item ids (the `id` of a predictions file): the parquet has no question id, so an item is
`realworldqa/<row>`, its 0-based row in the split's files read in name order.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.files import answer_text, image_bytes, is_parquet, parquet_records, text
from dvlm.tasks.benchmarks.items import LMMS_EVAL, Benchmark, BenchmarkDataError, Item, Score
from dvlm.tasks.benchmarks.letters import extract_mcq_answer

LETTERS = ("A", "B", "C", "D")


def read(data: Path, images: Path | None) -> list[Item]:
    if not is_parquet(data):
        raise BenchmarkDataError(f"{data}: RealWorldQA takes lmms-lab/RealWorldQA's parquet files")
    return [Item(f"realworldqa/{k}", text(r, "question", where), [image_bytes(r["image"], where)],
                 answer_text(r, "answer", where))
            for k, (where, r) in enumerate(parquet_records(data, "test", ["image", "question", "answer"]))]


def prompt(item: Item) -> str:
    return item.question.strip()


def _is_letter_question(item: Item) -> bool:
    return item.answer.strip().upper() in LETTERS


def score(prediction: str, item: Item, rule: str) -> Score:
    reference = item.answer.strip()
    if _is_letter_question(item):
        parsed, expected = extract_mcq_answer(prediction, LETTERS), reference.upper()
    else:
        parsed, expected = prediction.lower().strip().rstrip("."), reference.lower()
    return Score({"exact_match": float(parsed == expected)}, parsed)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    return {"exact_match": sum(s["exact_match"] for s in scores) / len(scores)}


REALWORLDQA = Benchmark("realworldqa", read, prompt, score, aggregate, ("exact_match",), max_new_tokens=16,
                        layouts="lmms-lab/RealWorldQA parquet (test)",
                        rules={LMMS_EVAL: "lmms_eval/tasks/realworldqa/utils.py with _task_utils/mcq_extract.py"})
