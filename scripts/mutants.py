#!/usr/bin/env python
"""Mutation check: would the tests notice a wrong recipe?

Each mutation is one small deliberate bug: one exact text replacement in one source file. For
each, the script copies `src/` to a temporary folder, applies the patch there (the working tree is
never touched), runs the test files that should catch it against the copy, and reports `caught`
(some test failed; the first failing test is named) or `survived` (every test passed).

A patch must match its file exactly once; if the code it targets has changed, the script stops
with an error naming the mutation, so mutations are updated together with the code.

    python scripts/mutants.py            # all mutations (a few minutes on 2 CPU cores)
    python scripts/mutants.py -k spec    # the mutations whose name contains "spec"
    python scripts/mutants.py -k spec,tie  # ... "spec" or "tie"
    python scripts/mutants.py --list

Exit status: 0 when every selected mutation is caught, 1 when one survives, 2 when a patch no
longer applies or the unmutated tests fail.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_TIMEOUT_S = 300  # a mutation that makes decoding loop forever counts as caught
WEIGHTS = Path("dvlm", "zoo", "weights")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to src/dvlm
    old: str
    new: str
    tests: tuple[str, ...]
    bug: str


DECODE = "tests/decode"
OBJECTIVE = "tests/diffusion/test_objective.py"
NOISING = "tests/diffusion/test_noising.py"
DVL_TRAIN = "tests/diffusion/test_diffusionvl_reference.py"
DVL_DECODE = "tests/decode/test_diffusionvl_reference.py"
SCRIPTED = "tests/decode/test_scripted.py"
SAMPLING = "tests/decode/test_sampling.py"
CONSISTENCY = "tests/decode/test_train_consistency.py"
JOIN = "tests/decode/test_join.py"
FUSED_PREFILL = "tests/decode/test_fused_prefill.py"
COMPILED = "tests/decode/test_compiled.py"
JOIN_CACHE = "tests/model/test_cache_join.py"
PREFIX = "tests/decode/test_prefix_cache.py"
SCORING = "tests/tasks/benchmarks/test_scoring.py"
CHOICES = "tests/tasks/benchmarks/test_choices.py"
ANSWERS = "tests/tasks/benchmarks/test_answers.py"
PUBLISHED = "tests/model/adapters/test_published.py"
PUBLISHED_FILES = "tests/model/adapters/test_published_files.py"
DATA_PARALLEL = "tests/train/test_data_parallel.py"
SCHEDULES = "tests/train/test_schedules.py"
MEMORY = "tests/train/test_memory.py"
RESUME = "tests/train/test_resume.py"
LORA = "tests/train/test_lora.py"
IMAGES = "tests/data/test_images.py"
CONFIG_LIMITS = "tests/test_config_limits.py"
POSITIONS = "tests/decode/test_position_limits.py"
STEP_DATA = "tests/train/test_step_data.py"
LIMITS = "tests/serve/test_limits.py"
FAILURES = "tests/serve/test_engine_failures.py"
USAGE = "tests/serve/test_usage.py"

MUTATIONS = [
    # -- training -----------------------------------------------------------------------------
    Mutation("target-not-shifted", "diffusion/objective.py",
             "targets = input_ids[rows, stream.source[rows, cols + 1]]",
             "targets = input_ids[rows, stream.source[rows, cols]]",
             (OBJECTIVE,), "token shift: each noisy output learns its own position"),
    Mutation("inverse-sqrt-t", "diffusion/objective.py",
             "ce = ce * (1 / t)", "ce = ce * (1 / t.sqrt())",
             (OBJECTIVE, DVL_TRAIN), "loss weight 1/sqrt(t) instead of 1/t"),
    Mutation("rows-normalised-by-batch", "diffusion/objective.py",
             "ce = ce / row_tokens\n", "ce = ce / row_tokens.max()\n",
             (OBJECTIVE, DVL_TRAIN), "rows rule divides by the longest row, not each row's own count"),
    Mutation("rows-normaliser-counts-tokens", "diffusion/objective.py",
             "return sum(int(y.shape[0]) for y in labels)",
             "return sum(int((y != IGNORE_INDEX).sum()) for y in labels)",
             (OBJECTIVE, DVL_TRAIN), "rows rule's window normaliser counts tokens"),
    Mutation("ar-loss-unshifted", "diffusion/objective.py",
             "targets = labels[rows, cols + 1]", "targets = labels[rows, cols]",
             (OBJECTIVE,), "AR loss: clean output i scored against its own token"),
    Mutation("antithetic-stratum-not-scaled", "diffusion/schedule.py",
             "u = torch.remainder(u / n + stratum, 1.0)", "u = torch.remainder(u + stratum, 1.0)",
             (NOISING, DVL_TRAIN), "sequence-order antithetic t: the draw is not scaled into its stratum"),
    Mutation("antithetic-order-ignored", "diffusion/noising.py",
             "input_ids.device, cfg.antithetic_order,", "input_ids.device, \"permuted\",",
             (NOISING, DVL_TRAIN), "the diffusionvl preset draws permuted strata"),
    Mutation("complementary-copy-same-mask", "diffusion/noising.py",
             "copies = [masked, maskable & ~masked]", "copies = [masked, masked]",
             (NOISING,), "the complementary copy repeats the first mask"),
    Mutation("noise-window-offset-ignored", "diffusion/noising.py",
             "mine = slice(window.offset, window.offset + rows)", "mine = slice(0, rows)",
             (NOISING,), "data parallel: every process takes the noise of the global batch's first rows"),
    Mutation("spill-owns-its-block", "diffusion/noising.py",
             "owner = torch.cat([owner, e.flatten(1)], dim=1)", "owner = torch.cat([owner, src[:, length:]], dim=1)",
             (NOISING, OBJECTIVE), "truncate_last_block=False: a taken-in token keeps its own block"),
    Mutation("spill-past-row-end", "diffusion/noising.py",
             "return torch.minimum(fill_counts(labels, attention_mask, block, block_size), tokens_after)",
             "return fill_counts(labels, attention_mask, block, block_size)",
             (NOISING,), "truncate_last_block=False: the last block takes in padding past the row's end"),
    Mutation("block-start-maskable", "diffusion/noising.py",
             "        maskable &= ~block_starts(block)\n", "        pass\n",
             (NOISING, OBJECTIVE), "token shift: a block's first token (the seed) may be masked"),
    Mutation("noisy-sees-own-clean-block", "model/masks.py",
             "n2c = clean_block[:, None, :] < noisy_block[:, :, None]",
             "n2c = clean_block[:, None, :] <= noisy_block[:, :, None]",
             ("tests/model/test_masks.py", OBJECTIVE), "N2C leaks the clean copy of the noisy token's own block"),
    Mutation("noisy-positions-off-by-one", "diffusion/objective.py",
             "copy_positions(positions, stream.source, stream.index - stream.source)",
             "copy_positions(positions, stream.source, 1 + stream.index - stream.source)",
             (OBJECTIVE,), "noisy stream positions one past their clean copies"),
    Mutation("training-clean-stream-block-causal", "diffusion/objective.py",
             '"causal" if cfg.clean_attention == "causal" else "block_causal",',
             '"block_causal",',
             (OBJECTIVE,), "fast-dvlm trains a block-causal clean stream"),
    # -- schedules of a training run -------------------------------------------------------------
    Mutation("anneal-never-advances", "train/loop.py",
             "annealed_block_size(step / total, dcfg.block_size, dcfg.anneal_fraction)",
             "annealed_block_size(0 / total, dcfg.block_size, dcfg.anneal_fraction)",
             (SCHEDULES,), "block-size annealing never advances: the whole run trains at B=2"),
    Mutation("anneal-stage-rounded", "diffusion/schedule.py",
             "stage = math.floor(progress / anneal_fraction * len(sizes))",
             "stage = math.floor(progress / anneal_fraction * len(sizes) + Fraction(1, 2))",
             (SCHEDULES, NOISING), "annealing stages rounded to the nearest: each starts half a stage early"),
    Mutation("anneal-stage-in-floats", "diffusion/schedule.py",
             "progress, anneal_fraction = exact_ratio(progress), exact_ratio(anneal_fraction)", "pass",
             (SCHEDULES, NOISING), "annealing stages in floats: a stage due exactly at a step starts a step late"),
    Mutation("warmup-steps-in-floats", "train/loop.py",
             "warmup = math.floor(exact_ratio(cfg.warmup_ratio) * total_steps)",
             "warmup = int(cfg.warmup_ratio * total_steps)",
             (SCHEDULES,), "warmup_ratio 0.29 of 100 steps warms up for 28 (float rounding)"),
    Mutation("warmup-one-step-long", "train/loop.py",
             "        if step < warmup:\n", "        if step <= warmup:\n",
             (SCHEDULES,), "the warmup's last step goes past the peak"),
    Mutation("warmup-starts-at-zero", "train/loop.py",
             "return (step + 1) / warmup", "return step / warmup",
             (SCHEDULES,), "the first warmup step trains at learning rate 0"),
    Mutation("cosine-not-clamped", "train/loop.py",
             "math.cos(math.pi * min(progress, 1.0))", "math.cos(math.pi * progress)",
             (SCHEDULES,), "past the schedule's end the cosine rises again"),
    # -- data parallelism (two gloo processes == one with the global batch) ------------------------
    Mutation("dp-share-not-scaled", "train/distributed.py",
             "scale = micro.weight * self.world_size", "scale = micro.weight",
             (DATA_PARALLEL,), "each process backpropagates its share unscaled: the averaged gradient is 1/N"),
    Mutation("dp-loss-per-process-normaliser", "train/loop.py",
             "out = _backward(run, micro, normaliser, block_size,",
             "out = _backward(run, micro, int(counts[processes.rank, 1]), block_size,",
             (DATA_PARALLEL,), "each process normalises its loss by its own tokens, not the step's"),
    Mutation("dp-noise-own-length", "train/distributed.py",
             "length=int(extents[:, micro, 1].max())", "length=int(extents[processes.rank, micro, 1])",
             (DATA_PARALLEL,), "each process draws the noise at its own length, not the micro-batch's"),
    Mutation("dp-noise-own-blocks", "train/distributed.py",
             "blocks=int(extents[:, micro, 2].max())", "blocks=int(extents[processes.rank, micro, 2])",
             (DATA_PARALLEL,), "each process draws the masking rates for its own block count"),
    Mutation("dp-noise-offset-zero", "train/distributed.py",
             "offset=int(rows[:processes.rank].sum())", "offset=0",
             (DATA_PARALLEL,), "every process takes the noise of the micro-batch's first rows"),
    Mutation("dp-stand-in-weighted", "train/distributed.py",
             "scale = micro.weight * self.world_size", "scale = self.world_size",
             (DATA_PARALLEL,), "a stand-in pass (a process without rows) adds its gradient"),
    Mutation("dp-logged-losses-of-one-process", "train/loop.py",
             "loss, diffusion_sum, ar_sum, masked, skipped = processes.sum([",
             "loss, diffusion_sum, ar_sum, masked, skipped = ([",
             (DATA_PARALLEL,), "metrics.jsonl logs rank 0's part of the step's loss and counts"),
    # -- memory estimate ---------------------------------------------------------------------------
    Mutation("memory-noisy-stream-forgotten", "train/memory.py",
             "longest = 2 * cfg.max_length", "longest = cfg.max_length",
             (MEMORY,), "the estimate forgets the noisy stream's activations"),
    Mutation("memory-frozen-vision-counted", "train/memory.py",
             "frozen_vision = lora or cfg.vision_learning_rate == 0", "frozen_vision = lora",
             (MEMORY,), "a frozen vision tower still counted with gradients and AdamW moments"),
    # -- resume ----------------------------------------------------------------------------------
    Mutation("resume-dropped-setting-ignored", "train/resume.py",
             "for key in [*now, *(k for k in recorded if k not in now)]:", "for key in now:",
             (RESUME,), "a setting the checkpoint records but the resumed run lacks (group_by_length off) passes"),
    Mutation("lora-resume-setting-unchecked", "train/loop.py",
             "        check_lora_resume(checkpoint, cfg.lora)\n", "        pass\n",
             (LORA,), "a LoRA run resumes with another --lora setting (r, alpha, targets)"),
    Mutation("lora-size-mismatch-raw", "train/lora.py",
             "    except RuntimeError as err:  # torch's", "    except KeyError as err:  # torch's",
             (LORA,), "an adapter of another rank fails with torch's multi-line size-mismatch traceback"),
    # -- block decoding -----------------------------------------------------------------------
    Mutation("commit-block-causal", "decode/block.py",
             'self.commit_kind = "causal" if self.dcfg.clean_attention == "causal" else "block_causal"',
             'self.commit_kind = "block_causal"',
             (CONSISTENCY, f"{DECODE}/test_decoders.py"), "fast-dvlm commits blocks block-causally"),
    Mutation("absolute-prefill-causal", "decode/canvas.py",
             'ctx.commit(*committed, "block_causal")', 'ctx.commit(*committed, "causal")',
             (CONSISTENCY, DVL_DECODE), "diffusionvl prefills the prompt's blocks causally"),
    Mutation("absolute-fused-prefill-causal", "decode/canvas.py",
             'first_pass = ctx.commit_and_draft(committed, drafts, "block_causal")[1][:, 0]',
             'first_pass = ctx.commit_and_draft(committed, drafts, "causal")[1][:, 0]',
             (DVL_DECODE, FUSED_PREFILL), "diffusionvl's prefill with the first pass fused runs causally"),
    Mutation("fused-prefill-pass-misses-prompt-end", "decode/canvas.py",
             "canvas.positions, batch.input_ids.shape[1], canvas.valid)",
             "canvas.positions, batch.input_ids.shape[1] - 1, canvas.valid)",
             (FUSED_PREFILL, SCRIPTED), "the first pass fused into the prefill does not see the prompt's last token"),
    Mutation("fused-commit-off", "decode/settings.py",
             'fuse = cfg.fuse_commit and recipe.token_shift and recipe.clean_attention == "causal"',
             "fuse = False",
             (SCRIPTED, f"{DECODE}/test_decoders.py"), "the fused commit is never used"),
    Mutation("decode-logits-not-shifted", "decode/block.py",
             "logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)", "logits = logits",
             (SCRIPTED,), "token shift ignored when decoding"),
    Mutation("first-block-full-width", "decode/canvas.py",
             "[min(block_size, b) for b in budgets]", "[block_size for b in budgets]",
             (SCRIPTED, f"{DECODE}/test_decoders.py"), "N2: the first block is B wide whatever the budget"),
    Mutation("absolute-first-block-full-width", "decode/canvas.py",
             "lengths + budget <= block_size, lengths + budget, block_size)",
             "lengths + budget < 0, lengths + budget, block_size)",
             (SCRIPTED, DVL_DECODE), "diffusionvl: an answer that fits its first block still gets B positions"),
    Mutation("steps-schedule-ignored", "decode/block.py",
             'if dcfg.decode_steps_schedule == "block_size":', "if False:",
             (SAMPLING, DVL_DECODE), "diffusionvl spreads the masks left over the steps left"),
    Mutation("block-schedule-extra-off-by-one", "decode/sampling.py",
             "return base + (1 if step < extra else 0)", "return base + (1 if step <= extra else 0)",
             (SAMPLING, DVL_DECODE), "DiffusionVL's counts give one step too many the extra token"),
    Mutation("tie-break-ignored", "decode/block.py",
             'unmask = unmask_by_topk if dcfg.decode_tie_break == "topk" else unmask_by_count',
             "unmask = unmask_by_count",
             (SAMPLING, DVL_DECODE), "diffusionvl breaks confidence ties by lowest index"),
    Mutation("threshold-ignored", "decode/sampling.py",
             "return chosen | (best & masked.any(dim=1, keepdim=True))",
             "return best & masked.any(dim=1, keepdim=True)",
             (SAMPLING, SCRIPTED), "a threshold pass unmasks one token only"),
    Mutation("threshold-strict", "decode/sampling.py",
             "chosen = masked & (conf >= threshold)", "chosen = masked & (conf > threshold)",
             (SAMPLING, SCRIPTED), "confidence must exceed the threshold instead of reach it"),
    Mutation("sampled-token-greedy-confidence", "decode/sampling.py",
             "return torch.where(pick, sampled, tokens), torch.where(pick, sampled_conf, conf)",
             "return torch.where(pick, sampled, tokens), conf",
             (SAMPLING,), "a sampling row reports the greedy token's confidence for the token it sampled"),
    Mutation("greedy-mask-not-banned", "decode/sampling.py",
             '    if banned:\n        logits = logits.clone()\n        logits[..., banned] = float("-inf")\n'
             "    conf, tokens",
             "    conf, tokens",
             (SAMPLING,), "greedy selection may output [MASK]"),
    Mutation("sampling-mask-not-banned", "decode/sampling.py",
             '    if banned:\n        logits = logits.clone()\n        logits[..., banned] = float("-inf")\n'
             "    per_row",
             "    per_row",
             (SAMPLING,), "a sampling row may draw [MASK]"),
    Mutation("block-schedule-tail-off-by-one", "decode/sampling.py",
             "    if step >= steps:\n        return max(base, 1)", "    if step > steps:\n        return max(base, 1)",
             (SAMPLING,), "the first pass after the last step (sub-blocks) unmasks nothing when B < steps"),
    # -- speculative decoding -----------------------------------------------------------------
    Mutation("spec-draft-off-by-one", "decode/speculative.py",
             "logits = lm.adapter.logits(lm.model, hidden[:, :-1])  # output j drafts position j + 1",
             "logits = lm.adapter.logits(lm.model, hidden[:, 1:])",
             (SCRIPTED, f"{DECODE}/test_speculative.py"), "spec drafts each position from its own output"),
    Mutation("fused-prefill-draft-one-late", "decode/speculative.py",
             "lm.positions.text(batch.next_positions, block_size - 1)",
             "lm.positions.text(batch.next_positions + 1, block_size - 1)",
             (SCRIPTED, FUSED_PREFILL), "the first draft, made in the prefill, drafts one position too late"),
    Mutation("rolled-draft-one-early", "decode/speculative.py",
             "logits = self.lm.adapter.logits(self.lm.model, redraft[:, 1:])",
             "logits = self.lm.adapter.logits(self.lm.model, redraft[:, :-1])",
             (SCRIPTED,), "after a rejected first draft, the next block's drafts are one position early"),
    Mutation("spec-accepts-one-less", "decode/speculative.py",
             "agree = (target[:, :-1] == block[:, 1:]).long()",
             "agree = (target[:, :-1] == block[:, 1:]).long()\n    agree[:, -1:] = 0",
             (SCRIPTED, f"{DECODE}/test_speculative.py"), "spec never accepts the block's last draft"),
    Mutation("draft-rows-copy-other-rows", "model/cache.py",
             "selected.update(entries[0][rows], entries[1][rows])",
             "selected.update(entries[0][rows.flip(0)], entries[1][rows.flip(0)])",
             (JOIN_CACHE, f"{DECODE}/test_speculative.py"), "a draft pass over some rows reads other rows' keys/values"),
    Mutation("draft-rows-scattered-wrong", "decode/speculative.py",
             "        logits[rows] = part\n", "        logits[rows.flip(0)] = part\n",
             (f"{DECODE}/test_speculative.py", JOIN), "the drafts of some rows land in other rows"),
    # -- the compiled decode path ---------------------------------------------------------------
    Mutation("compiled-padding-visible", "decode/compiled.py",
             "full = mask.new_zeros(rows, bucket, capacity)", "full = mask.new_ones(rows, bucket, capacity)",
             (COMPILED,), "a compiled forward attends to the padding and the stale entries of its static buffers"),
    Mutation("compiled-keeps-the-peek", "decode/compiled.py",
             "            layer.length = start + keep\n", "            layer.length = start + q\n",
             (COMPILED,), "a compiled peek leaves its block in the cache"),
    # -- rows joining a running batch, the engine ---------------------------------------------
    Mutation("join-pads-with-garbage", "model/cache.py",
             "keys, values = (t.new_zeros(", "keys, values = (torch.nan * t.new_ones(",
             (JOIN_CACHE,), "a joined context's padding entries hold NaN (masked is not enough)"),
    Mutation("row-widths-from-the-batch", "decode/block.py",
             "return [min(self.group.block_size, self.rows[i].remaining) for i in self.rows.active]",
             "return [min(self.group.block_size, max(self.rows[i].remaining for i in self.rows.active))]"
             " * self.rows.num_active",
             (JOIN,), "N2 per row: a row's block takes the widest row's budget"),
    Mutation("draws-by-canvas-width", "decode/block.py",
             "draws_per_row=group.block_size", "draws_per_row=None",
             (JOIN,), "a sampling row's stream advances by the batch's canvas width"),
    Mutation("fused-draft-sees-padding", "model/cache.py",
             "            mask[:, :, self.length + q1:] &= d_valid.flatten(1)[:, None, :]", "            pass",
             (JOIN,), "a fused commit's draft attends to the padding of narrower rows"),
    # -- the prefix and vision caches ---------------------------------------------------------
    Mutation("prefix-reuses-partial-block", "model/prefix_cache.py",
             "        cut -= cut % align\n", "",
             (PREFIX,), "diffusionvl: a kept prefix reused up to the first difference, inside an absolute block"),
    Mutation("prefix-matches-token-ids-only", "decode/prompts.py",
             "= image_code(image.digest)", "= 0",
             (PREFIX,), "kept prefixes matched on token ids, not image identity (two pictures, one key)"),
    Mutation("prefix-suffix-one-late", "decode/prompts.py",
             "parts.append(part_after(prompt, n))", "parts.append(part_after(prompt, n + 1 if n else 0))",
             (PREFIX,), "a prompt that reuses n entries is prefilled from token n + 1"),
    Mutation("prefix-suffix-one-early", "decode/prompts.py",
             "parts.append(part_after(prompt, n))", "parts.append(part_after(prompt, max(n - 1, 0)))",
             (PREFIX,), "a prompt that reuses n entries is prefilled from token n - 1 (one token twice)"),
    Mutation("prefix-reuses-last-prompt-token", "decode/prompts.py",
             "store.match(stream, key, len(prompt) - 1)", "store.match(stream, key, len(prompt))",
             (PREFIX,), "a prompt kept whole is reused whole: nothing is left to predict its first token from"),
    Mutation("prefix-blocks-not-offset", "decode/canvas.py",
             " // block_size + prompts.block_offsets(lm.device)[:, None])", " // block_size)",
             (PREFIX,), "diffusionvl: the blocks prefilled after reused ones restart at block 0"),
    Mutation("prefix-seeded-left-aligned", "model/prefix_cache.py",
             "keys[row, :, width - n:] = prefix.layers[index][0][0, :, :n]",
             "keys[row, :, :n] = prefix.layers[index][0][0, :, :n]",
             (PREFIX,), "a reused prefix's keys sit at the start of a wider row, not beside its prompt"),
    Mutation("vision-key-pixels-only", "model/vision_cache.py",
             "    for name in sorted(vision.tensors):", "    for name in [\"pixel_values\"]:",
             ("tests/model/test_prefix_store.py",), "an image's cache key ignores its grid (the same patches on another grid hit)"),
    # -- benchmark scorers -------------------------------------------------------------------
    Mutation("pope-precision-recall-swapped", "tasks/benchmarks/pope.py",
             "    precision = tp / (tp + fp) if tp + fp else 0.0\n    recall = tp / (tp + fn) if tp + fn else 0.0",
             "    precision = tp / (tp + fn) if tp + fn else 0.0\n    recall = tp / (tp + fp) if tp + fp else 0.0",
             (SCORING,), "POPE's precision and recall swapped"),
    Mutation("mmmu-option-text-at-five-words", "tasks/benchmarks/choices.py",
             "if len(padded.split()) > LONG_ANSWER_WORDS:", "if len(padded.split()) >= LONG_ANSWER_WORDS:",
             (CHOICES,), "MMMU matches option texts in a five-word answer (more than five words, in the rule)"),
    Mutation("chartqa-tolerance-of-prediction", "tasks/benchmarks/answers.py",
             "abs(predicted - expected) / abs(expected) <= RELAXED_TOLERANCE",
             "abs(predicted - expected) / abs(predicted) <= RELAXED_TOLERANCE",
             (ANSWERS,), "ChartQA's 5% taken relative to the prediction, not the target"),
    Mutation("mme-parquet-question-own-image", "tasks/benchmarks/mme.py",
             '{"category": text(row, "category", where), "image": image_key}',
             '{"category": text(row, "category", where), "image": f"{image_key}#{counts[image_key]}"}',
             (SCORING,), "MME parquet: each question counted as its own image (acc+ = acc)"),
    Mutation("anls-threshold-drops-one-half", "tasks/benchmarks/answers.py",
             "return 0.0 if similarity < threshold else similarity",
             "return 0.0 if similarity <= threshold else similarity",
             (ANSWERS,), "ANLS gives 0 at exactly NL = 0.5 (the reference keeps 0.5)"),
    Mutation("anls-normalised-length", "tasks/benchmarks/answers.py",
             "longer = max(len(answer.upper()), len(prediction.upper()))",
             "longer = max(len(_anls_text(answer)), len(predicted))",
             (ANSWERS,), "ANLS divides by the normalised lengths, not the raw ones"),
    Mutation("generation-not-stripped", "tasks/benchmarks/items.py",
             "return self.score(generation.strip(), item, self.check_rule(rule))",
             "return self.score(generation, item, self.check_rule(rule))",
             (SCORING,), "a generation reaches the scorer unstripped (POPE reads 'No\\n' as yes)"),
    Mutation("limit-splits-mme-pairs", "tasks/benchmarks/items.py",
             "        if self.group_key is None:\n            return items[:limit]",
             "        if True:\n            return items[:limit]",
             (SCORING,), "a limited MME run cuts an image's question pair (acc+ sees one question)"),
    # -- documented limits, exactly at the limit -------------------------------------------------
    Mutation("image-pixels-limit-exclusive", "data/images.py",
             "if width * height > limits.max_pixels:", "if width * height >= limits.max_pixels:",
             (IMAGES,), "an image of exactly max_pixels is refused"),
    Mutation("image-aspect-limit-exclusive", "data/images.py",
             "if ratio > limits.max_aspect_ratio:", "if ratio >= limits.max_aspect_ratio:",
             (IMAGES,), "an image of exactly the largest aspect ratio is refused"),
    Mutation("image-bytes-limit-exclusive", "data/images.py",
             "if size > limits.max_bytes:", "if size >= limits.max_bytes:",
             (IMAGES,), "an image of exactly max_bytes is refused"),
    *[Mutation(f"limit-{name}", path, old, new, (CONFIG_LIMITS,), bug) for name, path, old, new, bug in [
        ("seed", "config.py", "not 0 <= seed < SEED_LIMIT", "not 0 <= seed <= SEED_LIMIT", "seed 2**32 accepted"),
        ("eps-max", "config.py", "self.eps_max <= 1.0:", "self.eps_max < 1.0:", "eps_max=1 refused"),
        ("eps-order", "config.py", "0.0 < self.eps_min < self.eps_max", "0.0 < self.eps_min <= self.eps_max",
         "eps_min == eps_max accepted"),
        ("loss-weight", "config.py", "if self.diffusion_loss_weight < 0 or", "if self.diffusion_loss_weight <= 0 or",
         "diffusion_loss_weight=0 refused"),
        ("anneal-fraction", "config.py", "self.anneal_fraction <= 1.0:", "self.anneal_fraction < 1.0:",
         "anneal_fraction=1 refused"),
        ("decode-threshold", "config.py", "not 0.0 <= self.decode_threshold <= 1.0",
         "not 0.0 < self.decode_threshold <= 1.0", "decode_threshold=0 refused"),
        ("decode-steps", "config.py", "self.decode_steps < 1:", "self.decode_steps <= 1:", "decode_steps=1 refused"),
        ("top-k", "config.py", "self.top_k < 1:", "self.top_k <= 1:", "top_k=1 refused"),
        ("top-p", "config.py", "0.0 < self.top_p <= 1.0", "0.0 < self.top_p < 1.0", "top_p=1 refused"),
        ("max-new-tokens", "config.py", "if self.max_new_tokens < 1:", "if self.max_new_tokens <= 1:",
         "max_new_tokens=1 refused"),
        ("threshold", "config.py", "not 0.0 <= self.threshold <= 1.0", "not 0.0 <= self.threshold < 1.0",
         "threshold=1 refused"),
        ("steps", "config.py", "self.steps is not None and self.steps < 1:",
         "self.steps is not None and self.steps <= 1:", "steps=1 refused"),
        ("sub-block", "config.py", "self.sub_block_size < 1:", "self.sub_block_size <= 1:", "sub_block_size=1 refused"),
        ("lora-r", "config.py", "if settings.r < 1 or", "if settings.r <= 1 or", "LoRA r=1 refused"),
        ("lora-dropout", "config.py", "0 <= settings.dropout < 1:", "0 <= settings.dropout <= 1:",
         "LoRA dropout=1 accepted"),
        ("learning-rate", "config.py", "if self.learning_rate <= 0:", "if self.learning_rate < 0:",
         "learning_rate=0 accepted"),
        ("vision-learning-rate", "config.py", "self.vision_learning_rate < 0:", "self.vision_learning_rate <= 0:",
         "vision_learning_rate=0 (frozen) refused"),
        ("warmup-ratio", "config.py", "not 0.0 <= self.warmup_ratio < 1.0", "not 0.0 <= self.warmup_ratio <= 1.0",
         "warmup_ratio=1 accepted"),
        ("max-steps", "config.py", "self.max_steps < 1:", "self.max_steps <= 1:", "max_steps=1 refused"),
        ("save-every", "config.py", "if self.save_every < 0:", "if self.save_every <= 0:", "save_every=0 refused"),
        ("num-workers", "config.py", "if self.num_workers < 0:", "if self.num_workers <= 0:", "num_workers=0 refused"),
        ("image-limits", "data/images.py", "not self.max_aspect_ratio >= 1", "not self.max_aspect_ratio > 1",
         "ImageLimits(max_aspect_ratio=1) refused"),
    ]],
    Mutation("prompt-position-limit-off-by-one", "decode/generate.py",
             "if next_position >= limit:", "if next_position > limit:",
             (POSITIONS,), "a prompt that takes every position is accepted (no room for an answer)"),
    Mutation("answer-position-warning-early", "decode/generate.py",
             "if next_position + max_new_tokens > limit:", "if next_position + max_new_tokens >= limit:",
             (POSITIONS,), "an answer ending on the model's last position warns"),
    Mutation("max-length-exclusive", "data/processor.py",
             "len(ids) > self.max_length:", "len(ids) >= self.max_length:",
             (STEP_DATA,), "a training sample of exactly max_length tokens is skipped"),
    Mutation("top-p-strict", "decode/sampling.py",
             "drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p",
             "drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) > p",
             (SAMPLING,), "top_p keeps one token past the smallest set that reaches p"),
    Mutation("top-k-drops-the-kth", "decode/sampling.py",
             'filtered & (logits < kth), float("-inf")', 'filtered & (logits <= kth), float("-inf")',
             (SAMPLING,), "top_k keeps k - 1 tokens (and drops ties with the k-th)"),
    Mutation("steps-schedule-ceil-off-by-one", "decode/sampling.py",
             "return (remaining + steps_left - 1) // max(steps_left, 1)",
             "return (remaining + steps_left) // max(steps_left, 1)",
             (SAMPLING,), "masks_left: a pass takes one token too many when the masks divide evenly"),
    Mutation("stop-text-sent-early", "serve/answer_text.py",
             "return self._take(len(text) - held_back(text, self.stop))", "return self._take(len(text))",
             ("tests/serve/test_engine.py",), "the beginning of a stop string is streamed before it is known"),
    # -- every family as published: the checkpoint's template and end tokens -------------------
    Mutation("template-ignored", "model/adapters/base.py",
             "template = template or tokenizer_template(tokenizer)", "template = None",
             (PUBLISHED_FILES,), "the checkpoint's chat template is ignored for the family's own layout"),
    Mutation("generation-config-eos-ignored", "model/checkpoint_files.py",
             '(GENERATION_CONFIG, generation.get("eos_token_id"))', '(GENERATION_CONFIG, None)',
             (PUBLISHED,), "generation_config.json's end tokens (<|endoftext|> for Qwen-VL) do not stop answers"),
    Mutation("end-of-turn-not-trained", "data/template.py",
             "return Span(start, end.end())", "return Span(start, start + len(text))",
             ("tests/data/test_processor.py", PUBLISHED), "training never teaches the token that ends a turn"),
    Mutation("stop-token-not-recorded", "decode/rows.py",
             'row.finish, row.stop_token = "stop", tok', 'row.finish = "stop"',
             (PUBLISHED,), "GenerationOutput does not say which end token ended the answer"),
    # -- the server's limits, at their boundaries ----------------------------------------------
    Mutation("batch-admits-one-more", "serve/engine.py",
             "if ends_now or free > 0:", "if ends_now or free >= 0:",
             (LIMITS,), "a group admits max_batch_size + 1 rows"),
    Mutation("engine-queue-holds-one-more", "serve/engine.py",
             "if len(self._waiting) >= self.max_queue:", "if len(self._waiting) > self.max_queue:",
             (LIMITS,), "the engine's queue takes max_queue + 1 requests"),
    Mutation("max-queue-admits-one-more", "serve/app.py",
             "if waiting >= self.settings.max_queue:", "if waiting > self.settings.max_queue:",
             (LIMITS,), "--max-queue + 1 requests may wait to start"),
    Mutation("max-images-itself-refused", "serve/prepare.py",
             "if count > max_images:", "if count >= max_images:",
             (LIMITS,), "a request with exactly --max-images images is refused"),
    Mutation("max-tokens-itself-refused", "serve/prepare.py",
             "requested is not None and requested > settings.max_tokens:",
             "requested is not None and requested >= settings.max_tokens:",
             (LIMITS,), "max_tokens equal to --max-tokens is refused"),
    Mutation("max-prompt-tokens-itself-refused", "serve/prepare.py",
             "len(encoded) > settings.max_prompt_tokens:", "len(encoded) >= settings.max_prompt_tokens:",
             (LIMITS,), "a prompt of exactly --max-prompt-tokens is refused"),
    Mutation("last-position-unusable", "serve/prepare.py",
             "if room < 1:", "if room < 2:",
             (LIMITS,), "a prompt leaving one position for the answer is refused"),
    Mutation("answer-filling-the-positions-refused", "serve/prepare.py",
             "if requested > room:", "if requested >= room:",
             (LIMITS,), "max_tokens equal to the positions left is refused"),
    Mutation("declared-body-of-the-limit-refused", "serve/app.py",
             "int(declared) > limit:", "int(declared) >= limit:",
             (LIMITS,), "a body of exactly --max-body-mb (Content-Length) is refused"),
    Mutation("read-body-of-the-limit-refused", "serve/app.py",
             "if size > limit:", "if size >= limit:",
             (LIMITS,), "a chunked body of exactly --max-body-mb is refused"),
    Mutation("image-of-the-byte-limit-refused", "serve/images.py",
             "if size > limits.max_bytes:", "if size >= limits.max_bytes:",
             (LIMITS,), "an image of exactly the byte limit is refused"),
    Mutation("data-url-padding-counted", "data/images.py",
             "return (len(text) - start) // 4 * 3 - text[max(start, len(text) - 2):].count(\"=\")",
             "return (len(text) - start) * 3 // 4",
             (LIMITS, IMAGES), "a data URL's base64 padding counts as image bytes"),
    Mutation("three-stop-strings", "serve/schemas.py",
             "Field(None, max_length=MAX_STOP_STRINGS)", "Field(None, max_length=MAX_STOP_STRINGS - 1)",
             (LIMITS,), "four stop strings are refused"),
    Mutation("bearer-case-sensitive", "serve/app.py",
             'if scheme.lower() != "bearer" or', 'if scheme != "Bearer" or',
             (LIMITS,), "the Bearer scheme is matched case-sensitively (RFC 9110: case-insensitive)"),
    Mutation("block-size-unbounded", "config.py",
             "if self.block_size is not None and self.block_size > largest:",
             "if self.block_size is not None and self.block_size > 1000 * largest:",
             ("tests/decode/test_settings.py",), "block_size=100000 reaches the model"),
    # -- the server's failure paths, timeouts, usage -------------------------------------------
    Mutation("failure-path-raises", "serve/engine.py",
             "            except Exception as err:\n                failure = failure or err",
             "            except ZeroDivisionError as err:\n                failure = failure or err",
             (FAILURES,), "ending a failed group's requests raises the failure again (the loop dies, requests hang)"),
    Mutation("health-ignores-a-dead-engine", "serve/app.py",
             "if not state.engine.alive:", "if False:",
             ("tests/serve/test_lifecycle.py::test_health_is_503_once_the_engine_loop_is_gone",),
             "/health answers 200 with the engine loop gone"),
    Mutation("usage-counts-an-unproduced-end-token", "serve/requests.py",
             'ended_by_end_token = self.output.finish_reason == "stop" and not self.stop_string',
             'ended_by_end_token = self.output.finish_reason == "stop"',
             (USAGE,), "an answer cut by a stop string counts an end token the model never produced"),
    Mutation("timeout-unchecked-at-the-answer-s-end", "serve/engine.py",
             "self._end_rows(group, ended, now)", 'self._end_rows(group, ended, float("-inf"))',
             (USAGE,), "a request past its timeout gets its answer when the step that passed it completes it"),
    Mutation("timeout-from-submission", "serve/app.py",
             "handle = submit(state, with_time_left(prepared.request, state.settings, arrived))",
             "handle = submit(state, prepared.request)",
             ("tests/serve/test_timeouts.py",), "--request-timeout does not count reading and preparing the request"),
    Mutation("symlink-loop-unhandled", "serve/images.py",
             "except (OSError, RuntimeError) as err:  # a symlink loop", "except OSError as err:  # a symlink loop",
             ("tests/serve/test_images.py",), "a symlink loop in the image folder is a 500"),
    Mutation("non-finite-options-accepted", "cli.py",
             "if not math.isfinite(value):", "if False:",
             ("tests/serve/test_cli_serve.py::test_non_finite_numbers_are_a_one_line_usage_error",),
             "dvlm serve --max-body-mb inf: a traceback"),
]


def _patched(tree: Path, mutation: Mutation) -> str:
    """The mutated text of the mutation's file; stops the run if the patch does not apply once."""
    text = (tree / "dvlm" / mutation.path).read_text()
    count = text.count(mutation.old)
    if count != 1:
        print(f"mutation {mutation.name!r}: the patched text occurs {count} times in src/dvlm/{mutation.path} "
              "(expected once); update the mutation to the code", file=sys.stderr)
        raise SystemExit(2)
    return text.replace(mutation.old, mutation.new)


