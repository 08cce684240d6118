"""Real-size speed in one command: random models in the shapes of Qwen2.5-VL-3B (and of a
0.5B language model under the same vision tower), built once and cached, measured in one run.

For each size and each variant (bf16 eager, bf16 compiled, int8 eager, int8 compiled):

* prefill: one 448x448 image (1024 patches, 256 image tokens) inside a short chat, vision tower
  included (~300 prompt tokens);
* the cost of one forward of Q = 1 / 8 / 16 / 32 new tokens over that prompt's cache;
* each decoder's forwards (`ar`; `block` and `spec` at B=16): seconds per forward of its own
  mix of widths, from a few decoding steps (random weights: thresholds unmask one token per
  pass, drafts are rejected; only the time per forward is taken from them);
* peak memory;

then the projected tokens/s of each decoder, labelled as a projection: the tokens per forward the
built-in model decodes its test captions with (measured in this run), times this size's measured
seconds per forward of that decoder, plus the prefill, for an answer of the captions' mean length.
Random weights give the time of a forward, never its acceptance.

The 3B shapes are Qwen2.5-VL-3B-Instruct's published config.json: language model hidden 2048, 36
layers, 16 heads, 2 key/value heads, intermediate 11008, vocabulary 151936, tied embeddings,
M-RoPE sections [16, 24, 24]; vision tower depth 32, hidden 1280, 16 heads, intermediate 3420,
patch 14, merge 2, window 112, full attention in blocks 7, 15, 23, 31. The 0.5B shapes are
Qwen2.5-0.5B's language model (hidden 896, 24 layers, 14 heads, 2 key/value heads, intermediate
4864, the same vocabulary) under the same vision tower (there is no Qwen2.5-VL-0.5B); M-RoPE
sections [8, 12, 12] for its head dim of 64.

The weights are built once per size and dtype (random, seed 0) and saved under --cache-dir
(default ~/.cache/dvlm/real-size): 3B in bf16 is 7.5 GB on disk, and about as much memory while
it runs (int8 is measured after the bf16 variants, on the same model quantized in place).

Usage (from the repository root, on a quiet machine):

    python benchmarks/real_size.py                       # 3b and 0.5b, CPU, bf16 + int8, eager + compiled
    python benchmarks/real_size.py --device cuda         # the same on a GPU
    python benchmarks/real_size.py --quick               # small shapes: checks that it all runs (~2 minutes)
    python benchmarks/real_size.py --sizes 0.5b --variants eager,compiled --out real-size.json

Prints Markdown tables; --out writes every figure as JSON. Timings are medians; compare ratios
within one run only.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.utils import logging as hf_logging

import dvlm  # first: it quiets torchao's import
from dvlm.api import DVLM
from dvlm.config import DecodeConfig, DiffusionConfig
from dvlm.data.processor import IGNORE_INDEX, Encoded
from dvlm.data.vision import VisionInputs
from dvlm.decode.ar import ARStepper
from dvlm.decode.block import BlockStepper
from dvlm.decode.compiled import CompiledKVContext, forget_compiled, static_capacity
from dvlm.decode.prefill import prefill
from dvlm.decode.prompts import plain_prompts
from dvlm.decode.speculative import SpecStepper
from dvlm.eval.harness import evaluate
from dvlm.model.adapters.mrope import IMAGE_TOKEN_TYPE, TEXT_TOKEN_TYPE, MRopePositions
from dvlm.model.adapters.qwen2_5_vl import Qwen25VLAdapter
from dvlm.model.cache import KVContext
from dvlm.model.quantize import quantize_model
from dvlm.runtime import pick_device, synchronize

VISION_3B = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
                 temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
                 hidden_act="silu")
SIZES: dict[str, dict[str, Any]] = {
    "3b": dict(text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, mrope=[16, 24, 24]), vision=VISION_3B),
    "0.5b": dict(text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                           num_key_value_heads=2, vocab_size=151936, mrope=[8, 12, 12]), vision=VISION_3B),
    # --quick: the same code on small shapes
    "quick": dict(text=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=32000, mrope=[8, 12, 12]),
                  vision=dict(VISION_3B, depth=2, hidden_size=128, intermediate_size=256, num_heads=2,
                              fullatt_block_indexes=[1])),
}
IMAGE_SIDE = 448  # pixels: (448 / 14)^2 = 1024 patches, 256 image tokens after the 2x2 merge
QUERY_LENGTHS = (1, 8, 16, 32)
COMPILED_QUERY_LENGTHS = (1, 16, 32)  # the decoders' widths at B=16: each compiled width costs minutes at 3B
PREFILL_REPEATS = 2
TEXT_PROMPT = 32  # tokens of the decoders' prompt (a 32-token prefill shares the compiled Q=32 shape)
BLOCK_SIZE = 16
DECODERS = ("ar", "block", "spec")
STEPPERS = {"ar": ARStepper, "block": BlockStepper, "spec": SpecStepper}
VARIANTS = ("eager", "compiled", "int8", "int8-compiled")
INT8_SCHEME = "int8-weight"
CAPTION_TASK = "shapes-caption"


@dataclass
class _Processor:
    """What the decoders use of a processor (no tokenizer: the prompt is built from ids)."""

    pad_token_id: int
    positions: MRopePositions

    @staticmethod
    def decode(tokens: list[int]) -> str:
        return " ".join(map(str, tokens))


def special_ids(vocab: int) -> dict[str, int]:
    """Token ids at the top of the vocabulary for the roles a prompt and a dVLM need."""
    names = ("image", "video", "vision_start", "vision_end", "mask", "eos", "pad")
    return {name: vocab - 1 - i for i, name in enumerate(names)}


def config_for(size: str, dtype: torch.dtype) -> Qwen2_5_VLConfig:
    text = dict(SIZES[size]["text"])
    mrope, ids = text.pop("mrope"), special_ids(text["vocab_size"])
    vision = dict(SIZES[size]["vision"], out_hidden_size=text["hidden_size"])
    config = Qwen2_5_VLConfig(
        text_config=dict(**text, rope_scaling={"type": "mrope", "mrope_section": mrope}, rope_theta=1000000.0,
                         rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=128000,
                         bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"]),
        vision_config=vision, image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"], tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    config.dtype = dtype
    return config


def cached_model(size: str, dtype: torch.dtype, device: torch.device, cache_dir: Path, log) -> torch.nn.Module:
    """The random model of `size`, built (seed 0) and saved under cache_dir the first time."""
    path = cache_dir / f"qwen2_5_vl-{size}-{str(dtype).removeprefix('torch.')}"
    if not (path / "config.json").exists():
        log(f"building the random {size} model once (saved to {path})")
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the parameters are born in `dtype`: no float32 copy of a 3B model
        try:
            model = Qwen2_5_VLForConditionalGeneration(config_for(size, dtype))
        finally:
            torch.set_default_dtype(default)
        model.save_pretrained(path)
        del model
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()


def wrapped(model: torch.nn.Module) -> DVLM:
    """The random model as a dVLM (fast-dvlm recipe, B=16, no end token: rows run to their budget)."""
    ids = special_ids(model.config.get_text_config().vocab_size)
    diffusion = DiffusionConfig.from_preset("fast-dvlm", mask_token_id=ids["mask"], eos_token_ids=[ids["eos"]],
                                            pad_token_id=ids["pad"], block_size=BLOCK_SIZE)
    diffusion.eos_token_ids = []
    processor = _Processor(ids["pad"], MRopePositions(model.config.vision_config.spatial_merge_size))
    return DVLM(model, Qwen25VLAdapter(), processor, diffusion)


def image_prompt(lm: DVLM, text_before: int = 14, text_after: int = 24) -> Encoded:
    """A chat-sized prompt around one 448x448 image: ids and pixels random, shapes real."""
    vision_cfg, ids = lm.model.config.vision_config, special_ids(lm.model.config.get_text_config().vocab_size)
    patches_side = IMAGE_SIDE // vision_cfg.patch_size
    image_tokens = patches_side ** 2 // vision_cfg.spatial_merge_size ** 2
    gen = torch.Generator().manual_seed(1)
    words = lambda n: torch.randint(100, 20000, (n,), generator=gen)  # noqa: E731
    input_ids = torch.cat([words(text_before), torch.tensor([ids["vision_start"]]), torch.full((image_tokens,), ids["image"]),
                           torch.tensor([ids["vision_end"]]), words(text_after)])
    types = torch.where(input_ids == ids["image"], IMAGE_TOKEN_TYPE, TEXT_TOKEN_TYPE)
    patch = 3 * vision_cfg.temporal_patch_size * vision_cfg.patch_size ** 2
    vision = VisionInputs({"pixel_values": torch.randn(patches_side ** 2, patch, generator=gen).to(lm.model.dtype),
                           "image_grid_thw": torch.tensor([[1, patches_side, patches_side]])})
    positions, next_position = lm.positions.sample(types, vision)
    return Encoded(input_ids, torch.full_like(input_ids, IGNORE_INDEX), types, positions, next_position, vision)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def text_prompt(lm: DVLM, length: int = TEXT_PROMPT) -> Encoded:
    """A text-only prompt of random ids (the decoders' steps start from it)."""
    ids = torch.randint(100, 20000, (length,), generator=torch.Generator().manual_seed(2))
    positions, next_position = lm.positions.sample(torch.zeros_like(ids), None)
    return Encoded(ids, torch.full_like(ids, IGNORE_INDEX), torch.zeros_like(ids), positions, next_position, None)


@torch.inference_mode()
def forward_costs(lm: DVLM, prompt: Encoded, context_cls, repeats: int, widths) -> dict[str, float]:
    """Seconds of the prefill and of one peek of Q new tokens over its context."""
    out = {"prefill": timed(lambda: prefill(lm, plain_prompts(lm, [prompt]), context_cls), lm.device, PREFILL_REPEATS)}
    pre = prefill(lm, plain_prompts(lm, [prompt]), context_cls)
    ctx = pre.context
    for q in widths:
        ids = torch.full((1, q), lm.mask_token_id, device=lm.device)
        embeds, positions = lm.adapter.embed(lm.model, ids), lm.positions.text(pre.next_position, q)
        valid, blocks = torch.ones_like(ids, dtype=torch.bool), torch.full_like(ids, ctx.next_block_id())
        out[f"q{q}"] = timed(lambda: ctx.peek(embeds, positions, valid, blocks, "bidirectional"), lm.device, repeats)
    return out


@torch.inference_mode()
def decoder_costs(lm: DVLM, context_cls, steps: dict[str, int]) -> dict[str, dict[str, float]]:
    """Per decoder: seconds per forward over a few steps after a short text prompt (a step's cost
    barely depends on the cache length at these sizes), and the step and forward counts."""
    out, prompt = {}, text_prompt(lm)
    compiled = context_cls is not KVContext
    for decoder in DECODERS:
        # spec unfused: its steady state, a draft and a verify pass of B tokens (on random weights a
        # fused prefill's rejected first draft would make every verify pass carry a redraft of B more)
        cfg = DecodeConfig(decoder=decoder, block_size=BLOCK_SIZE, max_new_tokens=512, fuse_prefill=False)
        group, row = STEPPERS[decoder].settings_for(lm, cfg)
        for _ in ("warm-up", "timed") if compiled else ("timed",):  # a first run compiles the shapes it meets
            stepper = STEPPERS[decoder](lm, group, context_cls)
            stepper.join(stepper.start([prompt], [row]))
            seconds = forwards = 0.0
            for _ in range(steps[decoder]):
                synchronize(lm.device)
                start = time.perf_counter()
                report = stepper.step()
                synchronize(lm.device)
                seconds += time.perf_counter() - start
                forwards += report.forwards
        out[decoder] = {"s_per_forward": seconds / forwards, "forwards": forwards, "steps": steps[decoder]}
    return out


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def caption_tokens_per_forward(limit: int, log) -> dict[str, Any]:
    """The built-in model's tokens per forward on its test captions (ar, block, spec at B=16)."""
    lm = dvlm.load("tiny-dvlm")
    out: dict[str, Any] = {}
    for decoder in DECODERS:
        result = evaluate(lm, CAPTION_TASK, limit=limit, decoder=decoder, progress=False, block_size=BLOCK_SIZE)
        out[decoder] = result.speed["tokens_per_nfe"]
        out["mean_answer_tokens"] = result.speed["tokens"] / result.num_samples
    log(f"built-in model, {limit} {CAPTION_TASK} test samples: tokens/forward "
        + ", ".join(f"{d} {out[d]:.2f}" for d in DECODERS) + f"; {out['mean_answer_tokens']:.1f} tokens per answer")
    return out


def measure_size(size: str, args: argparse.Namespace, device: torch.device, log) -> dict[str, Any]:
    model = cached_model(size, torch.bfloat16, device, args.cache_dir, log)
    lm = wrapped(model)
    prompt = image_prompt(lm)
    params = sum(p.numel() for p in model.model.language_model.parameters())
    log(f"{size}: {params / 1e9:.2f}B language-model parameters, prompt {len(prompt)} tokens, {device}")
    steps = {"ar": args.repeats, "block": 1, "spec": 2}
    result: dict[str, Any] = {"size": size, "lm_parameters": params, "prompt_tokens": len(prompt), "variants": {}}
    for variant in args.variants:
        if variant.startswith("int8") and not result.get("quantized"):
            quantize_model(model, lm.adapter, INT8_SCHEME)
            forget_compiled(model)  # compiled for its float weights
            result["quantized"] = INT8_SCHEME
        compiled = variant.endswith("compiled")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        # Compiled: one buffer size (the image prompt's) for every context, so that the prompt's
        # peeks and the decoders' forwards share their compiled shapes (Q = 1, 16, 32).
        capacity = static_capacity(len(prompt) + max(QUERY_LENGTHS))
        context_cls = functools.partial(CompiledKVContext, capacity=capacity) if compiled else KVContext
        widths = COMPILED_QUERY_LENGTHS if compiled else QUERY_LENGTHS
        costs = forward_costs(lm, prompt, context_cls, args.repeats, widths)
        costs["decoders"] = decoder_costs(lm, context_cls, steps)
        costs["peak_memory_mb"] = round(peak_memory_mb(device), 1)
        costs["wall_s"] = round(time.perf_counter() - start, 1)
        result["variants"][variant] = costs
        log(f"  {variant}: prefill {costs['prefill']:.3f} s, forward of 1 token {costs['q1']:.3f} s "
            f"({costs['wall_s']:.0f} s with warm-up)")
    return result


def projected(costs: dict[str, Any], tpf: dict[str, Any]) -> dict[str, float]:
    """Projected tokens/s of an answer of the captions' mean length: prefill + forwards."""
    tokens = tpf["mean_answer_tokens"]
    return {d: tokens / (costs["prefill"] + tokens / tpf[d] * costs["decoders"][d]["s_per_forward"]) for d in DECODERS}


def report(results: list[dict[str, Any]], tpf: dict[str, Any], device: str) -> str:
    lines = [f"Device: {device}. Medians; ratios within this run only.", ""]
    for res in results:
        variants = res["variants"]
        base = variants.get("eager")
        lines += [f"### {res['size']} ({res['lm_parameters'] / 1e9:.2f}B LM parameters, prompt {res['prompt_tokens']} "
                  "tokens)", "", "| variant | prefill s | " + " | ".join(f"Q={q} s" for q in QUERY_LENGTHS)
                  + " | Q=16 / Q=1 | " + " | ".join(f"{d} s/forward" for d in DECODERS) + " | peak MB |",
                  "|---" * (4 + len(QUERY_LENGTHS) + len(DECODERS)) + "|"]
        for name, c in variants.items():
            cells = [name, f"{c['prefill']:.3f}", *(f"{c[f'q{q}']:.4f}" if f"q{q}" in c else "-" for q in QUERY_LENGTHS),
                     f"{c['q16'] / c['q1']:.2f}x",
                     *(f"{c['decoders'][d]['s_per_forward']:.4f}" for d in DECODERS), f"{c['peak_memory_mb']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        if base:
            lines += ["", "Step time against bf16 eager (lower is faster):", "",
                      "| variant | prefill | Q=1 (AR step) | " + " | ".join(f"{d} forward" for d in DECODERS) + " |",
                      "|---" * (3 + len(DECODERS)) + "|"]
            for name, c in variants.items():
                cells = [name, f"{c['prefill'] / base['prefill']:.2f}x", f"{c['q1'] / base['q1']:.2f}x",
                         *(f"{c['decoders'][d]['s_per_forward'] / base['decoders'][d]['s_per_forward']:.2f}x"
                           for d in DECODERS)]
                lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"PROJECTION (not measured end to end): tokens/s of a {tpf['mean_answer_tokens']:.0f}-token answer "
                      "= its prefill + the forwards the built-in model's caption tokens/forward implies "
                      "(" + ", ".join(f"{d} {tpf[d]:.2f}" for d in DECODERS) + "):", "",
                  "| variant | " + " | ".join(f"{d} tok/s" for d in DECODERS) + " | block vs ar | spec vs ar |",
                  "|---" * (3 + len(DECODERS)) + "|"]
        for name, c in variants.items():
            p = projected(c, tpf)
            lines.append("| " + " | ".join([name, *(f"{p[d]:.2f}" for d in DECODERS), f"{p['block'] / p['ar']:.2f}x",
                                            f"{p['spec'] / p['ar']:.2f}x"]) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3b,0.5b", help="comma-separated, from 3b, 0.5b (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per figure (default: %(default)s)")
    parser.add_argument("--captions", type=int, default=20, help="built-in captions for tokens/forward")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "dvlm" / "real-size")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats: checks that it runs")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    sizes = ["quick"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [s for s in sizes if s not in SIZES] + [v for v in args.variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"real_size.py: error: unknown size or variant {', '.join(unknown)}")
    if args.quick:
        args.repeats, args.captions = 2, 3
    device = pick_device(args.device)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    tpf = caption_tokens_per_forward(args.captions, log)
    # Smallest first: on CPU the peak is the process's (ru_maxrss), so a size measured after a larger
    # one would report the larger one's.
    sizes = sorted(dict.fromkeys(sizes), key=lambda s: SIZES[s]["text"]["hidden_size"] ** 2
                   * SIZES[s]["text"]["num_hidden_layers"])
    results = [measure_size(size, args, device, log) for size in sizes]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(report(results, tpf, name))
    log(f"done in {time.perf_counter() - start:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "tokens_per_forward": tpf, "sizes": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
