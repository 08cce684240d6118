"""A Hugging Face checkpoint directory as dvlm reads it: config.json, the processor's files,
safetensors weights, shards, dtype."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS_INDEX = "model.safetensors.index.json"
"""A sharded checkpoint's map of tensor names to shard files."""
GENERATION_CONFIG = "generation_config.json"
"""The checkpoint's generation defaults; dvlm reads only its end tokens (`eos_token_id`)."""
PROCESSOR_FILES = {"preprocessor_config.json": "the image processor's settings",
                   "tokenizer_config.json": "the tokenizer's settings"}
"""Files of a checkpoint's processor that dvlm needs, and what they hold."""


class CheckpointError(ValueError):
    """A checkpoint directory is incomplete or damaged; the message names the file at fault."""


def read_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict, with clear errors for a missing or bad directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model directory {p} does not exist")
    if not p.is_dir():
        raise NotADirectoryError(f"model path {p} is not a directory")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{p} has no config.json: is it a Hugging Face checkpoint directory?")
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{cfg} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg} must hold a JSON object, not {type(config).__name__}")
    return config


def read_generation_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json as a dict; {} when it has none."""
    file = Path(path) / GENERATION_CONFIG
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object, not {type(config).__name__}")
    return config


def declared_eos_token_ids(config: dict[str, Any], generation: dict[str, Any]) -> list[int]:
    """The end tokens a checkpoint declares, in order, deduplicated: config.json's `eos_token_id` (top
    level, then its text_config's), then generation_config.json's; each one id, a list, or absent.
    (transformers' `generate` stops on generation_config.json's, config.json's when it has none.)"""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    found: list[int] = []
    for source, value in (("config.json", config.get("eos_token_id")), ("config.json text_config",
                          text.get("eos_token_id")), (GENERATION_CONFIG, generation.get("eos_token_id"))):
        values = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise CheckpointError(f"{source}: eos_token_id must be a token id or a list of token ids, got {value!r}")
        found += values
    return list(dict.fromkeys(found))


def check_processor_files(path: str | Path) -> None:
    """A CheckpointError naming the first processor file the directory lacks (`PROCESSOR_FILES`)."""
    for name, what in PROCESSOR_FILES.items():
        if not (Path(path) / name).is_file():
            raise CheckpointError(f"{path} has no {name} ({what}); copy it from the model the checkpoint "
                                  "came from, or re-save the processor with save_pretrained")


def check_weights(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files, each with a readable header; dvlm loads nothing else.

    Raises CheckpointError naming the file for missing, empty, truncated or corrupt weights."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        found = sorted(f.name for f in p.iterdir() if f.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        raise CheckpointError(
            f"{p} has no .safetensors weights{' (found ' + ', '.join(found) + ')' if found else ''}; dvlm "
            "loads weights only from safetensors. Re-save the model with save_pretrained(safe_serialization=True).")
    for file in weight_files(p):
        try:
            with safe_open(file, "pt"):  # parses the header and checks it covers the whole file
                pass
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file ({err}); the checkpoint is "
                                  "truncated or damaged") from err
    return files


def weight_files(src: Path) -> list[Path]:
    """The safetensors files holding the weights: those the index names, else every one."""
    index = src / WEIGHTS_INDEX
    if not index.is_file():
        return sorted(src.glob("*.safetensors"))
    try:
        files = sorted({src / name for name in json.loads(index.read_text())["weight_map"].values()})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index} is not a valid shard index (a 'weight_map' object): {err!r}") from err
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} names shard(s) missing from {src}: {', '.join(missing)}")
    return files


def saved_dtype(config: dict[str, Any]) -> str | None:
    """The dtype a checkpoint's weights were saved in (`dtype`, or the older `torch_dtype`, at the top
    level or in `text_config`), e.g. "bfloat16"; None when config.json does not say."""
    for section in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, str):
                return value.removeprefix("torch.")
    return None
