"""The training loop: explicit, no framework subclass.

Each optimizer step takes `grad_accum` micro-batches. The data order and the noise of every step
are pure functions of (seed, step), so a resumed run continues exactly where the stopped one was:
same batches, same masks, same losses.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from dvlm.config import ConfigError, DiffusionConfig, TrainConfig, from_dict
from dvlm.data.collate import Batch, collate
from dvlm.data.llava_json import LlavaJsonDataset, SampleError, SkipReport
from dvlm.diffusion.noising import IGNORE_INDEX, build_noisy_stream
from dvlm.diffusion.objective import LossOutput, ar_objective, diffusion_objective
from dvlm.diffusion.schedule import annealed_block_size
from dvlm.model.wrapper import DIFFUSION_CONFIG_KEY, DVLM, load
from dvlm.train.checkpoint import list_checkpoints, load_training_state, save_checkpoint, save_model

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "model"


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    skipped: int = 0


def lr_lambda(total_steps: int, cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_lr_ratio, as a multiplier of the peak LR."""
    warmup = int(cfg.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class StepData:
    """The micro-batches of each optimizer step, determined by (seed, step) alone."""

    def __init__(self, dataset: LlavaJsonDataset, cfg: TrainConfig, pad_token_id: int, skips: SkipReport):
        self.dataset, self.cfg, self.pad = dataset, cfg, pad_token_id
        self.skips = skips
        self.samples_per_step = cfg.batch_size * cfg.grad_accum
        self.steps_per_epoch = max(1, math.ceil(len(dataset) / self.samples_per_step))
        self._seen_bad: set[int] = set()

    def total_steps(self) -> int:
        return self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch

    def micro_batches(self, step: int) -> list[Batch]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
        chosen = order[index * self.samples_per_step:(index + 1) * self.samples_per_step].tolist()
        batches = []
        for start in range(0, len(chosen), self.cfg.batch_size):
            samples = [s for s in (self._get(i) for i in chosen[start:start + self.cfg.batch_size]) if s is not None]
            if samples:
                batches.append(collate(samples, self.pad))
        return batches

    def _get(self, index: int):
        try:
            return self.dataset[index]
        except SampleError as err:
            if index not in self._seen_bad:  # report each bad sample once, however often it is drawn
                self._seen_bad.add(index)
                self.skips.record(err)
            return None


def parameter_groups(lm: DVLM, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group, or two when the vision encoder has its own learning rate (0 freezes it)."""
    if cfg.vision_learning_rate is None:
        return [{"params": list(lm.model.parameters())}]
    vision_params = lm.adapter.vision_parameters(lm.model)
    vision = {id(p) for p in vision_params}
    rest = [p for p in lm.model.parameters() if id(p) not in vision]
    if cfg.vision_learning_rate == 0:
        for p in vision_params:
            p.requires_grad_(False)  # frozen: no gradients, no optimizer state
        return [{"params": rest}]
    return [{"params": rest}, {"params": vision_params, "lr": cfg.vision_learning_rate}]


def noise_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1_009 + micro)


def train(
    model: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig,
    *,
    image_root: str | Path | None = None,
    diffusion_overrides: dict[str, Any] | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Fine-tune `model` on LLaVA-format `data`; checkpoints and metrics go to `out`.

    With `cfg.ar_loss` the model trains autoregressively (no diffusion); otherwise it must be a
    converted dVLM and trains with its DiffusionConfig (updated by `diffusion_overrides`).
    """
    run_dir = Path(out)
    start_dir = _start_directory(run_dir, model, resume)
    lm = load(start_dir, device=device, dtype="float32")  # master weights in fp32
    dcfg = _diffusion_config(lm, cfg, diffusion_overrides)
    lm.processor.max_length = cfg.max_length
    dataset = LlavaJsonDataset(data, lm.processor, image_root=image_root)
    skips = SkipReport()
    steps = StepData(dataset, cfg, lm.processor.pad_token_id, skips)
    total = steps.total_steps()

    _prepare_model(lm.model, cfg)
    optimizer = torch.optim.AdamW(parameter_groups(lm, cfg), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, cfg))
    start = 0
    if resume:
        start = load_training_state(start_dir, optimizer, scheduler)["step"]
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / METRICS_FILE
    _truncate_metrics(metrics_path, start)
    state = {"train_config": asdict(cfg), "total_steps": total, "data": str(data)}

    result = TrainResult(run_dir, run_dir / FINAL_DIR, total)
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not progress, unit="step")
    for step in bar:
        tick = time.perf_counter()
        record = _train_step(lm, dcfg, cfg, steps, step, total, optimizer, scheduler)
        record.update(step=step + 1, seconds=round(time.perf_counter() - tick, 4), skipped=skips.count)
        result.losses.append(record["loss"])
        bar.set_postfix(loss=f"{record['loss']:.4f}", B=record.get("block_size", "-"), skipped=skips.count)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            save_checkpoint(run_dir, step + 1, lm, optimizer, scheduler, state, cfg.keep_checkpoints)
        if on_step is not None:
            on_step(step + 1, record)
    save_checkpoint(run_dir, total, lm, optimizer, scheduler, state, cfg.keep_checkpoints)
    lm.model.eval()
    save_model(lm, result.model_dir)
    result.skipped = skips.count
    if skips.count:
        tqdm.write(skips.summary())
    return result


