"""Loading a checkpoint's tokenizer safely: local files only, never code shipped with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer


class UnsafeCheckpointError(ValueError):
    """A checkpoint asks to run code it ships (``auto_map``); dvlm never does."""


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt")
"""A checkpoint's tokenizer vocabulary lives in at least one of these."""


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local checkpoint directory, never running code shipped with it.

    transformers would import a checkpoint's own tokenizer module when ``tokenizer_config.json``
    maps the class to one (``auto_map``), after asking on stdin; dvlm refuses such a checkpoint
    outright and tells transformers never to trust remote code, so nothing is asked or run."""
    vocabulary = [name for name in TOKENIZER_FILES if (Path(path) / name).is_file()]
    if not vocabulary:
        raise FileNotFoundError(f"{path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                                "copy them from the model the checkpoint came from")
    config_file = Path(path) / "tokenizer_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{config_file} is not valid JSON: {err}") from err
        if isinstance(config, dict) and "auto_map" in config:
            raise UnsafeCheckpointError(
                f"{config_file} maps the tokenizer to code shipped in the checkpoint (auto_map); dvlm never "
                "runs checkpoint code. Remove 'auto_map' if the tokenizer is a standard one.")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
