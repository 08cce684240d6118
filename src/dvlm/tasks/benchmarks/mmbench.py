"""MMBench (Liu et al. 2023), English dev split: single-choice questions, A-D with some missing,
each asked several times with its options rotated (circular evaluation).

Layouts read:
* the Hugging Face parquet that lmms-eval reads (lmms-lab/MMBench, config `en`, split `dev`):
  `index`, `question`, `hint`, `answer`, `A` ... `D` (null where a question has fewer options),
  `category`, `L2-category`, `image`, ...; `--data` is the dataset's root (its `en/` is read) or
  the `en` files;
* the official release `MMBench_DEV_EN.tsv` (the same columns, `l2-category`, images in base64;
  a rotated copy's image cell may hold the index of the row whose image it shares).

Rows whose `index` is at least 1,000,000 are rotated copies of question `index % 1,000,000`.

Prompt: lmms-eval's (`mmbench/en_utils.py`, `mmbench_evals.py` `create_options_prompt`): the hint
(when there is one), the question and "There are several options:" with an "A. ..." line per
present option, space-separated, then a blank line and the letter instruction.

Scoring: lmms-eval's `mmbench_en_dev_static` rule (`mmbench_evals.py`, `eval_method="static"`),
the one it runs without an LLM judge. An answer's letter is read by MMBench's own matching
(`can_infer`: a lone letter A-E among its space-separated words, unless "A" may be an article
(an "A" word in an answer of more than three words), else a letter written "B." "B," "B:" "B)"
"B)." "(B)" "(B)." ":B" ":B," ":B." ":B)" ":B)." as a whole word, when exactly one letter is
written that way; else the one option whose text, lowercased, is inside the lowercased answer);
where that finds nothing, `letters.extract_mcq_answer` over the present options decides (where
lmms-eval's default `mmbench_en_dev` asks GPT instead). A question counts as right only when every
rotated copy of it is answered right; accuracy over the questions, overall, per category and per
L2 category. A limited run (`--limit`) takes whole questions, every rotated copy of each
(`group_key`), so no copy is left out of a question's verdict.

Item ids (the `id` of a predictions file): MMBench's `index` ("7", and "1000007" for its rotated
copy).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from dvlm.tasks.benchmarks.files import (
    answer_text,
    image_bytes,
    is_parquet,
    parquet_records,
    read_text,
    require,
    text,
)
from dvlm.tasks.benchmarks.items import LETTER_ANSWER, LMMS_EVAL, Benchmark, BenchmarkDataError, Item, Score
from dvlm.tasks.benchmarks.letters import extract_mcq_answer

OPTION_LETTERS = ("A", "B", "C", "D")
# Letters MMBench's matching looks for; E is never a reference, so reading it scores 0.
MATCHED_LETTERS = ("A", "B", "C", "D", "E")
# (prefix, suffix) around a letter that make a whole word name it, in MMBench's order.
LETTER_WORDS = (("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"), ("(", ")."), (":", ""),
                (":", ","), (":", "."), (":", ")"), (":", ")."))
ARTICLE_MIN_WORDS = 4  # in answers this long, a word "A" may be the article, not the option
API_FAILURE = "Failed to obtain answer via API"  # MMBench's matcher refuses its own failure marker
CIRCULAR_OFFSET = 1_000_000
OPTIONS_HEADER = "There are several options:"
LANGUAGE_FOLDER = "en"
OTHER_CONFIGS = ("cn", "cc")  # lmms-lab/MMBench's Chinese configs, never read
SPLIT = "dev"
FIELDS = ("index", "question", "hint", "answer", *OPTION_LETTERS, "category")
TSV_IMAGE_REFERENCE_MAX = 64  # a shorter image cell names the row that holds the image


# -- reading -------------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _index(record: dict[str, Any], where: str) -> int:
    value = answer_text(record, "index", where)
    try:
        return int(value)
    except ValueError as err:
        raise BenchmarkDataError(f"{where}: index must be an integer, got {value[:40]!r}") from err


def _optional_text(record: dict[str, Any], key: str, where: str) -> str | None:
    """A cell that may be missing (None, or NaN as pandas reads an empty cell), else text."""
    return None if _missing(record.get(key)) else answer_text(record, key, where)


def _item(record: dict[str, Any], image, where: str) -> Item:
    require(record, FIELDS, where)
    index = _index(record, where)
    l2 = _optional_text(record, "L2-category" if "L2-category" in record else "l2-category", where)
    return Item(str(index), text(record, "question", where), [image], text(record, "answer", where).strip(),
                {"index": index, "circular": index % CIRCULAR_OFFSET, "hint": _optional_text(record, "hint", where),
                 "options": {x: _optional_text(record, x, where) for x in OPTION_LETTERS},
                 "category": text(record, "category", where), "l2_category": l2})


def _tsv_rows(path: Path) -> list[dict[str, Any]]:
    csv.field_size_limit(2**31 - 1)  # base64 images are far longer than csv's default field limit
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), delimiter="\t")
    missing = [c for c in (*FIELDS, "image") if c not in (reader.fieldnames or [])]
    if missing:
        raise BenchmarkDataError(f"{path}: no column(s) {', '.join(missing)}; MMBench's TSV has {', '.join(FIELDS)}, "
                                 "image, ...")
    try:
        rows = list(reader)
    except csv.Error as err:
        raise BenchmarkDataError(f"{path}, line {reader.line_num}: not a TSV row ({err})") from err
    # pandas, which the reference reads these files with, reads an empty cell as missing
    return [{k: (None if v == "" else v) for k, v in row.items()} for row in rows]


def _tsv_images(rows: list[dict[str, Any]], path: Path) -> dict[str, bytes]:
    cells = {str(r["index"]): r.get("image") or "" for r in rows}
    images = {}
    for index, cell in cells.items():
        encoded = cells.get(cell, "") if len(cell) <= TSV_IMAGE_REFERENCE_MAX else cell
        if len(encoded) <= TSV_IMAGE_REFERENCE_MAX:
            raise BenchmarkDataError(f"{path}, index {index}: the image cell {cell[:20]!r} is neither an image "
                                     "nor the index of a row with one")
        try:
            images[index] = base64.b64decode(encoded)
        except binascii.Error as err:
            raise BenchmarkDataError(f"{path}, index {index}: the image cell is not base64 ({err})") from err
    return images


def read(data: Path, images: Path | None) -> list[Item]:
    if data.suffix == ".tsv":
        rows = _tsv_rows(data)
        by_index = _tsv_images(rows, data)
        return [_item(r, by_index[str(r["index"])], f"{data}, index {r['index']}") for r in rows]
    if not is_parquet(data):
        raise BenchmarkDataError(f"{data}: MMBench takes lmms-lab/MMBench's parquet (config en) or MMBench_DEV_EN.tsv")
    folder = data / LANGUAGE_FOLDER if (data / LANGUAGE_FOLDER).is_dir() else data
    if any((folder / other).is_dir() for other in OTHER_CONFIGS):  # the root, without en/
        raise BenchmarkDataError(f"{data}: no {LANGUAGE_FOLDER}/ folder (the English config) beside "
                                 f"{', '.join(OTHER_CONFIGS)}")
    return [_item(r, image_bytes(r["image"], where), where)
            for where, r in parquet_records(folder, SPLIT, [*FIELDS, "image"])]


# -- prompt --------------------------------------------------------------------------------------
def _has_hint(hint: Any) -> bool:
    return not _missing(hint) and hint != "nan"


def prompt(item: Item) -> str:
    shown = [f"{x}. {text}" for x, text in item.meta["options"].items()
             if text and not _missing(text) and text != "nan"]
    options = "\n".join([OPTIONS_HEADER, *shown])
    hint = item.meta["hint"]
    query = f"{hint} {item.question} {options}" if _has_hint(hint) else f"{item.question} {options}"
    return f"{query}\n\n{LETTER_ANSWER}"


# -- scoring -------------------------------------------------------------------------------------
def _letter_from_words(answer: str) -> str | None:
    words = answer.split()
    bare = [x for x in MATCHED_LETTERS if x in words]
    if len(bare) == 1 and not ("A" in words and len(words) >= ARTICLE_MIN_WORDS):
        return bare[0]
    for prefix, suffix in LETTER_WORDS:
        marked = [x for x in MATCHED_LETTERS if f"{prefix}{x}{suffix}" in words]
        if len(marked) == 1:
            return marked[0]
    return None


def _letter_from_text(answer: str, options: dict[str, str]) -> str | None:
    lowered = answer.lower()
    found = [x for x, text in options.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def _scored_options(item: Item) -> dict[str, str]:
    return {x: text for x, text in item.meta["options"].items() if not _missing(text)}


def read_letter(answer: str, item: Item) -> str:
    """The option letter the static rule reads from a (stripped) answer, or "" for none."""
    options = _scored_options(item)
    from_words = None if API_FAILURE in answer else _letter_from_words(answer)
    matched = from_words or _letter_from_text(answer, options)
    return matched or extract_mcq_answer(answer, sorted(options))


def score(prediction: str, item: Item, rule: str) -> Score:
    letter = read_letter(prediction, item)
    return Score({"accuracy": float(letter == item.answer)}, letter)


def aggregate(items: list[Item], scores: list[dict[str, float]]) -> dict[str, float]:
    """Circular accuracy: a question is right when all its rotated copies are (mmbench_evals.py)."""
    right: dict[int, bool] = defaultdict(lambda: True)
    for item, s in zip(items, scores, strict=True):
        right[item.meta["circular"]] = right[item.meta["circular"]] and s["accuracy"] == 1.0
    mains = [item for item in items if item.meta["index"] < CIRCULAR_OFFSET]
    if not mains:
        raise BenchmarkDataError("MMBench: no question with an index below 1,000,000 among the items scored")
    hits = [float(right[item.meta["index"]]) for item in mains]
    result = {"accuracy": sum(hits) / len(hits)}
    for key, label in (("category", ""), ("l2_category", "L2 ")):
        groups: dict[str, list[float]] = defaultdict(list)
        for item, hit in zip(mains, hits):
            groups[str(item.meta[key])].append(hit)
        result.update({f"{label}{name}/accuracy": sum(v) / len(v) for name, v in sorted(groups.items())})
    return result


MMBENCH = Benchmark("mmbench", read, prompt, score, aggregate, ("accuracy",), max_new_tokens=1024,
                    layouts="lmms-lab/MMBench parquet (config en, split dev) or MMBench_DEV_EN.tsv",
                    rules={LMMS_EVAL: "lmms_eval/tasks/mmbench/mmbench_evals.py (static) with "
                                      "_task_utils/mcq_extract.py"},
                    group_key="circular")
