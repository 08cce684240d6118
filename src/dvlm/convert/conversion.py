"""`dvlm convert`: an AR VLM checkpoint -> a block-diffusion VLM checkpoint.

A dVLM is the same network as its AR source. Conversion only adds the [MASK] token (tokenizer +
a mean-initialised embedding row) and writes the diffusion recipe into config.json. It then proves
itself: the written checkpoint, loaded back, must give the source model's logits in causal mode
(invariant 1). The output keeps the source's dtype (unless `dtype` says otherwise), its sharded
layout, its chat template and its generation_config.json. The check computes in the dtype the
device runs that dtype in (`dvlm.runtime.pick_dtype`: float32 on a CPU for float16, and for
bfloat16 where the CPU lacks bfloat16 instructions). The output is assembled in a temporary
directory that replaces `out` only once every check has passed (`dvlm.atomic`): a failed or
killed conversion never leaves a half-written or half-deleted model, and the next run removes
what a killed one left behind.

The mask token is either new (a spare embedding row if the table has one, else the table grows)
or an existing added special token the chat never uses; any other token would have its rows
overwritten, so it is refused.
"""

from __future__ import annotations

import gc
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from tokenizers import AddedToken
from torch import nn

from dvlm.atomic import atomic_directory, recover
from dvlm.config import DTYPES, ConfigError, DiffusionConfig
from dvlm.convert.verify import causal_logits, max_logit_difference, probe_input
from dvlm.data.chat import IMAGE_PLACEHOLDER
from dvlm.data.processor import ChatProcessor
from dvlm.model.adapters.base import Adapter
from dvlm.model.adapters.registry import adapter_for_checkpoint
from dvlm.model.checkpoint_files import (
    check_weights,
    read_config,
    read_generation_config,
    saved_dtype,
    weight_files,
)
from dvlm.model.checkpoint_writing import shard_size_like
from dvlm.model.loaded import LoadedModel, end_token_ids, has_recipe, save_model, write_recipe
from dvlm.model.quantize import RECIPE_KEY as QUANTIZATION_RECIPE
from dvlm.runtime import dtype_name, pick_device, pick_dtype

REPORT_FILE = "dvlm_conversion.json"
FP32_TOLERANCE = 1e-4
HALF_PRECISION_ULPS = 4
"""16-bit tolerance, in units in the last place of the largest logit (see half_precision_tolerance)."""
# safetensors dtypes an unquantized checkpoint stores (I64/BOOL: index buffers, never weights).
UNQUANTIZED_STORAGE = {"F64", "F32", "F16", "BF16", "I64", "BOOL"}
# Where the mask token's embedding row came from -> how the report describes it.
MASK_ROWS = {
    "spare": "a new token in a spare row of the embedding table",
    "resized": "the embedding table was resized to hold it",
    "special": "an existing special token the chat does not use; its row was re-initialised",
}


class ConversionError(RuntimeError):
    """The conversion could not be verified (non-finite or differing logits); nothing was written."""


@dataclass
class ConversionReport:
    source: str
    output: str
    architecture: str
    preset: str
    block_size: int
    mask_token: str
    mask_token_id: int
    mask_row: str  # a MASK_ROWS key
    dtype: str
    shards: int
    max_logit_difference: float
    tolerance: float
    parameters: int
    verified_in: str = "float32"
    """The dtype the check computed in (the written dtype, or float32 where the device is slow in it)."""

    @property
    def mask_row_description(self) -> str:
        return MASK_ROWS[self.mask_row]


@dataclass(frozen=True)
class MaskSlot:
    token_id: int
    row: str  # a MASK_ROWS key


# -- the source ------------------------------------------------------------------------------------


def check_source(src: Path) -> str:
    """Validate a source checkpoint directory; returns its architecture name."""
    config = read_config(src)  # missing directory / config.json errors
    adapter_for_checkpoint(src)  # unsupported architecture error, naming the supported ones
    if has_recipe(config):
        raise ValueError(f"{src} is already a converted dVLM (its config.json holds a diffusion recipe)")
    check_weights(src)  # safetensors only, each with a readable header
    check_not_quantized(src, config)
    return config["architectures"][0]


