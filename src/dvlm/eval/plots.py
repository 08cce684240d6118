"""One plot style for demo, bench and evaluation results: speed-up over AR against accuracy.

One panel per task. x: tokens/s as a multiple of the run's own AR decoding (measured side by side,
so 1.0 is AR by construction); y: the task's primary metric on its full scale [0, 1], so that a
0.60 vs 0.65 difference looks like what it is. Each decoder setting has one marker and colour,
named in a shared legend under the panels (no labels on the points, which overlap).
Sweeps (`dvlm ablate`) use the same decoder colours and markers, as lines against the knob.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRIMARY_METRIC = {"shapes-qa": "exact_match", "shapes-caption": "fact_f1", "digits-read": "digit_accuracy",
                  "multi-turn": "exact_match"}
# decoder -> (colour, marker); settings of one decoder share its colour and differ in shade.
STYLE = {"ar": ("black", "o"), "hf": ("dimgray", "s"), "block": ("tab:blue", "D"), "spec": ("tab:orange", "^"),
         "spec-quadratic": ("tab:red", "v")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def primary_metric(task: str, metrics: dict[str, float]) -> tuple[str, float]:
    name = PRIMARY_METRIC.get(task, next(iter(metrics)))
    return name, metrics.get(name, 0.0)


def setting_label(row: dict[str, Any]) -> str:
    """A short legend name: "block B=16 τ=0.9", "spec B=16", "hf (baseline model)"."""
    parts = [row["decoder"]]
    if row.get("block_size") is not None:
        parts.append(f"B={row['block_size']}")
    if row.get("threshold") is not None:
        parts.append(f"τ={row['threshold']}")
    if row.get("model") == "baseline":
        parts.append("(AR source)")
    return " ".join(parts)


def pareto_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy against speed-up over AR, one panel per task, one point per decoder setting."""
    plt = _pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    labels = list(dict.fromkeys(setting_label(r) for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks) + 0.6, 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        task_rows = [r for r in rows if r["task"] == task]
        for row in task_rows:
            _point(ax, row, labels)
        _axes(ax, task, task_rows)
    handles, names = axes[0][0].get_legend_handles_labels()
    by_name = dict(zip(names, handles))
    fig.legend([by_name[n] for n in labels if n in by_name], [n for n in labels if n in by_name],
               loc="lower center", ncol=min(4, len(labels)), frameon=False, fontsize=9)
    rows_of_legend = -(-len(labels) // 4)
    fig.tight_layout(rect=(0, 0.06 * rows_of_legend + 0.02, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _point(ax, row: dict[str, Any], labels: list[str]) -> None:
    colour, marker = STYLE.get(row["decoder"], ("tab:green", "P"))
    label = setting_label(row)
    same = [n for n in labels if n.split(" ")[0] == row["decoder"]]
    shade = 0.45 + 0.55 * (same.index(label) + 1) / len(same)  # later settings of a decoder darker
    _, value = primary_metric(row["task"], row["metrics"])
    ax.scatter(row.get("speedup_vs_ar") or 0.0, value, s=60, marker=marker, color=colour, alpha=shade,
               edgecolors="black", linewidths=0.5, label=label, zorder=3)


def _axes(ax, task: str, rows: list[dict[str, Any]]) -> None:
    name, _ = primary_metric(task, rows[0]["metrics"])
    top = max([r.get("speedup_vs_ar") or 0.0 for r in rows] + [1.0])
    ax.axvline(1.0, color="gray", linewidth=0.8, linestyle="--", zorder=1)
    ax.set_xlim(0, top * 1.15)
    ax.set_ylim(0, 1.04)
    ax.set_xlabel("speed-up over AR (tokens/s, same run)")
    ax.set_ylabel(name.replace("_", " "))
    ax.set_title(panel_title(task, rows))
    ax.grid(alpha=0.3, zorder=0)


def panel_title(task: str, rows: list[dict[str, Any]]) -> str:
    """The task's name, with "partial: N of M items" under it when its rows scored a limited run."""
    row = rows[0]
    if "coverage" in row and row["num_items"] != row["total_items"]:
        return f"{task}\n{row['coverage']}"
    return task


@dataclass
class Curve:
    """One decoder's line in a sweep: x values and, per x, a score and a tokens/forward estimate
    (anything with `value`, `low`, `high`: the interval is drawn as a band)."""

    label: str
    decoder: str
    x: list[float]
    score: list[Any]
    tokens_per_forward: list[Any]


def curve_plot(curves: list[Curve], x_name: str, path: Path, log_x: bool = False) -> Path:
    """Two panels against one knob (threshold, block size): score on its full [0, 1] scale, and
    tokens per forward; one line per decoder in the decoders' shared colours, intervals as bands."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 4.0))
    for curve in curves:
        colour, marker = STYLE.get(curve.decoder, ("tab:green", "P"))
        for ax, values in zip(axes, (curve.score, curve.tokens_per_forward)):
            ax.plot(curve.x, [v.value for v in values], marker=marker, color=colour, label=curve.label, zorder=3)
            ax.fill_between(curve.x, [v.low for v in values], [v.high for v in values], color=colour, alpha=0.2,
                            linewidth=0, zorder=2)
    axes[0].set_ylim(0, 1.04)
    axes[0].set_ylabel("average score")
    axes[1].set_ylim(bottom=0)
    axes[1].set_ylabel("tokens per forward")
    for ax in axes:
        if log_x:
            ax.set_xscale("log", base=2)
            ticks = sorted({x for c in curves for x in c.x})
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel(x_name)
        ax.grid(alpha=0.3, zorder=0)
    axes[0].legend(frameon=False, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
