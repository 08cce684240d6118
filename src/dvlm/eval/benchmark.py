"""`dvlm eval --benchmark`: a model on a published benchmark, accuracy and speed per decoder.

Every decoder setting decodes the same items in the same process (after one warm-up item), so
its tokens/s is comparable with the AR row of the same run: speed-ups are ratios within a run,
as in `dvlm bench`. Rows have the shape `dvlm.eval.plots.pareto_plot` draws.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from dvlm.decode.output import GenerationOutput
from dvlm.tasks.benchmarks import Benchmark, Item

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


def run_setting(lm: Any, benchmark: Benchmark, items: list[Item], decoder: str, *, batch_size: int = 1,
                max_new_tokens: int | None = None, progress: bool = False, **options: Any) -> BenchmarkRun:
    """Warm up on one item, then decode and score every item with one decoder setting."""
    options = {k: v for k, v in options.items() if v is not None and k in DECODER_OPTIONS.get(decoder, ())}
    decode_items(lm, benchmark, items[:1], decoder=decoder, max_new_tokens=max_new_tokens, **options)
    outputs, seconds = decode_items(lm, benchmark, items, decoder=decoder, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, progress=progress, **options)
    scores = [benchmark.score(o.text, item) for o, item in zip(outputs, items, strict=True)]
    metrics = benchmark.aggregate(items, scores)
    row = {"task": benchmark.name, "decoder": decoder, "model": "main", **options,
           "setting": _label(decoder, options), "num_items": len(items), "metrics": metrics,
           **speed(outputs, seconds)}
    predictions = [{"id": i.id, "prediction": o.text, "reference": i.answer, **s, "nfe": o.nfe,
                    "tokens": o.num_tokens} for i, o, s in zip(items, outputs, scores)]
    return BenchmarkRun(row, predictions)


def _label(decoder: str, options: dict[str, Any]) -> str:
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    return f"{decoder}({opts})" if opts else decoder


def run_benchmark(lm: Any, benchmark: Benchmark, items: list[Item], decoders: list[str], *,
                  on_run: Callable[[BenchmarkRun], None] | None = None, **settings: Any) -> list[BenchmarkRun]:
    """Every decoder on the same items; rows get `speedup_vs_ar` when `ar` is among them."""
    runs = []
    for decoder in decoders:
        runs.append(run_setting(lm, benchmark, items, decoder, **settings))
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
    lines = [f"{benchmark.name}: {rows[0]['num_items']} items. Device: {device}. Speed-ups are ratios within this run.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], *(_metric(r["metrics"].get(m)) for m in benchmark.headline),
                 f"{r['tokens_per_nfe']:.2f}", f"{r['tokens_per_second']:.1f}",
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
    paths["json"].write_text(json.dumps({"benchmark": benchmark.name, "device": device, "rows": rows}, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(benchmark, rows, device))
    for run in runs:
        name = out / f"{benchmark.name}.{run.row['setting']}.predictions.jsonl"
        name.write_text("".join(json.dumps(p, default=str) + "\n" for p in run.predictions))
    if any(r.get("speedup_vs_ar") for r in rows):
        paths["plot"] = pareto_plot(rows, out / f"{benchmark.name}.png")
    return paths
