"""How much memory a training run needs, known before the weights load, and what would make it fit.

Training holds four things: the weights, a gradient per trained weight, AdamW's two moments per
trained weight, and the activations of one micro-batch kept for the backward pass. The first three
follow exactly from the parameter counts and the dtypes; they are counted here on a model built on
PyTorch's meta device (no memory, no weights read). The activations are an estimate: per token and
layer, the tensors a decoder layer keeps for its backward (about ten hidden-size vectors and four
intermediate-size ones), the attention weights where the kernel keeps them, and the fp32 logits of
the labelled tokens. `benchmarks/train_layout.py` measures the real peak beside this estimate.

A 3.75B-parameter Qwen2.5-VL-3B shape needs 16 bytes per trained parameter in fp32 with AdamW
(weights 4, gradient 4, moments 8): about 60 GB, 52 GB with the vision tower frozen (frozen
weights cost their 4 bytes and nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass
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
            f"{name} {getattr(self, name) / GIB:.1f}"
            for name in ("weights", "gradients", "optimizer", "activations")
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
    attention = (
        2 * shape.num_heads * longest_row * longest_row * rows
        if attention_weights_kept
        else 0
    )
    if (
        gradient_checkpointing
    ):  # each layer keeps its input; one layer at a time is recomputed whole
        layers = (
            tokens * shape.hidden_size * shape.num_layers
            + tokens * per_token_layer
            + attention
        )
    else:
        layers = (tokens * per_token_layer + attention) * shape.num_layers
    logits = (
        3 * labelled_tokens * shape.vocab_size * FP32
    )  # logits, log-softmax, their gradient (fp32 CE)
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
    with open(
        "/proc/meminfo"
    ) as meminfo:  # Linux; MemAvailable counts reclaimable cache
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("cannot read the available memory from /proc/meminfo")
