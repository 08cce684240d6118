"""`dvlm eval --benchmark`: a model on a published benchmark, accuracy and speed per decoder.

Every decoder setting decodes the same items in the same process (after one warm-up item), so
its tokens/s is comparable with the AR row of the same run: speed-ups are ratios within a run,
as in `dvlm bench`. Rows have the shape `dvlm.eval.plots.pareto_plot` draws.

Every generation is stripped and scored by one named rule of the benchmark (`Benchmark.judge`);
each row says how many of the benchmark's items it scored ("partial: N of M items" for a limited
run) and by which rule. `rescore` scores a predictions file written elsewhere (one
`{"id", "prediction"}` per line) by the same rule, with no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from dvlm.decode.output import GenerationOutput
from dvlm.tasks.benchmarks import Benchmark, BenchmarkDataError, Item
from dvlm.tasks.benchmarks.files import read_text
from dvlm.tasks.benchmarks.items import Score, coverage

# Decoding options each decoder reads (the others would only clutter its row and label).
DECODER_OPTIONS = {"block": ("block_size", "threshold", "steps"), "spec": ("block_size",),
                   "spec-quadratic": ("block_size",)}


@dataclass
class BenchmarkRun:
    """One decoder setting on one benchmark: the reported numbers, speed and every answer."""

    row: dict[str, Any]
    predictions: list[dict[str, Any]] = field(default_factory=list)


def speed(outputs: list[GenerationOutput], seconds: float) -> dict[str, float]:
    """Tokens (the end token included), forwards and their ratios over the timed decoding."""
    tokens = sum(o.num_tokens for o in outputs)
    nfe = sum(o.nfe for o in outputs)
    return {"tokens": tokens, "nfe": nfe, "tokens_per_nfe": round(tokens / nfe, 3) if nfe else 0.0,
            "seconds": round(seconds, 4), "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else 0.0}


def decode_items(lm: Any, benchmark: Benchmark, items: list[Item], *, decoder: str, batch_size: int = 1,
                 max_new_tokens: int | None = None, progress: bool = False,
                 **options: Any) -> tuple[list[GenerationOutput], float]:
    """Answer every item with the benchmark's prompt; returns the outputs and the decoding seconds."""
    outputs: list[GenerationOutput] = []
    seconds = 0.0
    limit = max_new_tokens or benchmark.max_new_tokens
    bar = tqdm(total=len(items), desc=f"{benchmark.name} [{decoder}]", disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        outs = lm.generate([benchmark.prompt(i) for i in chunk], [i.images for i in chunk], decoder=decoder,
                           max_new_tokens=limit, **options)
        seconds += outs[0].timings.get("total_s", 0.0)  # one batch: the timings are the batch's
        outputs.extend(outs)
        bar.update(len(chunk))
    bar.close()
    return outputs, seconds


def score_run(benchmark: Benchmark, items: list[Item], texts: list[str], rule: str,
              total: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(row fields: rule, counts and metrics; one prediction line per item) for `texts`, item by item."""
    scores = [benchmark.judge(text, item, rule) for text, item in zip(texts, items, strict=True)]
    row = {"rule": rule, "reference": benchmark.rules[rule], "num_items": len(items), "total_items": total,
           "coverage": coverage(len(items), total),
           "metrics": benchmark.aggregate(items, [s.values for s in scores])}
    return row, [_prediction_line(item, text, s) for item, text, s in zip(items, texts, scores)]


def _prediction_line(item: Item, text: str, score: Score) -> dict[str, Any]:
    """What a reader needs to audit one item's score: the answer, how the rule read it, the score."""
    return {"id": item.id, "prediction": text, "parsed": score.parsed, "guessed": score.guessed,
            "reference": item.answer, **score.values}


def run_setting(lm: Any, benchmark: Benchmark, items: list[Item], decoder: str, *, rule: str, total: int,
                batch_size: int = 1, max_new_tokens: int | None = None, progress: bool = False,
                **options: Any) -> BenchmarkRun:
    """Warm up on one item, then decode and score every item with one decoder setting."""
    options = {k: v for k, v in options.items() if v is not None and k in DECODER_OPTIONS.get(decoder, ())}
    decode_items(lm, benchmark, items[:1], decoder=decoder, max_new_tokens=max_new_tokens, **options)
    outputs, seconds = decode_items(lm, benchmark, items, decoder=decoder, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, progress=progress, **options)
    scored, predictions = score_run(benchmark, items, [o.text for o in outputs], rule, total)
    row = {"task": benchmark.name, "decoder": decoder, "model": "main", **options,
           "setting": _label(decoder, options), **scored, **speed(outputs, seconds)}
    for line, output in zip(predictions, outputs):
        line.update({"nfe": output.nfe, "tokens": output.num_tokens})
    return BenchmarkRun(row, predictions)


def rescore(benchmark: Benchmark, items: list[Item], predictions: dict[str, str], *, rule: str,
            total: int, source: str) -> BenchmarkRun:
    """Score answers made elsewhere (`predictions`: item id -> answer) by the benchmark's rule."""
    scored, lines = score_run(benchmark, items, [predictions[item.id] for item in items], rule, total)
    return BenchmarkRun({"task": benchmark.name, "decoder": RESCORED, "model": source, "setting": RESCORED,
                         **scored}, lines)


RESCORED = "rescored"  # the setting name of a re-scored predictions file (no decoder ran)


def read_predictions(path: Path) -> dict[str, str]:
    """id -> prediction from a JSON-lines file of `{"id": ..., "prediction": "..."}` (ids as dvlm
    writes them; an integer id is read as its digits)."""
    predictions: dict[str, str] = {}
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            item_id, text = _prediction_record(line, f"{path}, line {number}")
            if item_id in predictions:
                raise BenchmarkDataError(f"{path}, line {number}: id {item_id!r} appears twice")
            predictions[item_id] = text
    return predictions


def _prediction_record(line: str, where: str) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict) or "id" not in record or "prediction" not in record:
        raise BenchmarkDataError(f'{where}: expected {{"id": ..., "prediction": "..."}}')
    item_id, text = record["id"], record["prediction"]
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or not isinstance(text, str):
        raise BenchmarkDataError(f"{where}: id must be text (or an integer) and prediction text")
    return str(item_id), text


def match_predictions(predictions: dict[str, str], every: list[Item], selected: list[Item], source: Path) -> None:
    """Refuse ids the benchmark does not have, and selected items the file does not answer."""
    known = {item.id for item in every}
    unknown = [item_id for item_id in predictions if item_id not in known]
    missing = [item.id for item in selected if item.id not in predictions]
    for ids, what in ((unknown, "ids the benchmark does not have"), (missing, "no prediction for")):
        if ids:
            shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS]) + (f" and {len(ids) - SHOWN_IDS} more"
                                                                   if len(ids) > SHOWN_IDS else "")
            raise BenchmarkDataError(f"{source}: {what} {len(ids)} item(s): {shown}")


