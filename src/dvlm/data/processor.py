"""The chat processor: chats with images -> `Encoded` samples, the same code for every model family.

It takes every input form (`dvlm.data.chat`), loads and checks the images, and asks the family's
`ChatFormat` for the rest: the chat template the turns are rendered through (`dvlm.data.template`:
transformers' renderer, the text tokenized whole), the image tensors and image-token counts, and the
position ids. Only each assistant answer and the token ending its turn are labelled; everything
else is IGNORE_INDEX.
Special tokens typed as text are refused, in prompts and answers alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dvlm.data.chat import (
    ChatFormat,
    ImagePart,
    ImageSlot,
    Messages,
    Turn,
    to_turns,
)
from dvlm.data.images import DEFAULT_LIMITS, ImageLimits, ImageSource, load_image
from dvlm.data.positions import PositionScheme
from dvlm.data.template import TemplateError, encode_chat
from dvlm.data.vision import VisionInputs

IGNORE_INDEX = -100
"""The label of a token that is not trained (anything but an answer span, and padding)."""


def response_mask(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(..., L) bool: the trained (answer) tokens, within `attention_mask` when given."""
    response = labels != IGNORE_INDEX
    return response if attention_mask is None else response & attention_mask


class PromptTooLongError(ValueError):
    """An encoded sample is longer than ``max_length`` (samples are never silently truncated)."""

    def __init__(self, length: int, limit: int, message: str | None = None):
        super().__init__(message or f"encoded sample has {length} tokens, more than max_length={limit}")
        self.length = length
        self.limit = limit


@dataclass
class Encoded:
    """One encoded sample (no batch dimension)."""

    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long, IGNORE_INDEX where not trained
    mm_token_type_ids: torch.Tensor  # (L,) long, 1 at image tokens, else 0
    position_ids: torch.Tensor  # (A, L) long, the family's position ids (A axes, dvlm.data.positions)
    next_position: int  # the position id of the token after the sample (the first generated one)
    vision: VisionInputs | None  # the sample's images as its family's vision tower takes them

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class _FromFormat:
    """Marker: take the default system prompt from the family's chat format (its tokenizer's template)."""


FROM_FORMAT = _FromFormat()


class ChatProcessor:
    """Encodes chats with images into :class:`Encoded` samples, laid out by a family's ChatFormat."""

    def __init__(self, format: ChatFormat, *, system_prompt: str | None | _FromFormat = FROM_FORMAT,
                 max_length: int | None = None, allow_remote_images: bool = False,
                 image_limits: ImageLimits = DEFAULT_LIMITS):
        """``system_prompt``: the system turn added when a chat has none; by default the format's (None
        for a checkpoint's own template, which adds its own default system turn, if any)."""
        self.format = format
        self.system_prompt = format.default_system_prompt if isinstance(system_prompt, _FromFormat) else system_prompt
        self.max_length = max_length
        self.allow_remote_images = allow_remote_images
        self.image_limits = image_limits

    @property
    def tokenizer(self) -> Any:
        return self.format.tokenizer

    @property
    def image_processor(self) -> Any:
        return self.format.image_processor

    @property
    def positions(self) -> PositionScheme:
        return self.format.positions

    def save_pretrained(self, path: str | Path) -> None:
        """Save tokenizer and image processor so that the family's adapter reloads them."""
        self.format.save_pretrained(path)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an answer (the family's: e.g. its end-of-turn token and the tokenizer's eos)."""
        return self.format.eos_token_ids

    @property
    def pad_token_id(self) -> int:
        return self.format.pad_token_id

    def decode(self, token_ids: torch.Tensor | Sequence[int], *,
               skip_special_tokens: bool = True) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def encode(self, messages: Messages, images: Sequence[ImageSource] | None = None, *,
               add_generation_prompt: bool = False) -> Encoded:
        """Encode a prompt string or an OpenAI-style message list (see `dvlm.data.chat`) through the
        chat template (`dvlm.data.template`).

        Raises:
            ValueError: malformed messages or placeholder/image count mismatch, special tokens typed
                as text, a chat the template cannot render (TemplateError).
            ImageError: an image cannot be loaded. PromptTooLongError: longer than max_length.
        """
        turns = to_turns(messages, images)
        if self.system_prompt is not None and turns[0].role != "system":
            turns.insert(0, Turn("system", [self.system_prompt]))
        sources = [p.source for t in turns for p in t.parts if isinstance(p, ImageSlot)]
        pil = [load_image(s, allow_remote=self.allow_remote_images, limits=self.image_limits) for s in sources]
        vision, counts = self.format.process_images(pil) if pil else (None, [])
        tokens = iter(counts)
        laid_out = [(turn.role, [self._checked(p) if isinstance(p, str) else ImagePart(next(tokens))
                                 for p in turn.parts]) for turn in turns]
        ids, trained = encode_chat(self.format.template, self.tokenizer, laid_out, self.format.image_token_id,
                                   self._end_pattern, add_generation_prompt=add_generation_prompt)
        if self.max_length is not None and len(ids) > self.max_length:
            raise PromptTooLongError(len(ids), self.max_length)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.tensor(trained, dtype=torch.bool), input_ids, IGNORE_INDEX)
        image_tokens = (input_ids == self.format.image_token_id).long()
        positions, next_position = self.positions.sample(image_tokens, vision)
        return Encoded(input_ids, labels, image_tokens, positions, next_position, vision)

    def _checked(self, text: str) -> str:
        """A piece of plain text (a prompt, a system prompt or a training answer), checked.

        One rule for every text: a special token's string inside it (an end-of-turn token, a pad
        or image token, the mask token, ...) is refused rather than rendered as that control token.
        Typed text must not end a turn, fake an image, or plant a mask."""
        pattern = self.format.special_tokens_pattern
        found = pattern.search(text) if pattern else None
        if found:
            raise ValueError(f"text contains the special token {found.group()!r}; special tokens cannot be "
                             "given as text")
        return text

    @property
    def _end_pattern(self) -> re.Pattern[str]:
        pattern = self.format.special_tokens_pattern
        if pattern is None:
            raise TemplateError("the tokenizer has no special tokens: nothing can end an assistant turn")
        return pattern