def check_not_quantized(src: Path, config: dict[str, Any]) -> None:
    """Refuse quantized weights: conversion must copy weights exactly, and transformers would
    otherwise dequantize some formats silently (or fail deep inside a quantizer)."""
    for where in (config, config.get("text_config")):
        if isinstance(where, dict) and "quantization_config" in where:
            settings = where["quantization_config"]
            method = settings.get("quant_method", "unknown method") if isinstance(settings, dict) else settings
            raise ValueError(f"{src} is quantized (quantization_config: {method}); dvlm converts only "
                             "unquantized float checkpoints: convert the original bf16/fp32 model")
    if QUANTIZATION_RECIPE in config:
        # Its weights are float and the recipe would be copied: verification would compare the float
        # source with a converted copy that dvlm.load quantizes, and report a quantization error
        # as a conversion error (or, within tolerance, "verify" a model it never ran as saved).
        raise ValueError(f"{src} is a `dvlm quantize` output ({QUANTIZATION_RECIPE} in config.json); convert its "
                         "full-precision source, then quantize the converted model")
    for file in weight_files(src):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                stored = f.get_slice(name).get_dtype()
                if stored not in UNQUANTIZED_STORAGE:
                    raise ValueError(f"{src} holds {stored} tensors ({name} in {file.name}): quantized weights? "
                                     "dvlm converts only unquantized float checkpoints")


def conversion_dtype(requested: str, src: Path, log: Callable[[str], None]) -> str:
    """`auto`: the source's dtype, so a bf16 checkpoint is neither doubled in memory nor on disk."""
    names = [d for d in DTYPES if d != "auto"]
    if requested != "auto":
        if requested not in names:
            raise ValueError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
        return requested
    declared = saved_dtype(read_config(src))
    if declared is None:
        log("config.json declares no dtype: converting in float32 (pass --dtype to choose)")
        return "float32"
    if declared not in names:
        raise ValueError(f"{src} has dtype {declared!r}, not one of {', '.join(names)}; "
                         "pass --dtype to convert to one of them")
    return declared


# -- the mask token --------------------------------------------------------------------------------


def chat_tokens(processor: ChatProcessor, config: dict[str, Any]) -> dict[str, str]:
    """Tokens the chat or the model use -> why: none of them may become the mask token."""
    tokenizer = processor.tokenizer
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    used = {by_id[i]: "eos" for i in processor.eos_token_ids}
    used.setdefault(by_id[processor.pad_token_id], "pad")
    for role, token in (("unk", tokenizer.unk_token), ("bos", tokenizer.bos_token)):
        if token:
            used.setdefault(token, role)
    for i in processor.format.structure_token_ids().values():
        used.setdefault(by_id[i], "chat token")
    used.setdefault(IMAGE_PLACEHOLDER, "image placeholder")
    template = tokenizer.chat_template or ""
    template = " ".join(template.values()) if isinstance(template, dict) else template
    for added in tokenizer.added_tokens_decoder.values():
        if added.content in template:
            used.setdefault(added.content, "chat template")
    for key, i in config_token_ids(config):
        if i in by_id:
            used.setdefault(by_id[i], f"config.json {key}")
    return used


def config_token_ids(config: dict[str, Any]) -> list[tuple[str, int]]:
    """Every `*_token_id(s)` and `*_token_index` of config.json and its sub-configs (image, video,
    vision tokens...; some families name their token ids `image_token_index`)."""
    found = []
    for where in [config, *(v for v in config.values() if isinstance(v, dict))]:
        for key, value in where.items():
            if re.fullmatch(r".+_token_(ids?|index)", key):
                found += [(key, i) for i in (value if isinstance(value, list) else [value]) if isinstance(i, int)]
    return found


def check_mask_token(tokenizer: Any, token: str, used: dict[str, str]) -> bool:
    """Whether `token` already exists; raises ConfigError unless it may become the mask token."""
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        return False
    choose = f"choose a token absent from the vocabulary (default {DiffusionConfig.mask_token!r}) or an " \
             "added special token the chat does not use"
    if token in used:
        raise ConfigError(f"mask_token {token!r} (id {vocab[token]}) is used by the chat ({used[token]}); {choose}")
    added = {t.content: t for t in tokenizer.added_tokens_decoder.values()}
    if token not in added:
        raise ConfigError(f"mask_token {token!r} is an ordinary token of the vocabulary (id {vocab[token]}): "
                          f"its embedding and lm_head rows would be overwritten; {choose}")
    if not added[token].special:
        raise ConfigError(f"mask_token {token!r} is an added token but not a special one (id {vocab[token]}): "
                          f"ordinary text may contain it; {choose}")
    return True


