"""Model cards of the built-in models: what they are, how they were made, how well they do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dvlm.eval.harness import evaluate

CARD_TASKS = ("shapes-qa", "shapes-caption", "digits-read", "multi-turn")
EVAL_FILE = "eval_results.json"


def evaluate_builtin(model, decoders: list[tuple[str, dict[str, Any]]], limit: int,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Greedy test-split scores of `model` for each (decoder, options) on every task."""
    rows = []
    for decoder, options in decoders:
        for task in CARD_TASKS:
            result = evaluate(model, task, limit=limit, decoder=decoder, batch_size=16, progress=progress, **options)
            rows.append({"task": task, "decoder": decoder, **options, "metrics": result.metrics,
                         "tokens_per_nfe": result.speed["tokens_per_nfe"], "samples": result.num_samples})
    return rows


def write_model_card(path: Path, name: str, summary: str, info: dict[str, Any], rows: list[dict[str, Any]]) -> Path:
    """README.md (+ eval_results.json) in the model directory."""
    (path / EVAL_FILE).write_text(json.dumps(rows, indent=2) + "\n")
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", {})
    stages = info["recipe"]["ar_stages"] if info["stage"] == "ar" else [info["recipe"]["dvlm"]]
    lines = [
        f"# {name}", "", summary, "",
        "## Model", "",
        f"- architecture: `{config['architectures'][0]}` (the Hugging Face class, small sizes)",
        f"- language model: hidden {text.get('hidden_size')}, {text.get('num_hidden_layers')} layers, "
        f"{text.get('num_attention_heads')} heads / {text.get('num_key_value_heads')} KV heads, "
        f"vocabulary {text.get('vocab_size')}",
        vision_line(config.get("vision_config", {})),
        f"- parameters: {info.get('parameters', 'n/a'):,}" if isinstance(info.get("parameters"), int) else "",
        "", "## Training", "",
        f"- data: {', '.join(f'{k} x{v}' for k, v in info['recipe']['train_mix'].items())} (train split, seed "
        f"{info['recipe']['seed']})",
        *([f"- conversion: `dvlm convert --preset fast-dvlm`, block size {info['recipe']['block_size']}, "
           f"overrides {json.dumps(info['recipe'].get('diffusion_overrides', {}))}"] if info["stage"] == "dvlm" else []),
        *(stage_line(i, st) for i, st in enumerate(stages, start=1)),
        f"- training time: about {info['train_seconds'] / 60:.0f} min (sum of measured step times) on "
        f"{info['hardware']}",
        "- rebuild: `dvlm zoo build` (the recipe in `src/dvlm/zoo/recipe.py`)",
        "", "## Test-split results (greedy)", "",
        "| task | decoder | metrics | tokens / forward |", "|---|---|---|---|",
    ]
    for r in rows:
        opts = ", ".join(f"{k}={r[k]}" for k in ("block_size", "threshold") if k in r)
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items())
        lines.append(f"| {r['task']} | {r['decoder']}{' (' + opts + ')' if opts else ''} | {metrics} | "
                     f"{r['tokens_per_nfe']:.2f} |")
    lines.append("")
    card = path / "README.md"
    card.write_text("\n".join(line for line in lines if line is not None) + "\n")
    return card


def vision_line(vision: dict[str, Any]) -> str:
    """The card's vision-tower line from a config's `vision_config`, whichever family's keys it uses
    (layers as `depth` or `num_hidden_layers`; a patch merge only where the tower has one)."""
    parts = [f"depth {vision.get('depth', vision.get('num_hidden_layers'))}", f"hidden {vision.get('hidden_size')}",
             f"patch {vision.get('patch_size')}"]
    if "spatial_merge_size" in vision:
        parts.append(f"merge {vision['spatial_merge_size']}")
    return "- vision: " + ", ".join(parts)


def stage_line(index: int, stage: dict[str, Any]) -> str:
    """One training stage of a card, e.g. "- stage 1: 6000 steps, ..., vision tower frozen, next-token loss"."""
    vision = stage.get("vision_learning_rate")
    vision_text = "" if vision is None else ", vision tower frozen" if vision == 0 else f", vision lr {vision}"
    # Stages recorded before TrainConfig.ar_loss became `objective` carry the old key.
    autoregressive = stage.get("objective", "autoregressive" if stage.get("ar_loss") else "diffusion") == "autoregressive"
    loss = "next-token loss" if autoregressive else "diffusion + AR loss (fast-dvlm recipe)"
    return (f"- stage {index}: {stage['max_steps']} steps, batch {stage['batch_size']}, AdamW lr "
            f"{stage['learning_rate']} (warmup {stage['warmup_ratio']}, cosine), {stage['dtype']}{vision_text}, {loss}")
