"""The training loop: explicit, no framework subclass.

Each optimizer step takes `grad_accum` micro-batches. The data order and the noise of every step
are pure functions of (seed, step), so a resumed run continues exactly where the stopped one was:
same batches, same masks, same losses. What else fixes them (the data file's bytes, batch_size,
grad_accum, max_length, the diffusion recipe) is recorded in each checkpoint as `data_order`, and
a resume that differs is refused.

A run stops with an error rather than write something misleading: a data file without records
fails before the model loads, a step without any token to train on and a non-finite loss stop the
run before the weights are updated (no final model, no NaN in metrics.jsonl).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from dvlm.atomic import written_whole
from dvlm.config import ConfigError, DiffusionConfig, TrainConfig, from_dict
from dvlm.data.collate import Batch
from dvlm.data.llava_json import (
    LlavaJsonDataset,
    SkipReport,
    file_fingerprint,
    open_records,
)
from dvlm.data.processor import response_mask
from dvlm.diffusion.noising import build_noisy_stream, noise_extent
from dvlm.diffusion.objective import (
    LossOutput,
    ar_objective,
    diffusion_objective,
    loss_normaliser,
)
from dvlm.diffusion.schedule import annealed_block_size, exact_ratio
from dvlm.model.adapters.registry import adapter_for_checkpoint
from dvlm.model.checkpoint_files import read_config, saved_dtype
from dvlm.model.checkpoint_writing import declare_dtype, shard_size_like
from dvlm.model.loaded import LoadedModel, save_model, write_recipe
from dvlm.runtime import pick_device, seeded_generator, slow_in_bf16, storage_dtype
from dvlm.train import distributed, lengths, memory, report
from dvlm.train import lora as lora_tools
from dvlm.train.resume import (
    TRAIN_CONFIG_KEY,
    Checkpoint,
    check_lora_resume,
    newest_usable_checkpoint,
    restore_training_state,
    save_checkpoint,
    setting_changes,
)
from dvlm.train.step_data import StepData

METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "model"
DATA_ORDER_KEY = "data_order"  # in trainer_state.json: what a resume must not change


class TrainingError(ValueError):
    """Training cannot go on: a step with nothing to train on, or a non-finite loss."""


@dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    """The run's total optimizer steps (the model in model_dir has had them all)."""
    losses: list[float] = field(default_factory=list)
    """The loss of each step trained by this call (after start_step)."""
    skipped: int = 0
    start_step: int = 0
    """The step this call resumed from (0 for a fresh run)."""
    main_process: bool = True
    """False on the other processes of a data-parallel run (rank 0 writes and reports)."""


