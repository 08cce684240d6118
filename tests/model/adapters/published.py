"""Checkpoints laid out as published: the config files of Qwen/Qwen2.5-VL-3B-Instruct,
Qwen/Qwen2-VL-2B-Instruct, Qwen/Qwen3-VL-2B-Instruct and llava-hf/llava-onevision-qwen2-0.5b-ov-hf,
field by field, with only the network's sizes shrunk (`shrink=True`) or only its depth (`shrink=False`,
the published shapes with fewer layers, for the slow tests).

Where each field comes from is written beside it: "published" = the checkpoint's file on the Hugging
Face hub, as read through the search tools in public copies of it (the copies are named in
SOURCES); "shrunk" = a size made small for a CPU test (the value published is in the comment).
Token ids are the published ones (the tokenizer built here gives each special token its published
id), so the fixtures exercise the real ids, the real chat templates and the real end-token lists.

The tokenizer is not the published one (151k merges are not available offline): a byte-level BPE
with Qwen2's pre-tokenization (the published tokenizer.json's split pattern and byte-level map),
trained here on a small fixed corpus, plus the published special tokens at their published ids.
Both dvlm and the transformers reference tokenize with it, so whole-text tokenization (merges across
a template's pieces) is exercised as with the real one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SOURCES = {
    "Qwen2-VL-2B-Instruct": "chat template and tokenizer_config (bos null, chat_template): the hub's processor and "
                            "tokenizer configs as shown at ai-nexus-293.pages.dev/model/qwen/qwen2-vl-2b-instruct; "
                            "generation defaults (temperature 0.01, top_p 0.001, top_k 1, repetition_penalty 1.0) "
                            "as quoted from its generation_config.json in public code (swift QWEN2_VL_GENERATE_CONFIG)",
    "Qwen2.5-VL-3B-Instruct": "config.json values as copied (transformers_version 4.41.2) in public code (a "
                              "Qwen2_5_VLConfig with depth 32, fullatt_block_indexes [7, 15, 23, 31], mrope [16, 24, "
                              "24]); generation_config.json as carried unchanged by a public Qwen2.5-VL fine-tune "
                              "(eos [151645, 151643], repetition_penalty 1.05, temperature 0.1, top_k 1, top_p "
                              "0.001); preprocessor_config.json as printed in public notes (min_pixels 3136, "
                              "max_pixels 12845056, CLIP mean/std); chat template as recorded for "
                              "Qwen/Qwen2.5-VL-7B-Instruct@cc594898 (the same text ships with the 3B)",
    "Qwen3-VL-2B-Instruct": "config.json and generation_config.json (bos 151643, eos [151645, 151643], pad 151643) "
                            "as copied for Qwen/Qwen3-VL-2B-Instruct@89644892 in public test code; chat template "
                            "as registered under 'qwen3-vl-instruct' in a public template registry",
    "llava-onevision-qwen2-0.5b-ov-hf": "chat_template.json as transformers' own processor tests copy it (and a "
                                        "public collator that cites the hub file); config.json fields (anyres_max_9, "
                                        "384 px SigLIP tiles, 6x6 pinpoints, image 151646 / video 151647, 'full' "
                                        "features) as the transformers documentation and public configs give them",
}

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""The split pattern of the Qwen2 tokenizer.json (published; Qwen2-VL, Qwen2.5-VL, Qwen3-VL and the
LLaVA-OneVision Qwen2 language model share it)."""

QWEN_VL_SPECIALS = {  # added_tokens_decoder of the published Qwen-VL tokenizer_config.json files
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<|object_ref_start|>",
    151647: "<|object_ref_end|>", 151648: "<|box_start|>", 151649: "<|box_end|>", 151650: "<|quad_start|>",
    151651: "<|quad_end|>", 151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>",
}
LLAVA_OV_SPECIALS = {  # Qwen2-0.5B-Instruct's three specials + the two llava-hf added (published)
    151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>", 151646: "<image>", 151647: "<video>",
}

