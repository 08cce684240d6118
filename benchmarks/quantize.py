"""Quantization side by side in one run: accuracy and tokens/s per decoder for fp32, bf16,
int8-weight and int8-dynamic (and fp8 on a GPU of compute capability >= 8.9), with ratios to fp32.

Two parts:

* the built-in `tiny-dvlm` on the built-in tasks: accuracy (each task's primary metric), tokens
  per forward and tokens/s for the `ar`, `block` and `spec` decoders. Every precision's model is
  loaded first, then each (task, decoder) runs over the precisions one after the other, so that
  drift in the machine's speed hits all precisions alike;
* the ~50M-parameter Qwen2.5-VL-shaped decoder of `forward_cost.py` (random weights, so speed
  only): milliseconds per forward of 1 and of 16 new tokens over a KV cache, the AR tokens/s
  that 1 token per forward gives (1000 / ms at Q=1), and the cost of a block forward.

int8 schemes quantize the fp32 model (`dvlm.load(..., quantize=...)`; vision encoder and output
layer stay fp32). On CPU, expect int8 to be no faster than fp32: torchao writes its CPU int8 paths
as decomposed ops for torch.compile (Inductor) to fuse, and dvlm decodes eagerly, so int8-weight
converts its int8 weights to float inside every matmul, and int8-dynamic runs the per-token
activation quantization, the int8 matmul and the rescaling as separate ops. On the tiny model
every forward is overhead-bound (~1 ms) whatever the arithmetic.

Usage (from the repository root, on a quiet machine):

    python benchmarks/quantize.py [--limit 40] [--device cpu] [--threads 2] [--out quantize-results]
    python benchmarks/quantize.py --quick      # a few samples, short cache: checks that it runs

Prints markdown tables; writes `quantize.json` (every row) into --out. Timings are only
comparable within one run.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as hf_logging

import dvlm  # first: it quiets torchao's import, which forward_cost's transformers import triggers
from dvlm.model.adapters.qwen2_5_vl import Qwen25VLAdapter
from dvlm.eval.harness import evaluate
from dvlm.eval.plots import primary_metric
from dvlm.model.quantize import FP8_MIN_CAPABILITY, quantize_model
from dvlm.runtime import pick_device

sys.path.insert(0, str(Path(__file__).resolve().parent))  # forward_cost.py, run as a script or imported
from forward_cost import build, forward_cost

MODEL = "tiny-dvlm"
TASKS = ("shapes-qa", "shapes-caption", "digits-read")
DECODERS = ("ar", "block", "spec")
SCALED_SIZE = "50m"
QUERY_LENGTHS = (1, 16)  # an AR step; a block forward at B=16


@dataclass(frozen=True)
class Precision:
    name: str
    dtype: str
    scheme: str | None  # a dvlm.model.quantize scheme applied on top of `dtype`


PRECISIONS = (Precision("fp32", "float32", None), Precision("bf16", "bfloat16", None),
              Precision("int8-weight", "float32", "int8-weight"), Precision("int8-dynamic", "float32", "int8-dynamic"))
FP8 = Precision("fp8", "bfloat16", "fp8")


def precisions_here(device: torch.device) -> tuple[Precision, ...]:
    """fp8 joins where torchao's float8 matmuls run (CUDA, compute capability >= 8.9)."""
    fp8_ok = device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY
    return PRECISIONS + ((FP8,) if fp8_ok else ())


# -- the built-in model on the built-in tasks ------------------------------------------------------
def builtin_rows(precisions: tuple[Precision, ...], device: torch.device, limit: int) -> list[dict[str, Any]]:
    models = {p.name: dvlm.load(MODEL, device=str(device), dtype=p.dtype, quantize=p.scheme) for p in precisions}
    for lm in models.values():  # warm-up: first-call costs (allocations, torchao's kernels) stay out of the timings
        evaluate(lm, TASKS[0], limit=1, decoder="ar", progress=False)
    rows = []
    for task in TASKS:
        for decoder in DECODERS:
            for name, lm in models.items():
                result = evaluate(lm, task, limit=limit, decoder=decoder, progress=False)
                metric, value = primary_metric(task, result.metrics)
                rows.append({"model": MODEL, "precision": name, "task": task, "decoder": decoder, "metric": metric,
                             "value": value, "tokens_per_nfe": result.speed["tokens_per_nfe"],
                             "tokens_per_second": result.speed["tokens_per_second"]})
    return rows


