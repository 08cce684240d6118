"""dvlm's own Qwen2.5-VL chat processor: chat template, image tokens, labels, M-RoPE positions.

The combined HF ``Qwen2_5_VLProcessor`` needs torchvision, so the template is rebuilt here token
by token, which also makes the label boundaries exact::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>×n<|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

Only ``{answer}<|im_end|>`` of each assistant turn is labelled; everything else is -100.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
    Qwen2VLImageProcessorPil,
)

from dvlm.data.images import DEFAULT_LIMITS, ImageLimits, ImageSource, load_image
from dvlm.data.tokenizer import (
    CHAT_TOKEN_STRINGS,
    FROM_TEMPLATE,
    _FromTemplate,
    load_tokenizer,
    template_system_prompt,
)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
TEXT_TOKEN_TYPE, IMAGE_TOKEN_TYPE = 0, 1

Messages = Union[str, Sequence[Mapping[str, Any]]]


class PromptTooLongError(ValueError):
    """An encoded sample is longer than ``max_length`` (samples are never silently truncated)."""

    def __init__(self, length: int, limit: int, message: str | None = None):
        super().__init__(message or f"encoded sample has {length} tokens, more than max_length={limit}")
        self.length = length
        self.limit = limit



@dataclass(frozen=True)
class ChatTokenIds:
    """Ids of the chat-structure special tokens, looked up by their strings in the tokenizer."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatTokenIds":
        # get_vocab, not convert_tokens_to_ids: the latter maps a missing token to <unk> silently.
        vocab = tokenizer.get_vocab()
        missing = [s for s in CHAT_TOKEN_STRINGS.values() if s not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen chat special token(s) {missing}; "
                             "dvlm's ChatProcessor needs a Qwen2-VL style tokenizer")
        return cls(**{field: vocab[s] for field, s in CHAT_TOKEN_STRINGS.items()})


@dataclass
class Encoded:
    """One encoded sample (no batch dimension)."""

    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long, IGNORE_INDEX where not trained
    mm_token_type_ids: torch.Tensor  # (L,) long, 1 at <|image_pad|>, else 0
    position_ids: torch.Tensor  # (3, L) long, M-RoPE (temporal, height, width)
    rope_delta: int  # max position + 1 - L: the next token's position is L + rope_delta
    pixel_values: torch.Tensor | None  # (num_patches, C*temporal_patch*patch*patch) float
    image_grid_thw: torch.Tensor | None  # (num_images, 3) long, in patches before merging

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def mrope_position_ids(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                       image_grid_thw: torch.Tensor | None,
                       spatial_merge_size: int) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids of one sequence, as Qwen2.5-VL's ``get_rope_index`` for images.

    Text tokens advance all three coordinates by 1. An image of grid (t, h, w) patches covers
    t·(h/m)·(w/m) tokens (m = spatial_merge_size) placed on a (t, h/m, w/m) grid offset by the
    current position; afterwards the current position advances by max(h/m, w/m).
    Example, m=2, two text tokens, one image of grid (1, 4, 6) (6 tokens), one text token::

        type      0 0  1 1 1 1 1 1  0
        temporal  0 1  2 2 2 2 2 2  5
        height    0 1  2 2 2 3 3 3  5
        width     0 1  2 3 4 2 3 4  5      rope_delta = 5 + 1 - 9 = -3

    Args:
        input_ids: (L,) token ids (only the shape and device are used).
        mm_token_type_ids: (L,) 0 for text, 1 for image tokens.
        image_grid_thw: (num_images, 3) or None, one row per image block in order.
    Returns:
        position_ids (3, L) long and rope_delta (int).
    """
    types = mm_token_type_ids.tolist()
    if input_ids.shape != mm_token_type_ids.shape or input_ids.dim() != 1:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and mm_token_type_ids "
                         f"{tuple(mm_token_type_ids.shape)} must be the same 1-D shape")
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    length = len(types)
    positions = torch.empty(3, length, dtype=torch.long)
    current, i, image = 0, 0, 0
    while i < length:
        if types[i] == TEXT_TOKEN_TYPE:
            end = i
            while end < length and types[end] == TEXT_TOKEN_TYPE:
                end += 1
            positions[:, i:end] = torch.arange(current, current + end - i)
            current += end - i
        elif types[i] == IMAGE_TOKEN_TYPE:
            if image >= len(grids):
                raise ValueError(f"image tokens at {i} but only {len(grids)} image_grid_thw rows")
            t, h, w = grids[image]
            h, w = h // spatial_merge_size, w // spatial_merge_size  # merged grid
            end = i + t * h * w
            # Blocks are consumed by their grid size, so adjacent images stay separate.
            if types[i:end] != [IMAGE_TOKEN_TYPE] * (t * h * w):
                raise ValueError(f"image {image} needs {t * h * w} image tokens from {i}")
            grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            positions[:, i:end] = torch.stack(grid).reshape(3, -1) + current
            current += max(h, w)
            image += 1
        else:
            raise ValueError(f"unsupported mm_token_type {types[i]} at {i} (images only)")
        i = end
    if image != len(grids):
        raise ValueError(f"{len(grids)} image_grid_thw rows but {image} image blocks")
    rope_delta = int(positions.max()) + 1 - length if length else 0
    return positions.to(input_ids.device), rope_delta


@dataclass
class _ImageSlot:
    """Where an image goes in a turn; ``source`` None means "the next image of ``images``"."""

    source: ImageSource | None = None


@dataclass
class _Turn:
    role: str
    parts: list[Union[str, _ImageSlot]]


def _message_parts(index: int, content: Any) -> list[Union[str, _ImageSlot]]:
    """Parts of one OpenAI-style message content (a string or a list of typed parts)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, Sequence):
        raise ValueError(f"message {index}: content must be a string or a list of parts, "
                         f"got {type(content).__name__}")
    parts: list[Union[str, _ImageSlot]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, Mapping) else url
            if not isinstance(url, str):
                raise ValueError(f"message {index}: image_url part without a url string")
            parts.append(_ImageSlot(url))
        elif kind == "image":
            parts.append(_ImageSlot(part.get("image")))
        else:
            raise ValueError(f"message {index}: unsupported content part {part!r} "
                             "(expected type text, image_url or image)")
    return parts


