"""The built-in tokenizer: task-text coverage, exact round trips, save/load, chat template."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dvlm.tasks.builtin import TASKS, vocabulary_texts
from dvlm.zoo.tokenizer import SPECIAL_TOKENS, UNK_TOKEN, build_tokenizer

# The built-in models are of the reference family (Qwen2.5-VL): its pad and eos tokens.
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_END_TOKEN = "<|im_end|>"

EXAMPLE = "There are 3 shapes. A red circle is in the top left."
MAX_VOCAB = 200


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def task_texts():
    """Every question and answer of a sample of each task."""
    texts = []
    for task in TASKS.values():
        for sample in task.generate("train", 40) + task.generate("test", 20):
            texts += [turn["value"] for turn in sample.conversations]
    return texts


def test_vocabulary_is_small_with_qwen_specials(tokenizer):
    assert len(tokenizer) < MAX_VOCAB
    assert tokenizer.convert_ids_to_tokens(list(range(len(SPECIAL_TOKENS)))) == list(SPECIAL_TOKENS)
    assert tokenizer.pad_token == ENDOFTEXT_TOKEN
    assert tokenizer.eos_token == IM_END_TOKEN
    assert tokenizer.unk_token == UNK_TOKEN


def test_pre_tokenizer_splits_words_digits_punctuation_and_newline(tokenizer):
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("top left.\n12")
    assert [p for p, _ in pieces] == ["top", "Ġleft", ".", "Ċ", "1", "2"]


def test_example_round_trips(tokenizer):
    ids = tokenizer.encode(EXAMPLE, add_special_tokens=False)
    assert len(ids) == 14
    assert tokenizer.decode(ids) == EXAMPLE


def test_every_task_text_round_trips_without_unk(tokenizer, task_texts):
    for text in task_texts + vocabulary_texts():
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == text


def test_unknown_words_map_to_unk(tokenizer):
    assert tokenizer.encode("hello", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_save_and_load_offline(tokenizer, tmp_path, monkeypatch, task_texts):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id,
                                                           tokenizer.eos_token_id)
    for text in task_texts[:50]:
        ids = loaded.encode(text, add_special_tokens=False)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text


def test_chat_template_is_qwen_style(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "image"},
                                     {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": "red"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                    "What colour is the circle?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n")
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    encoded = tokenizer.apply_chat_template(messages, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m]) == [
        "red", IM_END_TOKEN]
