"""What the training layout costs: peak memory and step time per `noisy_stream`, with and without
gradient checkpointing, measured through `dvlm train` as a user runs it.

Fast-dVLM reports that leaving the vision tokens out of the noisy stream cuts peak memory by 15.0%
and step time by 14.2% against duplicating them. dvlm's noisy stream can hold every token (`all`,
DiffusionVL), the text tokens (`text`, Fast-dVLM's vision-efficient concatenation) or only the
response (`response`, dvlm's default). This script builds a randomly initialised Qwen2.5-VL-shaped
model scaled to these CPUs, writes LLaVA-style data shaped like real training (one image of a few
hundred vision tokens per sample, a short question, a LLaVA-length answer), converts the model
once, and then runs `dvlm train` in a fresh process per configuration, so that each process's peak
resident memory (``wait4``'s ``ru_maxrss``) is that configuration's alone. Step time is the median
of the logged steps after the first (warm-up).

Everything runs through the CLI; random weights are fine because only cost is measured.

Usage: python benchmarks/train_layout.py [--steps 6] [--batch-size 2] [--size small|medium]
       [--answer-tokens 128] [--image-side 448] [--out DIR] [--json FILE] [--quick]
Run it on a quiet machine: on 2 shared cores, contention voids the time ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import dvlm

STREAMS = ("all", "text", "response")
PAPER = {
    "memory": 15.0,
    "time": 14.2,
}  # Fast-dVLM: vision-efficient concatenation vs duplication, % saved
SIZES = {
    # Qwen2.5-VL's layer shapes (GQA 4:1, MLP ~3x, M-RoPE) scaled to a few CPU seconds per step.
    "small": {
        "hidden_size": 384,
        "intermediate_size": 1152,
        "num_hidden_layers": 6,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "vocab_size": 16000,
        "mrope": [8, 12, 12],
        "vision": {
            "depth": 4,
            "hidden_size": 192,
            "intermediate_size": 384,
            "num_heads": 4,
        },
    },
    # Qwen2.5-VL-3B's published shape (benchmarks/lora_memory.py: a LoRA fine-tune of it on CPU).
    "3b": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "mrope": [16, 24, 24],
        "vision": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16},
    },
    "medium": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 32000,
        "mrope": [8, 12, 12],
        "vision": {
            "depth": 4,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_heads": 4,
        },
    },
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
)


def build_source(out: Path, size: str, image_side: int, dtype: torch.dtype = torch.float32) -> None:
    """A random Qwen2.5-VL-shaped checkpoint with the built-in model's tokenizer and chat layout,
    built and saved in `dtype` (bfloat16 halves the memory of building a large one)."""
    builtin = Path(dvlm.__file__).parent / "zoo" / "weights" / "tiny-ar"
    base = json.loads((builtin / "config.json").read_text())
    shape = dict(SIZES[size])
    mrope, vision = shape.pop("mrope"), shape.pop("vision")
    text = {
        **base["text_config"],
        **shape,
        "layer_types": ["full_attention"] * shape["num_hidden_layers"],
        "rope_parameters": {
            **base["text_config"]["rope_parameters"],
            "mrope_section": mrope,
        },
    }
    vision_config = {
        **base["vision_config"],
        **vision,
        "out_hidden_size": shape["hidden_size"],
        "fullatt_block_indexes": [vision["depth"] - 1],
    }
    ids = {
        key: base[key]
        for key in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "eos_token_id",
            "pad_token_id",
        )
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision_config,
        bos_token_id=None,
        tie_word_embeddings=True,
        **ids,
    )
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.config.dtype = dtype
    model.save_pretrained(out)
    del model
    for name in TOKENIZER_FILES:
        shutil.copy(builtin / name, out / name)
    processor = json.loads((builtin / "preprocessor_config.json").read_text())
    processor["size"] = {
        "shortest_edge": 56 * 56,
        "longest_edge": image_side * image_side,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def write_data(out: Path, samples: int, answer_tokens: int, image_side: int, seed: int = 0) -> Path:
    """LLaVA JSON: one noise image per sample, a question, an answer of about `answer_tokens` words."""
    rng = random.Random(seed)
    words = [
        "the",
        "red",
        "blue",
        "green",
        "circle",
        "square",
        "star",
        "is",
        "in",
        "top",
        "left",
        "right",
        "bottom",
        "center",
        "shape",
        "there",
        "are",
        "digits",
        "first",
        "last",
        ".",
    ]
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples):
        pixels = np.random.default_rng(seed + i).integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out / f"{i}.png")
        length = rng.randint(answer_tokens // 2, answer_tokens * 3 // 2)
        answer = " ".join(rng.choice(words) for _ in range(length))
        records.append(
            {
                "id": str(i),
                "image": f"{i}.png",
                "conversations": [
                    {
                        "from": "human",
                        "value": "<image>\nDescribe the image in detail, shape by shape.",
                    },
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    path = out / "data.json"
    path.write_text(json.dumps(records))
    return path


def dvlm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvlm", *args]


def run_measured(command: list[str], env: dict[str, str]) -> tuple[int, int]:
    """Run a command in its own process; (exit status, its peak resident memory in bytes)."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read()[-3000:]}")
    process.stderr.close()
    return process.returncode, usage.ru_maxrss * 1024  # Linux reports kilobytes