def _to_turns(messages: Messages, images: Sequence[ImageSource] | None) -> list[_Turn]:
    """Normalise the accepted formats into turns whose image slots all carry a source."""
    extra = list(images or [])
    if isinstance(messages, str):
        if not messages and not extra:
            raise ValueError("empty prompt and no images")
        # A plain prompt without placeholders gets its images before the text.
        slots = [] if IMAGE_PLACEHOLDER in messages else [_ImageSlot() for _ in extra]
        turns = [_Turn("user", [*slots, messages])]
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
            turns.append(_Turn(role, _message_parts(index, message.get("content"))))
    return _bind_images(turns, extra)


def split_placeholders(text: str) -> list[Union[str, _ImageSlot]]:
    """Text with ``<image>`` placeholders -> text pieces and empty image slots, in order.

    The canonical layout is the family's chat template: an image's tokens are followed directly
    by the text (``<|vision_end|>What is this?``). A LLaVA record writes the placeholder on a line
    of its own, so one line break right after a placeholder, or right before a placeholder that
    ends the text, belongs to the placeholder and is dropped::

        "<image>\\nWhat is this?"  -> [slot, "What is this?"]
        "What is this?\\n<image>"  -> ["What is this?", slot]
        "A <image> and <image>."   -> ["A ", slot, " and ", slot, "."]
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[Union[str, _ImageSlot]] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            parts.append(_ImageSlot())
            piece = piece.removeprefix("\n")
        if k == len(pieces) - 2 and pieces[-1] == "":
            piece = piece.removesuffix("\n")
        if piece:
            parts.append(piece)
    return parts


def _bind_images(turns: list[_Turn], extra: list[ImageSource]) -> list[_Turn]:
    """Expand ``<image>`` placeholders and hand ``extra`` images to the empty slots, in order."""
    queue = iter(extra)
    wanted = 0
    for turn in turns:
        parts: list[Union[str, _ImageSlot]] = []
        for part in turn.parts:
            parts.extend(split_placeholders(part) if isinstance(part, str) else [part])
        for part in parts:
            if isinstance(part, _ImageSlot) and part.source is None:
                wanted += 1
                part.source = next(queue, None)
        turn.parts = parts
    if wanted != len(extra):
        raise ValueError(f"{wanted} image placeholder(s) ({IMAGE_PLACEHOLDER!r} or image parts "
                         f"without data) but {len(extra)} image(s) given")
    return turns


class ChatProcessor:
    """Encodes chats with images into :class:`Encoded` samples for Qwen2.5-VL style models."""

    def __init__(self, tokenizer: Any, image_processor: Any, *,
                 system_prompt: str | None | _FromTemplate = FROM_TEMPLATE, max_length: int | None = None,
                 allow_remote_images: bool = False, image_limits: ImageLimits = DEFAULT_LIMITS):
        """``system_prompt``: the system turn added when a chat has none; by default the one the
        tokenizer's own chat template adds (none if it adds none), else ``DEFAULT_SYSTEM_PROMPT``."""
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.system_prompt = (template_system_prompt(tokenizer) if isinstance(system_prompt, _FromTemplate)
                              else system_prompt)
        self.max_length = max_length
        self.allow_remote_images = allow_remote_images
        self.image_limits = image_limits
        self.token_ids = ChatTokenIds.from_tokenizer(tokenizer)
        self.merge_size = int(image_processor.merge_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "ChatProcessor":
        """Load the tokenizer and image processor from a local directory (never from a hub)."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a local directory; dvlm loads processors "
                                    "from local directories only")
        tokenizer = load_tokenizer(path)
        # Explicit PIL class: AutoImageProcessor would pick the torchvision backend when
        # torchvision is importable; both produce the same pixel_values and grids.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, local_files_only=True)
        return cls(tokenizer, image_processor, **kwargs)

    def save_pretrained(self, path: str | Path) -> None:
        """Save tokenizer and image processor so that :meth:`from_pretrained` reloads them."""
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end an answer: ``<|im_end|>`` and the tokenizer's eos (deduplicated)."""
        ids = [self.token_ids.im_end]
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else ``<|endoftext|>``, else eos."""
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        fallback = self.tokenizer.get_vocab().get("<|endoftext|>", self.tokenizer.eos_token_id)
        if fallback is None:
            raise ValueError("tokenizer has no pad token, no <|endoftext|> and no eos token")
        return int(fallback)

    def decode(self, token_ids: torch.Tensor | Sequence[int], *,
               skip_special_tokens: bool = True) -> str:
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.tolist()
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def encode(self, messages: Messages, images: Sequence[ImageSource] | None = None, *,
               add_generation_prompt: bool = False) -> Encoded:
        """Encode a prompt string or an OpenAI-style message list (see module docstring).

        Raises:
            ValueError: malformed messages or placeholder/image count mismatch.
            ImageError: an image cannot be loaded. PromptTooLongError: longer than max_length.
        """
        turns = _to_turns(messages, images)
        if self.system_prompt is not None and turns[0].role != "system":
            turns.insert(0, _Turn("system", [self.system_prompt]))
        sources = [p.source for t in turns for p in t.parts if isinstance(p, _ImageSlot)]
        pil = [load_image(s, allow_remote=self.allow_remote_images, limits=self.image_limits) for s in sources]
        pixel_values, image_grid_thw = self._process_images(pil)
        counts = iter([] if image_grid_thw is None else self._image_token_counts(image_grid_thw))
        ids: list[int] = []
        labels: list[int] = []
        for turn in turns:
            self._append_turn(turn, counts, ids, labels)
        if add_generation_prompt:
            header = [self.token_ids.im_start, *self._text("assistant\n")]
            ids += header
            labels += [IGNORE_INDEX] * len(header)
        if self.max_length is not None and len(ids) > self.max_length:
            raise PromptTooLongError(len(ids), self.max_length)
        input_ids = torch.tensor(ids, dtype=torch.long)
        mm_token_type_ids = (input_ids == self.token_ids.image_pad).long()
        position_ids, rope_delta = mrope_position_ids(
            input_ids, mm_token_type_ids, image_grid_thw, self.merge_size)
        return Encoded(input_ids, torch.tensor(labels, dtype=torch.long), mm_token_type_ids,
                       position_ids, rope_delta, pixel_values, image_grid_thw)

    def _append_turn(self, turn: _Turn, counts: Iterator[int], ids: list[int],
                     labels: list[int]) -> None:
        """Append ``<|im_start|>role\\n content <|im_end|>\\n``; label an assistant's answer."""
        trained = turn.role == "assistant"

        def add(tokens: list[int], train: bool) -> None:
            ids.extend(tokens)
            labels.extend(tokens if train else [IGNORE_INDEX] * len(tokens))

        add([self.token_ids.im_start, *self._text(f"{turn.role}\n")], False)
        for part in turn.parts:
            if isinstance(part, str):
                add(self._text(part), trained)
            else:
                pads = [self.token_ids.image_pad] * next(counts)
                add([self.token_ids.vision_start, *pads, self.token_ids.vision_end], False)
        add([self.token_ids.im_end], trained)
        add(self._text("\n"), False)

    def _text(self, text: str) -> list[int]:
        """Token ids of plain text (a prompt, a system prompt or a training answer).

        One rule for every text: a special token's string inside it (``<|im_end|>``,
        ``<|endoftext|>``, ``<|video_pad|>``, the mask token, ...) is refused rather than encoded
        as that control token. Typed text must not end a turn, fake an image, or plant a mask."""
        found = self._special_pattern.search(text) if self._special_pattern else None
        if found:
            raise ValueError(f"text contains the special token {found.group()!r}; special tokens cannot be "
                             "given as text")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        """Matches any special token of the tokenizer (longest first), or None if it has none."""
        added = getattr(self.tokenizer, "added_tokens_decoder", {}).values()
        tokens = {t.content for t in added if t.special} | set(self.tokenizer.all_special_tokens)
        tokens -= {IMAGE_PLACEHOLDER}  # placeholders are split out before text is encoded
        tokens = sorted((t for t in tokens if t), key=len, reverse=True)
        return re.compile("|".join(map(re.escape, tokens))) if tokens else None

    def _process_images(self, images: list) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """pixel_values (num_patches, C*tp*p*p) and image_grid_thw (num_images, 3), or Nones."""
        if not images:
            return None, None
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].long()

    def _image_token_counts(self, image_grid_thw: torch.Tensor) -> list[int]:
        """Number of <|image_pad|> tokens per image: t·h·w / merge²."""
        patches = image_grid_thw.prod(dim=-1)  # (num_images,)
        merge_area = self.merge_size ** 2
        if bool((patches % merge_area).any()):
            raise ValueError(f"image grids {image_grid_thw.tolist()} not divisible by merge²")
        return (patches // merge_area).tolist()