def _run_tests(src: Path, tests: tuple[str, ...]) -> tuple[bool, str]:
    """(passed, the first failing test or the reason) for `tests` run against `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {TEST_TIMEOUT_S}s"
    if done.returncode == 0:
        return True, ""
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.MULTILINE)
    return False, failed.group(1) if failed else f"pytest exit {done.returncode}"


def _check_imports_from(src: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = subprocess.run([sys.executable, "-c", "import dvlm; print(dvlm.__file__)"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(src)):
        print(f"dvlm is imported from {out}, not from the mutated copy under {src}", file=sys.stderr)
        raise SystemExit(2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this (or one of these, comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    selected = [m for m in MUTATIONS if any(k in m.name for k in args.k.split(","))]
    if args.list:
        for m in selected:
            print(f"{m.name:36s} {m.bug}")
        return 0
    with tempfile.TemporaryDirectory(prefix="dvlm-mutants-") as tmp:
        tree = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", tree, ignore=shutil.ignore_patterns("weights", "__pycache__"))
        # The built-in models, linked rather than copied: the server's tests encode with tiny-dvlm.
        (tree / WEIGHTS).symlink_to(ROOT / "src" / WEIGHTS, target_is_directory=True)
        for m in selected:  # every patch must apply before anything runs
            _patched(tree, m)
        _check_imports_from(tree)
        baseline = sorted({t for m in selected for t in m.tests})
        ok, why = _run_tests(tree, tuple(baseline))
        if not ok:
            print(f"the unmutated tests fail ({why}); fix them first", file=sys.stderr)
            return 2
        rows = []
        for m in selected:
            work = Path(tmp) / m.name / "src"
            shutil.copytree(tree, work, symlinks=True)
            (work / "dvlm" / m.path).write_text(_patched(tree, m))
            start = time.monotonic()
            passed, why = _run_tests(work, m.tests)
            rows.append((m, "survived" if passed else "caught", why, time.monotonic() - start))
            print(f"{m.name:36s} {rows[-1][1]:8s} {why}  ({rows[-1][3]:.0f}s)", flush=True)
            shutil.rmtree(work.parent)
    print("\n| mutation | bug | result | caught by |\n|---|---|---|---|")
    for m, result, why, _ in rows:
        print(f"| `{m.name}` | {m.bug} | {result} | {why} |")
    survived = [m.name for m, result, _, _ in rows if result == "survived"]
    print(f"\n{len(rows) - len(survived)} caught, {len(survived)} survived" + (f": {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
