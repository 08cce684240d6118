"""A chat as dvlm takes it, before any model family lays it out, and what a family adds.

Every input form of a request (a prompt string with images, ``<image>`` placeholders in a string,
OpenAI-style messages with image parts, a LLaVA record) becomes a list of turns whose parts are
text pieces and image slots, in the user's order (`to_turns`). A family's `ChatFormat` then says
what the checkpoint adds: its chat template (which lays the turns out, `dvlm.data.template`), its
special tokens, what an image becomes (its tensors and how many image tokens stand for it), and its
position ids. The chat processor
(`dvlm.data.processor`) joins the two; a family's adapter builds its `ChatFormat`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvlm.data.images import ImageSource
from dvlm.data.positions import PositionScheme
from dvlm.data.vision import VisionInputs

if TYPE_CHECKING:
    from dvlm.data.template import ChatTemplate

ROLES = ("system", "user", "assistant")
"""The roles of a chat's messages."""
HUMAN, GPT = "human", "gpt"
"""The speakers of a LLaVA record's user and assistant turns (its "from" values)."""
SPEAKER_ROLES = {HUMAN: "user", "user": "user", GPT: "assistant", "assistant": "assistant", "system": "system"}
"""LLaVA record speakers (and the role names themselves) -> chat roles."""
IMAGE_PLACEHOLDER = "<image>"
"""Where an image goes in a text (LLaVA's convention); its image tokens replace it."""

Messages = str | Sequence[Mapping[str, Any]]


@dataclass
class ImageSlot:
    """Where an image goes in a turn; ``source`` None means "the next image of ``images``"."""

    source: ImageSource | None = None


@dataclass(frozen=True)
class ImagePart:
    """An image in a turn handed to the family's layout: the number of image tokens it takes."""

    tokens: int


@dataclass
class Turn:
    role: str
    parts: list[str | ImageSlot]


class ChatFormat:
    """What one model family adds to a chat. Its adapter builds one from the checkpoint's tokenizer,
    image processor and chat template (`Adapter.chat_format`); everything else about encoding (input
    forms, placeholders, loading images, refusing special tokens typed as text, rendering the chat
    through the template, labels, length limits) is the chat processor's and the same for every family.

    Subclasses give `image_token_id`, `structure_token_ids` and `process_images`, and pass their
    position scheme. The layout itself is the chat template (`dvlm.data.template`): the checkpoint's
    own, or the family's when the checkpoint has none (then with the family's default system prompt).
    """

    def __init__(self, tokenizer: Any, image_processor: Any, positions: PositionScheme, template: ChatTemplate,
                 default_system_prompt: str | None = None) -> None:
        """`default_system_prompt`: the system turn the chat processor adds to a chat that has none
        (None for a checkpoint's own template, which adds its own default, if any)."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.positions = positions
        self.template = template
        self.default_system_prompt = default_system_prompt

    @property
    def image_token_id(self) -> int:
        """The token whose positions receive image features (the one the template writes per image)."""
        raise NotImplementedError

    def structure_token_ids(self) -> dict[str, int]:
        """The special tokens the layout itself uses, by name (none of them may become the mask token)."""
        raise NotImplementedError

    def process_images(self, images: list[Any]) -> tuple[VisionInputs, list[int]]:
        """Run the image processor on one sample's images (RGB PIL, in order; never empty).

        Returns the tensors for the vision tower and the number of image tokens of each image."""
        raise NotImplementedError

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an answer as far as the chat knows: the token the template ends an assistant
        turn with (what training teaches), then the tokenizer's eos, deduplicated."""
        eos = self.tokenizer.eos_token_id
        return list(dict.fromkeys([self.end_of_turn_token_id, *([int(eos)] if eos is not None else [])]))

    @functools.cached_property
    def end_of_turn_token_id(self) -> int:
        """The special token the chat template ends an assistant turn with (what training teaches)."""
        from dvlm.data.template import end_of_turn_token

        return int(self.tokenizer.convert_tokens_to_ids(end_of_turn_token(self.template, self.tokenizer,
                                                                          self.special_tokens_pattern)))

    @functools.cached_property
    def special_tokens_pattern(self) -> re.Pattern[str] | None:
        """Matches any special token of the tokenizer (longest first) but the ``<image>`` placeholder
        (placeholders are split out of texts before they are encoded); None if it has none."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}).values()
        tokens = {t.content for t in added if t.special} | set(self.tokenizer.all_special_tokens)
        tokens -= {IMAGE_PLACEHOLDER}
        tokens = sorted((t for t in tokens if t), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its eos."""
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)


