"""`dvlm ablate`: the papers' recipe claims, reproduced at small scale from the shipped tiny-ar.

One diffusion fine-tune per variant and seed, each the zoo recipe's tiny-dvlm stage with one
recipe element changed (or the whole diffusionvl preset, or the data split into a text-only stage
and a multimodal one), at a shorter budget than the shipped model so that the elements have room
to matter. Every run is decoded on the same test samples
with block decoding (threshold) and, where the recipe allows it, self-speculative decoding; the
full recipe is also swept over thresholds and block sizes. The runs go through
`dvlm.zoo.recipe.run_stage`, so a rerun with the same --out skips what is finished.

The evaluation is chosen to separate recipes (see docs/ablations.md): shapes-qa's content
questions ("What colour is the circle?", "Where is the red square?"), which the AR source answers
about half the time, instead of the whole of shapes-qa (every other question type is at 1.00);
captions for long answers; digits and multi-turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dvlm.config import PRESETS, ConfigError, TrainConfig
from dvlm.data.chat import IMAGE_PLACEHOLDER
from dvlm.decode.generate import generate
from dvlm.eval.harness import sample_prompt
from dvlm.model.loaded import LoadedModel
from dvlm.tasks.builtin import Sample, get_task
from dvlm.tasks.metrics import score
from dvlm.zoo.recipe import ZooRecipe, build_data, run_stage
from dvlm.zoo.registry import builtin_path

RESULTS_FILE = "results.json"
REFERENCE = "full"
"""The variant every other one is compared with: the zoo recipe's tiny-dvlm stage."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]
    """DiffusionConfig fields set for the fine-tune on top of the reference recipe."""
    description: str
    text_first: bool = False
    """Two stages: the first half of the steps on the training data's text alone (images dropped),
    then the second half on the multimodal data (the small-scale stand-in for Fast-dVLM's two-stage
    route; see docs/ablations.md)."""


def _diffusionvl_overrides() -> dict[str, Any]:
    # fill_last_block is dvlm's addition on the response layout: the absolute layout refuses it.
    return {"preset": "diffusionvl", **PRESETS["diffusionvl"], "fill_last_block": False}


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant(REFERENCE, {}, "the zoo recipe: fast-dvlm preset + fill_last_block"),
    Variant("block-causal", {"clean_attention": "block_causal", "ar_loss_weight": 0.0},
            "no causal context attention: block-causal clean stream (the AR loss must go with it)"),
    Variant("no-anneal", {"anneal_block_size": False}, "no block-size annealing: B=16 from the start"),
    Variant("no-truncation", {"truncate_last_block": False, "fill_last_block": False},
            "no auto-truncation: a turn's last block continues over the next turn's first tokens (the fill "
            "goes with it: compare with no-fill for the truncation alone)"),
    Variant("no-ar-loss", {"ar_loss_weight": 0.0}, "no AR loss on the clean stream"),
    Variant("no-complementary", {"complementary_mask": False}, "no complementary mask"),
    Variant("no-fill", {"fill_last_block": False}, "no fill of the last block (dvlm's addition)"),
    Variant("noisy-all", {"noisy_stream": "all"}, "vision and prompt duplicated into the noisy stream"),
    Variant("absolute", {"block_layout": "absolute", "noisy_stream": "all", "token_shift": False,
                         "fill_last_block": False},
            "DiffusionVL's absolute blocks on the fast-dvlm preset (the layout needs a full noisy stream and "
            "no token shift)"),
    Variant("two-stage", {}, "half the steps on the data's text alone, then half on images and text",
            text_first=True),
    Variant("diffusionvl", _diffusionvl_overrides(), "the whole diffusionvl preset (B=8)"),
)}

CONTENT_QUESTIONS = ("colour", "position")
"""shapes-qa question types that must find a shape by its content: the ones the AR source gets
right about half the time (every other type is at 1.00, so it cannot separate recipes)."""
EVAL_TASKS = ("shapes-content", "shapes-caption", "digits-read", "multi-turn")
PRIMARY = {"shapes-content": "exact_match", "shapes-caption": "fact_f1", "digits-read": "digit_accuracy",
           "multi-turn": "exact_match"}