SHOWN_IDS = 5


def _label(decoder: str, options: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    return f"{decoder}({opts})" if opts else decoder


def run_benchmark(lm: Any, benchmark: Benchmark, items: list[Item], decoders: list[str], *, rule: str,
                  total: int, on_run: Callable[[BenchmarkRun], None] | None = None,
                  **settings: Any) -> list[BenchmarkRun]:
    """Every decoder on the same items; rows get `speedup_vs_ar` when `ar` is among them."""
    runs = []
    for decoder in decoders:
        runs.append(run_setting(lm, benchmark, items, decoder, rule=rule, total=total, **settings))
        if on_run is not None:
            on_run(runs[-1])
    reference = next((r.row for r in runs if r.row["decoder"] == "ar"), None)
    if reference and reference["tokens_per_second"]:
        for run in runs:
            run.row["speedup_vs_ar"] = round(run.row["tokens_per_second"] / reference["tokens_per_second"], 3)
    return runs


def markdown_table(benchmark: Benchmark, rows: list[dict[str, Any]], device: str) -> str:
    """Accuracy and speed side by side, one line per decoder setting."""
    head = ["setting", *benchmark.headline, "tok/NFE", "tok/s", "vs AR"]
    first = rows[0]
    timed = any("tokens_per_second" in r for r in rows)
    lines = [f"{benchmark.name}: {first['coverage']}. Rule: {first['rule']} ({first['reference']}). "
             f"Device: {device}." + (" Speed-ups are ratios within this run." if timed else ""),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], *(_metric(r["metrics"].get(m)) for m in benchmark.headline),
                 f"{r['tokens_per_nfe']:.2f}" if "tokens_per_nfe" in r else "-",
                 f"{r['tokens_per_second']:.1f}" if "tokens_per_second" in r else "-",
                 f"{r['speedup_vs_ar']:.2f}x" if r.get("speedup_vs_ar") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _metric(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value > 1 else f"{value:.4f}"  # MME's summed scores are out of 2000 / 800


def write_report(benchmark: Benchmark, runs: list[BenchmarkRun], out: Path, device: str) -> dict[str, Path]:
    """<name>.json (rows + settings), <name>.md (the table), <name>.png (the plot) and one
    predictions file per setting."""
    from dvlm.eval.plots import pareto_plot

    out.mkdir(parents=True, exist_ok=True)
    rows = [run.row for run in runs]
    paths = {"json": out / f"{benchmark.name}.json", "markdown": out / f"{benchmark.name}.md"}
    document = {"benchmark": benchmark.name, "coverage": rows[0]["coverage"], "rule": rows[0]["rule"],
                "reference": rows[0]["reference"], "device": device, "rows": rows}
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(benchmark, rows, device))
    for run in runs:
        name = out / f"{benchmark.name}.{run.row['setting']}.predictions.jsonl"
        name.write_text("".join(json.dumps(p, default=str) + "\n" for p in run.predictions))
    if any(r.get("speedup_vs_ar") for r in rows):
        paths["plot"] = pareto_plot(rows, out / f"{benchmark.name}.png")
    return paths
