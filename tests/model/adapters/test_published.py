"""DESIGN.md invariants 8-10 per family, against transformers itself, on checkpoints laid out as
published (`tests.model.adapters.published`: the published config files, chat templates and end
tokens; tiny random weights):

* every input form (a plain string + images, ``<image>`` in a string, chat parts, an OpenAI request
  through the server's preparation, a LLaVA training record) encodes the ids transformers' processor
  gives with the checkpoint's chat template (`tests.model.adapters.reference`), and a record trains
  exactly its answer and the end-of-turn token;
* dvlm's AR greedy decoding equals transformers' `generate` greedy, token for token, including where
  it stops, for an answer ending on each end token the checkpoint lists;
* the converted model's speculative decoding equals its AR decoding.

Reaching each end token with random weights: a random model almost never picks one given token of
152k, so for each end token one question is chosen and the end token's row of the (tied, as
published) embedding table is moved along the mean of that question's final hidden states (the
direction every answer step shares), by the smallest of BOOSTS for which transformers' own
`generate` then ends that answer on the end token after at least one other token. That raises the
end token's logit at every step by about the same amount, so the answer ends where the end token was
closest to winning; moving the row also moves the prompt wherever the token occurs in it
(<|im_end|> closes each turn), which is why every choice is confirmed by `generate` itself, and the
next seed is tried when no scale gives every listed end token its answer.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

import dvlm
from dvlm.convert.conversion import convert_checkpoint
from dvlm.data.llava_json import LlavaJsonDataset
from dvlm.data.processor import IGNORE_INDEX
from dvlm.serve.images import ImagePolicy
from dvlm.serve.prepare import encode as serve_encode
from dvlm.serve.prepare import processor_messages
from dvlm.serve.schemas import ChatCompletionRequest
from tests.model.adapters.published import FAMILIES, Published, save_as_published, write_checkpoint
from tests.model.adapters.reference import (
    final_hidden_states,
    load_reference_model,
    reference_greedy,
    reference_inputs,
)

BOOSTS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 14.0, 17.0, 20.0)
"""How much (in logits, along the shared direction) an end token's logit may be raised, tried in order."""
MAX_NEW_TOKENS = 10
SEEDS = range(4)
INIT_STD = 0.3
QUESTIONS = ("Describe the image.", "What colour is the cat?", "How many shapes are there?")
"""One prompt per end token (at most two end tokens per family), and a last one compared wherever it ends."""
ANSWER = "A red square and a blue circle."


