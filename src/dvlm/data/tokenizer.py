"""Loading a checkpoint's tokenizer safely, and reading what its chat template does.

The chat structure is Qwen's (``CHAT_TOKEN_STRINGS``); the processor builds prompts token by token
and takes only the default system prompt from the tokenizer's own template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Field of ChatTokenIds -> the token string it is looked up by.
CHAT_TOKEN_STRINGS = {"im_start": "<|im_start|>", "im_end": "<|im_end|>",
                      "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
                      "image_pad": "<|image_pad|>"}


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


class _FromTemplate:
    """Marker: take the default system prompt from the tokenizer's chat template."""


FROM_TEMPLATE = _FromTemplate()
_PROBE_TEXT = "dvlm-probe"


def template_system_prompt(tokenizer: Any) -> str | None:
    """The system prompt the tokenizer's chat template adds to a chat that has none.

    Qwen2.5-VL's template adds "You are a helpful assistant."; Qwen3-VL's and dvlm's built-in
    models' add none. Without a chat template: the Qwen default, ``DEFAULT_SYSTEM_PROMPT``.
    """
    if not getattr(tokenizer, "chat_template", None):
        return DEFAULT_SYSTEM_PROMPT
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _PROBE_TEXT}], tokenize=False)
    prefix = rendered.split(f"{CHAT_TOKEN_STRINGS['im_start']}user", 1)[0]
    head, end = f"{CHAT_TOKEN_STRINGS['im_start']}system\n", f"{CHAT_TOKEN_STRINGS['im_end']}\n"
    if not prefix:
        return None
    if not (prefix.startswith(head) and prefix.endswith(end)):
        raise ValueError(f"the tokenizer's chat template starts a chat with {prefix!r}, not a Qwen "
                         "system turn; dvlm's ChatProcessor cannot follow it")
    return prefix[len(head):-len(end)]


