"""Typed configuration: the diffusion recipe, decoding and training settings.

Every recipe element of DiffusionVL and Fast-dVLM is its own field, so an ablation is a flag, not
a fork. The presets (`fast-dvlm`, `diffusionvl`) only choose defaults. Configs are validated when
they are built: an invalid or unknown setting is an error that says what to change.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

BLOCK_LAYOUTS = ("response", "absolute")
CLEAN_ATTENTIONS = ("causal", "block_causal")
NOISY_STREAMS = ("response", "text", "all")
T_SAMPLINGS = ("uniform", "antithetic")
ANTITHETIC_ORDERS = ("permuted", "sequence")
LOSS_WEIGHTINGS = ("none", "inverse_t")
LOSS_NORMALISATIONS = ("tokens", "rows")
STEP_SCHEDULES = ("masks_left", "block_size")
TIE_BREAKS = ("lowest_index", "topk")
DECODERS = ("ar", "block", "spec", "spec-quadratic", "hf")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OBJECTIVES = ("diffusion", "autoregressive")
TRAINABLE = ("all", "projector")


class ConfigError(ValueError):
    """An invalid configuration value, with a message saying what to change."""


DEFAULT_THRESHOLD = 0.9
"""The confidence threshold of block decoding when neither the request nor the model says otherwise."""

SEED_LIMIT = 2**32
"""Seeds are in [0, SEED_LIMIT): derived per-step seeds stay inside torch's 64-bit generator range."""

MAX_BLOCK_SIZE = 256
"""Largest block size a decode may ask for: 8x the largest the papers decode with (32). A block is
the query of a forward, and its attention masks grow with its square."""

MAX_QUADRATIC_BLOCK_SIZE = 64
"""Largest block size of `spec-quadratic`, whose passes hold B + B*B positions (4160 at 64)."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {', '.join(choices)}")


def check_field_types(config: Any) -> None:
    """Refuse a field whose value does not have the field's annotated type.

    Every config calls this first in ``__post_init__``, so a value read from YAML, a ``--set``
    override, JSON or a checkpoint's config.json is checked like one typed in Python: ``2.5`` is
    not an ``int``, ``True`` is not a number, floats must be finite. An ``int`` is accepted where a
    ``float`` is expected.
    """
    hints = _field_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _has_type(value, hints[f.name]):
            raise ConfigError(f"{type(config).__name__}.{f.name}={value!r} is not valid: "
                              f"expected {_type_name(hints[f.name])}")


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (resolving them costs more than the checks)."""
    return typing.get_type_hints(cls)


def _has_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    names = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
             type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _check_seed(name: str, seed: int | None) -> None:
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{name} must be in [0, 2**32), got {seed}")


