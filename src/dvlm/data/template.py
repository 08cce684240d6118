"""A checkpoint's chat template: where it is found, and a chat rendered through it into token ids.

The layout of every chat is the checkpoint's own Jinja chat template, rendered exactly as
transformers renders it (`render_jinja_template`, the engine of `apply_chat_template`), then
tokenized as one string, so dvlm's prompt ids are the ids transformers' processor gives. Where the
template is found, in transformers' own order (the processor's template first, then the tokenizer's):

1. ``processor_config.json`` ``"chat_template"``;
2. ``chat_template.json`` ``"chat_template"`` (the processor's, where most published VLMs keep it);
3. ``chat_template.jinja``;
4. the tokenizer's (``tokenizer_config.json`` ``"chat_template"``).

Labels: a chat is rendered once whole and once up to each assistant turn, so the characters of each
answer are known; an answer's tokens and the tokens up to and including the special token that
ends its turn are trained, nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dvlm.data.chat import ImagePart

TEMPLATE_FILES = ("processor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer_config.json")
"""Where a checkpoint's chat template may be, in the order transformers looks."""
IMAGE_CONTENT = {"type": "image"}
"""An image in a message's content, as chat templates test for it (HF's image part)."""


class TemplateError(ValueError):
    """The chat template cannot render a chat, or renders it in a way dvlm cannot label."""


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and where it came from (a file of the checkpoint, or the family's default)."""

    text: str
    source: str
    fallback: bool = False
    """True for a family's default layout (the checkpoint carries no template): nothing to write back."""


def find_chat_template(path: str | Path, tokenizer: Any) -> ChatTemplate | None:
    """The chat template a checkpoint directory carries (module docstring's order), None if none."""
    path = Path(path)
    for name in ("processor_config.json", "chat_template.json"):
        text = _json_template(path / name)
        if text:
            return ChatTemplate(text, name)
    if (path / "chat_template.jinja").is_file():
        return ChatTemplate((path / "chat_template.jinja").read_text(encoding="utf-8"), "chat_template.jinja")
    return tokenizer_template(tokenizer, "tokenizer_config.json")


def tokenizer_template(tokenizer: Any, source: str = "the tokenizer") -> ChatTemplate | None:
    """The tokenizer's own chat template (its "default" one when it has several), None if none."""
    text = getattr(tokenizer, "chat_template", None)
    if isinstance(text, dict):
        text = text.get("default")
    return ChatTemplate(text, source) if isinstance(text, str) and text else None


def _json_template(file: Path) -> str | None:
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TemplateError(f"{file} is not valid JSON: {err}") from err
    text = data.get("chat_template") if isinstance(data, dict) else None
    return text if isinstance(text, str) and text else None


# -- rendering ---------------------------------------------------------------------------------------


def template_messages(turns: Sequence[tuple[str, Sequence[str | ImagePart]]]) -> list[dict[str, Any]]:
    """(role, parts) turns -> the messages a chat template takes: content always a list of typed parts
    (templates such as llava-hf's read only lists), an image as ``{"type": "image"}``."""
    return [{"role": role, "content": [{"type": "text", "text": p} if isinstance(p, str) else dict(IMAGE_CONTENT)
                                       for p in parts]}
            for role, parts in turns]


def render(template: ChatTemplate, tokenizer: Any, messages: list[dict[str, Any]], *,
           add_generation_prompt: bool) -> str:
    """The chat as the template renders it (transformers' renderer, the tokenizer's special tokens as
    template variables, as `apply_chat_template` passes them)."""
    from jinja2 import TemplateError as JinjaError
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=template.text,
                                            add_generation_prompt=add_generation_prompt,
                                            **tokenizer.special_tokens_map)
    except JinjaError as err:
        raise TemplateError(f"the chat template ({template.source}) cannot render this chat: {err}") from err
    return rendered[0]


@dataclass(frozen=True)
class Span:
    """Characters [start, end) of a rendered chat."""

    start: int
    end: int


def trained_spans(template: ChatTemplate, tokenizer: Any, messages: list[dict[str, Any]], rendered: str,
                  end_pattern: re.Pattern[str]) -> list[Span]:
    """The characters trained in `rendered` (the whole chat rendered without a generation prompt):
    each assistant answer through the special token that ends its turn (`end_pattern` matches the
    tokenizer's special tokens)."""
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(template, tokenizer, messages[:k], add_generation_prompt=False) if k else ""
        through = render(template, tokenizer, messages[:k + 1], add_generation_prompt=False)
        if not (rendered.startswith(through) and through.startswith(before)):
            raise TemplateError(f"the chat template ({template.source}) renders a chat's first turns differently "
                                "from the whole chat; dvlm cannot tell which tokens are the answers")
        spans.append(answer_span(template, before, through, answer_text(message), end_pattern))
    return spans