def message_parts(index: int, content: Any) -> list[str | ImageSlot]:
    """Parts of one OpenAI-style message content (a string or a list of typed parts)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, Sequence):
        raise ValueError(f"message {index}: content must be a string or a list of parts, "
                         f"got {type(content).__name__}")
    parts: list[str | ImageSlot] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str):
                raise ValueError(f"message {index}: image_url part without a url string")
            parts.append(ImageSlot(url))
        elif kind == "image":
            parts.append(ImageSlot(part.get("image")))
        else:
            raise ValueError(f"message {index}: unsupported content part {part!r} "
                             "(expected type text, image_url or image)")
    return parts


def to_turns(messages: Messages, images: Sequence[ImageSource] | None) -> list[Turn]:
    """Normalise the accepted formats into turns whose image slots all carry a source."""
    extra = list(images or [])
    if isinstance(messages, str):
        if not messages and not extra:
            raise ValueError("empty prompt and no images")
        # A plain prompt without placeholders gets its images before the text.
        slots = [] if IMAGE_PLACEHOLDER in messages else [ImageSlot() for _ in extra]
        turns = [Turn("user", [*slots, messages])]
    else:
        if isinstance(messages, Mapping):
            raise ValueError("messages must be a prompt string or a list of messages, not a dict")
        if len(messages) == 0:
            raise ValueError("empty conversation: no messages")
        turns = []
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, Mapping) else None
            if role not in ROLES:
                raise ValueError(f"message {index}: unknown role {role!r} (expected {ROLES})")
            turns.append(Turn(role, message_parts(index, message.get("content"))))
    return bind_images(turns, extra)


def split_placeholders(text: str) -> list[str | ImageSlot]:
    """Text with ``<image>`` placeholders -> text pieces and empty image slots, in order.

    The canonical layout is the family's chat template: an image's tokens are followed directly
    by the text. A LLaVA record writes the placeholder on a line of its own, so one line break
    right after a placeholder, or right before a placeholder that ends the text, belongs to the
    placeholder and is dropped::

        "<image>\\nWhat is this?"  -> [slot, "What is this?"]
        "What is this?\\n<image>"  -> ["What is this?", slot]
        "A <image> and <image>."   -> ["A ", slot, " and ", slot, "."]
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[str | ImageSlot] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append(ImageSlot())
            piece = piece.removeprefix("\n")
        if k == len(pieces) - 2 and pieces[-1] == "":
            piece = piece.removesuffix("\n")
        if piece:
            parts.append(piece)
    return parts


def bind_images(turns: list[Turn], extra: list[ImageSource]) -> list[Turn]:
    """Expand ``<image>`` placeholders and hand ``extra`` images to the empty slots, in order."""
    queue = iter(extra)
    wanted = 0
    for turn in turns:
        parts: list[str | ImageSlot] = []
        for part in turn.parts:
            parts.extend(split_placeholders(part) if isinstance(part, str) else [part])
        for part in parts:
            if isinstance(part, ImageSlot) and part.source is None:
                wanted += 1
                part.source = next(queue, None)
        turn.parts = parts
    if wanted != len(extra):
        raise ValueError(f"{wanted} image placeholder(s) ({IMAGE_PLACEHOLDER!r} or image parts "
                         f"without data) but {len(extra)} image(s) given")
    return turns