@dataclass
class DiffusionConfig:
    """The block-diffusion recipe of a converted model, stored in its `config.json` under `dvlm`."""

    preset: str = "fast-dvlm"
    """Name of the preset these defaults came from (informational once built)."""
    block_size: int = 16
    """B: tokens per diffusion block, the largest block used in training and the decoding default."""
    block_layout: str = "response"
    """`response`: blocks start at each response's first token and the last block of a response is
    truncated at its end (Fast-dVLM auto-truncation). `absolute`: block = position // B over the
    whole sequence (DiffusionVL)."""
    truncate_last_block: bool = True
    """Response layout: end each response's last block at the response's end (Fast-dVLM
    auto-truncation). False (the ablation of Fast-dVLM's Table 3): the block continues over the
    tokens that follow in the sequence, up to B positions or the row's end, so a turn's last block
    holds the start of the next turn, visible to its masked answer tokens and never scored, as
    blocks laid over a conversation without truncation do. Decoding is unchanged."""
    fill_last_block: bool = False
    """Response layout: pad each response's truncated last block, in the noisy stream only, to B
    positions with copies of the response's final token (its end-of-answer token), masked and
    scored like the others. Decoding always denoises whole blocks, so without it a short answer's
    block holds more masks than any training block did, and the mask count hints at a longer answer.
    dvlm's addition (off in both presets). On the built-in model it helps short answers (digits at
    B=16: +1.7 points per digit, +4.5 exact) and costs a little on long ones (captions: -0.5 F1
    points, 5.6 instead of 6.1 tokens/forward); see `dvlm.zoo.recipe`."""
    clean_attention: str = "causal"
    """Clean-stream (and KV-cache) attention: `causal` keeps the AR model's token-causal mask
    (Fast-dVLM); `block_causal` is bidirectional inside a block (BD3-LM, DiffusionVL)."""
    noisy_stream: str = "response"
    """What the noisy stream copies: `response` tokens only (vision-efficient concatenation),
    all `text` tokens, or `all` tokens including vision (DiffusionVL's duplication)."""
    token_shift: bool = True
    """Output i predicts token i+1 (the AR convention, Fast-dLLM v2); the first token of a block
    is then never masked: it is the seed produced by the previous commit."""
    t_sampling: str = "uniform"
    """Per-block masking rate t: independent `uniform` draws or stratified `antithetic` ones."""
    antithetic_order: str = "permuted"
    """Which block gets which stratum under `t_sampling='antithetic'` (ignored otherwise):
    `permuted` assigns the strata to the batch's blocks by a random permutation (dvlm);
    `sequence` gives stratum j to block j in row-major order over (row, block), so t rises along
    each sequence and from row to row (BD3-LM, DiffusionVL)."""
    eps_min: float = 1e-3
    """Lower bound of t (masking probability = eps_min + (eps_max - eps_min) * u)."""
    eps_max: float = 1.0
    """Upper bound of t."""
    complementary_mask: bool = True
    """Add a second noisy copy with the opposite mask, so every maskable token is masked once."""
    loss_weighting: str = "none"
    """`inverse_t` weights each masked token's CE by 1/t (BD3-LM ELBO weight, DiffusionVL)."""
    loss_normalisation: str = "tokens"
    """What the loss is divided by. `tokens`: the summed (weighted) CE of an optimizer step's whole
    accumulation window over the window's labelled tokens (dvlm). `rows`: each row's summed CE over
    that row's labelled tokens (at least 1), then the mean over the window's rows (LLaDA-V,
    DiffusionVL). The two agree only when every row holds equally many labelled tokens."""
    diffusion_loss_weight: float = 0.5
    """alpha: weight of the masked-diffusion CE on the noisy stream."""
    ar_loss_weight: float = 0.5
    """beta: weight of the next-token CE on the clean stream (needs causal clean attention)."""
    anneal_block_size: bool = True
    """Grow the training block size over {2, 4, ..., block_size} with training progress."""
    anneal_fraction: float = 0.5
    """Fraction of training over which the block size anneals (the rest uses block_size)."""
    decode_threshold: float | None = DEFAULT_THRESHOLD
    """Default confidence threshold tau of block decoding (None: use decode_steps)."""
    decode_steps: int | None = None
    """Default fixed number of denoising steps per block (DiffusionVL's static schedule)."""
    decode_steps_schedule: str = "masks_left"
    """How a fixed number of steps shares a block's masks out. `masks_left`: each pass unmasks
    ceil(masks left / steps left), so a block with fewer masks than B (a prompt tail in it, a seed)
    still spreads them over every step (dvlm). `block_size`: pass s unmasks B // steps tokens, one
    more in the first B % steps passes, at most the masks left: the counts of a full block
    whatever the block holds (DiffusionVL; 3 masks, B=8, 4 steps: 2 then 1)."""
    decode_tie_break: str = "lowest_index"
    """Fixed-step unmasking, which of equally confident masked positions goes first:
    `lowest_index` (dvlm) or `topk`: the order of `torch.topk` over the block (DiffusionVL), which
    depends on k and the device."""
    mask_token: str = "<|mask|>"
    """The mask token's string, added to the tokenizer at conversion when absent."""
    mask_token_id: int = -1
    """Filled in by `dvlm convert` from the tokenizer; -1 until then."""
    eos_token_ids: list[int] = field(default_factory=list)
    """End-of-answer ids, filled in by `dvlm convert` from the tokenizer."""
    pad_token_id: int = -1
    """Padding id, filled in by `dvlm convert` from the tokenizer."""

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_choice("block_layout", self.block_layout, BLOCK_LAYOUTS)
        _check_choice("clean_attention", self.clean_attention, CLEAN_ATTENTIONS)
        _check_choice("noisy_stream", self.noisy_stream, NOISY_STREAMS)
        _check_choice("t_sampling", self.t_sampling, T_SAMPLINGS)
        _check_choice("antithetic_order", self.antithetic_order, ANTITHETIC_ORDERS)
        _check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        _check_choice("loss_normalisation", self.loss_normalisation, LOSS_NORMALISATIONS)
        _check_choice("decode_steps_schedule", self.decode_steps_schedule, STEP_SCHEDULES)
        _check_choice("decode_tie_break", self.decode_tie_break, TIE_BREAKS)
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.eps_min < self.eps_max <= 1.0:
            raise ConfigError(f"need 0 < eps_min < eps_max <= 1, got {self.eps_min}, {self.eps_max}")
        if self.diffusion_loss_weight < 0 or self.ar_loss_weight < 0:
            raise ConfigError("loss weights must be >= 0")
        if self.diffusion_loss_weight + self.ar_loss_weight == 0:
            raise ConfigError("diffusion_loss_weight + ar_loss_weight must be > 0")
        if self.ar_loss_weight > 0 and self.clean_attention != "causal":
            raise ConfigError(
                "ar_loss_weight > 0 needs clean_attention='causal': with a block-causal clean stream "
                "a token sees the tokens it should predict. Set ar_loss_weight=0 or clean_attention=causal."
            )
        if self.block_layout == "absolute" and self.noisy_stream != "all":
            raise ConfigError(
                "block_layout='absolute' needs noisy_stream='all': an absolute block can hold prompt or "
                "vision tokens next to response tokens, and the noisy block must see them as decoding does."
            )
        if self.block_layout == "absolute" and self.token_shift:
            raise ConfigError(
                "block_layout='absolute' needs token_shift=False: with token shift each block's first "
                "token is an AR step from the previous block, which only the response layout decodes."
            )
        if not self.truncate_last_block and (self.block_layout != "response" or self.noisy_stream != "response"
                                             or self.fill_last_block):
            raise ConfigError(
                "truncate_last_block=False needs block_layout='response', noisy_stream='response' and "
                "fill_last_block=False: the last block continues over the following tokens instead of "
                "being truncated or filled, and only a response-only noisy stream lacks those tokens."
            )
        if self.fill_last_block and self.block_layout != "response":
            raise ConfigError("fill_last_block needs block_layout='response': absolute blocks are never truncated")
        if not 0.0 <= self.anneal_fraction <= 1.0:
            raise ConfigError(f"anneal_fraction must be in [0, 1], got {self.anneal_fraction}")
        if self.decode_threshold is not None and not 0.0 <= self.decode_threshold <= 1.0:
            raise ConfigError(f"decode_threshold must be in [0, 1], got {self.decode_threshold}")
        if self.decode_steps is not None and self.decode_steps < 1:
            raise ConfigError(f"decode_steps must be >= 1, got {self.decode_steps}")

    @classmethod
    def from_preset(cls, preset: str = "fast-dvlm", **overrides: Any) -> DiffusionConfig:
        """The preset's defaults with `overrides` applied (unknown keys are errors)."""
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return from_dict(cls, {"preset": preset, **PRESETS[preset], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    "fast-dvlm": {},  # the dataclass defaults are the Fast-dVLM recipe
    "diffusionvl": dict(
        block_size=8,
        block_layout="absolute",
        clean_attention="block_causal",
        noisy_stream="all",
        token_shift=False,
        t_sampling="antithetic",
        antithetic_order="sequence",
        complementary_mask=False,
        loss_weighting="inverse_t",
        loss_normalisation="rows",
        diffusion_loss_weight=1.0,
        ar_loss_weight=0.0,
        anneal_block_size=False,
        decode_threshold=None,
        decode_steps=8,
        decode_steps_schedule="block_size",
        decode_tie_break="topk",
    ),
}


@dataclass(frozen=True)
class Sampling:
    """How a row picks its tokens: the sampling arguments travel together as this one object."""

    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature)."""
    top_k: int | None = None
    """Sample from the k most likely tokens only."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens with cumulative probability >= top_p."""
    seed: int | None = None
    """Seed of the row's own random stream (reproducible sampling, whatever batch the row runs in)."""

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_seed("seed", self.seed)
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class DecodeConfig:
    """How to decode; `None` fields fall back to the model's DiffusionConfig defaults
    (`dvlm.decode.settings.resolve` fills them in, once). The fields are `generate`'s keywords and,
    with dashes, the decoding flags of the command line."""

    decoder: str = "block"
    """`ar` (our KV-cached loop), `block` (block diffusion), `spec` (self-speculative block
    decoding: lossless w.r.t. AR), `spec-quadratic` (experimental: `spec` with verify and the next
    draft fused into one pass of B + B*B tokens) or `hf` (transformers `generate`)."""
    max_new_tokens: int = 128
    """Upper bound on generated tokens per row (EOS stops a row earlier)."""
    block_size: int | None = None
    """Block size B for block decoding (default: the model's block_size)."""
    threshold: float | None = None
    """Unmask every position whose confidence >= threshold (at least one per step)."""
    steps: int | None = None
    """Instead of a threshold: a fixed number of denoising steps per block."""
    temperature: float = 0.0
    """0 = greedy; > 0 samples from softmax(logits / temperature)."""
    top_k: int | None = None
    """Sample from the k most likely tokens only."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens with cumulative probability >= top_p."""
    seed: int | None = None
    """Seed of the sampling generator (for reproducible sampling)."""
    sub_block_size: int | None = None
    """Block decoding: unmask only inside the first sub-block (of this many positions) that still
    has masks, left to right (Fast-dLLM v2 / Fast-dVLM use 8 with B=32). None: the whole block."""
    fuse_commit: bool = True
    """Block decoding with token shift: run each commit pass together with the next block's first
    denoising pass when the seed can be guessed (exact: the output does not change)."""
    fuse_prefill: bool = True
    """Run the first block's first denoising pass (block decoding without token shift) or the
    first draft (spec, spec-quadratic) in the prefill forward: one forward less per request, the
    same output (spec: AR's, whatever the draft). A token-shift block's first pass reads its seed,
    which the prefill itself predicts, so block decoding with token shift has nothing to fuse."""
    compile: bool = False
    """Run each step's forward under torch.compile with static shapes (`dvlm.decode.compiled`;
    CUDA graphs on a GPU); the same tokens as eager decoding, after a warm-up (compiling) per
    shape that is reported as `compile_s` and left out of tokens/s. Not for `hf`."""

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_choice("decoder", self.decoder, DECODERS)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.block_size is not None and self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")
        largest = MAX_QUADRATIC_BLOCK_SIZE if self.decoder == "spec-quadratic" else MAX_BLOCK_SIZE
        if self.block_size is not None and self.block_size > largest:
            raise ConfigError(f"block_size must be <= {largest} with decoder {self.decoder!r}, got {self.block_size}")
        if self.threshold is not None and self.steps is not None:
            raise ConfigError("give either threshold or steps, not both")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")
        if self.sub_block_size is not None and self.sub_block_size < 1:
            raise ConfigError(f"sub_block_size must be >= 1, got {self.sub_block_size}")
        Sampling(self.temperature, self.top_k, self.top_p, self.seed)  # checks them: one place for the rules

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p, self.seed)