QWEN2_VL_TEMPLATE = (  # published chat_template.json of Qwen2-VL-2B-Instruct (and Qwen2.5-VL-3B-Instruct)
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

QWEN3_VL_TEMPLATE = (  # published chat_template.json of Qwen3-VL-2B-Instruct
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n"
    "        {%- if messages[0].content is string %}\n            {{- messages[0].content }}\n        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' }}\n        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n        {%- else %}\n            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n"
    "{%- set image_count = namespace(value=0) %}\n{%- set video_count = namespace(value=0) %}\n"
    "{%- for message in messages %}\n    {%- if message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n                    {{- content_item.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {%- if message.tool_calls %}\n            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n"
    "                    {{- '\\n' }}\n                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

LLAVA_OV_TEMPLATE = (  # published chat_template.json of llava-hf/llava-onevision-qwen2-0.5b-ov-hf
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

QWEN_CLIP_NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
RELEASED_PINPOINTS = [[r * 384, c * 384] for r in range(1, 7) for c in range(1, 7)]  # published: 384..2304, 6x6


@dataclass
class Published:
    """One family's published files (as dicts / text), with the sizes to shrink them to."""

    name: str
    architecture: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    preprocessor_config: dict[str, Any]
    chat_template: str
    specials: dict[int, str]
    tokenizer_config: dict[str, Any]
    shrunk: dict[str, Any]
    """Dotted config.json paths -> the tiny value (the published value is in the config above)."""
    fewer_layers: dict[str, Any]
    """Dotted config.json paths -> the value for the published shapes with fewer layers."""
    processor_config: dict[str, Any] = field(default_factory=dict)


def qwen2_5_vl() -> Published:
    return Published(
        name="Qwen2.5-VL-3B-Instruct", architecture="Qwen2_5_VLForConditionalGeneration",
        config={  # published config.json
            "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
            "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
            "intermediate_size": 11008, "max_position_embeddings": 128000, "max_window_layers": 70,
            "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
            "use_sliding_window": False,
            "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                              "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                              "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                              "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                              "temporal_patch_size": 2},
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
        },
        generation_config={"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,  # published
                           "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                           "top_p": 0.001, "top_k": 1, "transformers_version": "4.37.0"},
        preprocessor_config={"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,  # published
                             "temporal_patch_size": 2, "merge_size": 2, **QWEN_CLIP_NORM,
                             "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"},
        chat_template=QWEN2_VL_TEMPLATE, specials=QWEN_VL_SPECIALS,
        tokenizer_config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",  # published
                          "errors": "replace", "model_max_length": 131072, "split_special_tokens": False,
                          "clean_up_tokenization_spaces": False},
        shrunk={  # text 2048 wide, 36 layers, 16 heads; vision 1280 wide, 32 deep, 16 heads (published)
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_scaling.mrope_section": [2, 3, 3],  # head_dim 16: 16:24:24 scaled to a sum of 8
            "vision_config.depth": 2, "vision_config.hidden_size": 32, "vision_config.intermediate_size": 64,
            "vision_config.num_heads": 2, "vision_config.out_hidden_size": 64, "vision_config.fullatt_block_indexes": [1],
        },
        fewer_layers={"num_hidden_layers": 2, "vision_config.depth": 2, "vision_config.fullatt_block_indexes": [1]},
    )


def qwen2_vl() -> Published:
    return Published(
        name="Qwen2-VL-2B-Instruct", architecture="Qwen2VLForConditionalGeneration",
        config={  # published config.json
            "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
            "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
            "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
            "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
            "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2_vl",
            "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
            "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                              "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2,
                              "spatial_patch_size": 14, "temporal_patch_size": 2},
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
        },
        generation_config={"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,  # published
                           "eos_token_id": [151645, 151643], "repetition_penalty": 1.0, "temperature": 0.01,
                           "top_p": 0.001, "top_k": 1, "transformers_version": "4.37.0"},
        preprocessor_config={"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14,  # published
                             "temporal_patch_size": 2, "merge_size": 2, **QWEN_CLIP_NORM,
                             "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor"},
        chat_template=QWEN2_VL_TEMPLATE, specials=QWEN_VL_SPECIALS,
        tokenizer_config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",  # published
                          "errors": "replace", "model_max_length": 32768, "split_special_tokens": False,
                          "clean_up_tokenization_spaces": False},
        shrunk={  # text 1536 wide, 28 layers, 12 heads; vision 1280 wide, 32 deep, 16 heads (published)
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_scaling.mrope_section": [2, 3, 3],  # head_dim 16: 16:24:24 scaled to a sum of 8
            "vision_config.depth": 2, "vision_config.embed_dim": 32, "vision_config.num_heads": 2,
            "vision_config.hidden_size": 64,
        },
        fewer_layers={"num_hidden_layers": 2, "vision_config.depth": 2},
    )


