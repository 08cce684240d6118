"""The serving engine's throughput against sequential `generate`, side by side in one run.

N requests (built-in task prompts with their images, encoded once beforehand) are decoded one by
one with the decoder `DVLM.generate` calls, then through `dvlm.serve.engine.Engine` with at most C requests in flight (C
client threads, each submitting its next request when the previous one finished), for each C.
Prints generated tokens per second, the ratio to sequential generate, the mean rows per engine
step, and whether every answer equals the sequential one (greedy: it must).

Usage: python benchmarks/engine_throughput.py [--model tiny-dvlm] [--decoder block] [--requests 32]
       [--concurrency 1 4 16] [--max-new-tokens 48] [--task shapes-caption]
       python benchmarks/engine_throughput.py --model random-0.5b --requests 32 --max-new-tokens 32
`random-0.5b`: serve_load.py's random model with Qwen2.5-0.5B's language-model shape (built once).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

import dvlm
from dvlm.config import DecodeConfig
from dvlm.decode.generate import decoder_function
from dvlm.eval.harness import sample_prompt
from dvlm.serve.engine import Engine
from dvlm.serve.requests import EngineObserver, EngineRequest, Finished
from dvlm.tasks.builtin import get_task
from serve_load import RANDOM_SHAPES, random_model  # noqa: E402 (benchmarks/ is this script's folder)


class StepRows(EngineObserver):
    def __init__(self) -> None:
        self.rows: list[int] = []

    def on_step(self, group_key, rows, forwards) -> None:
        self.rows.append(rows)


def sequential(lm, encoded, cfg: DecodeConfig) -> tuple[list[list[int]], float]:
    """`generate` of each request alone, after its encoding (the engine gets encoded requests too)."""
    decode = decoder_function(cfg.decoder)
    start = time.perf_counter()
    outputs = [decode(lm, [prompt], cfg)[0] for prompt in encoded]
    return [o.tokens for o in outputs], time.perf_counter() - start


def through_engine(lm, requests, concurrency: int) -> tuple[list[list[int]], float, float]:
    """(tokens per request, wall seconds, mean rows per step) with `concurrency` clients."""
    steps = StepRows()
    engine = Engine(lm, max_batch_size=max(concurrency, 1), max_queue=len(requests) + 1, observer=steps)
    engine.start()
    results: dict[str, list[int]] = {}

    def client(part):
        for request in part:
            finished = list(engine.submit(request).iter_events())[-1]
            assert isinstance(finished, Finished) and finished.error is None, finished.error
            results[request.id] = finished.output.tokens

    threads = [threading.Thread(target=client, args=(requests[i::concurrency],)) for i in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    engine.shutdown()
    return [results[r.id] for r in requests], wall, sum(steps.rows) / max(len(steps.rows), 1)


def load(name: str, dtype: str | None = None):
    if name in RANDOM_SHAPES:
        return dvlm.load(random_model(name, Path(tempfile.gettempdir()) / "dvlm-bench-models"), dtype=dtype), name
    try:
        return dvlm.load(name, dtype=dtype), name
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"cannot load {name!r}: {err}") from err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-dvlm")
    parser.add_argument("--decoder", default="block", choices=["ar", "block", "spec"])
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--task", default="shapes-caption")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dtype", help="load the model in this dtype (default: the checkpoint's; answers are "
                        "batch-invariant only in float32)")
    args = parser.parse_args()
    lm, name = load(args.model, args.dtype)
    samples = get_task(args.task).generate("test", args.requests, seed=0)
    prompts = [(sample_prompt(s), s.images) for s in samples]  # laid out as the eval harness does
    options = dict(decoder=args.decoder, block_size=args.block_size, threshold=args.threshold,
                   max_new_tokens=args.max_new_tokens)
    encoded = [lm.encode(text, images) for text, images in prompts]
    requests = [EngineRequest(id=str(i), prompt=prompt, **options) for i, prompt in enumerate(encoded)]
    cfg = DecodeConfig(**options)
    sequential(lm, encoded[:2], cfg)  # warm-up
    expected, base = sequential(lm, encoded, cfg)
    tokens = sum(len(t) for t in expected)
    print(f"model {name}, {lm.device}, torch threads {torch.get_num_threads()}, decoder {args.decoder}, "
          f"{args.requests} requests of {args.task}, {tokens} tokens generated")
    print("| run | tokens/s | vs sequential generate | mean rows per step | answers equal |")
    print("|---|---|---|---|---|")
    print(f"| sequential generate | {tokens / base:.1f} | 1.00x | 1.0 | yes |")
    walls = {}
    for concurrency in args.concurrency:
        got, walls[concurrency], rows = through_engine(lm, requests, concurrency)
        same = "yes" if got == expected else f"no ({sum(a != b for a, b in zip(got, expected))} differ)"
        print(f"| engine, {concurrency} in flight | {tokens / walls[concurrency]:.1f} | {base / walls[concurrency]:.2f}x "
              f"| {rows:.1f} | {same} |")
    if 1 in walls:
        print(f"engine at 1 in flight: {100 * (walls[1] / base - 1):+.1f}% time over sequential generate")
        for concurrency in (c for c in walls if c != 1):
            print(f"engine at {concurrency} in flight: {walls[1] / walls[concurrency]:.2f}x its tokens/s at 1")


if __name__ == "__main__":
    main()