def answer_text(message: dict[str, Any]) -> str:
    return "".join(part["text"] for part in message["content"] if part["type"] == "text")


def answer_span(template: ChatTemplate, before: str, through: str, answer: str,
                end_pattern: re.Pattern[str]) -> Span:
    """Where the answer of the turn `through[len(before):]` is, through the special token ending the turn
    (the answer's last occurrence in its turn: a turn's header may repeat the answer's words; a template
    may strip the answer's outer whitespace)."""
    if not answer.strip():
        raise TemplateError("an assistant turn has an empty answer: nothing to train")
    found = [(through.rfind(text, len(before)), text) for text in (answer, answer.strip())]
    start, text = next(((i, t) for i, t in found if i >= 0), (-1, answer))
    if start < 0:
        raise TemplateError(f"the chat template ({template.source}) does not render an assistant answer verbatim")
    end = end_pattern.search(through, start + len(text))
    if end is None:
        raise TemplateError(f"the chat template ({template.source}) ends an assistant turn with no special token: "
                            "training could not teach the model where an answer ends")
    return Span(start, end.end())


def in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """Per token (its character offsets), whether it overlaps a trained span."""
    return [any(start < span.end and span.start < end for span in spans) for start, end in offsets]


def encode_chat(template: ChatTemplate, tokenizer: Any, turns: Sequence[tuple[str, Sequence[str | ImagePart]]],
                image_token_id: int, end_pattern: re.Pattern[str], *,
                add_generation_prompt: bool) -> tuple[list[int], list[bool]]:
    """Token ids of a chat rendered by `template` and whether each is trained.

    The rendered text is tokenized whole (as transformers' processor does; pieces tokenized apart
    could merge differently), then each image's one image token is repeated as many times as the
    image takes (`ImagePart.tokens`), in order, as the processor's image-token expansion does."""
    messages = template_messages(turns)
    whole = render(template, tokenizer, messages, add_generation_prompt=False)
    spans = trained_spans(template, tokenizer, messages, whole, end_pattern)
    rendered = render(template, tokenizer, messages, add_generation_prompt=True) if add_generation_prompt else whole
    if not rendered.startswith(whole):
        raise TemplateError(f"the chat template ({template.source}) renders a chat differently with a generation "
                            "prompt than without one")
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    ids, trained = list(encoded["input_ids"]), in_spans(encoded["offset_mapping"], spans)
    counts = [p.tokens for _, parts in turns for p in parts if isinstance(p, ImagePart)]
    return expand_images(ids, trained, image_token_id, counts, template)


def expand_images(ids: list[int], trained: list[bool], image_token_id: int, counts: list[int],
                  template: ChatTemplate) -> tuple[list[int], list[bool]]:
    """Repeat the k-th image token counts[k] times (image tokens are never trained)."""
    slots = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(slots) != len(counts):
        raise TemplateError(f"the chat template ({template.source}) rendered {len(slots)} image token(s) for "
                            f"{len(counts)} image(s)")
    out_ids: list[int] = []
    out_trained: list[bool] = []
    start = 0
    for slot, count in zip(slots, counts):
        out_ids += ids[start:slot] + [image_token_id] * count
        out_trained += trained[start:slot] + [False] * count
        start = slot + 1
    return out_ids + ids[start:], out_trained + trained[start:]


PROBE_QUESTION, PROBE_ANSWER = "dvlm probe question", "dvlm probe answer"


def end_of_turn_token(template: ChatTemplate, tokenizer: Any, end_pattern: re.Pattern[str]) -> str:
    """The special token that ends an assistant turn in this template."""
    messages = template_messages([("user", [PROBE_QUESTION]), ("assistant", [PROBE_ANSWER])])
    before = render(template, tokenizer, messages[:1], add_generation_prompt=False)
    through = render(template, tokenizer, messages, add_generation_prompt=False)
    span = answer_span(template, before, through, PROBE_ANSWER, end_pattern)
    match = end_pattern.search(through, span.start + len(PROBE_ANSWER))
    return match.group()
