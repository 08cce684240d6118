"""`dvlm assemble`: a causal language model + a vision tower -> an AR VLM checkpoint (DiffusionVL's
second route, before alignment and conversion).

The family's adapter joins the parts with a fresh projector (`Adapter.assemble`); this module checks
the inputs and the output place first, writes the result whole or not at all (`dvlm.atomic`), and
proves it: the written checkpoint holds every weight of the parts bit for bit, and its tokenizer and
image processor make the family's chat format. It carries the family's chat template (the one its
tokenizer was given) and the language model's generation_config.json (its end tokens). Then
`dvlm train --trainable projector --ar` aligns the projector and `dvlm convert` makes a dVLM of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dvlm.atomic import recover, written_whole
from dvlm.config import DTYPES
from dvlm.convert.conversion import check_not_quantized, check_output
from dvlm.model.adapters.registry import adapter_for_architecture, assembling_architectures
from dvlm.model.checkpoint_files import check_weights, read_config
from dvlm.model.checkpoint_writing import copy_generation_config


@dataclass
class AssemblyReport:
    language_model: str
    vision_tower: str
    output: str
    architecture: str
    added_tokens: list[str]
    new_parameters: int
    parameters: int


def assembling_architecture(requested: str | None) -> str:
    """The architecture to assemble: `requested`, else the only one that can be assembled."""
    known = assembling_architectures()
    if requested is None and len(known) == 1:
        return known[0]
    if requested not in known:
        raise ValueError(f"architecture {requested!r} cannot be assembled from parts; choose one of {', '.join(known)}")
    return requested


def check_part(path: Path, flag: str) -> None:
    """A local, unquantized safetensors checkpoint (the adapter checks its architecture)."""
    try:
        config = read_config(path)
    except (FileNotFoundError, NotADirectoryError) as err:
        raise type(err)(f"{flag}: {err}") from err
    check_weights(path)
    check_not_quantized(path, config)


def assemble_checkpoint(language_model: str | Path, vision_tower: str | Path, out: str | Path, *,
                        architecture: str | None = None, seed: int = 0, dtype: str = "auto",
                        overwrite: bool = False, log: Callable[[str], None] = print) -> AssemblyReport:
    """Write to `out` a checkpoint of `architecture` made of the two parts; see the module docstring.

    dtype: `auto` (the language model's saved dtype), `float32`, `bfloat16` or `float16`."""
    language_model, vision_tower, out = Path(language_model), Path(vision_tower), Path(out)
    architecture = assembling_architecture(architecture)
    check_part(language_model, "--lm")
    check_part(vision_tower, "--vision")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    for line in recover(out):
        log(line)
    for part in (language_model, vision_tower):
        check_output(part, out, overwrite)
    adapter = adapter_for_architecture(architecture)
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    assembled = adapter.assemble(language_model, vision_tower, seed, torch_dtype, log)
    with written_whole(out) as tmp:
        assembled.model.save_pretrained(tmp, safe_serialization=True)
        assembled.tokenizer.save_pretrained(tmp)
        assembled.image_processor.save_pretrained(tmp)
        copy_generation_config(tmp, language_model)
        assembled.check_written(tmp)
        adapter.load_processor(tmp)  # the chat format takes the written tokenizer and image processor
    log(f"verified: every weight of both parts is in {out}, bit for bit")
    return AssemblyReport(str(language_model), str(vision_tower), str(out), architecture, assembled.added_tokens,
                          assembled.new_parameters, sum(p.numel() for p in assembled.model.parameters()))
