"""The `dvlm ablate` report: intervals, the variant table, the sweeps and the papers' claims.

Intervals are 95% percentile intervals of a two-level (hierarchical) bootstrap: each draw picks
the training seeds with replacement, then the test samples with replacement within each picked
seed, so both the seed-to-seed spread and the finite test set count. The draws are shared by every
variant (the same seed slots and sample indices), so a difference between two variants is paired:
its interval is that of the per-draw differences, which is what the claims are judged on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dvlm.zoo.ablate import EVAL_TASKS, REFERENCE

DRAWS = 2000
CONFIDENCE = 0.95
CLAIM_RULES = ("A relative claim's sign reproduces when our 95% interval excludes 0 on the paper's side; its "
               "size is consistent when the paper's figure lies inside our interval. Ours come from a tiny model "
               "after a short fine-tune, the paper's from a 3B VLM on millions of samples: read the sign first.")
SOURCE = "tiny-ar"
"""The AR source's row name (decoded autoregressively, one 'seed': its weights are fixed)."""


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def cell(self, scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
        fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
        return f"{fmt.format(self.value * scale)} [{fmt.format(self.low * scale)}, {fmt.format(self.high * scale)}]"

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def setting_label(row: dict[str, Any]) -> str:
    """"block B=16 τ=0.9", "spec B=16", "ar"."""
    parts = [row["decoder"]]
    if "block_size" in row:
        parts.append(f"B={row['block_size']}")
    if "threshold" in row:
        parts.append(f"τ={row['threshold']}")
    return " ".join(parts)


class Unit:
    """One (variant, decoder setting): per task, (seeds, samples) arrays of scores, tokens, forwards."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, list[list[float]]]] = {}
        self.seconds: list[float] = []
        self.row: dict[str, Any] = {}

    def add(self, row: dict[str, Any]) -> None:
        per = self.tasks.setdefault(row["task"], {"scores": [], "tokens": [], "nfe": []})
        for key in per:
            per[key].append(row[key])
        self.seconds.append(row["seconds"])
        self.row = {k: row[k] for k in ("decoder", "block_size", "threshold") if k in row}

    def array(self, task: str, key: str) -> np.ndarray:
        return np.asarray(self.tasks[task][key], dtype=float)  # (seeds, samples)

    def tokens_per_second(self) -> float:
        tokens = sum(float(np.sum(self.array(t, "tokens"))) for t in self.tasks)
        return tokens / sum(self.seconds) if sum(self.seconds) > 0 else 0.0


def collect(results: dict[str, Any]) -> dict[tuple[str, str], Unit]:
    units: dict[tuple[str, str], Unit] = {}
    for run in results["runs"]:
        for row in run["rows"]:
            units.setdefault((run["variant"], setting_label(row)), Unit()).add(row)
    for row in results["source"]:
        units.setdefault((SOURCE, setting_label(row)), Unit()).add(row)
    return units


@lru_cache(maxsize=8)
def _seed_picks(seeds: int, draws: int) -> np.ndarray:
    return np.random.default_rng([seeds, 1]).integers(0, seeds, size=(draws, seeds))  # (draws, seeds)


@lru_cache(maxsize=8)
def _sample_picks(seeds: int, samples: int, draws: int) -> np.ndarray:
    return np.random.default_rng([samples, 2]).integers(0, samples, size=(draws, seeds, samples))


def resample(values: np.ndarray, draws: int = DRAWS) -> np.ndarray:
    """(seeds, samples) -> (draws, seeds, samples): the hierarchical bootstrap's draws (shared picks)."""
    seeds, samples = values.shape
    return values[_seed_picks(seeds, draws)[:, :, None], _sample_picks(seeds, samples, draws)]


def task_draws(unit: Unit, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Per draw: the mean score and the tokens per forward of one task."""
    scores = resample(unit.array(task, "scores")).mean(axis=(1, 2))
    tokens = resample(unit.array(task, "tokens")).sum(axis=(1, 2))
    nfe = resample(unit.array(task, "nfe")).sum(axis=(1, 2))
    return scores, tokens / np.maximum(nfe, 1)


def average_draws(unit: Unit) -> tuple[np.ndarray, np.ndarray]:
    """Per draw: the score averaged over tasks (the papers' 'average score') and mean tokens/forward."""
    pairs = [task_draws(unit, task) for task in EVAL_TASKS]
    return np.mean([p[0] for p in pairs], axis=0), np.mean([p[1] for p in pairs], axis=0)


def point(unit: Unit, task: str | None = None) -> tuple[float, float]:
    """The plain (not resampled) score and tokens/forward, of a task or averaged over tasks."""
    tasks = [task] if task else list(EVAL_TASKS)
    scores = [float(unit.array(t, "scores").mean()) for t in tasks]
    speeds = [float(unit.array(t, "tokens").sum() / max(unit.array(t, "nfe").sum(), 1)) for t in tasks]
    return float(np.mean(scores)), float(np.mean(speeds))


def estimate(value: float, draws: np.ndarray) -> Estimate:
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(draws, [tail, 100 - tail])
    return Estimate(value, float(low), float(high))


def relative_change(unit: Unit, reference: Unit) -> Estimate:
    """(average score of unit - reference) / reference, paired over the shared draws."""
    ours, _ = average_draws(unit)
    base, _ = average_draws(reference)
    value = point(unit)[0] / point(reference)[0] - 1 if point(reference)[0] else 0.0
    return estimate(value, ours / np.maximum(base, 1e-9) - 1)


# -- tables --------------------------------------------------------------------------------------


def variant_table(units: dict[tuple[str, str], Unit], variants: list[str]) -> list[str]:
    head = ["variant", "decoder", *EVAL_TASKS, "average", "vs full", "tokens/forward"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, label), unit in units.items():
        if name not in (*variants, SOURCE) or not _main_setting(name, label, units):
            continue
        cells = [name, label]
        for task in EVAL_TASKS:
            cells.append(estimate(point(unit, task)[0], task_draws(unit, task)[0]).cell())
        scores, speeds = average_draws(unit)
        cells.append(estimate(point(unit)[0], scores).cell())
        reference = main_unit(units, REFERENCE, unit.row["decoder"])
        cells.append(relative_change(unit, reference).cell(100, 1, True) + " %" if reference and name != REFERENCE
                     else "-")
        cells.append(estimate(point(unit)[1], speeds).cell(digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _main_setting(name: str, label: str, units: dict[tuple[str, str], Unit]) -> bool:
    """A variant's own settings (the first block and spec ones), not the reference's sweep points."""
    return any(main_unit(units, name, d) is units[(name, label)] for d in ("block", "spec", "ar"))


def main_unit(units: dict[tuple[str, str], Unit], name: str, decoder: str) -> Unit | None:
    """A variant's first setting of a decoder: the one every variant is decoded with."""
    return next((u for (n, _), u in units.items() if n == name and u.row["decoder"] == decoder), None)


def sweep_rows(units: dict[tuple[str, str], Unit], decoder: str, vary: str) -> list[dict[str, Any]]:
    """The reference's settings of one decoder along `vary` (threshold or block_size), in order."""
    rows = []
    for (name, label), unit in units.items():
        if name != REFERENCE or unit.row["decoder"] != decoder or vary not in unit.row:
            continue
        rows.append({**unit.row, "label": label, "unit": unit})
    fixed = {"threshold": "block_size", "block_size": "threshold"}[vary]
    if decoder == "block" and rows:  # the other knob held at its most common value
        common = max({r.get(fixed) for r in rows}, key=lambda v: sum(r.get(fixed) == v for r in rows))
        rows = [r for r in rows if r.get(fixed) == common]
    rows = list({r[vary]: r for r in rows}.values())
    return sorted(rows, key=lambda r: r[vary])


def sweep_table(rows: list[dict[str, Any]], vary: str) -> list[str]:
    lines = ["| setting | average score | tokens/forward | tokens/s (timed in the run) |", "|---|---|---|---|"]
    for r in rows:
        scores, speeds = average_draws(r["unit"])
        score, speed = point(r["unit"])
        lines.append(f"| {r['label']} | {estimate(score, scores).cell()} | {estimate(speed, speeds).cell(digits=2)} | "
                     f"{r['unit'].tokens_per_second():.0f} |")
    return lines


def write_report(results: dict[str, Any], out: Path, device: str) -> dict[str, Path]:
    """ablate.md, ablate.json (the summary) and the two sweep plots under `out`."""
    from dvlm.zoo.ablate_claims import claims, claims_table

    out.mkdir(parents=True, exist_ok=True)
    units = collect(results)
    variants = results["plan"]["variants"]
    found = claims(units, results)
    plots = sweep_plots({vary: {d: sweep_rows(units, d, vary) for d in ("block", "spec")}
                         for vary in ("threshold", "block_size")}, out)
    lines = _header(results, device) + ["## Variants", ""] + variant_table(units, variants) + [""]
    for vary, title in (("threshold", "Threshold sweep (full recipe, block decoding)"),
                        ("block_size", "Block-size sweep (full recipe)")):
        lines += [f"## {title}", "", f"![{vary}]({plots[vary].name})" if vary in plots else
                  f"Not measured: the {REFERENCE} variant was not run.", ""]
        for decoder in ("block", "spec"):
            rows = sweep_rows(units, decoder, vary)
            if rows and not (vary == "threshold" and decoder == "spec"):
                lines += sweep_table(rows, vary) + [""]
    lines += ["## The papers' claims", "", CLAIM_RULES, ""] + claims_table(found) + [""]
    paths = {"markdown": out / "ablate.md", "json": out / "ablate.json", **plots}
    paths["markdown"].write_text("\n".join(lines) + "\n")
    summary = {"plan": results["plan"], "device": device, "claims": found,
               "variants": _summary(units, variants)}
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n")
    return paths


def sweep_plots(sweeps: dict[str, dict[str, list[dict[str, Any]]]], out: Path) -> dict[str, Path]:
    """One figure per knob: average score and tokens/forward against it, one line per decoder."""
    from dvlm.eval.plots import Curve, curve_plot

    names = {"threshold": "threshold τ", "block_size": "block size B"}
    paths = {}
    for vary, by_decoder in sweeps.items():
        curves = []
        for decoder, rows in by_decoder.items():
            if not rows:
                continue
            estimates = [(average_draws(r["unit"]), point(r["unit"])) for r in rows]
            x = [r[vary] for r in rows]
            curves.append(Curve(decoder, decoder, x,
                                [estimate(p[0], d[0]) for d, p in estimates],
                                [estimate(p[1], d[1]) for d, p in estimates]))
        if not curves:  # the full recipe was not run
            continue
        paths[vary] = curve_plot(curves, names[vary], out / f"ablate-{vary.replace('_', '-')}.png",
                                 log_x=vary == "block_size")
    return paths


def _summary(units: dict[tuple[str, str], Unit], variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    for (name, label), unit in units.items():
        scores, speeds = average_draws(unit)
        rows.append({"variant": name, "setting": label, **unit.row,
                     "average_score": estimate(point(unit)[0], scores).to_dict(),
                     "tokens_per_forward": estimate(point(unit)[1], speeds).to_dict(),
                     "tasks": {t: estimate(point(unit, t)[0], task_draws(unit, t)[0]).to_dict() for t in EVAL_TASKS}})
    return rows


def _header(results: dict[str, Any], device: str) -> list[str]:
    plan = results["plan"]
    seconds = [r["train_seconds"] for r in results["runs"]]
    return [
        "# `dvlm ablate`: the papers' recipe claims at small scale", "",
        (f"From the shipped tiny-ar; {plan['steps']} fine-tuning steps of batch {plan['batch_size']} per run, "
        f"{plan['seeds']} training seed(s) per variant, {plan['samples']} test samples per task (the same for "
        f"every run), greedy, max {plan['max_new_tokens']} new tokens. Device: {device}. Fine-tuning took "
        f"{np.mean(seconds) if seconds else 0:.0f} s per run on average (sum of logged step times)."), "",
        ("Tasks: shapes-content = shapes-qa's content questions (exact match), shapes-caption (fact F1), "
        "digits-read (per-digit accuracy), multi-turn (exact match on the last answer). 'average' is their "
        "mean. Cells: value [95% interval], hierarchical bootstrap over seeds and then samples "
        f"({DRAWS} draws, shared by all variants, so 'vs full' is a paired difference). tokens/s are wall-clock "
        "figures of this run: only meaningful when nothing else ran on the machine."), "",
    ]
