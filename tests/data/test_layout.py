"""Invariant 8: every input form of one request encodes the same prompt ids, and those ids are the
model's own chat template (the layout the built-in models were trained on)."""

import json

import pytest
from PIL import Image

import dvlm
from dvlm.data.chat import split_placeholders
from dvlm.data.llava_json import LlavaJsonDataset
from dvlm.data.template import ChatTemplate
from dvlm.model.adapters.qwen_chat import DEFAULT_SYSTEM_PROMPT
from dvlm.data.processor import ChatProcessor
from tests.data.conftest import ADAPTER, qwen_processor


def slots(parts):
    return ["<slot>" if not isinstance(p, str) else p for p in parts]


@pytest.mark.parametrize("text, expected", [
    ("<image>\nWhat is this?", ["<slot>", "What is this?"]),
    ("What is this?\n<image>", ["What is this?", "<slot>"]),
    ("A <image> and <image>.", ["A ", "<slot>", " and ", "<slot>", "."]),
    ("<image>\n<image>\nCompare", ["<slot>", "<slot>", "Compare"]),
    ("<image>\n\nTwo breaks", ["<slot>", "\nTwo breaks"]),  # only the placeholder's own line break goes
    ("x\n<image> y", ["x\n", "<slot>", " y"]),  # not at the end: the text keeps its line break
    ("no placeholder\n", ["no placeholder\n"]),
])
def test_split_placeholders_literal(text, expected):
    assert slots(split_placeholders(text)) == expected


@pytest.fixture(scope="module")
def builtin():
    return dvlm.load("tiny-ar")


def forms(image, tmp_path):
    """The same request in every input form dvlm accepts."""
    image.save(tmp_path / "x.png")
    record = {"id": "r", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nRead the digits."}, {"from": "gpt", "value": "1 2"}]}
    (tmp_path / "d.json").write_text(json.dumps([record]))
    return {
        "plain string + images": ("Read the digits.", [image]),
        "<image> in a string": ("<image>\nRead the digits.", [image]),
        "<image> without line break": ("<image>Read the digits.", [image]),
        "OpenAI parts": ([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}},
            {"type": "text", "text": "Read the digits."}]}], None),
        "HF image part": ([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "Read the digits."}]}], [image]),
    }


def test_every_input_form_encodes_the_same_ids(builtin, tmp_path):
    image = Image.new("RGB", (56, 28), (200, 30, 30))
    encoded = {name: builtin.encode(prompt, images).input_ids.tolist()
               for name, (prompt, images) in forms(image, tmp_path).items()}
    reference = encoded["plain string + images"]
    assert all(ids == reference for ids in encoded.values()), encoded
    # The LLaVA record used for training: the same ids up to the generation prompt, then the answer.
    record = LlavaJsonDataset(tmp_path / "d.json", builtin.processor)[0].input_ids.tolist()
    assert record[:len(reference)] == reference


def test_encoding_equals_the_models_own_chat_template(builtin):
    image = Image.new("RGB", (56, 28), (200, 30, 30))
    ours = builtin.encode("Read the digits.", [image])
    tokenizer = builtin.processor.tokenizer
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read the digits."}]}],
        tokenize=False, add_generation_prompt=True)
    pads = int(ours.mm_token_type_ids.sum())
    rendered = rendered.replace("<|image_pad|>", "<|image_pad|>" * pads)
    assert ours.input_ids.tolist() == tokenizer(rendered, add_special_tokens=False)["input_ids"]


def test_default_system_prompt_follows_the_template(builtin, processor, as_tokens):
    """A checkpoint's own template decides the default system turn (the processor adds none); a
    checkpoint without a template gets the family's layout and default system prompt."""
    assert builtin.processor.system_prompt is None  # the built-in template adds none
    assert processor.system_prompt == DEFAULT_SYSTEM_PROMPT  # no template: the Qwen default
    own = ChatTemplate("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief<|im_end|>\n"
                       "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                       "{% for part in m['content'] %}{{ part['text'] }}{% endfor %}<|im_end|>\n{% endfor %}",
                       "a test template")
    with_template = ChatProcessor(ADAPTER.chat_format(processor.tokenizer, processor.image_processor, own))
    assert with_template.system_prompt is None
    assert as_tokens(with_template.encode("Yes").input_ids) == [
        "<|im_start|>", "system", "\n", "Be", "brief", "<|im_end|>", "\n", "<|im_start|>", "user", "\n", "Yes",
        "<|im_end|>", "\n"]
    # An explicit choice beats the template's default (its own system turn is then not added).
    explicit = ChatProcessor(ADAPTER.chat_format(processor.tokenizer, processor.image_processor, own),
                             system_prompt="Thanks")
    assert as_tokens(explicit.encode("Yes").input_ids)[:6] == ["<|im_start|>", "system", "\n", "Thanks",
                                                               "<|im_end|>", "\n"]
    assert qwen_processor(processor.tokenizer, processor.image_processor, system_prompt=None).system_prompt is None
