"""The Qwen-VL chat (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ChatML turns with Qwen's vision tokens.

The combined HF processors need torchvision, so the template is rebuilt token by token (which
also makes the label boundaries exact)::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>×n<|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

Only ``{answer}<|im_end|>`` of an assistant turn is trained. An image of grid (t, h, w) patches
takes t·h·w / merge² ``<|image_pad|>`` tokens. The default system prompt is the one the
tokenizer's chat template adds ("You are a helpful assistant." for Qwen2-VL and Qwen2.5-VL, none
for Qwen3-VL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dvlm.data.chat import ChatFormat, ImagePart, Segment, TextEncoder
from dvlm.data.positions import PositionScheme
from dvlm.data.vision import VisionInputs

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""Qwen's system prompt, for a tokenizer that has no chat template to say otherwise."""
ENDOFTEXT = "<|endoftext|>"
VIDEO_PAD = "<|video_pad|>"
# Field of ChatTokenIds -> the token string it is looked up by.
CHAT_TOKEN_STRINGS = {"im_start": "<|im_start|>", "im_end": "<|im_end|>",
                      "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>",
                      "image_pad": "<|image_pad|>"}
SPECIAL_TOKENS = (ENDOFTEXT, *CHAT_TOKEN_STRINGS.values(), VIDEO_PAD)
"""The special tokens of a Qwen-VL vocabulary, in Qwen's order (a new tokenizer gives them ids in this order)."""

CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for item in content -%}
{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif item['type'] == 'video' or 'video' in item -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in item -%}{{- item['text'] -}}
{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['role'] == 'assistant' -%}
{%- generation -%}{{- render_content(message['content']) + '<|im_end|>' -}}{%- endgeneration -%}
{%- else -%}{{- render_content(message['content']) + '<|im_end|>' -}}
{%- endif -%}
{{- '\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"""
"""Qwen2-VL's chat template without a default system prompt and without `add_vision_id`, with the
assistant turns marked for `return_assistant_tokens_mask`: for tokenizers built from scratch."""

_PROBE_TEXT = "dvlm-probe"


@dataclass(frozen=True)
class ChatTokenIds:
    """Ids of the chat-structure special tokens, looked up by their strings in the tokenizer."""

    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTokenIds:
        # get_vocab, not convert_tokens_to_ids: the latter maps a missing token to <unk> silently.
        vocab = tokenizer.get_vocab()
        missing = [s for s in CHAT_TOKEN_STRINGS.values() if s not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen chat special token(s) {missing}; "
                             "dvlm's Qwen chat format needs a Qwen2-VL style tokenizer")
        return cls(**{field: vocab[s] for field, s in CHAT_TOKEN_STRINGS.items()})


class QwenChatFormat(ChatFormat):
    """The Qwen-VL layout, Qwen2-VL style image processors (patches + grids), and a position scheme
    (M-RoPE for every Qwen-VL family)."""

    def __init__(self, tokenizer: Any, image_processor: Any, positions: PositionScheme) -> None:
        super().__init__(tokenizer, image_processor, positions)
        self.token_ids = ChatTokenIds.from_tokenizer(tokenizer)
        self.merge_size = int(image_processor.merge_size)

    def turn(self, role: str, parts: list[str | ImagePart], text: TextEncoder) -> list[Segment]:
        """``<|im_start|>role\\n content <|im_end|>\\n``; an assistant's text and <|im_end|> are trained."""
        ids, trained = self.token_ids, role == "assistant"
        segments: list[Segment] = [([ids.im_start, *text(f"{role}\n")], False)]
        for part in parts:
            if isinstance(part, str):
                segments.append((text(part), trained))
            else:
                segments.append(([ids.vision_start, *[ids.image_pad] * part.tokens, ids.vision_end], False))
        return segments + [([ids.im_end], trained), (text("\n"), False)]

    def generation_prompt(self, text: TextEncoder) -> list[int]:
        return [self.token_ids.im_start, *text("assistant\n")]

    def default_system_prompt(self) -> str | None:
        return template_system_prompt(self.tokenizer)

    @property
    def image_token_id(self) -> int:
        return self.token_ids.image_pad

    def structure_token_ids(self) -> dict[str, int]:
        return dict(vars(self.token_ids))

    @property
    def eos_token_ids(self) -> list[int]:
        """``<|im_end|>`` and the tokenizer's eos (deduplicated)."""
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
        fallback = self.tokenizer.get_vocab().get(ENDOFTEXT, self.tokenizer.eos_token_id)
        if fallback is None:
            raise ValueError(f"tokenizer has no pad token, no {ENDOFTEXT} and no eos token")
        return int(fallback)

    def process_images(self, images: list[Any]) -> tuple[VisionInputs, list[int]]:
        """pixel_values (num_patches, C·tp·p·p), image_grid_thw (num_images, 3) and t·h·w / merge²
        image tokens per image."""
        out = self.image_processor(images=images, return_tensors="pt")
        grids = out["image_grid_thw"].long()
        patches = grids.prod(dim=-1)  # (num_images,)
        merge_area = self.merge_size ** 2
        if bool((patches % merge_area).any()):
            raise ValueError(f"image grids {grids.tolist()} not divisible by merge²")
        return VisionInputs({"pixel_values": out["pixel_values"], "image_grid_thw": grids}), \
            (patches // merge_area).tolist()


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
                         "system turn; dvlm's Qwen chat format cannot follow it")
    return prefix[len(head):-len(end)]

