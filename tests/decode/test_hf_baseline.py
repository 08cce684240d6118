"""The `hf` baseline decodes with dvlm's settings, not the checkpoint's generation_config.json.

Qwen2.5-VL publishes sampling settings in its generation_config.json; transformers' `generate`
applies whatever a call leaves unset from that file, so a "greedy" call would penalise repeats
(`repetition_penalty`) and part from greedy decoding. The baseline must equal `ar` token for token.
"""

from __future__ import annotations

import json

import pytest

import dvlm
from dvlm.model.adapters.registry import reference_adapter
from dvlm.zoo.tiny import build_random_checkpoint
from dvlm.zoo.tokenizer import build_tokenizer
from tests.conftest import TEST_SHAPE

# Qwen/Qwen2.5-VL-7B-Instruct's generation_config.json as published (the same values in Qwen2-VL-2B's and in
# the Qwen2.5-VL fine-tunes that copy it, e.g. nbeerbower/Dumpling-Qwen2.5-VL-7B), with its token ids
# 151643 (<|endoftext|>) and 151645 (<|im_end|>) written as the tiny tokenizer's ids of the same tokens.
PUBLISHED = {"bos_token_id": "<|endoftext|>", "pad_token_id": "<|endoftext|>", "do_sample": True,
             "eos_token_id": ["<|im_end|>", "<|endoftext|>"], "repetition_penalty": 1.05, "temperature": 0.1,
             "top_p": 0.001, "top_k": 1}
PROMPTS = ["Describe the image.", "What shape is in the picture?", "Count the objects.", "What colour is it?"]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint carrying Qwen2.5-VL's published generation_config.json."""
    tokenizer = build_tokenizer(adapter=reference_adapter())
    path = build_random_checkpoint(tmp_path_factory.mktemp("published") / "ar", tokenizer, TEST_SHAPE)
    ids = tokenizer.convert_tokens_to_ids
    values = {key: ([ids(v) for v in value] if isinstance(value, list) else ids(value) if key.endswith("_id")
                    else value) for key, value in PUBLISHED.items()}
    (path / "generation_config.json").write_text(json.dumps(values, indent=2))
    return dvlm.load(path)


def test_the_checkpoint_really_carries_the_penalty(published):
    """The fixture's teeth: transformers read the published settings from the file."""
    config = published.model.generation_config
    assert (config.repetition_penalty, config.do_sample, config.top_k) == (1.05, True, 1)


def test_hf_equals_ar_token_for_token_despite_the_published_penalty(published, image):
    images = [[image]] * len(PROMPTS)
    ar = published.generate(PROMPTS, images, decoder="ar", max_new_tokens=48)
    hf = published.generate(PROMPTS, images, decoder="hf", max_new_tokens=48)
    assert [o.tokens for o in hf] == [o.tokens for o in ar]
    assert sum(o.num_tokens for o in ar) > 4 * 20  # long answers: repeats a penalty would change


def test_hf_states_the_settings_it_ran_with(published, image):
    ar = published.generate(PROMPTS[0], [image], decoder="ar", max_new_tokens=8)
    hf = published.generate(PROMPTS[0], [image], decoder="hf", max_new_tokens=8)
    assert hf.settings == {**ar.settings, "decoder": "hf"}
    assert (hf.settings["temperature"], hf.settings["top_k"], hf.settings["top_p"]) == (0.0, None, None)


def test_the_checkpoint_settings_are_back_after_the_call(published, image):
    published.generate(PROMPTS[0], [image], decoder="hf", max_new_tokens=4)
    assert published.model.generation_config.repetition_penalty == 1.05
