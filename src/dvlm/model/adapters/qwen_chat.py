"""The Qwen-VL chat (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): ChatML turns with Qwen's vision tokens.

The layout is the checkpoint's chat template (`dvlm.data.template`). As published, Qwen2-VL's and
Qwen2.5-VL's render::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (when the chat has none)
    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

and Qwen3-VL's the same without a default system turn. An image of grid (t, h, w) patches takes
t·h·w / merge² ``<|image_pad|>`` tokens. A checkpoint without a template is laid out as Qwen2-VL's
published one (`CHAT_TEMPLATE` with `DEFAULT_SYSTEM_PROMPT`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dvlm.data.chat import ChatFormat
from dvlm.data.positions import PositionScheme
from dvlm.data.template import ChatTemplate
from dvlm.data.vision import VisionInputs

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
"""The system turn Qwen2-VL's and Qwen2.5-VL's published templates add to a chat that has none: dvlm
adds it for a Qwen checkpoint that carries no chat template."""
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
assistant turns marked for `return_assistant_tokens_mask`: for tokenizers built from scratch (the
built-in models were trained on it) and, with `DEFAULT_SYSTEM_PROMPT`, for checkpoints without one."""


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
    """Qwen's vision tokens, Qwen2-VL style image processors (patches + grids), and a position scheme
    (M-RoPE for every Qwen-VL family); the layout is the chat template."""

    def __init__(self, tokenizer: Any, image_processor: Any, positions: PositionScheme, template: ChatTemplate,
                 default_system_prompt: str | None = None) -> None:
        super().__init__(tokenizer, image_processor, positions, template, default_system_prompt)
        self.token_ids = ChatTokenIds.from_tokenizer(tokenizer)
        self.merge_size = int(image_processor.merge_size)

    @property
    def image_token_id(self) -> int:
        return self.token_ids.image_pad

    def structure_token_ids(self) -> dict[str, int]:
        return dict(vars(self.token_ids))

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
