"""What dvlm writes is a checkpoint as its source was published (issue 24, issue 19): `convert`,
`assemble` and `train` write the chat template in use (where transformers' tokenizer and processor
read it) and the source's generation_config.json; `train` writes its final model in the source's
dtype and shard layout. Checked by loading the written checkpoints with transformers itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor

from dvlm.config import TrainConfig
from dvlm.convert.assembly import assemble_checkpoint
from dvlm.convert.conversion import convert_checkpoint
from dvlm.model.adapters.registry import adapter_for_architecture
from dvlm.tasks.builtin import export_llava, get_task
from dvlm.train.loop import train
from dvlm.zoo.tiny import tiny_image_processor
from dvlm.zoo.tokenizer import build_tokenizer
from tests.conftest import TEST_SHAPE
from tests.convert.assembly_parts import build_language_model, build_vision_tower
from tests.convert.sources import config_dtypes, quiet, shard_files, tensor_dtypes

LLAVA = adapter_for_architecture("LlavaOnevisionForConditionalGeneration")
# chat_template.json as llava-hf publishes it for LLaVA-OneVision (llava-hf/llava-onevision-qwen2-7b-si-hf,
# 824 bytes): the model's only chat template; its tokenizer_config.json has none.
PUBLISHED_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# generation_config.json of llava-hf/llava-onevision-qwen2-0.5b-ov-hf as published (151643 <|endoftext|>,
# 151645 <|im_end|>, written as the tiny tokenizer's ids), and of Qwen/Qwen2-0.5B-Instruct, its language model.
LLAVA_GENERATION = {"_from_model_config": True, "bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>",
                    "transformers_version": "4.45.0.dev0"}
QWEN2_GENERATION = {"bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>", "do_sample": True,
                    "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "repetition_penalty": 1.1, "temperature": 0.7,
                    "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}
IMAGE_MESSAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
RENDERED = "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
"""IMAGE_MESSAGE through PUBLISHED_TEMPLATE, with the generation prompt (worked out from the template by hand)."""


def generation_config(values: dict, tokenizer) -> str:
    ids = tokenizer.convert_tokens_to_ids
    return json.dumps({key: ([ids(v) for v in value] if isinstance(value, list) else ids(value)
                             if key.endswith("_token_id") else value) for key, value in values.items()}, indent=2)


def published_layout(out: Path, tokenizer, dtype: torch.dtype = torch.float32, shards: int = 1) -> Path:
    """A tiny LLaVA-OneVision checkpoint laid out as llava-hf publishes one: the template only in
    chat_template.json, generation_config.json as published; `shards` safetensors files."""
    torch.manual_seed(2)
    model = LLAVA.random_model(tokenizer, TEST_SHAPE).to(dtype)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out, **({"max_shard_size": f"{math.ceil(size / (shards - 0.5) / 1000)}KB"} if shards > 1
                                  else {}))
    tokenizer.save_pretrained(out)
    tiny_image_processor(adapter=LLAVA).save_pretrained(out)
    (out / "chat_template.jinja").unlink()  # the tokenizer's, as dvlm's builder wrote it
    (out / "chat_template.json").write_text(json.dumps({"chat_template": PUBLISHED_TEMPLATE}, indent=2))
    (out / "generation_config.json").write_text(generation_config(LLAVA_GENERATION, tokenizer))
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    return out


def renders_image_messages_in_transformers(path: Path) -> None:
    """The tokenizer and the processor of `path`, as transformers loads them (the processor class
    itself needs torchvision for its video part, so its files are read as it reads them)."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.apply_chat_template(IMAGE_MESSAGE, add_generation_prompt=True, tokenize=False) == RENDERED
    processor_dict, _ = LlavaOnevisionProcessor.get_processor_dict(path)
    assert processor_dict["chat_template"] == PUBLISHED_TEMPLATE


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(adapter=LLAVA)


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer) -> Path:
    """bf16 in 3 shards, as a downloaded model is."""
    return published_layout(tmp_path_factory.mktemp("published") / "src", tokenizer, torch.bfloat16, shards=3)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, source) -> Path:
    out = tmp_path_factory.mktemp("converted") / "dvlm"
    convert_checkpoint(source, out, log=quiet)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return export_llava(get_task("shapes-qa").generate("train", 2, seed=0), tmp_path_factory.mktemp("data"))


