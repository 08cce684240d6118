"""transformers itself as the reference for a checkpoint laid out as published: prompt ids, greedy
decoding and where it stops, built only from transformers' own pieces (never from dvlm's code).

The combined processors (`Qwen2VLProcessor`, `LlavaOnevisionProcessor`, ...) cannot be built without
torchvision (their video processor needs it), so the reference prompt is assembled from the parts
the processor itself uses: the chat template rendered by the tokenizer's `apply_chat_template`, the
PIL image processor's outputs, the processor class's own `replace_image_token` (its image-token
count, called on an instance that carries only the attributes that method reads), and the tokenizer
over the whole expanded text, as `ProcessorMixin.__call__` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from tests.model.adapters.published import Published

LLAVA = "LlavaOnevisionForConditionalGeneration"


def reference_processor(checkpoint: Path, published: Published) -> Any:
    """The family's processor class holding only what `replace_image_token` reads."""
    if published.architecture == LLAVA:
        processor = object.__new__(LlavaOnevisionProcessor)
        processor.image_processor = LlavaOnevisionImageProcessorPil.from_pretrained(checkpoint)
        settings = json.loads((checkpoint / "processor_config.json").read_text())
        processor.num_image_tokens = settings["num_image_tokens"]
        processor.vision_feature_select_strategy = settings["vision_feature_select_strategy"]
        processor.vision_aspect_ratio = published.config["vision_aspect_ratio"]
        processor.image_token = settings["image_token"]
        return processor
    processor = object.__new__(Qwen2VLProcessor)  # Qwen2.5-VL's and Qwen3-VL's count images the same way
    processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    processor.image_token = "<|image_pad|>"
    return processor


def reference_inputs(checkpoint: Path, published: Published, messages: list[dict[str, Any]], images: list[Any], *,
                     add_generation_prompt: bool = True) -> dict[str, torch.Tensor]:
    """What transformers' processor gives for `messages` (HF chat format) and `images`: input ids,
    attention mask, the image tensors and (Qwen) the token types."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(messages, chat_template=published.chat_template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    processor = reference_processor(checkpoint, published)
    image_inputs: dict[str, Any] = {}
    if images:
        batch = [images] if published.architecture == LLAVA else images
        image_inputs = dict(processor.image_processor(images=batch, return_tensors="pt"))
        pieces = text.split(processor.image_token)
        assert len(pieces) == len(images) + 1, "one image token per image in the rendered chat"
        text = pieces[0] + "".join(processor.replace_image_token(image_inputs, image_idx=k) + piece
                                   for k, piece in enumerate(pieces[1:]))
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **image_inputs}
    if published.architecture != LLAVA:
        image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
        inputs["mm_token_type_ids"] = (ids == image_id).long()
    return inputs


def load_reference_model(checkpoint: Path, published: Published):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()


def reference_greedy(model, inputs: dict[str, torch.Tensor], max_new_tokens: int, **options) -> list[int]:
    """transformers' `generate`, greedy (no sampling, no repetition penalty), the checkpoint's own
    end tokens (its generation_config.json): the new tokens, the end token included when it stopped."""
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                             **options)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def final_hidden_states(model, inputs: dict[str, torch.Tensor], steps: int) -> tuple[list[int], torch.Tensor]:
    """The greedy tokens of `steps` steps (end tokens not allowed to stop it) and the language model's
    last hidden state (what the output layer reads) at each step: (steps, D)."""
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, repetition_penalty=1.0, max_new_tokens=steps,
                             min_new_tokens=steps, return_dict_in_generate=True, output_hidden_states=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    hidden = torch.stack([step[-1][0, -1] for step in out.hidden_states])  # (steps, D)
    return tokens, hidden