def picture(width: int = 84, height: int = 56) -> Image.Image:
    """A small image with some structure (a flat image gives degenerate vision features)."""
    image = Image.new("RGB", (width, height), (200, 30, 30))
    image.paste((30, 60, 220), (width // 3, height // 4, width // 3 + 20, height // 4 + 20))
    return image


def user_turn(question: str) -> list[dict]:
    """The chat in HF's format (what transformers' processor takes): an image part, then the text."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def end_tokens(published: Published) -> list[int]:
    """The end tokens the checkpoint lists: generation_config.json's (one id or a list)."""
    listed = published.generation_config["eos_token_id"]
    return listed if isinstance(listed, list) else [listed]


@dataclass
class Built:
    path: Path
    published: Published
    ends: dict[int, str]
    """End token -> the question whose greedy answer ends on it."""


def aim(path: Path, published: Published) -> dict[int, str] | None:
    """Move each end token's row so that one question's answer ends on it (module docstring); save and
    return end token -> question when transformers' `generate` confirms every one, else None."""
    model = load_reference_model(path, published)
    ends = dict(zip(end_tokens(published), QUESTIONS))
    table = model.get_output_embeddings().weight  # tied with the input embeddings, as published
    for end, question in ends.items():
        inputs = reference_inputs(path, published, user_turn(question), [picture()])
        _, hidden = final_hidden_states(model, inputs, MAX_NEW_TOKENS)
        shared, row = hidden.mean(dim=0), table[end].detach().clone()
        for boost in BOOSTS:
            with torch.no_grad():
                table[end] = row + boost * shared / (shared @ shared)
            if ends_on(model, path, published, question, end):
                break
        else:
            return None
    if not all(ends_on(model, path, published, question, end) for end, question in ends.items()):
        return None
    save_as_published(model, published, path)
    return ends


def ends_on(model, path: Path, published: Published, question: str, end: int) -> bool:
    """Whether transformers' greedy answer to `question` ends on `end` after at least one other token."""
    answer = reference_greedy(model, reference_inputs(path, published, user_turn(question), [picture()]),
                              MAX_NEW_TOKENS)
    return len(answer) >= 2 and answer[-1] == end


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory) -> Built:
    published = FAMILIES[request.param]()
    for seed in SEEDS:
        path = write_checkpoint(published, tmp_path_factory.mktemp("published") / "model", seed=seed,
                                init_std=INIT_STD)
        ends = aim(path, published)
        if ends is not None:
            return Built(path, published, ends)
    raise AssertionError(f"no seed in {list(SEEDS)} gives answers ending on each of {end_tokens(published)}")


@pytest.fixture(scope="module")
def lm(built):
    return dvlm.load(str(built.path), dtype="float32")


@pytest.fixture(scope="module")
def converted(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "model"
    convert_checkpoint(built.path, out, preset="fast-dvlm", dtype="float32", log=lambda _: None)
    return dvlm.load(str(out), dtype="float32")


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_end_tokens_are_the_published_ones(built, lm):
    """tokenizer eos ∪ config.json ∪ generation_config.json, as generate stops."""
    assert set(lm.eos_token_ids) == set(end_tokens(built.published))
    assert lm.eos_token_ids[0] == 151645  # <|im_end|>: the template's end of turn, the tokenizer's eos


def test_every_input_form_encodes_the_reference_ids(built, lm, tmp_path):
    question, image = QUESTIONS[0], picture()
    reference = reference_inputs(built.path, built.published, user_turn(question), [image])["input_ids"][0].tolist()
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(image)}}, {"type": "text", "text": question}]}]})
    forms = {
        "plain string + images": lm.encode(question, [image]),
        "<image> in a string": lm.encode(f"<image>\n{question}", [image]),
        "chat parts": lm.encode([{"role": "user", "content": [{"type": "image", "image": image},
                                                              {"type": "text", "text": question}]}]),
        "OpenAI request": serve_encode(lm, processor_messages(request.messages, ImagePolicy(), max_images=4)),
    }
    for name, encoded in forms.items():
        assert encoded.input_ids.tolist() == reference, name
    image.save(tmp_path / "x.png")
    record = {"id": "r", "image": "x.png", "conversations": [
        {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": ANSWER}]}
    (tmp_path / "d.json").write_text(json.dumps([record]))
    sample = LlavaJsonDataset(tmp_path / "d.json", lm.processor)[0]
    conversation = user_turn(question) + [{"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}]
    whole = reference_inputs(built.path, built.published, conversation, [image], add_generation_prompt=False)
    assert sample.input_ids.tolist() == whole["input_ids"][0].tolist()
    trained = (sample.labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert trained == list(range(trained[0], trained[-1] + 1))  # one span
    assert lm.processor.decode(sample.input_ids[trained], skip_special_tokens=False) == ANSWER + "<|im_end|>"


def test_ar_greedy_equals_transformers_generate_and_stops_where_it_stops(built, lm):
    model = load_reference_model(built.path, built.published)
    stops = {}
    for question in QUESTIONS[:len(built.ends)] + QUESTIONS[-1:]:
        inputs = reference_inputs(built.path, built.published, user_turn(question), [picture()])
        reference = reference_greedy(model, inputs, MAX_NEW_TOKENS)
        ours = lm.generate(question, images=[picture()], decoder="ar", max_new_tokens=MAX_NEW_TOKENS)
        stopped = ours.tokens + ([ours.stop_token] if ours.finish_reason == "stop" else [])
        assert stopped == reference, question
        assert (ours.stop_token is None) == (ours.finish_reason == "length")
        assert ours.to_dict()["stop_token"] == ours.stop_token
        stops[question] = ours.stop_token
    assert {question: stops[question] for question in built.ends.values()} == {q: end for end, q in built.ends.items()}


def test_speculative_equals_ar_on_the_converted_model(built, converted):
    for question in QUESTIONS[:len(built.ends)] + QUESTIONS[-1:]:
        ar = converted.generate(question, images=[picture()], decoder="ar", max_new_tokens=MAX_NEW_TOKENS)
        spec = converted.generate(question, images=[picture()], decoder="spec", block_size=4,
                                  max_new_tokens=MAX_NEW_TOKENS)
        assert (spec.tokens, spec.stop_token) == (ar.tokens, ar.stop_token), question
    ended = [converted.generate(q, images=[picture()], decoder="ar", max_new_tokens=MAX_NEW_TOKENS).stop_token
             for q in built.ends.values()]
    assert ended == list(built.ends)  # conversion keeps where each answer ends