def test_the_source_itself_renders_only_through_its_processor_file(source):
    """The fixture's teeth: without chat_template.json, transformers' tokenizer has no template."""
    with pytest.raises(ValueError, match="chat template"):
        AutoTokenizer.from_pretrained(source).apply_chat_template(IMAGE_MESSAGE, tokenize=False)
    assert LlavaOnevisionProcessor.get_processor_dict(source)[0]["chat_template"] == PUBLISHED_TEMPLATE


def test_a_converted_checkpoint_keeps_its_template_and_generation_config(source, converted):
    renders_image_messages_in_transformers(converted)
    assert (converted / "chat_template.json").read_bytes() == (source / "chat_template.json").read_bytes()
    assert (converted / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(converted)
    assert model.generation_config.eos_token_id == GenerationConfig.from_pretrained(source).eos_token_id


def test_a_trained_checkpoint_is_written_as_its_source_was(tmp_path, source, converted, data):
    result = train(converted, data, tmp_path / "run", TrainConfig(max_steps=1, batch_size=2), progress=False)
    final = result.model_dir
    renders_image_messages_in_transformers(final)
    assert (final / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    assert tensor_dtypes(final) == {"BF16"} and set(config_dtypes(final).values()) == {"bfloat16"}
    assert shard_files(final) == shard_files(converted) == shard_files(source)  # 3 shards, as published
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(final)
    assert model.dtype == torch.bfloat16


def test_train_writes_another_dtype_when_asked(tmp_path, converted, data):
    result = train(converted, data, tmp_path / "run", TrainConfig(max_steps=1, batch_size=2), progress=False,
                   save_dtype="float32")
    assert tensor_dtypes(result.model_dir) == {"F32"} and set(config_dtypes(result.model_dir).values()) == {"float32"}
    checkpoint = next((tmp_path / "run").glob("checkpoint-*"))
    assert tensor_dtypes(checkpoint) == {"F32"}  # a checkpoint keeps the master weights whatever the final dtype
    renders_image_messages_in_transformers(checkpoint)  # and the template, for a resumed run's final model


def test_an_assembled_checkpoint_carries_the_language_models_generation_config(tmp_path):
    lm = build_language_model(tmp_path / "lm")
    lm_tokenizer = AutoTokenizer.from_pretrained(lm)
    (lm / "generation_config.json").write_text(generation_config(QWEN2_GENERATION, lm_tokenizer))
    out = tmp_path / "vlm"
    assemble_checkpoint(lm, build_vision_tower(tmp_path / "vision"), out, log=quiet)
    assert (out / "generation_config.json").read_bytes() == (lm / "generation_config.json").read_bytes()
    tokenizer = AutoTokenizer.from_pretrained(out)
    rendered = tokenizer.apply_chat_template(IMAGE_MESSAGE, add_generation_prompt=True, tokenize=False)
    assert "<image>" in rendered and rendered.endswith("assistant\n")  # the family's template, which takes images


def test_the_written_template_is_the_one_dvlm_lays_chats_out_with(tmp_path):
    """Whatever file the template came from (processor_config.json, the tokenizer, ...), the written
    checkpoint carries that very template where the tokenizer and the processor read it; a source's
    chat_template.json keeps its other fields but takes the template in use (a processor prefers that
    file, so a stale one would render another layout); a family's default layout is not written."""
    from dvlm.data.template import ChatTemplate, find_chat_template
    from dvlm.model.checkpoint_writing import write_companions

    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    (source / "chat_template.json").write_text(json.dumps({"chat_template": "stale", "extra": 1}))
    used = ChatTemplate("{{ messages[0]['content'] }}", "processor_config.json")
    write_companions(out, used, source)
    assert (out / "chat_template.jinja").read_text() == used.text
    assert json.loads((out / "chat_template.json").read_text()) == {"chat_template": used.text, "extra": 1}
    assert find_chat_template(out, tokenizer=None).text == used.text

    bare = tmp_path / "bare"
    bare.mkdir()
    write_companions(bare, ChatTemplate("{{ 'x' }}", "tokenizer_config.json"), None)
    assert sorted(p.name for p in bare.iterdir()) == ["chat_template.jinja"]

    fallback = tmp_path / "fallback"
    fallback.mkdir()
    write_companions(fallback, ChatTemplate("{{ 'x' }}", "a family's default layout", fallback=True), None)
    assert list(fallback.iterdir()) == []
