"""Preallocated vs dynamic KV cache: tokens/s of a cached AR loop, side by side in one run.

transformers' DynamicLayer concatenates the whole cache on every forward (a copy of every cached
entry, per layer); dvlm's PreallocatedLayer writes the new entries into buffers allocated once.
This times the same greedy 1-token-per-forward loop with both, on a randomly initialised
Qwen2.5-VL-shaped decoder (see forward_cost.py), after prompts of several lengths.

Usage: python benchmarks/kv_cache.py [--size 50m] [--prompts 256 1024 2048] [--new 64] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
from forward_cost import SIZES, build  # noqa: E402  (run from this folder or with it on sys.path)

from dvlm.model.adapters.mrope import MRopePositions
from dvlm.model.adapters.qwen2_5_vl import Qwen25VLAdapter
from dvlm.model.cache import KVContext
from dvlm.runtime import pick_device, pick_dtype, synchronize

POSITIONS = MRopePositions(spatial_merge_size=2)  # text positions: equal on the three axes


@torch.inference_mode()
def decode_seconds(model, prompt_len: int, new_tokens: int, capacity: int | None, device) -> float:
    """Seconds for `new_tokens` cached 1-token forwards after a `prompt_len` prefill."""
    adapter = Qwen25VLAdapter()
    ctx = KVContext(adapter, model, 1, device, capacity=capacity)
    ids = torch.randint(10, 1000, (1, prompt_len), device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    ctx.commit(adapter.embed(model, ids), POSITIONS.text(zero, prompt_len), torch.ones_like(ids, dtype=torch.bool),
               torch.zeros_like(ids), "causal")
    token = ids[:, -1:]
    synchronize(device)
    start = time.perf_counter()
    for step in range(new_tokens):
        hidden = ctx.commit(adapter.embed(model, token), POSITIONS.text(zero + prompt_len + step, 1),
                            torch.ones_like(token, dtype=torch.bool), torch.full_like(token, step + 1), "causal")
        token = adapter.logits(model, hidden[:, -1:]).argmax(-1)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="50m")
    parser.add_argument("--prompts", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--new", type=int, default=64, help="tokens decoded after each prompt")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (the median is kept)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = build(args.size, dtype, device)
    print(f"model {args.size}, {dtype}, {device}, {args.new} new tokens, threads {torch.get_num_threads()}")
    print("| prompt tokens | dynamic tok/s | preallocated tok/s | preallocated vs dynamic |")
    print("|---|---|---|---|")
    for prompt in args.prompts:
        times = {}
        for name, capacity in (("dynamic", None), ("preallocated", prompt + args.new)):
            runs = sorted(decode_seconds(model, prompt, args.new, capacity, device) for _ in range(args.repeats))
            times[name] = runs[len(runs) // 2]
        rate = {k: args.new / v for k, v in times.items()}
        print(f"| {prompt} | {rate['dynamic']:.1f} | {rate['preallocated']:.1f} | "
              f"{rate['preallocated'] / rate['dynamic']:.2f}x |")


if __name__ == "__main__":
    main()
