"""The HTTP layer over real HTTP on loopback, with the `openai` client, in front of the fake engine:
response shapes, streaming, what reaches the engine, and invariant 8 (an OpenAI request encodes the
prompt ids `model.generate` encodes)."""

from __future__ import annotations

import base64
import io
import json

import torch

from tests.serve.conftest import MODEL_NAME
from tests.serve.fake_engine import ANSWER_TOKENS, answer_text


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, *images) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def prompt_length(lm, messages: list[dict], images=()) -> int:
    chat = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
             else m["content"]} for m in messages]
    return len(lm.encode(chat, images or None))


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


def test_completion_answer_usage_and_dvlm_echo(serve, lm):
    server = serve()
    messages = [{"role": "user", "content": "How many shapes are there?"}]
    out = server.openai().chat.completions.create(model=MODEL_NAME, messages=messages)
    length = prompt_length(lm, messages)
    assert out.choices[0].message.content == answer_text(length)
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.role == "assistant"
    assert out.object == "chat.completion" and out.model == MODEL_NAME and out.id.startswith("chatcmpl-")
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (length, ANSWER_TOKENS + 1)
    assert out.usage.total_tokens == length + ANSWER_TOKENS + 1
    # The model's defaults filled in: block decoding, B=16, threshold 0.9 (tiny-dvlm's config.json).
    echo = out.model_extra["dvlm"]
    assert {k: echo[k] for k in ("decoder", "block_size", "threshold", "steps")} == {
        "decoder": "block", "block_size": 16, "threshold": 0.9, "steps": None}
    blocks = -(-ANSWER_TOKENS // 3)  # the fake commits 3 tokens per block, plus one prefill forward
    assert echo["nfe"] == blocks + 1 and echo["tokens_per_forward"] == round((ANSWER_TOKENS + 1) / (blocks + 1), 4)


def test_stream_sends_one_chunk_per_block_then_final_usage_done(serve, lm):
    server = serve()
    messages = [{"role": "user", "content": "Read the digits."}]
    chunks = list(server.openai().chat.completions.create(
        model=MODEL_NAME, messages=messages, stream=True, stream_options={"include_usage": True}))
    length = prompt_length(lm, messages)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == answer_text(length)
    assert len(pieces) == -(-ANSWER_TOKENS // 3)  # one chunk per committed block
    final, usage_chunk = chunks[-2], chunks[-1]
    assert final.choices[0].finish_reason == "stop" and final.model_extra["dvlm"]["decoder"] == "block"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == ANSWER_TOKENS + 1
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format_ends_with_done(serve):
    server = serve()
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    response = server.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["object"] for e in events[:-1]] == ["chat.completion.chunk"] * (len(events) - 1)
    assert "usage" not in json.loads(events[1])  # no include_usage: no usage fields


def test_max_tokens_and_stop_strings(serve, lm):
    server = serve()
    client = server.openai()
    messages = [{"role": "user", "content": "Describe the image."}]
    full = answer_text(prompt_length(lm, messages))
    cut = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=5)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5
    assert cut.choices[0].message.content == lm.processor.decode(
        lm.processor.tokenizer(full, add_special_tokens=False)["input_ids"][:5])
    stop = full.split(" ")[1]
    stopped = client.chat.completions.create(model=MODEL_NAME, messages=messages, stop=f" {stop}",
                                             max_completion_tokens=20)
    assert stopped.choices[0].message.content == full[:full.index(f" {stop}")]
    assert stopped.choices[0].finish_reason == "stop"


def test_request_settings_reach_the_engine(serve):
    server = serve(threshold=0.7, max_tokens=64, request_timeout_s=30.0)
    client = server.openai()
    client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=12, temperature=0.5,
        top_p=0.8, seed=7, stop=["a", "b"],
        extra_body={"decoder": "block", "block_size": 8, "top_k": 5})
    client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                   extra_body={"steps": 4, "decoder": "spec"})
    client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}])
    first, second, third = server.engine.submitted
    assert (first.decoder, first.block_size, first.threshold, first.steps) == ("block", 8, 0.7, None)
    assert (first.max_new_tokens, first.temperature, first.top_p, first.top_k, first.seed) == (12, 0.5, 0.8, 5, 7)
    # The engine gets the time left of --request-timeout, which counts from the request's arrival.
    assert first.stop == ("a", "b") and 25.0 < first.timeout_s < 30.0
    assert first.stream is False  # a whole answer: the engine sends no Deltas
    # A request that chooses steps does not inherit the server's threshold (that would be "both").
    assert (second.decoder, second.steps, second.threshold) == ("spec", 4, None)
    # No max_tokens: the server's --max-tokens (the prompt leaves room for it).
    assert (third.max_new_tokens, third.temperature, third.seed, third.decoder) == (64, 0.0, None, "block")
    assert len({first.id, second.id, third.id}) == 3


def test_openai_request_encodes_like_generate(serve, lm, image):
    """Invariant 8: the server's prompt equals model.generate's for the same content, in every form."""
    server = serve()
    other = image.rotate(90)
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                             {"type": "text", "text": "What is here?"}]},
                {"role": "assistant", "content": "Two shapes."},
                {"role": "user", "content": [{"type": "text", "text": "And here?"},
                                             {"type": "image_url", "image_url": {"url": data_url(other)}}]}]
    server.openai().chat.completions.create(model=MODEL_NAME, messages=messages)
    sent = server.engine.submitted[0].prompt
    chat = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is here?"}]},
            {"role": "assistant", "content": "Two shapes."},
            {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image", "image": other}]}]
    placeholders = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "<image>\nWhat is here?"},
                    {"role": "assistant", "content": "Two shapes."},
                    {"role": "user", "content": "And here?\n<image>"}]
    for expected in (lm.encode(chat), lm.encode(placeholders, [image, other])):
        assert torch.equal(sent.input_ids, expected.input_ids)
        assert torch.equal(sent.position_ids, expected.position_ids) and sent.next_position == expected.next_position
        assert torch.equal(sent.vision["pixel_values"], expected.vision["pixel_values"])
        assert torch.equal(sent.vision["image_grid_thw"], expected.vision["image_grid_thw"])


def test_single_prompt_with_image_matches_the_plain_prompt_form(serve, lm, image):
    server = serve()
    server.openai().chat.completions.create(model=MODEL_NAME, messages=user("Read the digits.", image))
    assert torch.equal(server.engine.submitted[0].prompt.input_ids,
                       lm.encode("Read the digits.", [image]).input_ids)


def test_models_and_health(serve):
    server = serve(api_key="sesame")
    models = server.openai(api_key="sesame").models.list()
    assert [m.id for m in models.data] == [MODEL_NAME] and models.data[0].owned_by == "dvlm"
    assert server.http.get("/health").json() == {"status": "ok"}  # no key needed for health and metrics
    assert server.http.get("/metrics").status_code == 200
    assert server.http.get("/docs").status_code == 404  # no interactive docs, no openapi.json
    assert server.engine.started

