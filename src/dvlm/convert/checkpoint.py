"""`dvlm convert`: an AR VLM checkpoint -> a block-diffusion VLM checkpoint.

A dVLM is the same network as its AR source. Conversion only adds the [MASK] token (tokenizer +
a mean-initialised embedding row, resizing only when no spare row exists) and writes the diffusion
recipe into config.json. It then proves itself: the written checkpoint, loaded back, must give the
source model's logits in causal mode (invariant 1). Nothing is written unless every check passes:
the output is assembled in a temporary directory and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import AddedToken
from torch import nn

from dvlm.config import DiffusionConfig
from dvlm.convert.registry import adapter_for_checkpoint, read_config
from dvlm.convert.verify import causal_logits, max_logit_difference, probe_input
from dvlm.data.processor import ChatProcessor, load_tokenizer
from dvlm.model.wrapper import DIFFUSION_CONFIG_KEY, load
from dvlm.runtime import pick_device

REPORT_FILE = "dvlm_conversion.json"


class ConversionError(RuntimeError):
    """The converted model failed its equivalence check; nothing was written."""


@dataclass
class ConversionReport:
    source: str
    output: str
    architecture: str
    preset: str
    block_size: int
    mask_token: str
    mask_token_id: int
    embeddings_resized: bool
    max_logit_difference: float
    tolerance: float
    parameters: int


def check_source(src: Path) -> str:
    """Validate a source checkpoint directory; returns its architecture name."""
    config = read_config(src)  # missing directory / config.json errors
    adapter_for_checkpoint(src)  # unsupported architecture error, naming the supported ones
    if DIFFUSION_CONFIG_KEY in config:
        raise ValueError(f"{src} is already a converted dVLM (its config.json has '{DIFFUSION_CONFIG_KEY}')")
    if not list(src.glob("*.safetensors")):
        found = sorted(p.name for p in src.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        raise ValueError(
            f"{src} has no .safetensors weights{' (found ' + ', '.join(found) + ')' if found else ''}; dvlm "
            "loads weights only from safetensors. Re-save the model with save_pretrained(safe_serialization=True)."
        )
    return config["architectures"][0]


def check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty; pass --overwrite to replace it")


def add_mask_token(model: nn.Module, tokenizer: Any, token: str) -> tuple[int, bool]:
    """Make sure `token` exists with an embedding row; returns (its id, whether rows were added).

    The new row (input and, when untied, output) is the mean of the existing tokens' rows, so the
    mask embedding starts "in distribution" instead of at an arbitrary unused row.
    """
    known = len(tokenizer)
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    mask_id = tokenizer.convert_tokens_to_ids(token)
    rows = model.get_input_embeddings().weight.shape[0]
    resized = mask_id >= rows
    if resized:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    real = torch.arange(min(known, rows))  # rows of actual tokens: padded spare rows are not averaged
    real = real[real != mask_id]  # a mask token that already existed does not average itself
    with torch.no_grad():
        for table in _embedding_tables(model):
            table[mask_id] = table[real].mean(dim=0)
    return mask_id, resized


def _embedding_tables(model: nn.Module) -> list[torch.Tensor]:
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)
    return tables


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    *,
    preset: str = "fast-dvlm",
    block_size: int | None = None,
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    device: str | None = None,
    tolerance: float | None = None,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert `src` (local AR checkpoint) into a dVLM at `out`; see the module docstring."""
    src, out = Path(src), Path(out)
    architecture = check_source(src)
    if src.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"output {out} would replace the source checkpoint {src}; choose another directory")
    check_output(out, overwrite)
    settings = dict(overrides or {})
    if block_size is not None:
        settings["block_size"] = block_size
    diffusion = DiffusionConfig.from_preset(preset, **settings)  # invalid settings fail before any work

    log(f"loading {architecture} from {src}")
    source = load(src, device=device, dtype="auto" if pick_device(device).type == "cuda" else "float32")
    tokenizer = load_tokenizer(src)
    processor = ChatProcessor(tokenizer, source.processor.image_processor)
    probe = probe_input(processor)
    reference = causal_logits(source.adapter, source.model, probe, processor.pad_token_id)

    mask_id, resized = add_mask_token(source.model, tokenizer, diffusion.mask_token)
    diffusion.mask_token_id = mask_id
    diffusion.eos_token_ids = processor.eos_token_ids
    diffusion.pad_token_id = processor.pad_token_id
    setattr(source.model.config, DIFFUSION_CONFIG_KEY, diffusion.to_dict())
    log(f"added {diffusion.mask_token!r} as id {mask_id} ({'resized embeddings' if resized else 'spare row'})")

    tmp = out.parent / f".{out.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        source.model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        processor.image_processor.save_pretrained(tmp)
        converted = load(tmp, device=device, dtype=str(source.model.dtype).removeprefix("torch."))
        logits = causal_logits(converted.adapter, converted.model, probe, processor.pad_token_id)
        diff = max_logit_difference(reference, logits, [mask_id])
        tol = tolerance if tolerance is not None else (1e-4 if source.model.dtype == torch.float32 else 2e-2)
        if diff > tol:
            raise ConversionError(f"converted model differs from the source: max |logit diff| {diff:.3g} > {tol:g}")
        log(f"verified: causal logits match the source (max |diff| {diff:.2e} <= {tol:g})")
        report = ConversionReport(
            source=str(src), output=str(out), architecture=architecture, preset=preset,
            block_size=diffusion.block_size, mask_token=diffusion.mask_token, mask_token_id=mask_id,
            embeddings_resized=resized, max_logit_difference=diff, tolerance=tol,
            parameters=sum(p.numel() for p in converted.model.parameters()),
        )
        (tmp / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report