def lr_lambda(total_steps: int, cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warmup then cosine decay to min_lr_ratio, as a multiplier of the peak LR. The
    warmup takes floor(warmup_ratio * total_steps) steps (0.29 of 100: 29, not float's 28)."""
    warmup = math.floor(exact_ratio(cfg.warmup_ratio) * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def parameter_groups(lm: LoadedModel, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group, or two when the vision encoder has its own learning rate (0 freezes it);
    with `trainable="projector"`, the projector's parameters alone (the rest frozen)."""
    if cfg.lora is not None:  # LoRA decides what trains; the vision encoder is frozen
        return [{"params": [p for p in lm.model.parameters() if p.requires_grad]}]
    if cfg.trainable == "projector":
        return [{"params": freeze_all_but(lm.model, lm.adapter.projector_parameters(lm.model))}]
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


def freeze_all_but(model: torch.nn.Module, trained: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Freeze every parameter of `model` but `trained` (no gradients, no optimizer state); returns `trained`."""
    if not trained:
        raise ConfigError("trainable='projector': this model has no projector parameters to train")
    keep = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return trained


def noise_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of a global micro-batch's noise (`micro`: its index among the step's micro-
    batches with rows); each process keeps its rows of the draw (`NoiseWindow`)."""
    """The noise of one micro-batch: a function of (seed, step, micro) alone, so a resumed run draws it again."""
    return seeded_generator(seed * 1_000_003 + step * 1_009 + micro)


@dataclass
class _Run:
    """What every step of a run needs: the model and its recipe, the data, optimizer and schedule."""

    lm: LoadedModel
    dcfg: DiffusionConfig | None
    cfg: TrainConfig
    steps: StepData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: dict[str, Any]
    """What each checkpoint's trainer_state.json records (besides its step)."""
    objective: distributed.Objective
    """The model with its loss as one module, as the data-parallel wrapper returned it."""
    processes: distributed.SingleProcess
    source: Path
    """The checkpoint the run started from: the final model keeps its layout, template and generation config."""
    save_dtype: str
    """The final model's dtype (the source's unless asked otherwise)."""
    lora: Any = None
    """peft's LoraModel around `lm.model` when training LoRA (`TrainConfig.lora`), else None."""


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
    save_dtype: str = "auto",
) -> TrainResult:
    """Fine-tune `model` on LLaVA-format `data`; checkpoints and metrics go to `out`.

    With `cfg.objective` "autoregressive" the model trains as a plain AR model (no diffusion);
    otherwise it must be a converted dVLM and trains with its DiffusionConfig (updated by
    `diffusion_overrides`). `model` is a checkpoint directory (the CLI resolves built-in names).
    `resume` continues from the run's newest usable checkpoint (from step 0 when it has none yet).
    `cfg.max_length` None: the model's position limit (`dvlm.train.lengths`). The final model is
    written in `save_dtype` (`auto`: `model`'s dtype) and `model`'s shard layout, with its chat
    template and generation config; checkpoints keep the float32 master weights.

    Raises:
        TrainingError: a step with nothing to train on, or a non-finite loss.
        CheckpointError: no usable checkpoint to resume from. WriteError: a directory could not be written.
        ValueError: no records in `data`, or a resume that would change the data order or go back.
    """
    run_dir, source = Path(out), Path(model)
    records = open_records(data)  # a file without records fails before the model loads; JSONL is read lazily
    if cfg.lora is not None:
        lora_tools.require_peft()
    report.require(cfg.report_to)
    processes = distributed.start(device, cfg)
    device, progress = processes.device(device), progress and processes.is_main
    with processes.main_first():  # rank 0 sets unusable checkpoints aside before the others look
        checkpoint = _resume_point(run_dir, resume)
    final_dtype = storage_dtype(save_dtype, saved_dtype(read_config(source)))
    shape = memory.model_shape(source, adapter_for_checkpoint(source))
    given = cfg  # as asked (trainer_state.json's train_config); data_order records the max_length used
    cfg, origin = lengths.resolve_max_length(cfg, shape.max_positions, _recorded_max_length(checkpoint))
    scan = lengths.measure(source, data, image_root, records, cfg, origin) if progress else None
    _check_memory(shape, cfg, device, progress, scan.longest if scan else None)
    _check_bf16_speed(cfg, device, progress)
    # master weights in fp32; a LoRA checkpoint holds only the adapter, its base is `model`
    lora_checkpoint = checkpoint is not None and (checkpoint.path / lora_tools.ADAPTER_FILE).exists()
    weights = model if checkpoint is None or lora_checkpoint else checkpoint.path
    lm = LoadedModel.load(weights, device=device, dtype="float32")
    dcfg = _diffusion_config(lm, cfg, diffusion_overrides)
    lora = _attach_lora(lm, cfg, dcfg, checkpoint)
    lm.processor.max_length = cfg.max_length
    dataset = LlavaJsonDataset(data, lm.processor, image_root=image_root, records=records)
    steps = StepData(dataset, cfg, lm.processor.pad_token_id, SkipReport(), processes.rank, processes.world_size)
    total = steps.total_steps()
    order = data_order(data, cfg, dcfg, processes.world_size)
    if checkpoint is not None:
        check_resume(checkpoint, order, total)

    _prepare_model(lm.model, cfg)
    optimizer = torch.optim.AdamW(parameter_groups(lm, cfg), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, cfg))
    objective, optimizer = processes.prepare(distributed.Objective(lm.model, _loss(lm, dcfg)), optimizer)
    start = 0
    if checkpoint is not None:  # after prepare: FSDP2 shards the optimizer state as it shards the weights
        restored = distributed.CheckpointedOptimizer(processes, objective, optimizer)
        start = restore_training_state(checkpoint, restored, scheduler)
    steps.prefetch(start, total)
    processes.barrier()  # every process has read the run directory before rank 0 writes to it
    if processes.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(run_dir / METRICS_FILE, start)
    state = {TRAIN_CONFIG_KEY: asdict(given), "total_steps": total, "data": str(data), DATA_ORDER_KEY: order}
    run = _Run(lm, dcfg, cfg, steps, optimizer, scheduler, state, objective, processes, source, final_dtype, lora)
    result = TrainResult(run_dir, run_dir / FINAL_DIR, total, start_step=start, main_process=processes.is_main)
    _train_steps(run, result, progress, on_step)
    return result


def _train_steps(run: _Run, result: TrainResult, progress: bool, on_step) -> None:
    """Steps start_step..steps, logging and checkpointing as they go; then the final model."""
    cfg, skips, total, run_dir = run.cfg, run.steps.skips, result.steps, result.run_dir
    bar = tqdm(range(result.start_step, total), initial=result.start_step, total=total, desc="train",
               disable=not progress, unit="step")
    main = run.processes.is_main
    reporter = report.open_report(cfg.report_to, run_dir, result.start_step, main)
    for step in bar:
        tick = time.perf_counter()
        record = _train_step(run, step, total)
        seconds = time.perf_counter() - tick
        record.update(step=step + 1, seconds=round(seconds, 4), tokens_per_second=round(record["tokens"] / seconds))
        result.losses.append(record["loss"])
        bar.set_postfix(loss=f"{record['loss']:.4f}", B=record.get("block_size", "-"),
                        tok_s=record["tokens_per_second"], skipped=record["skipped"])
        if main and ((step + 1) % cfg.log_every == 0 or step + 1 == total):
            with (run_dir / METRICS_FILE).open("a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")  # NaN is not JSON
            reporter.log(record)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < total:
            _save_checkpoint(run, run_dir, step + 1)
        if on_step is not None:
            on_step(step + 1, record)
    run.steps.close()
    reporter.close()
    _save_checkpoint(run, run_dir, total)
    if run.lora is not None:
        run.lm.model = lora_tools.merge(run.lora)  # the final model is a plain checkpoint
    run.lm.model.eval()
    weights = run.processes.full_state_dict(run.objective)  # sharded weights gathered (a collective)
    if main:
        _write_final(run, result.model_dir, weights)
    run.processes.barrier()  # the run ends when its model is written
    result.skipped = skips.count
    if skips.count:
        tqdm.write(skips.summary())


def _save_checkpoint(run: _Run, run_dir: Path, step: int) -> None:
    """Rank 0 writes the checkpoint (atomically) while the others wait."""
    weights = run.processes.full_state_dict(run.objective)  # sharded weights gathered (a collective)
    optimizer = run.processes.optimizer_state(run.objective, run.optimizer)  # likewise
    if run.processes.is_main:
        write_weights = None  # the whole model, as save_model writes it
        if run.lora is not None:
            write_weights = functools.partial(_write_lora, run.lm)
        elif weights is not None:
            write_weights = functools.partial(run.lm.save, state_dict=weights)
        saved = distributed.CheckpointedOptimizer(run.processes, run.objective, run.optimizer, optimizer)
        save_checkpoint(run_dir, step, run.lm, saved, run.scheduler, run.state, run.cfg.keep_checkpoints,
                        write_weights)
    run.processes.barrier()


def _write_final(run: _Run, final: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """The final model, written atomically like a checkpoint, as its source was written: in its dtype
    (`run.save_dtype`) and shard layout, with its chat template and generation config. `weights`:
    the gathered weights when the model holds only its shard of them (FSDP2, ZeRO-3)."""
    dtype = getattr(torch, run.save_dtype)
    if weights is None:
        run.lm.model.to(dtype)  # the run is over: its fp32 master weights are not needed any more
    else:
        weights = {name: t.to(dtype) if t.is_floating_point() else t for name, t in weights.items()}
    state = run.lm.model.state_dict() if weights is None else weights
    with written_whole(final) as tmp:
        save_model(run.lm.model, run.lm.processor, tmp, max_shard_size=shard_size_like(run.source, state),
                   state_dict=weights, source=run.source)
        declare_dtype(tmp, run.save_dtype)  # transformers names the dtype the model (and its parts) loaded in


def _write_lora(lm: LoadedModel, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    lm.model.config.save_pretrained(folder)
    tensors = {name: t.detach().contiguous() for name, t in lora_tools.adapter_state(lm.model).items()}
    save_file(tensors, folder / lora_tools.ADAPTER_FILE)


def _recorded_max_length(checkpoint: Checkpoint | None) -> int | None:
    """The max_length the resumed run trained with (its checkpoint's data order), if it says."""
    if checkpoint is None:
        return None
    recorded = (checkpoint.state.get(DATA_ORDER_KEY) or {}).get("max_length")
    return recorded if isinstance(recorded, int) else None


def _check_bf16_speed(cfg: TrainConfig, device: str | None, progress: bool) -> None:
    if progress and cfg.dtype == "bfloat16" and slow_in_bf16(pick_device(device)):
        tqdm.write("dtype: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX): bfloat16 autocast runs slower "
                   "than float32 here (--dtype float32)")


def _check_memory(shape: memory.ModelShape, cfg: TrainConfig, device: str | None, progress: bool,
                  longest: int | None) -> None:
    """Estimate the run's memory from the checkpoint's config before any weight loads; refuse a run
    whose weights and optimizer state cannot fit (unless `memory_check` is off). `longest`: the
    longest sample's tokens, when measured."""
    try:
        line = memory.check_fits(shape, cfg, pick_device(device), longest=longest)
    except memory.InsufficientMemoryError:
        if cfg.memory_check:
            raise
        line = "memory: the estimate exceeds the available memory; memory_check=false, starting anyway"
    if progress:
        tqdm.write(line)


def _attach_lora(lm: LoadedModel, cfg: TrainConfig, dcfg: DiffusionConfig | None, checkpoint: Checkpoint | None):
    """LoRA in place when the run asks for it (the mask token's rows train too); on resume, the
    checkpoint's adapter tensors are put back. None for a full fine-tune."""
    has_adapter = checkpoint is not None and (checkpoint.path / lora_tools.ADAPTER_FILE).exists()
    if cfg.lora is None:
        if has_adapter:
            raise ConfigError(f"{checkpoint.path} is a LoRA checkpoint: resume it with the same --lora setting")
        return None
    if checkpoint is not None and not has_adapter:
        raise ConfigError(f"{checkpoint.path} is a full fine-tune checkpoint: resume it without --lora")
    if has_adapter:
        check_lora_resume(checkpoint, cfg.lora)
    tokens = [] if dcfg is None else [dcfg.mask_token_id]
    with torch.random.fork_rng(devices=[]):  # LoRA's random init is a function of the run's seed
        torch.manual_seed(cfg.seed)
        wrapped = lora_tools.attach(lm.model, lm.adapter, lora_tools.parse_lora(cfg.lora), tokens)
    if has_adapter:
        lora_tools.load_adapter_state(lm.model, checkpoint.path)
    return wrapped


def _resume_point(run_dir: Path, resume: bool) -> Checkpoint | None:
    """The checkpoint to continue from: None for a fresh start (or a resume before any checkpoint)."""
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"run directory {run_dir} is not empty; pass --resume to continue it or pick a new one")
        return None
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}: no such directory")
    checkpoint = newest_usable_checkpoint(run_dir, tqdm.write)
    if checkpoint is None:  # killed before its first checkpoint: its metrics lines go, it starts over
        tqdm.write(f"--resume: no checkpoint in {run_dir} yet; starting from step 0")
    return checkpoint


def data_order(data: str | Path, cfg: TrainConfig, dcfg: DiffusionConfig | None, world_size: int = 1) -> dict[str, Any]:
    """Everything besides (seed, step) that decides a step's batches and noise: the data file's
    bytes, how samples are grouped, which are too long to use, and the noising recipe.

    `batch_size` is the global micro-batch (per-process batch times processes): a run resumes
    exactly on another number of processes that keeps it."""
    return {
        "data_file": file_fingerprint(data),
        "batch_size": cfg.batch_size * world_size,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "max_length": cfg.max_length,
        "objective": cfg.objective,
        "diffusion": dcfg.to_dict() if dcfg is not None else None,
        # only when on: checkpoints from before the setting existed still resume
        **({"group_by_length": True} if cfg.group_by_length else {}),
    }


def check_resume(checkpoint: Checkpoint, order: dict[str, Any], total: int) -> None:
    """Refuse a resume that would not continue the checkpoint's run: other data order, fewer steps."""
    name = checkpoint.path.name
    if total < checkpoint.step:
        raise ValueError(f"--resume: {name} is at step {checkpoint.step}, past the {total} steps asked for; "
                         f"ask for at least {checkpoint.step} (--steps), or start a new run")
    recorded = checkpoint.state.get(DATA_ORDER_KEY)
    if recorded is None:  # written before data orders were recorded: nothing to compare with
        tqdm.write(f"--resume: {name} does not record its data order; cannot check that it is unchanged")
        return
    if "ar_loss" in recorded:  # recorded before TrainConfig.ar_loss became `objective`
        recorded = {**recorded, "objective": "autoregressive" if recorded["ar_loss"] else "diffusion"}
        del recorded["ar_loss"]
    now = json.loads(json.dumps(order))  # as read back from JSON: lists, not tuples
    changed = setting_changes(recorded, now, name)
    if changed:
        raise ValueError(f"--resume: {'; '.join(changed)}; a resumed run must see the batches and noise of the run "
                         "it continues: use the same data and settings, or start a new run")


def _prepare_model(model, cfg: TrainConfig) -> None:
    model.train()
    if not cfg.gradient_checkpointing:
        return
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _diffusion_config(lm: LoadedModel, cfg: TrainConfig, overrides: dict[str, Any] | None) -> DiffusionConfig | None:
    if cfg.autoregressive:
        if overrides:
            raise ConfigError("diffusion overrides make no sense with objective='autoregressive' training")
        return None
    base = lm.require_diffusion("diffusion training (objective='diffusion')")
    if overrides:
        base = from_dict(DiffusionConfig, {**base.to_dict(), **overrides})
        write_recipe(lm.model, base)  # the saved model keeps the recipe
        lm.diffusion = base
    return base


def _loss(lm: LoadedModel, dcfg: DiffusionConfig | None):
    """The loss of one micro-batch, as `distributed.Objective` calls it."""
    def loss(model, batch: Batch, normaliser: int, stream, clean_block) -> LossOutput:
        if dcfg is None:
            return ar_objective(lm.adapter, model, batch, normaliser)
        return diffusion_objective(lm.adapter, model, batch, stream, clean_block, dcfg, normaliser)

    return loss


def _train_step(run: _Run, step: int, total: int) -> dict[str, Any]:
    """One optimizer step over the step's micro-batches; raises TrainingError rather than update
    the weights from nothing (no answer token) or from a non-finite loss or gradient."""
    lm, dcfg, cfg, steps, processes = run.lm, run.dcfg, run.cfg, run.steps, run.processes
    block_size = _block_size(dcfg, step, total)
    shares = [None if b is None else b.to(lm.device) for b in steps.micro_batches(step)]
    counts = processes.gather(_step_counts(shares, dcfg, block_size))  # (processes, 3 + 3 * micro-batches)
    response_tokens, normaliser, tokens = (int(n) for n in counts[:, :3].sum(dim=0))  # the step's, globally
    if response_tokens == 0:  # every sample skipped or answer-less: the loss would be 0/0
        raise TrainingError(f"step {step + 1}: nothing to train on (none of its {len(steps.indices(step))} samples "
                            f"has an answer token); {steps.skips.summary()}")
    extents = counts[:, 3:].view(processes.world_size, len(shares), 3)
    plan = distributed.plan_micro_steps(processes, shares, extents, lambda m: steps.stand_in(step, m).to(lm.device))
    outputs = []
    for micro in plan:  # gradients are reduced over processes once, after the last
        with contextlib.nullcontext() if micro.last else processes.no_sync(run.objective):
            out = _backward(run, micro, normaliser, block_size, noise_generator(cfg.seed, step, micro.index))
        if micro.weight:
            outputs.append(out)
    loss, diffusion_sum, ar_sum, masked, skipped = processes.sum([
        float(sum(o.loss.detach() for o in outputs)), float(sum(o.diffusion_sum for o in outputs)),
        float(sum(o.ar_sum for o in outputs)), sum(o.num_masked for o in outputs), steps.skips.count,
    ])
    # Clipping at infinity changes nothing but still measures the norm, so it is checked and logged.
    grad_norm = processes.clip_grad_norm(run.objective, cfg.max_grad_norm or math.inf)
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
        if value is not None and not math.isfinite(value):
            raise TrainingError(f"step {step + 1}: the {name} is {value}; stopped before updating the weights "
                                "(lower the learning rate or check the data, then --resume from the last checkpoint)")
    lr = run.scheduler.get_last_lr()[0]  # the language model's (first group's)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {
        "loss": loss,
        "diffusion_loss": diffusion_sum / normaliser,
        "ar_loss": ar_sum / normaliser,
        "masked_tokens": int(masked),
        "response_tokens": response_tokens,
        "tokens": tokens,
        "block_size": block_size,
        "lr": lr,
        "grad_norm": None if grad_norm is None else round(grad_norm, 4),
        "skipped": int(skipped),  # summed over processes: a bad sample two of them drew counts twice
    }


def _block_size(dcfg: DiffusionConfig | None, step: int, total: int) -> int | None:
    if dcfg is None:
        return None
    if dcfg.anneal_block_size:
        return annealed_block_size(step / total, dcfg.block_size, dcfg.anneal_fraction)
    return dcfg.block_size


def _step_counts(shares: list[Batch | None], dcfg: DiffusionConfig | None, block_size: int | None) -> list[int]:
    """This process's part of what every process must know about a step: its answer tokens, its
    part of the loss normaliser, its tokens, then (rows, length, blocks) of each of its shares."""
    present = [b for b in shares if b is not None]
    counts = [sum(int(response_mask(b.labels).sum()) for b in present),
              loss_normaliser([b.labels for b in present], dcfg) if present else 0,
              sum(int(b.attention_mask.sum()) for b in present)]
    for b in shares:
        if b is None:
            counts += [0, 0, 0]
        elif dcfg is None:
            counts += [len(b), b.labels.shape[1], 0]
        else:
            counts += list(noise_extent(b.labels, b.attention_mask, dcfg, block_size))
    return counts


def _backward(run: _Run, micro: distributed.MicroStep, normaliser: int, block_size: int | None,
              noise: torch.Generator) -> LossOutput:
    """The loss of one micro-batch (normalised by the whole step's answer tokens), backpropagated."""
    batch, dcfg = micro.batch, run.dcfg
    with torch.autocast(run.lm.device.type, dtype=torch.bfloat16, enabled=run.cfg.dtype == "bfloat16"):
        stream = clean_block = None
        if dcfg is not None:
            stream, clean_block = build_noisy_stream(
                batch.input_ids, batch.labels, batch.attention_mask, batch.mm_token_type_ids, dcfg, block_size, noise,
                micro.window,
            )
        out = run.objective(batch, normaliser, stream, clean_block)
    run.processes.backward(out.loss, micro)
    return out


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (they will be redone), atomically.

    A last line cut short by a kill while it was written is dropped too: its step had no
    checkpoint yet. Any other line that is not a metrics record is an error naming the file.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            logged = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError) as err:  # ValueError: invalid JSON included
            if number == len(lines):
                break
            raise ValueError(f"{path} line {number}: not a metrics record ({err}); "
                             "repair or remove the line to resume") from err
        if logged <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)  # a kill during the rewrite leaves the old file, not half of it
