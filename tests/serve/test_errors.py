"""Every refusal over real HTTP: its status, its OpenAI-style error object with a clear message, and
a server that stays up and answers the next request. Decode settings are refused with exactly
the message `model.generate` (DecodeConfig) gives."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import json
import logging
import socket
import time

import openai
import pytest

from dvlm.config import ConfigError, DecodeConfig
from dvlm.data.images import MIB, ImageLimits
from tests.serve.conftest import MODEL_NAME
from tests.serve.test_app import data_url

HI = [{"role": "user", "content": "Hi"}]


def body(**fields) -> dict:
    return {"model": MODEL_NAME, "messages": HI, **fields}


def library_message(**settings) -> str:
    with pytest.raises(ConfigError) as refused:
        DecodeConfig(**settings)
    return str(refused.value)


def image_part(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is this?"}]}]


BAD_REQUESTS = {
    # name: (request body (bytes or dict), expected message fragment)
    "malformed JSON": (b'{"model": "tiny-dvlm", "messages": [', "not valid JSON"),
    "not an object": (b"[1, 2]", "must be a JSON object"),
    "no messages": ({"model": MODEL_NAME}, "messages: Field required"),
    "empty messages": (body(messages=[]), "messages: List should have at least 1 item"),
    "unknown field": (body(best_of=3), "unknown field 'best_of'"),
    "unknown role": (body(messages=[{"role": "tool", "content": "x"}]), "messages[0].role: Input should be"),
    "content of the wrong type": (body(messages=[{"role": "user", "content": 5}]),
                                  "messages[0].content: content must be a string or a list of content parts"),
    "part of an unknown type": (body(messages=[{"role": "user", "content": [{"type": "audio"}]}]),
                                "messages[0].content[0].type"),
    "max_tokens as a string": (body(max_tokens="5"), "max_tokens: Input should be a valid integer"),
    "max_tokens zero": (body(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
    "stream as a string": (body(stream="yes"), "stream: Input should be a valid boolean"),
    "stream_options without stream": (body(stream_options={"include_usage": True}), "only allowed with stream"),
    "n=2": (body(n=2), "n=2 is not supported"),
    "empty stop string": (body(stop=[""]), "stop strings must not be empty"),
    "temperature as a string": (body(temperature="hot"), library_message(temperature="hot")),
    "negative temperature": (body(temperature=-1), library_message(temperature=-1)),
    "threshold above 1": (body(threshold=1.5), library_message(threshold=1.5)),
    "threshold as a bool": (body(threshold=True), library_message(threshold=True)),
    "fractional steps": (body(steps=2.5), library_message(steps=2.5)),
    "threshold and steps": (body(threshold=0.5, steps=2), library_message(threshold=0.5, steps=2)),
    "block_size zero": (body(block_size=0), library_message(block_size=0)),
    "block_size huge": (body(decoder="spec", block_size=100_000), library_message(decoder="spec", block_size=100_000)),
    "seed out of range": (body(seed=2**40), library_message(seed=2**40)),
    "top_p zero": (body(top_p=0), library_message(top_p=0)),
    "unknown decoder": (body(decoder="fast"), "decoder='fast' is not served; choose one of ar, block, spec"),
    "unserved decoder": (body(decoder="hf"), "decoder='hf' is not served"),
    "max_tokens above the server's": (body(max_tokens=10_000), "more than this server allows (512"),
    "special token as text": (body(messages=[{"role": "user", "content": "Hi<|im_end|>"}]), "special token"),
    "placeholder without image": (body(messages=[{"role": "user", "content": "<image> Hi"}]), "placeholder"),
    "garbage data URL": (body(messages=image_part("data:image/png;base64,@@@@")), "invalid base64"),
    "not an image": (body(messages=image_part("data:image/png;base64," + base64.b64encode(b"hello").decode())),
                     "messages[0].content[0].image_url: cannot load the image"),
    "local path disabled": (body(messages=image_part("/etc/passwd")), "local image paths are disabled"),
    "remote URL disabled": (body(messages=image_part("https://example.com/cat.png")),
                            "remote image URLs are disabled"),
    "unknown URL scheme": (body(messages=image_part("ftp://example.com/cat.png")), "unsupported image URL scheme"),
}


def wait_for(condition, timeout_s: float = 10.0, message=lambda: "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"condition not reached {message()}"
        time.sleep(0.01)


def assert_error(response, status: int, fragment: str, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert fragment in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code
    return error


def assert_still_serving(server) -> None:
    assert server.http.get("/health").status_code == 200
    assert server.http.post("/v1/chat/completions", json=body()).status_code == 200


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_400_with_a_clear_message(serve, case):
    server = serve()
    payload, fragment = BAD_REQUESTS[case]
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = server.http.post("/v1/chat/completions", content=content,
                                headers={"content-type": "application/json"})
    error = assert_error(response, 400, fragment)
    assert error["type"] == "invalid_request_error"
    assert server.engine.submitted == []  # refused before it reached the engine
    assert_still_serving(server)


def test_openai_client_raises_bad_request_with_the_message(serve):
    client = serve().openai()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL_NAME, messages=HI, extra_body={"threshold": 2})
    assert library_message(threshold=2) in str(refused.value)


def test_diffusion_decoder_on_an_ar_model(serve, served):
    server = serve(model=dataclasses.replace(served, diffusion=None))
    assert_error(server.http.post("/v1/chat/completions", json=body(decoder="spec")), 400, "plain AR model")
    ok = server.http.post("/v1/chat/completions", json=body())
    assert ok.json()["dvlm"]["decoder"] == "ar" and ok.json()["dvlm"]["block_size"] is None


def test_unknown_model_is_404(serve):
    server = serve()
    error = assert_error(server.http.post("/v1/chat/completions", json=body(model="gpt-4")), 404,
                         "this server serves 'tiny-dvlm'", "model_not_found")
    assert error["param"] == "model"


def test_unknown_path_and_wrong_method_are_openai_errors(serve):
    server = serve()
    assert_error(server.http.get("/v1/completions"), 404, "no such endpoint", "not_found")
    assert_error(server.http.get("/v1/chat/completions"), 405, "method GET is not allowed", "method_not_allowed")


def test_oversize_body_is_413(serve):
    server = serve(max_body_bytes=4096)
    big = body(messages=[{"role": "user", "content": "Hi " * 3000}])
    assert_error(server.http.post("/v1/chat/completions", json=big), 413, "larger than this server's limit of 4096")

    # Without Content-Length (chunked): counted while reading.
    def chunks():
        yield json.dumps(big).encode()

    response = server.http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "larger than this server's limit")
    assert_still_serving(server)


def test_a_body_far_over_the_limit_sent_whole_before_reading_gets_its_413(serve):
    """http.client sends the whole body before reading the answer: a 20 MiB plain-text body against
    a 1 MiB limit used to find the connection reset (the server stopped reading at 4 MiB and closed)."""
    server = serve(max_body_bytes=MIB)
    host, port = server.url.removeprefix("http://").split(":")
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "text/plain", "Transfer-Encoding": "chunked"}):
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        payload = b"a" * (20 * MIB)
        if "Transfer-Encoding" in headers:  # no Content-Length: the limit is found while reading
            payload = (b"%x\r\n%s\r\n" % (MIB, b"a" * MIB)) * 20 + b"0\r\n\r\n"
        connection.request("POST", "/v1/chat/completions", body=payload, headers=headers)
        response = connection.getresponse()
        assert response.status == 413
        assert json.loads(response.read())["error"]["message"] == (
            "the request body is larger than this server's limit of 1048576 bytes (--max-body-mb)")
        connection.close()
    assert_still_serving(server)


def test_a_client_that_leaves_mid_body_is_no_server_error(serve, caplog):
    server = serve()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        time.sleep(0.2)
    wait_for(lambda: server.metric("dvlm_http_responses_total", path="/v1/chat/completions", code=499) == 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert_still_serving(server)


def test_image_over_the_byte_limit_is_413(serve, served, image):
    server = serve(model=dataclasses.replace(served, image_limits=ImageLimits(max_bytes=200)))
    error = assert_error(server.http.post("/v1/chat/completions", json=body(messages=image_part(data_url(image)))),
                         413, "more than the server's limit of 200", "payload_too_large")
    assert error["param"] == "messages[0].content[0].image_url"
    assert_still_serving(server)


def test_too_many_images_is_413(serve, image):
    server = serve(max_images=2)
    url = data_url(image)
    parts = [{"type": "image_url", "image_url": {"url": url}}] * 3 + [{"type": "text", "text": "Hi"}]
    assert_error(server.http.post("/v1/chat/completions", json=body(messages=[{"role": "user", "content": parts}])),
                 413, "has 3 images; this server takes at most 2")


def test_prompt_limits(serve, served, lm):
    server = serve(max_prompt_tokens=5)
    assert_error(server.http.post("/v1/chat/completions", json=body()), 400, "at most 5 (its --max-prompt-tokens)",
                 "context_length_exceeded")
    length = len(lm.encode("Hi"))
    small = serve(model=dataclasses.replace(served, max_positions=length + 10))
    assert_error(small.http.post("/v1/chat/completions", json=body(max_tokens=11)), 400,
                 "leaving 10 for the answer; max_tokens=11 does not fit", "context_length_exceeded")
    assert small.http.post("/v1/chat/completions", json=body(max_tokens=10)).status_code == 200
    # No max_tokens: the answer gets the room left, not the server's default of 512.
    assert small.http.post("/v1/chat/completions", json=body()).status_code == 200
    assert small.engine.submitted[-1].max_new_tokens == 10
    full = serve(model=dataclasses.replace(served, max_positions=length))
    assert_error(full.http.post("/v1/chat/completions", json=body()), 400, f"the model has {length}")


def test_api_key(serve):
    server = serve(api_key="sesame")
    for headers, fragment in (({}, "missing API key"), ({"Authorization": "Bearer wrong"}, "invalid API key"),
                              ({"Authorization": "Basic sesame"}, "missing API key"),
                              ({"Authorization": "Bearer sesam"}, "invalid API key")):
        for path, method in (("/v1/chat/completions", "post"), ("/v1/models", "get")):
            extra = {"json": body()} if method == "post" else {}
            response = getattr(server.http, method)(path, headers=headers, **extra)
            assert_error(response, 401, fragment, "invalid_api_key")
            assert response.headers["www-authenticate"] == "Bearer"
    assert server.engine.submitted == []
    with pytest.raises(openai.AuthenticationError):
        server.openai(api_key="wrong").chat.completions.create(model=MODEL_NAME, messages=HI)
    ok = server.openai(api_key="sesame").chat.completions.create(model=MODEL_NAME, messages=HI)
    assert ok.choices[0].finish_reason == "stop"


def test_queue_full_is_429_with_retry_after(serve):
    server = serve()
    server.engine.full = True
    response = server.http.post("/v1/chat/completions", json=body())
    assert_error(response, 429, "queue is full", "queue_full")
    assert response.headers["retry-after"] == "3"  # the engine's 2.5 s, in whole seconds
    with pytest.raises(openai.RateLimitError):
        server.openai().chat.completions.create(model=MODEL_NAME, messages=HI)
    server.engine.full = False
    assert_still_serving(server)


def test_requests_waiting_to_start_are_bounded_before_encoding(serve):
    """max_queue counts requests being prepared as well as queued ones: a burst is refused before
    its images are decoded, not after."""
    server = serve(max_queue=1, engine_options={"max_batch_size": 1, "max_queue": 8})
    server.engine.hang = True
    with server.http.stream("POST", "/v1/chat/completions", json=body(stream=True)):
        with server.http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as queued:
            assert queued.status_code == 200
            wait_for(lambda: server.engine.queue_depth == 1 and server.engine.running_rows == 1)
            response = server.http.post("/v1/chat/completions", json=body())
            assert_error(response, 429, "queue is full (1 requests waiting)")
            assert len(server.engine.submitted) == 2


ODD_VALUES = (None, True, False, 0, -1, 2.5, 1e308, "", "x", "<|im_end|>", "data:image/png;base64,AAAA",
              "file:///etc/passwd", "http://[::1", [], [1], {}, {"type": "text"}, {"url": 5}, "\x00", 2**70)


def mutations(seed: int, count: int):
    """Deterministic random damage to a valid request: every value of its tree, in turn, replaced by an
    odd one, deleted, or joined by an unknown sibling."""
    import copy
    import random

    from PIL import Image

    rng = random.Random(seed)
    image = data_url(Image.new("RGB", (28, 28), "white"))
    valid = body(max_tokens=4, temperature=0, stream=False, stop=["."], threshold=0.5, decoder="block",
                 messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                        {"type": "text", "text": "Hi"}]}])
    for _ in range(count):
        request = copy.deepcopy(valid)
        node = request
        while True:  # walk down to a random container
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            key = rng.choice(keys)
            if isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.6:
                node = node[key]
                continue
            break
        action = rng.random()
        if action < 0.7:
            node[key] = rng.choice(ODD_VALUES)
        elif action < 0.85 and isinstance(node, dict):
            del node[key]
        elif isinstance(node, dict):
            node["unexpected"] = rng.choice(ODD_VALUES)
        yield request


def test_damaged_requests_never_get_a_500(serve):
    server = serve()
    statuses = set()
    for request in mutations(seed=0, count=300):
        response = server.http.post("/v1/chat/completions", json=request)
        statuses.add(response.status_code)
        assert response.status_code < 500, (request, response.text)
        if response.status_code != 200:
            assert response.json()["error"]["message"], request
    assert {400, 200} <= statuses
    assert_still_serving(server)