def _start_directory(run_dir: Path, model: str | Path, resume: bool) -> str | Path:
    """Where the weights come from: the run's newest checkpoint (resume) or `model`."""
    checkpoints = list_checkpoints(run_dir)
    if resume and not checkpoints:
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty; pass --resume to continue it or pick a new one")
    return checkpoints[-1][1] if resume else model


def _prepare_model(model, cfg: TrainConfig) -> None:
    model.train()
    if not cfg.gradient_checkpointing:
        return
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _diffusion_config(lm: DVLM, cfg: TrainConfig, overrides: dict[str, Any] | None) -> DiffusionConfig | None:
    if cfg.ar_loss:
        if overrides:
            raise ConfigError("diffusion overrides make no sense with ar_loss training")
        return None
    base = lm.require_diffusion("diffusion training (train without ar_loss)")
    if overrides:
        base = from_dict(DiffusionConfig, {**base.to_dict(), **overrides})
        setattr(lm.model.config, DIFFUSION_CONFIG_KEY, base.to_dict())  # the saved model keeps the recipe
        lm.diffusion = base
    return base


def _train_step(lm: DVLM, dcfg, cfg: TrainConfig, steps: StepData, step: int, total: int, optimizer, scheduler):
    batches = [b.to(lm.device) for b in steps.micro_batches(step)]
    normaliser = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches)
    block_size = None
    if dcfg is not None:
        block_size = dcfg.block_size
        if dcfg.anneal_block_size:
            block_size = annealed_block_size(step / total, dcfg.block_size, dcfg.anneal_fraction)
    outputs: list[LossOutput] = []
    for micro, batch in enumerate(batches):
        with torch.autocast(lm.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            if dcfg is None:
                out = ar_objective(lm.adapter, lm.model, batch, normaliser)
            else:
                stream, clean_block = build_noisy_stream(
                    batch.input_ids, batch.labels, batch.attention_mask, batch.mm_token_type_ids, dcfg,
                    block_size, noise_generator(cfg.seed, step, micro),
                )
                out = diffusion_objective(lm.adapter, lm.model, batch, stream, clean_block, dcfg, normaliser)
        out.loss.backward()
        outputs.append(out)
    grad_norm = 0.0
    if cfg.max_grad_norm > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(lm.model.parameters(), cfg.max_grad_norm))
    lr = scheduler.get_last_lr()[0]  # the language model's (first group's)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    norm = max(normaliser, 1)
    return {
        "loss": float(sum(o.loss.detach() for o in outputs)) if outputs else float("nan"),
        "diffusion_loss": float(sum(o.diffusion_sum for o in outputs)) / norm,
        "ar_loss": float(sum(o.ar_sum for o in outputs)) / norm,
        "masked_tokens": sum(o.num_masked for o in outputs),
        "response_tokens": normaliser,
        "block_size": block_size,
        "lr": lr,
        "grad_norm": round(grad_norm, 4),
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines of steps after the checkpoint (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