def builtin_table(rows: list[dict[str, Any]]) -> str:
    fp32 = {(r["task"], r["decoder"]): r for r in rows if r["precision"] == "fp32"}
    lines = ["| task | decoder | precision | metric | value | vs fp32 | tok/NFE | tok/s | tok/s vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = fp32[(r["task"], r["decoder"])]
        speed = r["tokens_per_second"] / base["tokens_per_second"] if base["tokens_per_second"] else float("nan")
        lines.append(f"| {r['task']} | {r['decoder']} | {r['precision']} | {r['metric']} | {r['value']:.3f} | "
                     f"{r['value'] - base['value']:+.3f} | {r['tokens_per_nfe']:.2f} | {r['tokens_per_second']:.1f} | "
                     f"{speed:.2f}x |")
    return "\n".join(lines)


# -- the scaled random model: forward cost -------------------------------------------------------
def scaled_model(precision: Precision, device: torch.device) -> torch.nn.Module:
    model = build(SCALED_SIZE, getattr(torch, precision.dtype), device)
    if precision.scheme is not None:
        quantize_model(model, Qwen25VLAdapter(), precision.scheme)
    return model


def scaled_rows(precisions: tuple[Precision, ...], device: torch.device, cache: int,
                repeats: int) -> list[dict[str, Any]]:
    models = {p.name: scaled_model(p, device) for p in precisions}
    parameters = sum(p.numel() for p in models["fp32"].model.language_model.parameters())
    rows = []
    for q in QUERY_LENGTHS:  # all precisions at one Q back to back
        for name, model in models.items():
            ms = 1000 * forward_cost(model, cache, q, repeats, device)
            rows.append({"model": f"{SCALED_SIZE} random ({parameters / 1e6:.0f}M LM parameters)", "precision": name,
                         "cache": cache, "new_tokens": q, "ms_per_forward": round(ms, 3)})
    return rows


def scaled_table(rows: list[dict[str, Any]]) -> str:
    ms = {(r["precision"], r["new_tokens"]): r["ms_per_forward"] for r in rows}
    lines = [f"model: {rows[0]['model']}, cache {rows[0]['cache']} tokens",
             "| precision | ms/forward Q=1 | vs fp32 | AR tok/s (1000/ms) | ms/forward Q=16 | vs fp32 | Q=16 vs Q=1 |",
             "|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["precision"] for r in rows):
        one, block = ms[(name, 1)], ms[(name, 16)]
        lines.append(f"| {name} | {one:.2f} | {one / ms[('fp32', 1)]:.2f}x | {1000 / one:.1f} | {block:.2f} | "
                     f"{block / ms[('fp32', 16)]:.2f}x | {block / one:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=40, help="test samples per built-in task (default: %(default)s)")
    parser.add_argument("--cache", type=int, default=256, help="cached tokens of the scaled model's forwards")
    parser.add_argument("--repeats", type=int, default=20, help="timed forwards per setting (median kept)")
    parser.add_argument("--device", help="cpu, cuda, cuda:0 (default: auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("quantize-results"), help="directory for quantize.json")
    parser.add_argument("--quick", action="store_true", help="4 samples per task, cache 32, 2 repeats: a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.limit, args.cache, args.repeats = 4, 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # a bar per model load would bury the tables
    device = pick_device(args.device)
    precisions = precisions_here(device)
    print(f"device {device}, {torch.get_num_threads()} threads; precisions {', '.join(p.name for p in precisions)}"
          f"{' (quick run: not a measurement)' if args.quick else ''}")
    builtin = builtin_rows(precisions, device, args.limit)
    print(f"\n## {MODEL}, {args.limit} test samples per task, batch 1, greedy\n\n{builtin_table(builtin)}")
    scaled = scaled_rows(precisions, device, args.cache, args.repeats)
    print(f"\n## scaled model, forward cost (median of {args.repeats})\n\n{scaled_table(scaled)}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"device": str(device), "threads": torch.get_num_threads(), "quick": args.quick, "limit": args.limit,
              "builtin": builtin, "scaled": scaled}
    (args.out / "quantize.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out / 'quantize.json'}")


if __name__ == "__main__":
    main()
