"""RealWorldQA (xAI 2024): questions about real-world photographs, mostly multiple choice.

Layout read: the Hugging Face parquet that lmms-eval reads (lmms-lab/RealWorldQA, split `test`):
`image`, `question` (options and instruction already in it), `answer`.

Prompt: lmms-eval's (`realworldqa/utils.py`, `default` kwargs): the stripped question as it is;
its empty post prompt leaves the question's own instruction ("Please answer directly with only
the letter of the correct option and nothing else.") in place. Scoring (the same file): when the
stripped reference is a letter A-D, the letter `letters.extract_mcq_answer` reads from the answer
among A-D must equal it; otherwise the answer, lowercased, stripped and without its trailing
periods, must equal the reference lowercased. The mean is `exact_match`.
"""

from __future__ import annotations

from pathlib import Path

from dvlm.tasks.benchmarks.files import image_bytes, is_parquet, parquet_rows
from dvlm.tasks.benchmarks.items import Benchmark, BenchmarkDataError, Item
from dvlm.tasks.benchmarks.letters import Parsed, extract_mcq_answer

LETTERS = ("A", "B", "C", "D")


def read(data: Path, images: Path | None) -> list[Item]:
    if not is_parquet(data):
        raise BenchmarkDataError(f"{data}: RealWorldQA takes lmms-lab/RealWorldQA's parquet files")
    return [Item(f"realworldqa/{k}", r["question"], [image_bytes(r["image"], f"{data}, row {k}")], r["answer"])
            for k, r in enumerate(parquet_rows(data, "test", ["image", "question", "answer"]))]


def prompt(item: Item) -> str:
    return item.question.strip()


def _is_letter_question(item: Item) -> bool:
    return item.answer.strip().upper() in LETTERS


def parse(prediction: str, item: Item) -> Parsed:
    if _is_letter_question(item):
        return Parsed(extract_mcq_answer(prediction.strip(), LETTERS))
    return Parsed(prediction.strip().lower().strip().rstrip("."))


def score(prediction: str, item: Item) -> dict[str, float]:
    reference = item.answer.strip()
    expected = reference.upper() if _is_letter_question(item) else reference.lower()
    return {"exact_match": float(parse(prediction, item).answer == expected)}


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    return {"exact_match": sum(s["exact_match"] for s in scores) / len(scores)}


REALWORLDQA = Benchmark("realworldqa", read, prompt, score, aggregate, ("exact_match",), max_new_tokens=16,
                        layouts="lmms-lab/RealWorldQA parquet (test)")
