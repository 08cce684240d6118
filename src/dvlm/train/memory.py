"""How much memory a training run needs, known before the weights load, and what would make it fit.

Training holds four things: the weights, a gradient per trained weight, AdamW's two moments per
trained weight, and the activations of one micro-batch kept for the backward pass. The first three
follow exactly from the parameter counts and the dtypes; they are counted here on a model built on
PyTorch's meta device (no memory, no weights read). The activations are an estimate: per token and
layer, the tensors a decoder layer keeps for its backward (about ten hidden-size vectors and four
intermediate-size ones), the attention weights where the kernel keeps them, and the fp32 logits of
the labelled tokens. `benchmarks/train_layout.py` measures the real peak beside this estimate.

A 3.75B-parameter 3B-class VLM shape needs 16 bytes per trained parameter in fp32 with AdamW
(weights 4, gradient 4, moments 8): about 60 GB, 52 GB with the vision tower frozen (frozen
weights cost their 4 bytes and nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers

GIB = 2**30
FP32 = 4
ADAM_MOMENTS = 2


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know of a checkpoint."""

    parameters: int
    vision_parameters: int
    """Of `parameters`, those the adapter calls the vision encoder (frozen by vision_learning_rate=0)."""
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    max_positions: int | None = None
    """The language model's position limit (None: it states none)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training run holds at its peak, by kind."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def states(self) -> int:
        """Weights, gradients and optimizer moments: exact, whatever the data."""
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.1f}" for name in ("weights", "gradients", "optimizer", "activations")
        )
        return f"~{self.total / GIB:.1f} GiB ({parts} GiB)"


def model_shape(path: str | Path, adapter) -> ModelShape:
    """Count a checkpoint's parameters on the meta device: its config is read, its weights are not."""
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = model_class(config)
    text = config.get_text_config()
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        vision_parameters=sum(p.numel() for p in adapter.vision_parameters(model)),
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        vocab_size=text.vocab_size,
        max_positions=adapter.max_positions(model),
    )


def estimate(
    shape: ModelShape,
    *,
    tokens: int,
    labelled_tokens: int,
    longest_row: int,
    freeze_vision: bool = False,
    gradient_checkpointing: bool = False,
    bfloat16: bool = False,
    attention_weights_kept: bool = True,
) -> MemoryEstimate:
    """Peak bytes of one micro-batch step.

    `tokens` counts every position of the micro-batch's forward (both streams of every row),
    `labelled_tokens` those whose logits are scored, `longest_row` the longest row's positions (the
    attention weights grow with its square). Master weights and optimizer moments stay fp32;
    `bfloat16` autocast halves the activations. `attention_weights_kept` is true on CPU, where
    PyTorch's attention keeps its probabilities for the backward; CUDA's fused kernels do not.
    """
    trained = shape.parameters - (shape.vision_parameters if freeze_vision else 0)
    act_bytes = 2 if bfloat16 else FP32
    per_token_layer = 10 * shape.hidden_size + 4 * shape.intermediate_size
    rows = max(1, tokens // max(1, longest_row))
    attention = 2 * shape.num_heads * longest_row * longest_row * rows if attention_weights_kept else 0
    if gradient_checkpointing:  # each layer keeps its input; one layer at a time is recomputed whole
        layers = tokens * shape.hidden_size * shape.num_layers + tokens * per_token_layer + attention
    else:
        layers = (tokens * per_token_layer + attention) * shape.num_layers
    logits = 3 * labelled_tokens * shape.vocab_size * FP32  # logits, log-softmax, their gradient (fp32 CE)
    return MemoryEstimate(
        weights=shape.parameters * FP32,
        gradients=trained * FP32,
        optimizer=trained * FP32 * ADAM_MOMENTS,
        activations=layers * act_bytes + logits,
    )


def available_bytes(device: torch.device) -> int:
    """Memory a run on `device` can still take: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as meminfo:  # Linux; MemAvailable counts reclaimable cache
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("cannot read the available memory from /proc/meminfo")


class InsufficientMemoryError(ValueError):
    """The run's weights, gradients and optimizer state alone do not fit in the device's memory."""


def training_estimate(shape: ModelShape, cfg, *, lora: bool) -> MemoryEstimate:
    """The estimate for a TrainConfig, at its worst case: every row of a micro-batch `max_length`
    long in both streams (the clean one, and a noisy one as long again), half of it labelled. A
    LoRA run counts no trained weights (its adapter is a few per cent at most)."""
    frozen_vision = lora or cfg.vision_learning_rate == 0
    longest = 2 * cfg.max_length
    base = estimate(
        shape,
        tokens=cfg.batch_size * longest,
        labelled_tokens=cfg.batch_size * cfg.max_length // 2,
        longest_row=longest,
        freeze_vision=frozen_vision,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bfloat16=cfg.dtype == "bfloat16",
    )
    if lora:
        return MemoryEstimate(base.weights, 0, 0, base.activations)
    return base


def check_fits(shape: ModelShape, cfg, device: torch.device, available: int | None = None,
               longest: int | None = None) -> str:
    """One line saying what the run needs; raises InsufficientMemoryError, with the options that
    would fit, when its weights and optimizer state alone exceed what `device` has free.

    `longest`: the longest sample's tokens when the data was measured (the activations are then
    bounded by it rather than by `cfg.max_length`)."""
    available = available_bytes(device) if available is None else available
    lora = cfg.lora is not None
    measured = longest is not None and longest < cfg.max_length
    needed = training_estimate(shape, replace(cfg, max_length=longest) if measured else cfg, lora=lora)
    rows = f"as long as the longest sample, {longest:,} tokens" if measured else \
        f"at max_length, {cfg.max_length:,} tokens"
    line = (
        f"memory: weights + optimizer state {needed.states / GIB:.1f} GiB, activations at most "
        f"{needed.activations / GIB:.1f} GiB (a worst-case bound: every row of a micro-batch of {cfg.batch_size} "
        f"{rows}{'' if cfg.autoregressive else ', with its noisy copy'}); "
        f"{available / GIB:.1f} GiB available on {device.type}"
    )
    if needed.states <= available:
        return line
    options = _options_that_fit(shape, cfg, available)
    raise InsufficientMemoryError(
        f"training needs {needed.states / GIB:.1f} GiB for weights, gradients and AdamW state alone "
        f"({needed.describe()}), but {device.type} has {available / GIB:.1f} GiB available. "
        + (
            f"Options that fit: {'; '.join(options)}."
            if options
            else "No single-device option fits: shard the states over several GPUs (DeepSpeed ZeRO-3 or FSDP2, "
            "see the README's multi-GPU section)."
        )
        + " (--set memory_check=false skips this check.)"
    )


def _options_that_fit(shape: ModelShape, cfg, available: int) -> list[str]:
    candidates = [
        (
            "--set vision_learning_rate=0 (freeze the vision tower)",
            dict(vision_learning_rate=0.0),
            False,
        ),
        ("--lora (LoRA: the language model frozen, low-rank updates)", {}, True),
    ]
    fits = []
    for label, changes, lora in candidates:
        states = training_estimate(shape, replace(cfg, **changes), lora=lora).states
        if states <= available:
            fits.append(f"{label}: {states / GIB:.1f} GiB")
    sharded = training_estimate(shape, cfg, lora=False).states
    for gpus in (2, 4, 8):
        if sharded / gpus <= available:
            fits.append(f"{gpus} GPUs with ZeRO-3 / FSDP2: ~{sharded / gpus / GIB:.1f} GiB each")
            break
    return fits
