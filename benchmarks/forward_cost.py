"""Cost of one forward pass with Q new tokens over a KV cache, and the speed-up it implies.

Block decoding pays for Q = B tokens per forward and gets `tokens_per_nfe` tokens out of it; AR
pays Q = 1 per token. On a model big enough to be compute-light per token (memory- or
overhead-bound), a forward of 16 tokens costs little more than a forward of 1, which is where
the speed-up comes from. This script measures that curve on a randomly initialised
Qwen2.5-VL-shaped model (random weights are fine for timing) and projects the speed-up at given
acceptance rates:

    threshold decoding: speedup = tokens_per_nfe * cost(1) / cost(B)
    self-speculative:   speedup = accepted_per_block * cost(1) / (2 * cost(B))
    spec-quadratic:     speedup = accepted_per_pass * cost(1) / cost(B + B*B)

Usage: python benchmarks/forward_cost.py [--size 50m|3b] [--cache 256] [--dtype float32|bfloat16]
       [--tokens-per-nfe 3.1] [--accept 6.0] [--accept-quadratic 5.0] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from dvlm.model.adapters.mrope import MRopePositions
from dvlm.model.adapters.qwen2_5_vl import Qwen25VLAdapter
from dvlm.model.cache import KVContext
from dvlm.runtime import pick_device, pick_dtype, synchronize

POSITIONS = MRopePositions(spatial_merge_size=2)  # text positions: equal on the three axes

SIZES = {
    # ~50M parameters: a CPU-sized decoder.
    "50m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=32000, mrope=[8, 12, 12]),
    # Qwen2.5-VL-3B's language model shape.
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, mrope=[16, 24, 24]),
}
QUERY_LENGTHS = (1, 4, 8, 16, 32, 272)  # 272 = B + B*B at B=16: one spec-quadratic pass


def build(size: str, dtype: torch.dtype, device: torch.device) -> Qwen2_5_VLForConditionalGeneration:
    shape = dict(SIZES[size])
    mrope = shape.pop("mrope")
    config = Qwen2_5_VLConfig(
        text_config=dict(**shape, rope_scaling={"type": "mrope", "mrope_section": mrope}, bos_token_id=None,
                         eos_token_id=0, pad_token_id=0),
        vision_config=dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=shape["hidden_size"]),
        image_token_id=1, video_token_id=2, vision_start_token_id=3, vision_end_token_id=4, bos_token_id=None,
        eos_token_id=0, pad_token_id=0,
    )
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(dtype).eval()


@torch.inference_mode()
def forward_cost(model, cache_len: int, query_len: int, repeats: int, device: torch.device) -> float:
    """Median seconds of one block forward (peek) of `query_len` tokens over `cache_len` cached ones."""
    adapter = Qwen25VLAdapter()
    ctx = KVContext(adapter, model, 1, device)
    ids = torch.randint(10, 1000, (1, cache_len), device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    ctx.commit(adapter.embed(model, ids), POSITIONS.text(zero, cache_len), torch.ones_like(ids, dtype=torch.bool),
               torch.zeros_like(ids), "causal")
    block = torch.randint(10, 1000, (1, query_len), device=device)
    pos = POSITIONS.text(zero + cache_len, query_len)
    valid, blocks = torch.ones_like(block, dtype=torch.bool), torch.ones_like(block)
    times = []
    for i in range(repeats + 2):
        synchronize(device)
        start = time.perf_counter()
        hidden = ctx.peek(adapter.embed(model, block), pos, valid, blocks, "bidirectional")
        adapter.logits(model, hidden[:, -1:])
        synchronize(device)
        if i >= 2:  # two warm-up calls
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="50m")
    parser.add_argument("--cache", type=int, default=256, help="cached tokens (prompt + answer so far)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tokens-per-nfe", type=float, nargs="*", default=[],
                        help="measured block-decoding tokens/NFE to project (at block 16)")
    parser.add_argument("--accept", type=float, nargs="*", default=[],
                        help="measured mean accepted tokens per speculative block (at block 16)")
    parser.add_argument("--accept-quadratic", type=float, nargs="*", default=[],
                        help="measured mean accepted tokens per spec-quadratic pass (at block 16)")
    args = parser.parse_args()
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    model = build(args.size, dtype, device)
    params = sum(p.numel() for p in model.model.language_model.parameters())
    costs = {q: forward_cost(model, args.cache, q, args.repeats, device) for q in QUERY_LENGTHS}
    base = costs[1]
    print(f"model {args.size} ({params / 1e6:.1f}M LM parameters), {dtype}, {device}, cache {args.cache}, "
          f"threads {torch.get_num_threads()}")
    print("| new tokens Q | ms / forward | cost vs Q=1 | ms / token |")
    print("|---|---|---|---|")
    for q, c in costs.items():
        print(f"| {q} | {1000 * c:.2f} | {c / base:.2f}x | {1000 * c / q:.2f} |")
    for t in args.tokens_per_nfe:
        print(f"projected threshold-decoding speed-up at B=16, {t} tokens/NFE: {t * base / costs[16]:.2f}x")
    for a in args.accept:
        print(f"projected speculative speed-up at B=16, {a} accepted/block: {a * base / (2 * costs[16]):.2f}x")
    for a in args.accept_quadratic:
        print(f"projected spec-quadratic speed-up at B=16, {a} accepted/pass: {a * base / costs[272]:.2f}x")
    print(json.dumps({"size": args.size, "dtype": str(dtype), "device": str(device), "cache": args.cache,
                      "ms": {q: round(1000 * c, 3) for q, c in costs.items()}}))


if __name__ == "__main__":
    main()