def add_mask_token(adapter: Adapter, model: nn.Module, tokenizer: Any, token: str, used: dict[str, str]) -> MaskSlot:
    """Give `token` (new, or an unused special token) a mean-initialised embedding row.

    The row (input and, when untied, output) is the mean of the other tokens' rows, so the mask
    embedding starts "in distribution" instead of at an arbitrary unused row."""
    existed = check_mask_token(tokenizer, token, used)
    known = len(tokenizer)
    if not existed:
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    mask_id = tokenizer.convert_tokens_to_ids(token)
    rows = adapter.embedding_tables(model)[0].shape[0]
    row = "resized" if mask_id >= rows else "special" if existed else "spare"
    if row == "resized":
        adapter.resize_vocabulary(model, mask_id + 1)
    real = torch.arange(min(known, rows))  # rows of actual tokens: padded spare rows are not averaged
    real = real[real != mask_id]  # a mask token that already existed does not average itself
    with torch.no_grad():
        for table in adapter.embedding_tables(model):  # a tied lm_head shares the input table's rows
            table[mask_id] = table[real].mean(dim=0)
    return MaskSlot(mask_id, row)


# -- verification ------------------------------------------------------------------------------------


def half_precision_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest |logit difference| accepted in bf16/fp16: HALF_PRECISION_ULPS units in the last
    place of the largest |logit| (at least 1).

    The written weights are bit-exact copies and the hidden states come from the same kernels;
    only the lm_head matmul may change its accumulation order (one more column when the table
    grows, another device kernel), which moves a 16-bit logit by about one unit in its last place,
    at most eps·|logit|. A fixed bound cannot work: one bf16 ulp at |logit| 30 is 0.125. Four
    ulps leave margin for that and stay far below what a wrong row or weight changes."""
    return HALF_PRECISION_ULPS * torch.finfo(dtype).eps * max(1.0, float(reference.abs().max()))


def verification_tolerance(reference: torch.Tensor, dtype: torch.dtype) -> float:
    return FP32_TOLERANCE if dtype == torch.float32 else half_precision_tolerance(reference, dtype)


def require_finite_source(reference: torch.Tensor, dtype_name: str) -> None:
    """A source that gives NaN/inf cannot be verified against (every comparison with NaN is false)."""
    if bool(torch.isfinite(reference).all()):
        return
    hint = "float16 overflows easily: try --dtype bfloat16 or float32" if dtype_name == "float16" else \
        "its weights hold NaN/inf or are broken"
    raise ConversionError(f"the source model itself produces non-finite logits (NaN/inf) on the probe input "
                          f"in {dtype_name} ({hint}); nothing was written")


def require_match(diff: float, tol: float) -> None:
    # `nan > tol` is False: a non-finite difference must be refused explicitly.
    if not math.isfinite(diff) or diff > tol:
        raise ConversionError(f"converted model differs from the source: max |logit diff| {diff:.3g} > {tol:g}")


# -- the output ------------------------------------------------------------------------------------


def check_output(src: Path, out: Path, overwrite: bool) -> None:
    if src.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"output {out} would replace the source checkpoint {src}; choose another directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")


def remove_leftovers(out: Path) -> list[str]:
    """Finish what killed conversions to `out` left (`dvlm.atomic.recover`); one line per action."""
    return recover(out)


def save_converted(model: nn.Module, processor: ChatProcessor, tmp: Path, src: Path, dtype_name: str) -> int:
    """Write model (cast to `dtype_name` in place), tokenizer, image processor, chat template and
    generation config, sharded like the source; returns the shard count."""
    model.to(getattr(torch, dtype_name))
    save_model(model, processor, tmp, max_shard_size=shard_size_like(src, model.state_dict()), source=src)
    written = saved_dtype(read_config(tmp))
    if written != dtype_name:
        raise ConversionError(f"config.json was written with dtype {written!r}, weights in {dtype_name}")
    return len(weight_files(tmp))


# -- the conversion --------------------------------------------------------------------------------


@dataclass
class ConversionPlan:
    """What is settled before any weight is loaded (every cheap check has passed)."""

    architecture: str
    diffusion: DiffusionConfig
    dtype_name: str
    processor: ChatProcessor
    used_tokens: dict[str, str]


def plan_conversion(src: Path, out: Path, preset: str, settings: dict[str, Any], overwrite: bool,
                    dtype: str, log: Callable[[str], None]) -> ConversionPlan:
    architecture = check_source(src)
    for line in remove_leftovers(out):
        log(line)
    check_output(src, out, overwrite)
    diffusion = DiffusionConfig.from_preset(preset, **settings)  # invalid settings fail before any work
    dtype_name = conversion_dtype(dtype, src, log)
    processor = adapter_for_checkpoint(src).load_processor(src)
    used = chat_tokens(processor, read_config(src))
    check_mask_token(processor.tokenizer, diffusion.mask_token, used)
    diffusion.eos_token_ids = end_token_ids(processor.eos_token_ids, read_config(src), read_generation_config(src))
    diffusion.pad_token_id = processor.pad_token_id
    return ConversionPlan(architecture, diffusion, dtype_name, processor, used)


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    preset: str = "fast-dvlm",
    block_size: int | None = None,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    tolerance: float | None = None,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert `src` (local AR checkpoint) into a dVLM at `out`; see the module docstring.

    dtype: `auto` (the source's, from its config.json), `float32`, `bfloat16` or `float16`."""
    src, out = Path(src), Path(out)
    settings = dict(overrides or {}) | ({} if block_size is None else {"block_size": block_size})
    plan = plan_conversion(src, out, preset, settings, overwrite, dtype, log)
    processor, diffusion, dev = plan.processor, plan.diffusion, pick_device(device)
    stored = getattr(torch, plan.dtype_name)
    compute = pick_dtype("auto", dev, plan.dtype_name)  # the written dtype, unless the device is slow in it
    log(f"loading {plan.architecture} from {src} in {plan.dtype_name}"
        + ("" if compute == stored else f", verifying in {dtype_name(compute)}"))
    adapter = adapter_for_checkpoint(src)
    model = adapter.load_model(src, stored, dev)  # the weights as they will be written
    if compute != stored:
        model.to(compute)  # a lossless upcast (never a cast of the float32 buffers, such as RoPE's, down)
    probe = probe_input(processor)
    reference = causal_logits(adapter, model, probe, processor.pad_token_id)
    require_finite_source(reference, plan.dtype_name)
    mask = add_mask_token(adapter, model, processor.tokenizer, diffusion.mask_token, plan.used_tokens)
    diffusion.mask_token_id = mask.token_id
    write_recipe(model, diffusion)
    log(f"added {diffusion.mask_token!r} as id {mask.token_id} ({MASK_ROWS[mask.row]})")
    parameters = sum(p.numel() for p in model.parameters())

    with atomic_directory(out) as tmp:
        shards = save_converted(model, processor, tmp, src, plan.dtype_name)
        del model  # free the source before loading the written copy: memory stays near one copy
        gc.collect()
        converted = LoadedModel.load(tmp, device=device, dtype=dtype_name(compute))
        logits = causal_logits(converted.adapter, converted.model, probe, processor.pad_token_id)
        diff = max_logit_difference(reference, logits, [mask.token_id])
        tol = tolerance if tolerance is not None else verification_tolerance(reference, compute)
        require_match(diff, tol)
        log(f"verified: causal logits match the source (max |diff| {diff:.2e} <= {tol:g})")
        report = ConversionReport(
            source=str(src), output=str(out), architecture=plan.architecture, preset=preset,
            block_size=diffusion.block_size, mask_token=diffusion.mask_token, mask_token_id=mask.token_id,
            mask_row=mask.row, dtype=plan.dtype_name, shards=shards, max_logit_difference=diff,
            tolerance=tol, parameters=parameters, verified_in=dtype_name(compute),
        )
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