LORA_DEFAULTS = {"r": 16, "alpha": 32, "dropout": 0.0}


class LoraSpecError(ConfigError):
    """A `--lora` setting that cannot be parsed."""


@dataclass(frozen=True)
class LoraSettings:
    """`--lora r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj`; targets are module-name suffixes,
    none meaning every linear layer of the language model and projector (not the vision encoder,
    not the output layer)."""

    r: int = LORA_DEFAULTS["r"]
    alpha: float = LORA_DEFAULTS["alpha"]
    dropout: float = LORA_DEFAULTS["dropout"]
    targets: tuple[str, ...] = field(default=())


def parse_lora(spec: str) -> LoraSettings:
    """`key=value` pairs separated by commas; an empty spec (or "default") takes every default."""
    values: dict[str, object] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item == "default":
            continue
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise LoraSpecError(f"LoRA setting {item!r} is not key=value (e.g. r=16,alpha=32)")
        values[key.strip()] = _lora_value(key.strip(), value.strip())
    settings = LoraSettings(**values)  # type: ignore[arg-type]
    if settings.r < 1 or settings.alpha <= 0 or not 0 <= settings.dropout < 1:
        raise LoraSpecError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1, got {spec!r}")
    return settings


def _lora_value(key: str, value: str) -> object:
    try:
        if key == "r":
            return int(value)
        if key in ("alpha", "dropout"):
            return float(value)
    except ValueError:
        raise LoraSpecError(f"LoRA {key} must be a number, got {value!r}") from None
    if key == "targets":
        return tuple(filter(None, value.split("+")))
    raise LoraSpecError(f"unknown LoRA setting {key!r}; known: r, alpha, dropout, targets")