def qwen3_vl() -> Published:
    return Published(
        name="Qwen3-VL-2B-Instruct", architecture="Qwen3VLForConditionalGeneration",
        config={  # published config.json
            "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
            "model_type": "qwen3_vl", "video_token_id": 151656, "vision_start_token_id": 151652,
            "vision_end_token_id": 151653, "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0",
            "text_config": {
                "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 262144,
                "model_type": "qwen3_vl_text", "num_attention_heads": 16, "num_hidden_layers": 28,
                "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936,
            },
            "vision_config": {
                "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
                "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
                "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048,
                "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            },
        },
        generation_config={"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,  # published
                           "eos_token_id": [151645, 151643], "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.0,
                           "temperature": 0.7, "transformers_version": "4.56.0"},
        preprocessor_config={"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,  # published
                             "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                             "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                             "image_processor_type": "Qwen2VLImageProcessorFast"},
        chat_template=QWEN3_VL_TEMPLATE, specials=QWEN_VL_SPECIALS,
        tokenizer_config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",  # published
                          "errors": "replace", "model_max_length": 262144, "split_special_tokens": False,
                          "clean_up_tokenization_spaces": False},
        shrunk={  # text 2048 wide, 28 layers, 16 heads of 128, 8 kv; vision 1024 wide, 24 deep (published)
            "text_config.hidden_size": 64, "text_config.intermediate_size": 128, "text_config.num_hidden_layers": 3,
            "text_config.num_attention_heads": 4, "text_config.num_key_value_heads": 2, "text_config.head_dim": 32,
            "text_config.rope_scaling.mrope_section": [6, 5, 5],  # head_dim 32: 24:20:20 scaled to a sum of 16
            "vision_config.depth": 3, "vision_config.hidden_size": 32, "vision_config.intermediate_size": 64,
            "vision_config.num_heads": 2, "vision_config.out_hidden_size": 64,
            "vision_config.num_position_embeddings": 64,  # a square grid of position embeddings, as 2304 = 48²
            "vision_config.deepstack_visual_indexes": [0, 1, 2],  # one per LM layer, as [5, 11, 17]
        },
        fewer_layers={"text_config.num_hidden_layers": 3, "vision_config.depth": 3,
                      "vision_config.deepstack_visual_indexes": [0, 1, 2]},
    )


def llava_onevision() -> Published:
    return Published(
        name="llava-onevision-qwen2-0.5b-ov-hf", architecture="LlavaOnevisionForConditionalGeneration",
        config={  # published config.json
            "architectures": ["LlavaOnevisionForConditionalGeneration"], "image_grid_pinpoints": RELEASED_PINPOINTS,
            "image_token_index": 151646, "model_type": "llava_onevision", "projector_hidden_act": "gelu",
            "text_config": {
                "_name_or_path": "Qwen/Qwen2-0.5B-Instruct", "architectures": ["Qwen2ForCausalLM"],
                "bos_token_id": 151643, "eos_token_id": 151645, "hidden_size": 896, "intermediate_size": 4864,
                "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
                "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rope_theta": 1000000.0,
                "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 152000,
            },
            "tie_word_embeddings": True, "torch_dtype": "float16", "transformers_version": "4.45.0.dev0",
            "use_image_newline_parameter": True, "video_token_index": 151647, "vision_aspect_ratio": "anyres_max_9",
            "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                              "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 26,
                              "patch_size": 14, "vision_use_head": False},
            "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
        },
        generation_config={"bos_token_id": 151643, "eos_token_id": 151645,  # published
                           "transformers_version": "4.45.0.dev0"},
        preprocessor_config={"do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,  # published
                             "do_resize": True, "image_grid_pinpoints": RELEASED_PINPOINTS,
                             "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                             "image_processor_type": "LlavaOnevisionImageProcessor",
                             "processor_class": "LlavaOnevisionProcessor", "resample": 3,
                             "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384}},
        processor_config={"image_token": "<image>", "num_image_tokens": 729,  # published processor_config.json
                          "processor_class": "LlavaOnevisionProcessor", "video_token": "<video>",
                          "vision_feature_select_strategy": "full"},
        chat_template=LLAVA_OV_TEMPLATE, specials=LLAVA_OV_SPECIALS,
        tokenizer_config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",  # published
                          "errors": "replace", "model_max_length": 32768, "split_special_tokens": False,
                          "clean_up_tokenization_spaces": False},
        shrunk={  # text 896 wide, 24 layers, 14 heads; SigLIP 1152 wide, 26 deep, 16 heads (published)
            "text_config.hidden_size": 64, "text_config.intermediate_size": 128, "text_config.num_hidden_layers": 2,
            "text_config.num_attention_heads": 4, "vision_config.hidden_size": 32,
            "vision_config.intermediate_size": 64, "vision_config.num_hidden_layers": 2,
            "vision_config.num_attention_heads": 2,
        },  # the tiles (384 px, 14 px patches, 729 features) and pinpoints stay as published
        fewer_layers={"text_config.num_hidden_layers": 2, "vision_config.num_hidden_layers": 2},
    )