@dataclass
class AblationPlan:
    """What one `dvlm ablate` runs. The defaults are the full study (see docs/ablations.md for its cost)."""

    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: int = 3
    """Fine-tunes per variant (training seeds 0..seeds-1)."""
    steps: int = 400
    """Optimizer steps per fine-tune (the shipped tiny-dvlm has 4000). On 2 CPU cores alone the
    study's 33 fine-tunes of 400 steps took 205 s each on average, and with decoding the whole
    study takes about 2 h (measured, see docs/ablations.md)."""
    batch_size: int = 16
    samples: int = 100
    """Test samples per task (the same samples for every run)."""
    eval_batch_size: int = 16
    max_new_tokens: int = 96
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    block_sizes: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    threshold: float = 0.9
    """Threshold of every variant's block decoding (and of the block-size sweep)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        if not self.variants:
            raise ConfigError("no variants to run")
        for name in ("seeds", "steps", "batch_size", "samples", "eval_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")

    def train_config(self, seed: int) -> TrainConfig:
        """The zoo recipe's diffusion stage at this plan's budget and seed."""
        return replace(ZooRecipe().dvlm, max_steps=self.steps, batch_size=self.batch_size, seed=seed,
                       save_every=0, log_every=max(1, min(10, self.steps // 10)))


def quick_plan(variants: list[str] | None = None) -> AblationPlan:
    """The whole plumbing in a couple of minutes: tiny budgets, a few samples (no science)."""
    return AblationPlan(variants=variants or list(VARIANTS), seeds=1, steps=2, batch_size=4, samples=3,
                        eval_batch_size=4, max_new_tokens=24, thresholds=[0.4, 0.9], block_sizes=[4, 16])


# -- the test samples ----------------------------------------------------------------------------


def eval_samples(task: str, n: int) -> list[Sample]:
    """`n` test samples of an evaluation task (seed 0: the same for every run)."""
    if task != "shapes-content":
        return get_task(task).generate("test", n)
    return content_questions(n)


def content_questions(n: int) -> list[Sample]:
    """The first `n` shapes-qa test questions of the content types."""
    found: list[Sample] = []
    drawn = 0
    while len(found) < n:
        batch = get_task("shapes-qa").generate("test", drawn + 4 * n)[drawn:]
        found += [s for s in batch if s.meta["question_type"] in CONTENT_QUESTIONS]
        drawn += len(batch)
    return found[:n]


def decode_and_score(lm, task: str, samples: list[Sample], plan: AblationPlan, decoder: str,
                     options: dict[str, Any]) -> dict[str, Any]:
    """Per-sample primary scores, tokens and forwards (the report bootstraps over them)."""
    scores, tokens, nfe, seconds = [], [], [], 0.0
    for start in range(0, len(samples), plan.eval_batch_size):
        chunk = samples[start:start + plan.eval_batch_size]
        outs = generate(lm, [sample_prompt(s) for s in chunk], [s.images for s in chunk], decoder=decoder,
                        max_new_tokens=plan.max_new_tokens, **options)
        seconds += max(o.timings.get("total_s", 0.0) for o in outs)  # each row is timed until it finished
        for out, sample in zip(outs, chunk):
            scores.append(score(sample.task, out.text, sample)[PRIMARY[task]])
            tokens.append(out.num_tokens)
            nfe.append(out.nfe)
    return {"task": task, "decoder": decoder, **options, "scores": scores, "tokens": tokens, "nfe": nfe,
            "seconds": round(seconds, 4)}


def decoder_settings(lm, plan: AblationPlan, sweep: bool) -> list[tuple[str, dict[str, Any]]]:
    """Block decoding at the plan's threshold and spec (where the recipe allows it) at the model's B;
    with `sweep`, also every threshold at B and every block size for both decoders."""
    dcfg = lm.diffusion
    settings = [("block", {"block_size": dcfg.block_size, "threshold": plan.threshold})]
    can_spec = dcfg.token_shift and dcfg.clean_attention == "causal"
    if can_spec:
        settings.append(("spec", {"block_size": dcfg.block_size}))
    if sweep:
        settings += [("block", {"block_size": dcfg.block_size, "threshold": t}) for t in plan.thresholds]
        settings += [("block", {"block_size": b, "threshold": plan.threshold}) for b in plan.block_sizes]
        settings += [("spec", {"block_size": b}) for b in plan.block_sizes if can_spec]
    return list({json.dumps([d, o], sort_keys=True): (d, o) for d, o in settings}.values())


def evaluate_run(model_dir: Path, plan: AblationPlan, sweep: bool, progress: bool) -> list[dict[str, Any]]:
    lm = LoadedModel.load(model_dir)
    rows = []
    settings = decoder_settings(lm, plan, sweep)
    bar = tqdm(total=len(settings) * len(EVAL_TASKS), desc=f"eval {model_dir.parent.name}", disable=not progress,
               leave=False)
    for decoder, options in settings:
        for task in EVAL_TASKS:
            rows.append(decode_and_score(lm, task, eval_samples(task, plan.samples), plan, decoder, options))
            bar.update()
    bar.close()
    return rows


# -- the study -----------------------------------------------------------------------------------


def run_ablation(plan: AblationPlan, out: str | Path, *, log: Callable[[str], None] = print,
                 progress: bool = True, source: Path | None = None) -> dict[str, Any]:
    """Train and evaluate every (variant, seed) into `out`; returns the results (also in results.json).
    `source`: the AR checkpoint each variant converts and fine-tunes (default: the built-in tiny-ar)."""
    from dvlm.convert.conversion import convert_checkpoint

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = ZooRecipe()
    source = source or _tiny_ar()
    mix = training_mix(recipe, plan.steps * plan.batch_size)
    data = run_stage(out / "data", ("data", mix, recipe.seed), log, f"generating {sum(mix.values())} training samples",
                     lambda d: build_data(ZooRecipe(train_mix=mix), d)) / "data.json"
    convert_key = ("convert", _digest(source), recipe.block_size, recipe.diffusion_overrides)
    converted = run_stage(out / "converted", convert_key, log, f"converting {source.name} with the fast-dvlm preset",
                          lambda d: convert_checkpoint(source, d, preset="fast-dvlm", block_size=recipe.block_size,
                                                       overrides=recipe.diffusion_overrides, overwrite=True,
                                                       log=lambda _: None))
    text = None  # the records without their images, for the variants that train on them first
    if any(VARIANTS[name].text_first for name in plan.variants):
        text = run_stage(out / "data-text", ("data-text", mix, recipe.seed), log, "dropping the images",
                         lambda d: text_only(data, d / "data.json")) / "data.json"
    runs = [(name, seed) for name in plan.variants for seed in range(plan.seeds)]
    results: dict[str, Any] = {"plan": asdict(plan), "variants": {n: asdict(VARIANTS[n]) for n in plan.variants},
                               "runs": [], "source": _source_rows(source, plan, out, log, progress)}
    for name, seed in tqdm(runs, desc="ablation runs", disable=not progress):
        cfg = plan.train_config(seed)
        run = out / "runs" / f"{name}-seed{seed}"
        variant = VARIANTS[name]
        key = ("train", variant.overrides, asdict(cfg), _digest(converted), mix)
        key += ("text-first",) * variant.text_first  # (the other variants keep their keys)
        half = cfg.max_steps // 2
        stages = [(text, half), (data, cfg.max_steps - half)] if variant.text_first else [(data, cfg.max_steps)]
        model = run_stage(run / "model", key, log, f"{name} seed {seed}: fine-tuning ({cfg.max_steps} steps)",
                          lambda d, c=cfg, v=variant, r=run, s=stages: _train_into(converted, s, r, c, v, progress))
        sweep = name == REFERENCE
        evaluation = run_stage(run / "eval", ("eval", key, _eval_key(plan), sweep), log,
                               f"{name} seed {seed}: evaluating", lambda d, m=model, s=sweep: _write_rows(
                                   d, evaluate_run(m, plan, s, progress)))
        results["runs"].append({"variant": name, "seed": seed, "rows": _read_rows(evaluation),
                                "train_seconds": round(_train_seconds(run), 1)})
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    return results


def training_mix(recipe: ZooRecipe, total: int) -> dict[str, int]:
    """The zoo recipe's task mix scaled to `total` samples: one epoch of the plan's budget."""
    whole = sum(recipe.train_mix.values())
    return {task: max(2, round(n * total / whole)) for task, n in recipe.train_mix.items()}


def text_only(data: Path, out: Path) -> Path:
    """The LLaVA-JSON records of `data` without their images: the image placeholders leave the turns."""
    records = json.loads(data.read_text())
    for record in records:
        record.pop("image", None)
        for turn in record["conversations"]:
            turn["value"] = turn["value"].replace(IMAGE_PLACEHOLDER + "\n", "").replace(IMAGE_PLACEHOLDER, "")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records) + "\n")
    return out


def _train_into(converted: Path, stages: list[tuple[Path, int]], run: Path, cfg: TrainConfig, variant: Variant,
                progress: bool) -> None:
    """Fine-tune through `stages` ((data, steps) each, from the previous stage's model) into run/train
    (run/train-stage<k> before the last) and copy the final model to run/model (the stage's directory)."""
    import shutil

    from dvlm.train.loop import train

    model = converted
    for k, (data, steps) in enumerate(stages):
        directory = run / ("train" if k == len(stages) - 1 else f"train-stage{k + 1}")
        shutil.rmtree(directory, ignore_errors=True)
        model = train(model, data, directory, replace(cfg, max_steps=steps), progress=progress,
                      diffusion_overrides=variant.overrides if k == 0 else None).model_dir
    shutil.copytree(model, run / "model", dirs_exist_ok=True)


def _train_seconds(run: Path) -> float:
    """Training time over the run's fine-tunes (two for `text_first`): the logged steps' durations x
    the logging interval (as the zoo build reads it)."""
    from dvlm.zoo.recipe import logged_steps

    total = 0.0
    for directory in sorted(run.glob("train*")):
        records = logged_steps(directory)
        steps = [r["step"] for r in records]
        every = steps[1] - steps[0] if len(steps) > 1 else 1
        total += sum(r["seconds"] for r in records) * every
    return total


def _source_rows(source: Path, plan: AblationPlan, out: Path, log, progress: bool) -> list[dict[str, Any]]:
    """tiny-ar decoded autoregressively on the same samples: what conversion starts from."""
    def evaluate_source(d: Path) -> None:
        lm = LoadedModel.load(source)
        _write_rows(d, [decode_and_score(lm, task, eval_samples(task, plan.samples), plan, "ar", {})
                        for task in tqdm(EVAL_TASKS, desc=f"eval {source.name}", disable=not progress, leave=False)])

    stage = run_stage(out / "source-eval", ("source", _digest(source), _eval_key(plan)), log,
                      f"evaluating {source.name} (AR source)", evaluate_source)
    return _read_rows(stage)


def _eval_key(plan: AblationPlan) -> dict[str, Any]:
    fields = ("samples", "eval_batch_size", "max_new_tokens", "thresholds", "block_sizes", "threshold")
    return {name: getattr(plan, name) for name in fields}


def _write_rows(directory: Path, rows: list[dict[str, Any]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rows.json").write_text(json.dumps(rows) + "\n")


def _read_rows(directory: Path) -> list[dict[str, Any]]:
    return json.loads((directory / "rows.json").read_text())


def _tiny_ar() -> Path:
    path = builtin_path("tiny-ar")
    if path is None:
        raise FileNotFoundError("the built-in tiny-ar is not installed: `dvlm zoo build` makes it")
    return path


def _digest(model_dir: Path) -> str:
    """What identifies a model directory's weights in a stage key (so new weights retrain)."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(model_dir.glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
