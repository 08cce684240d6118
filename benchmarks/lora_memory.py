"""A LoRA fine-tune of a 3B-shaped dVLM on this machine's CPU, with its peak memory beside the
up-front estimate, and the full fine-tune that `dvlm train` refuses to start.

Qwen2.5-VL-3B's shape (3.75B parameters, random weights: only memory is measured) is built in
bfloat16, converted with `dvlm convert --dtype bfloat16`, then trained through the CLI:

1. a full fine-tune (fp32 master weights + AdamW: ~56 GiB of state), which the memory check
   refuses before loading anything, naming the options that would fit;
2. `--lora` for a few steps with gradient checkpointing: fp32 weights (14 GiB) plus the adapter,
   the mask token's row and the activations of short samples.

Each `dvlm train` runs in its own process; its peak resident memory is `wait4`'s ``ru_maxrss``.

Usage: python benchmarks/lora_memory.py [--steps 3] [--out DIR] [--json FILE]
It needs about 16 GiB of free memory and 16 GB of disk; a step takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_layout import build_source, dvlm_command, step_seconds, write_data  # noqa: E402

GIB = 2**30


def run(command: list[str], env: dict[str, str]) -> tuple[int, str, int]:
    """(exit status, stdout + stderr, peak resident bytes) of a command in its own process."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    return os.waitstatus_to_exitcode(status), output, usage.ru_maxrss * 1024


def memory_line(output: str) -> str:
    return next((line for line in output.splitlines() if line.startswith("memory:")), "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lora", default="r=16,alpha=32")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    work = args.out or Path(tempfile.mkdtemp(prefix="dvlm-lora-3b-"))
    try:
        source, model = work / "source", work / "model"
        if not (model / "config.json").exists():
            build_source(source, "3b", 224, dtype=torch.bfloat16)
            subprocess.run(dvlm_command("convert", "--model", str(source), "--out", str(model), "--dtype",
                                        "bfloat16", "--overwrite"), env=env, check=True)
            shutil.rmtree(source)
        data = write_data(work / "data", 4 * args.steps, answer_tokens=32, image_side=224)
        base = ["train", "--model", str(model), "--data", str(data), "--batch-size", "1", "--steps", str(args.steps)]
        full_code, full_out, full_peak = run(dvlm_command(*base, "--out", str(work / "full")), env)
        lora_run = work / "lora"
        shutil.rmtree(lora_run, ignore_errors=True)
        lora_code, lora_out, lora_peak = run(dvlm_command(*base, "--out", str(lora_run), "--lora", args.lora,
                                                          "--gradient-checkpointing"), env)
        if lora_code:
            raise SystemExit(f"the LoRA run failed:\n{lora_out[-3000:]}")
        result = {
            "full_fine_tune": {"exit": full_code, "message": full_out.strip().splitlines()[-1],
                               "peak_rss_gib": round(full_peak / GIB, 2)},
            "lora": {"setting": args.lora, "estimate": memory_line(lora_out), "peak_rss_gib": round(lora_peak / GIB, 2),
                     "step_seconds": step_seconds(lora_run), "final": lora_out.strip().splitlines()[-4:]},
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    finally:
        if args.out is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
