"""LLaVA-OneVision adapter (transformers 5.x `LlavaOnevisionForConditionalGeneration`): a SigLIP
vision tower, a two-layer projector and a Qwen2 language model with plain 1-D positions.

The layout is the checkpoint's chat template (`dvlm.data.template`). The llava-hf checkpoints
publish their own (`PUBLISHED_TEMPLATE`), which is not the layout LLaVA-OneVision was originally
trained with (ChatML with a system turn, ``user\\n``): no system turn, a space after the role, each
message's images first, then each text part after a line break, no line break between turns::

    <|im_start|>user <image>×n\\n{text}<|im_end|><|im_start|>assistant\\n          (the prompt)
    <|im_start|>user <image>×n\\n{text}<|im_end|><|im_start|>assistant \\n{answer}<|im_end|>

dvlm follows the checkpoint, as transformers, vLLM and lmms-eval's ``llava_onevision_hf`` do. Only
``{answer}<|im_end|>`` of an assistant turn is trained. The image token is ``<image>`` itself
(LLaVA's placeholder), repeated as many times as the model's feature packing gives features
(`dvlm.model.adapters.anyres`): a sample's only image is tiled ("anyres"), each image of a
multi-image sample is one padded tile. Positions are 0, 1, 2, ... over text and image tokens alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from dvlm.data.chat import IMAGE_PLACEHOLDER, ChatFormat
from dvlm.data.positions import PositionScheme
from dvlm.data.processor import ChatProcessor
from dvlm.data.template import ChatTemplate, find_chat_template
from dvlm.data.vision import VisionInputs
from dvlm.model.adapters.anyres import TileFeatures, max_tiles
from dvlm.model.adapters.base import (
    Adapter,
    ImageInputs,
    AssembledModel,
    TinyShape,
    TokenizerSpec,
    language_model_hidden_states,
    place_image_features,
)
from dvlm.model.adapters.registry import register
from dvlm.model.checkpoint_files import read_config

IM_START, IM_END, ENDOFTEXT, VIDEO = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<video>"
IMAGE = IMAGE_PLACEHOLDER
"""LLaVA's image token is the placeholder itself: the placeholder's tokens replace it in place."""
SIGLIP_PATCH_SIZE = 14
"""The released checkpoints' vision patch (SigLIP so400m/14) and feature cap, for a chat format
built without the checkpoint's config.json (`chat_format`); `load_processor` reads both from it."""
RELEASED_ASPECT_RATIO = "anyres_max_9"
UNTILED_COUNT = 2
"""`batch_num_images` of an image among others, given alone (`LlavaOnevisionAdapter.split_images`)."""
TINY_TILE = 2 * SIGLIP_PATCH_SIZE
"""The tiny models' tile: 2×2 features, so an image takes a few dozen tokens at most."""
TINY_PINPOINTS = tuple((rows * TINY_TILE, cols * TINY_TILE) for rows in range(1, 5) for cols in range(1, 5)
                       if rows * cols <= 4)
"""The tiny models' tilings: up to 4 tiles. Fixed, because the model's config lists the same ones."""

CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}{%- for item in content -%}
{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}{{- '<image>\n' -}}
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
"""LLaVA-OneVision's original ChatML layout without a default system prompt, assistant turns marked
for `return_assistant_tokens_mask`: for tokenizers built from scratch (the tests' tiny models, and
checkpoints assembled from a language model and a vision tower, which dvlm trains on it)."""

