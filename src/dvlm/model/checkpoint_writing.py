"""What a checkpoint dvlm writes carries besides its weights, tokenizer and image processor: the
chat template in use, the source's generation_config.json, and the source's shard layout.

transformers finds a chat template in three files: `chat_template.jinja` (read by the tokenizer and
the processor in 5.x), `chat_template.json` (the processor's older file, which a processor prefers
when both exist) and `tokenizer_config.json` (older tokenizers). A checkpoint laid out as published
may hold its multimodal template in `chat_template.json` alone (some llava-hf conversions): saving
the tokenizer alone would drop it, and `apply_chat_template` would then fail on image messages.
So the template in use, the processor's (which dvlm's adapters follow, as transformers' processor
does), is written where both the tokenizer and the processor read it, and to `chat_template.json`
too when the source had one.

generation_config.json holds what transformers' `generate` stops on (`eos_token_id`, often a list of
several end tokens) and the publisher's sampling defaults; it is copied from the source as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from dvlm.data.template import ChatTemplate
from dvlm.model.checkpoint_files import WEIGHTS_INDEX, CheckpointError, weight_files

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""The chat template file transformers 5 tokenizers and processors both read."""
PROCESSOR_TEMPLATE_FILE = "chat_template.json"
"""The processor's older chat template file ({"chat_template": ...}); a processor prefers it."""
GENERATION_CONFIG_FILE = "generation_config.json"


def write_chat_template(out: Path, template: ChatTemplate, source: Path | None) -> None:
    """Give `out` the chat template dvlm lays chats out with (`dvlm.data.template.find_chat_template`'s,
    see the module docstring): in chat_template.jinja, and in chat_template.json too when the source
    had that file (a processor prefers it), so that every reader of `out` renders the same layout. A
    family's default layout (no template in the source) is not written."""
    if template.fallback:
        return
    (out / CHAT_TEMPLATE_FILE).write_text(template.text, encoding="utf-8")
    legacy = None if source is None else source / PROCESSOR_TEMPLATE_FILE
    if legacy is not None and legacy.is_file():
        try:
            fields = json.loads(legacy.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{legacy} is not valid JSON: {err}") from err
        fields = fields if isinstance(fields, dict) else {}
        (out / PROCESSOR_TEMPLATE_FILE).write_text(json.dumps({**fields, "chat_template": template.text}, indent=2),
                                                   encoding="utf-8")


def copy_generation_config(out: Path, source: Path) -> None:
    """`source`'s generation_config.json, as it is (its end tokens, its publisher's settings); without
    one, what transformers wrote from the model's config stays."""
    if (source / GENERATION_CONFIG_FILE).is_file():
        shutil.copyfile(source / GENERATION_CONFIG_FILE, out / GENERATION_CONFIG_FILE)


def write_companions(out: Path, template: ChatTemplate, source: str | Path | None) -> None:
    """The chat template in use, and the generation config of `source` (the checkpoint directory the
    model came from, if any), into `out`."""
    source = Path(source) if source is not None and Path(source).is_dir() else None
    write_chat_template(out, template, source)
    if source is not None:
        copy_generation_config(out, source)


def max_shard_bytes(source: Path) -> int | None:
    """The size of the source's largest shard, so that a copy is sharded alike; None when the source
    is a single file (the copy then stays one file)."""
    if not (source / WEIGHTS_INDEX).is_file():
        return None
    return max(p.stat().st_size for p in weight_files(source))


def shard_size_like(source: Path, state: dict[str, Any]) -> int:
    """`max_shard_size` for writing `state` sharded as `source` is: its largest shard's bytes, or
    the whole of `state` (one file) when the source is one file."""
    return max_shard_bytes(source) or sum(t.numel() * t.element_size() for t in state.values())


def declare_dtype(out: Path, dtype_name: str) -> None:
    """Make `out`'s config.json name `dtype_name` as the weights' dtype, at the top level and in every
    sub-config that names one. transformers writes the model's dtype at the top level but leaves a
    sub-config's as the model was loaded (a model cast after loading), and a sharded model's own
    dtype where the weights written were cast from a gathered state dict."""
    path = out / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = dtype_name
    for section in config.values():
        if isinstance(section, dict) and "dtype" in section:
            section["dtype"] = dtype_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
