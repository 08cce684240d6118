"""`dvlm bench`: accuracy and speed of every decoder setting, measured side by side in one run.

Every setting decodes the same samples of the same task in the same process; speed-ups are
ratios against the AR settings of this run (our own AR loop, and HF `generate`), never absolute
times from different runs. Each setting is warmed up on one sample first (for a compiled setting
that compiles its shapes; a shape first met later is compiled then, and left out of its time).
"""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from dvlm.eval.harness import EvalResult, evaluate

ROWS_FILE = "bench.rows.jsonl"
"""Rows written one by one as they are measured (bench.json follows at the end)."""


@dataclass
class Setting:
    decoder: str
    options: dict[str, Any] = field(default_factory=dict)
    model: str = "main"  # "main" or "baseline" (e.g. HF generate of the AR source model)

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        name = self.decoder if self.model == "main" else f"{self.decoder}[{self.model}]"
        return f"{name}({opts})" if opts else name


def settings_grid(decoders: list[str], block_sizes: list[int], thresholds: list[float],
                  has_baseline: bool, compiled: bool = False) -> list[Setting]:
    """One setting per decoder, block decoding across (B, tau), spec across B; with `compiled`,
    each setting (but hf's) twice: eager, then under torch.compile (`compile=True`)."""
    grid: list[Setting] = []
    for decoder in decoders:
        if decoder == "block":
            grid += [Setting("block", {"block_size": b, "threshold": t}) for b in block_sizes for t in thresholds]
        elif decoder in ("spec", "spec-quadratic"):
            grid += [Setting(decoder, {"block_size": b}) for b in block_sizes]
        elif decoder == "hf" and has_baseline:
            grid += [Setting("hf", model="baseline"), Setting("hf")]
        else:
            grid.append(Setting(decoder))
    if not compiled:
        return grid
    twins = []
    for setting in grid:
        twins.append(setting)
        if setting.decoder != "hf":  # transformers' own loop: nothing of ours to compile
            twins.append(Setting(setting.decoder, {**setting.options, "compile": True}, setting.model))
    return twins


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU (monotone)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_bench(models: dict[str, Any], tasks: list[str], grid: list[Setting], *, limit: int, seed: int = 0,
              max_new_tokens: int = 96, progress: bool = True,
              on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate every (task, setting); returns one row per pair with speed-ups filled in.

    `on_row` receives each row as soon as it is measured (before speed-ups), so a long run that
    fails late keeps what it measured."""
    rows = []
    for task in tasks:
        task_rows = []
        for setting in grid:
            lm = models[setting.model]
            evaluate(lm, task, limit=1, seed=seed + 1, decoder=setting.decoder, progress=False,
                     max_new_tokens=max_new_tokens, **setting.options)  # warm-up
            if lm.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(lm.device)
            result = evaluate(lm, task, limit=limit, seed=seed, decoder=setting.decoder, progress=progress,
                              max_new_tokens=max_new_tokens, **setting.options)
            task_rows.append(_row(task, setting, result, peak_memory_mb(lm.device)))
            if on_row is not None:
                on_row(task_rows[-1])
        _add_speedups(task_rows)
        rows += task_rows
    return rows


def _row(task: str, setting: Setting, result: EvalResult, memory_mb: float) -> dict[str, Any]:
    return {"task": task, "setting": setting.label, "decoder": setting.decoder, "model": setting.model,
            **setting.options, "metrics": result.metrics, **result.speed, "peak_memory_mb": round(memory_mb, 1)}


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    refs = {"ar": _find(rows, "ar", "main") or _find(rows, "ar", "baseline"),
            "hf": _find(rows, "hf", "baseline") or _find(rows, "hf", "main")}
    for row in rows:
        for name, ref in refs.items():
            if ref and ref["tokens_per_second"]:
                row[f"speedup_vs_{name}"] = round(row["tokens_per_second"] / ref["tokens_per_second"], 3)


def _find(rows, decoder: str, model: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["decoder"] == decoder and r["model"] == model), None)


def markdown_table(rows: list[dict[str, Any]], device: str) -> str:
    lines = [f"Device: {device}. Batch 1, greedy. Speed-ups are ratios within this run.", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        task_rows = [r for r in rows if r["task"] == task]
        metric_names = list(task_rows[0]["metrics"])
        head = ["setting", *metric_names, "tok/NFE", "tok/s", "TTFT ms", "vs AR", "vs HF", "peak MB"]
        lines += [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in task_rows:
            cells = [r["setting"], *(f"{r['metrics'].get(m, 0):.3f}" for m in metric_names),
                     f"{r['tokens_per_nfe']:.2f}", f"{r['tokens_per_second']:.1f}", f"{1000 * r['ttft_s']:.1f}",
                     _ratio(r.get("speedup_vs_ar")), _ratio(r.get("speedup_vs_hf")), f"{r['peak_memory_mb']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def append_row(path: Path) -> Callable[[dict[str, Any]], None]:
    """An `on_row` callback appending each measured row to a JSON-lines file."""
    def append(row: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return append


def write_report(rows: list[dict[str, Any]], out: Path, device: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    paths["json"].write_text(json.dumps({"device": device, "rows": rows}, indent=2) + "\n")
    paths["markdown"].write_text(markdown_table(rows, device))
    from dvlm.eval.plots import pareto_plot

    paths["plot"] = pareto_plot(rows, out / "bench.png")
    return paths


def _ratio(value: float | None) -> str:
    """A speed-up cell; "-" when the run had no such reference decoder."""
    return f"{value:.2f}x" if value else "-"