@dataclass
class TrainConfig:
    """Diffusion fine-tuning settings (the recipe itself lives in the model's DiffusionConfig)."""

    learning_rate: float = 1e-4
    """Peak AdamW learning rate."""
    vision_learning_rate: float | None = None
    """Peak learning rate of the vision encoder (not the projector); None: learning_rate, 0: frozen.
    DiffusionVL trains its ViT at 1/5 of the LLM's rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Fraction of optimizer steps with linear warmup, followed by cosine decay."""
    min_lr_ratio: float = 0.0
    """Cosine decays to learning_rate * min_lr_ratio."""
    epochs: int = 1
    """Passes over the data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Total optimizer steps; overrides epochs."""
    batch_size: int = 4
    """Samples per micro-batch, per process (a step takes batch_size x processes x grad_accum)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    num_workers: int = 0
    """DataLoader worker processes that read, decode and encode the samples of the coming steps
    while the model trains (0: in the training process, when needed). Changes no batch."""
    report_to: str | None = None
    """Also send the metrics to "tensorboard" (RUN/tensorboard; needs the tensorboard package)."""
    group_by_length: bool = False
    """Put samples of similar length in the same steps (less padding): each epoch's shuffled order
    is cut into windows of 64 steps, each sorted by length (characters of text, plus a fixed
    amount per image) and dealt out longest step first; still a pure function of (seed, step)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    dtype: str = "float32"
    """Training compute dtype: float32 or bfloat16 (autocast; master weights stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    max_length: int | None = None
    """Samples longer than this (in tokens, image tokens included) are skipped and reported. None:
    the model's position limit (its config's `max_position_embeddings`), so that every sample the
    model can place trains (a photo tiled at a published model's real geometry can be ~2,900
    tokens); a resumed run keeps its own. How many samples exceed it is said before training starts."""
    seed: int = 0
    """Seed of data order, noise and initialisation of anything random."""
    log_every: int = 1
    """Optimizer steps between metric lines in metrics.jsonl."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = 2
    """How many step checkpoints to keep (older ones are deleted)."""
    objective: str = "diffusion"
    """`diffusion`: the model's block-diffusion recipe (its DiffusionConfig: masked-diffusion CE,
    plus the AR CE weighted by `ar_loss_weight`). `autoregressive`: plain next-token training
    (causal mask, no noise) of an AR model, as the built-in AR model is made before conversion.
    (Called `ar_loss: true` before; that key is refused with a pointer here.)"""
    memory_check: bool = True
    """Refuse to start when the weights and optimizer state alone exceed the device's free memory
    (`dvlm.train.memory`); the estimate is printed either way."""
    lora: str | None = None
    """LoRA fine-tuning instead of a full one, e.g. "r=16,alpha=32,dropout=0.05,targets=q_proj+v_proj"
    ("default": r=16, alpha=32, every linear layer of the language model); the mask token's rows
    train too, the vision encoder is frozen, and the final model has the updates merged in."""
    trainable: str = "all"
    """`all`: every parameter trains (the vision encoder at `vision_learning_rate`). `projector`:
    only the projector between vision encoder and language model trains, both frozen: the
    alignment stage of a model assembled from parts (`dvlm assemble`), with `objective: autoregressive`."""

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_seed("seed", self.seed)
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.vision_learning_rate is not None and self.vision_learning_rate < 0:
            raise ConfigError(f"vision_learning_rate must be >= 0, got {self.vision_learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "log_every", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0, got {self.save_every}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.report_to is not None:
            _check_choice("report_to", self.report_to, ("tensorboard",))
        _check_choice("dtype", self.dtype, ("float32", "bfloat16"))
        _check_choice("objective", self.objective, OBJECTIVES)
        if self.lora is not None:
            try:
                parse_lora(self.lora)
            except LoraSpecError as err:
                raise ConfigError(f"lora: {err}") from None
        _check_choice("trainable", self.trainable, TRAINABLE)
        if self.trainable == "projector" and self.vision_learning_rate is not None:
            raise ConfigError("vision_learning_rate has no effect with trainable='projector' (the vision encoder "
                              "is frozen); leave it unset")

    @property
    def autoregressive(self) -> bool:
        return self.objective == "autoregressive"


RENAMED_KEYS: dict[type, dict[str, str]] = {
    TrainConfig: {"ar_loss": "objective: autoregressive (ar_loss: true) or objective: diffusion (ar_loss: false)"},
}
"""Keys of earlier versions, per config class -> what to write instead (a clear error, not 'unknown key')."""

C = TypeVar("C")


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """Build a config dataclass from a dict, rejecting unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    renamed = RENAMED_KEYS.get(cls, {})
    for old in sorted(set(values) & set(renamed)):
        raise ConfigError(f"{cls.__name__}.{old} was renamed: write {renamed[old]}")
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys: {', '.join(sorted(names))}")
    return cls(**values)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse `key=value` strings (values are YAML scalars: 16, 0.9, true, null, [2, 4])."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not a YAML scalar ({err})") from err
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from a file, with a clear error for a missing or malformed file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping, got {type(data).__name__}")
    return data