PUBLISHED_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The chat template of the llava-hf LLaVA-OneVision checkpoints (chat_template.json of
llava-hf/llava-onevision-qwen2-0.5b-ov-hf, as transformers' own processor tests copy it): dvlm's
layout for a LLaVA-OneVision checkpoint that carries no template."""


@dataclass(frozen=True)
class ChatTokenIds:
    """Ids of the chat-structure tokens, looked up by their strings in the tokenizer."""

    im_start: int
    im_end: int
    image: int

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTokenIds:
        # get_vocab, not convert_tokens_to_ids: the latter maps a missing token to <unk> silently.
        vocab = tokenizer.get_vocab()
        wanted = {"im_start": IM_START, "im_end": IM_END, "image": IMAGE}
        missing = [s for s in wanted.values() if s not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the LLaVA-OneVision chat token(s) {missing}")
        return cls(**{field: vocab[s] for field, s in wanted.items()})


class LlavaOnevisionChatFormat(ChatFormat):
    """``<image>`` tokens, anyres tiles, 1-D positions; the layout is the chat template."""

    def __init__(self, tokenizer: Any, image_processor: Any, features: TileFeatures, template: ChatTemplate,
                 default_system_prompt: str | None = None) -> None:
        super().__init__(tokenizer, image_processor, PositionScheme(), template, default_system_prompt)
        self.token_ids = ChatTokenIds.from_tokenizer(tokenizer)
        self.features = features

    @property
    def image_token_id(self) -> int:
        return self.token_ids.image

    def structure_token_ids(self) -> dict[str, int]:
        return dict(vars(self.token_ids))

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else ``<|endoftext|>``, else eos."""
        if self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return int(self.tokenizer.get_vocab().get(ENDOFTEXT, self.tokenizer.eos_token_id))

    def process_images(self, images: list[Any]) -> tuple[VisionInputs, list[int]]:
        """pixel_values (tiles, C, T, T) of the images' real tiles in order (no padding tiles),
        image_sizes (num_images, 2) as (height, width), batch_num_images (1,) = len(images): the
        model tiles an image only when it is its sample's only one, as this count does."""
        out = self.image_processor(images=[images], return_tensors="pt")  # one sample
        sizes = out["image_sizes"].long()
        tiled = len(images) == 1
        tiles = [self.features.tiles(h, w) if tiled else 1 for h, w in sizes.tolist()]
        if out["pixel_values"].shape[1] != max(tiles):
            raise ValueError(f"the image processor cut {out['pixel_values'].shape[1]} tiles, the model "
                             f"expects {max(tiles)}: its size or grid pinpoints disagree with the model's")
        pixel_values = torch.cat([out["pixel_values"][i, :n] for i, n in enumerate(tiles)])
        tokens = [self.features.tokens(h, w) if tiled else self.features.untiled_tokens() for h, w in sizes.tolist()]
        return VisionInputs({"pixel_values": pixel_values, "image_sizes": sizes,
                             "batch_num_images": torch.tensor([len(images)])}), tokens


@register
class LlavaOnevisionAdapter(Adapter):
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    family = "LLaVA-OneVision"
    model_class = LlavaOnevisionForConditionalGeneration
    fallback_template = PUBLISHED_TEMPLATE

    def load_image_processor(self, path: str | Path) -> Any:
        return LlavaOnevisionImageProcessorPil.from_pretrained(path, local_files_only=True)

    def chat_format(self, tokenizer: Any, image_processor: Any, template: ChatTemplate | None = None,
                    features: TileFeatures | None = None) -> ChatFormat:
        """`features`: the checkpoint's (`tile_features`); None: the released models' patch and cap."""
        features = features or TileFeatures.from_image_processor(image_processor, SIGLIP_PATCH_SIZE,
                                                                 RELEASED_ASPECT_RATIO)
        return LlavaOnevisionChatFormat(tokenizer, image_processor, features, *self.chat_layout(tokenizer, template))

    def load_processor(self, path: str | Path, **options: Any) -> ChatProcessor:
        """The image-token count needs the vision tower's patch and the model's feature cap: read from config.json."""
        config = read_config(path)  # clear errors for a missing directory or config.json
        tokenizer, image_processor = self.load_processor_parts(path)
        features = tile_features(config, image_processor)
        template = find_chat_template(path, tokenizer)
        return ChatProcessor(self.chat_format(tokenizer, image_processor, template, features), **options)

    def image_features(self, model, vision: VisionInputs) -> torch.Tensor:
        features = model.model.get_image_features(
            vision["pixel_values"], vision["image_sizes"], batch_num_images=vision["batch_num_images"]
        ).pooler_output
        return torch.cat(list(features), dim=0)  # (num_image_tokens, D)

    def embed_with_features(self, model, input_ids, features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = model.get_input_embeddings()(input_ids)  # (R, L, D)
        if features is None:
            return embeds
        return place_image_features(embeds, input_ids, model.config.image_token_id, features)[0]

    def split_images(self, model, vision: VisionInputs) -> list[ImageInputs]:
        """Each image with its own tiles: a sample's only image is tiled (`TileFeatures.tiles` of them,
        the base tile first), an image among others is one tile. SigLIP reads each tile alone and the
        packing (unpadding, the feature cap, `image_newline`) is per image, so an image alone gets the
        features it gets among others. Its `batch_num_images` says which: [1] tiled, [2] not
        (transformers takes one "tile it" flag per image from these counts, n == 1 meaning tiled, and
        reads as many flags as images are given)."""
        features = model_tile_features(model.config)
        sizes = vision["image_sizes"]
        tiled = [n == 1 for n in vision["batch_num_images"].tolist() for _ in range(n)]
        tiles = [features.tiles(h, w) if alone else 1 for (h, w), alone in zip(sizes.tolist(), tiled)]
        tokens = [features.tokens(h, w) if alone else features.untiled_tokens()
                  for (h, w), alone in zip(sizes.tolist(), tiled)]
        parts = vision["pixel_values"].split(tiles)
        return [ImageInputs(VisionInputs({"pixel_values": part, "image_sizes": size[None],
                                          "batch_num_images": torch.tensor([1 if alone else UNTILED_COUNT])}), count)
                for part, size, alone, count in zip(parts, sizes, tiled, tokens)]

    def hidden_states(self, model, inputs_embeds, position_ids, attention_mask, cache=None) -> torch.Tensor:
        # (1, R, Q) -> (R, Q): one position axis
        return language_model_hidden_states(model.model.language_model, inputs_embeds, position_ids[0],
                                            attention_mask, cache)

    def logits(self, model, hidden) -> torch.Tensor:
        return model.lm_head(hidden)

    def new_cache(self, model) -> Any:
        return DynamicCache(config=model.config)

    def vision_parameters(self, model) -> list[nn.Parameter]:
        """The SigLIP tower only: the projector and `image_newline` train with the language model."""
        return list(model.model.vision_tower.parameters())

    def assemble(self, language_model: Path, vision_tower: Path, seed: int, dtype: torch.dtype | None,
                 log) -> AssembledModel:
        """From a Qwen2 causal LM and a SigLIP tower: `dvlm.model.adapters.llava_onevision_assembly`."""
        from dvlm.model.adapters.llava_onevision_assembly import assemble

        return assemble(self, language_model, vision_tower, seed, dtype, log)

    def tokenizer_spec(self) -> TokenizerSpec:
        return TokenizerSpec((ENDOFTEXT, IM_START, IM_END, VIDEO), pad_token=ENDOFTEXT, eos_token=IM_END,
                             chat_template=CHAT_TEMPLATE)

    def random_model(self, tokenizer: Any, shape: TinyShape) -> nn.Module:
        return LlavaOnevisionForConditionalGeneration(tiny_config(tokenizer, shape))

    def tiny_image_processor(self, min_pixels: int, max_pixels: int) -> Any:
        """Tiles of TINY_TILE pixels on TINY_PINPOINTS (the pixel range does not apply: LLaVA tiles
        have one size, and the model's config must list the same pinpoints)."""
        return LlavaOnevisionImageProcessorPil(size={"height": TINY_TILE, "width": TINY_TILE},
                                               image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS])


def model_tile_features(config: LlavaOnevisionConfig) -> TileFeatures:
    """The TileFeatures of a loaded model, from its config alone (`tile_features` checks that a
    checkpoint's image processor agrees with it)."""
    vision = config.vision_config
    return TileFeatures(tile_size=vision.image_size, patch_size=vision.patch_size,
                        max_tiles=max_tiles(config.vision_aspect_ratio),
                        pinpoints=tuple((int(h), int(w)) for h, w in config.image_grid_pinpoints))


def tile_features(config: dict[str, Any], image_processor: Any) -> TileFeatures:
    """A checkpoint's TileFeatures: tiles and pinpoints from its image processor, checked against the
    model's config.json, which gives the patch size and the feature cap."""
    vision = config["vision_config"]
    strategy = config.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ValueError(f"vision_feature_select_strategy {strategy!r}: dvlm counts image tokens for 'full' "
                         "(every patch feature, as SigLIP towers give)")
    features = TileFeatures.from_image_processor(image_processor, int(vision["patch_size"]),
                                                 config.get("vision_aspect_ratio", RELEASED_ASPECT_RATIO))
    pinpoints = config.get("image_grid_pinpoints")
    if features.tile_size != vision["image_size"] or (pinpoints and [list(p) for p in features.pinpoints] != pinpoints):
        raise ValueError(f"the image processor's tiles ({features.tile_size} px, pinpoints {features.pinpoints}) "
                         f"differ from the model's ({vision['image_size']} px, pinpoints {pinpoints})")
    return features


def tiny_config(tokenizer: Any, shape: TinyShape) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config sized by `shape`, with special-token ids taken from `tokenizer`."""
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        model_type="qwen2", hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=None, eos_token_id=ids(IM_END), pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, initializer_range=shape.initializer_range,
    )
    vision = dict(
        model_type="siglip_vision_model", hidden_size=shape.vision_hidden_size,
        intermediate_size=2 * shape.vision_hidden_size, num_hidden_layers=shape.vision_depth,
        num_attention_heads=shape.vision_heads, image_size=TINY_TILE, patch_size=SIGLIP_PATCH_SIZE,
        vision_use_head=False,
    )
    return LlavaOnevisionConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_index=ids(IMAGE), video_token_index=ids(VIDEO),
        image_grid_pinpoints=[list(p) for p in TINY_PINPOINTS], vision_aspect_ratio=RELEASED_ASPECT_RATIO,
        initializer_range=shape.initializer_range,
    )
