"""Plots of benchmark and demo results (matplotlib, imported when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PRIMARY_METRIC = {"shapes-qa": "exact_match", "shapes-caption": "fact_f1", "digits-read": "digit_accuracy",
                  "multi-turn": "exact_match"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def primary_metric(task: str, metrics: dict[str, float]) -> tuple[str, float]:
    name = PRIMARY_METRIC.get(task, next(iter(metrics)))
    return name, metrics.get(name, 0.0)


def pareto_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy vs tokens/s, one panel per task, one point per decoder setting."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            name, value = primary_metric(task, r["metrics"])
            ax.scatter(r["tokens_per_second"], value, label=r["setting"])
            ax.annotate(r["setting"], (r["tokens_per_second"], value), fontsize=6, alpha=0.8)
            ax.set_ylabel(name)
        ax.set_xlabel("tokens / s")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
