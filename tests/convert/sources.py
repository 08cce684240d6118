"""Source checkpoints for the conversion tests: tiny random models of a family (the reference one
unless told) in every layout the tests need (padded table, untied head, 16-bit, sharded, broken
weights, extra special tokens)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tokenizers import AddedToken

from dvlm.model.adapters.base import Adapter, TinyShape
from dvlm.model.adapters.registry import reference_adapter
from dvlm.zoo.tiny import tiny_image_processor
from dvlm.zoo.tokenizer import build_tokenizer

SHAPE = TinyShape(initializer_range=0.3)
INDEX_FILE = "model.safetensors.index.json"


def quiet(_: str) -> None:
    pass


def build_checkpoint(out: Path, tokenizer: Any, *, adapter: Adapter | None = None, extra_rows: int = 0,
                     tied: bool = True, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                     poison: float | None = None) -> Path:
    """Write a random tiny checkpoint of `adapter`'s family (default: the reference family).
    `poison`: a value (NaN, inf) written into one MLP weight."""
    template = (adapter or reference_adapter()).random_model(tokenizer, SHAPE)  # the family's class and config
    config = template.config
    config.get_text_config().vocab_size = len(tokenizer) + extra_rows
    if not tied:
        config.tie_word_embeddings = config.get_text_config().tie_word_embeddings = False
    torch.manual_seed(1)
    model = type(template)(config).to(dtype)
    if poison is not None:
        with torch.no_grad():
            model.model.language_model.layers[0].mlp.down_proj.weight[0, 0] = poison
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out)
    tiny_image_processor(adapter=adapter).save_pretrained(out)
    return out


def tokenizer_with(token: str, *, special: bool) -> Any:
    """The built-in tokenizer plus one added token (special or not), as Qwen's tokenizer has many."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)], special_tokens=special)
    return tokenizer


def shard_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.glob("*.safetensors"))


def tensor_dtypes(path: Path) -> set[str]:
    """The dtypes stored in a checkpoint's safetensors files (read from their headers)."""
    found = set()
    for file in path.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            found |= {f.get_slice(name).get_dtype() for name in f.keys()}
    return found


def config_dtypes(path: Path) -> dict[str, str]:
    """Every dtype field of config.json: top level and each sub-config."""
    config = json.loads((path / "config.json").read_text())
    found = {"": config.get("dtype")}
    found |= {name: sub.get("dtype") for name, sub in config.items() if isinstance(sub, dict) and "dtype" in sub}
    return found


def data_bytes(file: Path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the header."""
    with file.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return file.stat().st_size - 8 - header


def tensor_count(file: Path) -> int:
    with safe_open(file, "pt") as f:
        return len(list(f.keys()))


def dead_pid() -> int:
    """The id of a process that has just exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)