FAMILIES = {"Qwen2.5-VL": qwen2_5_vl, "Qwen2-VL": qwen2_vl, "Qwen3-VL": qwen3_vl, "LLaVA-OneVision": llava_onevision}


def with_values(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with the dotted paths of `values` set."""
    out = copy.deepcopy(config)
    for path, value in values.items():
        *parents, last = path.split(".")
        node = out
        for key in parents:
            node = node[key]
        if last not in node:
            raise KeyError(f"{path} is not a field of the published config")
        node[last] = value
    return out


# -- the tokenizer ------------------------------------------------------------------------------------

CORPUS = [
    "Describe the image.", "What is in the picture?", "Read the digits.", "How many shapes are there?",
    "A red square and a blue circle.", "There are 3 shapes.", "The cat sits on the mat.", "Yes, it is.",
    "Compare the two images.", "What colour is the cat?", "dvlm probe question", "dvlm probe answer",
    "system user assistant You are a helpful assistant.", "Picture 1: Video 1:", "0 1 2 3 4 5 6 7 8 9",
    "first second third and the of in on at with", "tool_call tool_response arguments name tools",
]


def build_tokenizer(published: Published) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's pre-tokenization trained on CORPUS, the published special tokens
    at their published ids, and the published tokenizer_config fields."""
    trainer_model = Tokenizer(models.BPE())
    trainer_model.normalizer = normalizers.NFC()
    trainer_model.pre_tokenizer = pre_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    trainer_model.train_from_iterator(CORPUS * 3, trainer)
    vocab = trainer_model.get_vocab()
    merges = json.loads(trainer_model.to_str())["model"]["merges"]
    vocab.update({token: i for i, token in published.specials.items()})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                        for m in merges]))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in published.specials.values()])
    settings = published.tokenizer_config
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=settings["eos_token"],
                                        pad_token=settings["pad_token"],
                                        clean_up_tokenization_spaces=settings["clean_up_tokenization_spaces"],
                                        model_max_length=settings["model_max_length"])
    for token_id, token in published.specials.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    return tokenizer


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


# -- the checkpoint ----------------------------------------------------------------------------------


def write_checkpoint(published: Published, out: Path, *, shrink: bool = True, seed: int = 0,
                     init_std: float | None = None, edit=None) -> Path:
    """A random-weight checkpoint whose files are the published ones (the network's sizes shrunk, or
    only its depth). `init_std`: redraw every matrix with this std (a tiny network drawn at the
    published 0.02 answers every prompt with one repeated token; tests need varied answers).
    `edit(model)` may change the weights before they are written."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    out.mkdir(parents=True, exist_ok=True)
    config = with_values(published.config, published.shrunk if shrink else published.fewer_layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(out), dtype=torch.float32)
    if init_std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() >= 2:
                    parameter.normal_(0.0, init_std)
    if edit is not None:
        edit(model)
    save_as_published(model, published, out, config)
    build_tokenizer(published).save_pretrained(out)
    return out


def write_processor_files(published: Published, out: Path) -> Path:
    """The checkpoint's files without weights (config, processor, template, tokenizer): enough to
    encode prompts."""
    out.mkdir(parents=True, exist_ok=True)
    write_published_files(published, out, with_values(published.config, published.shrunk))
    build_tokenizer(published).save_pretrained(out)
    return out


def save_as_published(model, published: Published, out: Path, config: dict[str, Any] | None = None) -> None:
    """Write `model`'s weights into `out` with the published files beside them (`config`: the
    config.json written, the published one with its sizes changed; default: the one already there)."""
    config = config if config is not None else json.loads((out / "config.json").read_text())
    model.save_pretrained(out)
    # save_pretrained rewrote config.json (transformers' own layout) and derived a generation config:
    # put the published files back.
    write_published_files(published, out, config)


def write_published_files(published: Published, out: Path, config: dict[str, Any]) -> None:
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(published.generation_config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(published.preprocessor_config, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": published.chat_template}, indent=2))
    if published.processor_config:
        (out / "processor_config.json").write_text(json.dumps(published.processor_config, indent=2))