def step_seconds(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["seconds"] for line in lines if line.strip()]


def measure(model: Path, data: Path, work: Path, stream: str, checkpointing: bool, args, env) -> dict:
    run_dir = work / f"run-{stream}-{'gc' if checkpointing else 'nogc'}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = dvlm_command(
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(run_dir),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--diffusion",
        f"noisy_stream={stream}",
        "--set",
        "save_every=0",
    )
    if checkpointing:
        command.append("--gradient-checkpointing")
    _, peak = run_measured(command, env)
    seconds = step_seconds(run_dir)[1:]  # the first step warms up allocators and kernels
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "noisy_stream": stream,
        "gradient_checkpointing": checkpointing,
        "peak_rss_mb": round(peak / 2**20, 1),
        "step_seconds": round(statistics.median(seconds), 3),
        "steps_timed": len(seconds),
    }


def baseline_rss(model: Path, env: dict[str, str]) -> int:
    """Peak memory of loading the model and building AdamW state without a training step: the part
    of every configuration's peak that does not depend on the layout."""
    code = (
        "import sys, torch, dvlm; lm = dvlm.load(sys.argv[1]); params = [p for p in lm.model.parameters()];"
        "opt = torch.optim.AdamW(params); [setattr(p, 'grad', torch.zeros_like(p)) for p in params];"
        "opt.step()"
    )
    return run_measured([sys.executable, "-c", code, str(model)], env)[1]


def report(rows: list[dict], base_mb: float) -> str:
    """Savings of each layout against `all` at the same checkpointing setting: of the whole peak, and
    of the part above the layout-independent base (activations and logits)."""
    lines = [
        (
            "| noisy stream | grad. ckpt | peak RSS (MB) | saved vs all | above base (MB) | saved vs all | "
            "step (s) | saved vs all |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ref = next(
            r
            for r in rows
            if r["noisy_stream"] == "all" and r["gradient_checkpointing"] == row["gradient_checkpointing"]
        )
        above, ref_above = row["peak_rss_mb"] - base_mb, ref["peak_rss_mb"] - base_mb
        lines.append(
            f"| {row['noisy_stream']} | {'on' if row['gradient_checkpointing'] else 'off'} | "
            f"{row['peak_rss_mb']:.0f} | {saving(row['peak_rss_mb'], ref['peak_rss_mb'])} | "
            f"{above:.0f} | {saving(above, ref_above)} | {row['step_seconds']:.2f} | "
            f"{saving(row['step_seconds'], ref['step_seconds'])} |"
        )
    lines.append(
        f"\nbase (model + AdamW state, no step): {base_mb:.0f} MB; paper (text vs all): "
        f"{PAPER['memory']}% memory, {PAPER['time']}% time"
    )
    return "\n".join(lines)


def saving(value: float, reference: float) -> str:
    return f"{100 * (1 - value / reference):.1f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per configuration")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--answer-tokens", type=int, default=128, help="mean answer length in words")
    parser.add_argument(
        "--image-side",
        type=int,
        default=448,
        help="image side in pixels (448: 256 vision tokens)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny shapes and 3 steps: checks the plumbing",
    )
    args = parser.parse_args()
    if args.quick:
        args.steps, args.answer_tokens, args.image_side, args.batch_size = 3, 24, 112, 1
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }
    work = args.out or Path(tempfile.mkdtemp(prefix="dvlm-train-layout-"))
    try:
        source, model = work / "source", work / "model"
        build_source(source, args.size, args.image_side)
        data = write_data(
            work / "data",
            4 * args.batch_size * args.steps,
            args.answer_tokens,
            args.image_side,
        )
        shutil.rmtree(model, ignore_errors=True)
        subprocess.run(
            dvlm_command("convert", "--model", str(source), "--out", str(model)),
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        base_mb = baseline_rss(model, env) / 2**20
        rows = []
        for checkpointing in (False, True):
            for stream in STREAMS:
                rows.append(measure(model, data, work, stream, checkpointing, args, env))
                print(json.dumps(rows[-1]), flush=True)
        print(report(rows, base_mb))
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "base_rss_mb": round(base_mb, 1),
                        "rows": rows,
                    },
                    indent=2,
                )
            )
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
