"""Every documented server limit, exactly at its boundary: the limit itself is accepted, one more is
refused (README "Serve": --max-batch-size, --max-images, --max-tokens, --max-body-mb,
--max-prompt-tokens, --max-queue, the image byte limit, `stop` up to 4, the model's positions), and
the `Bearer` scheme is matched case-insensitively (RFC 9110 section 11.1)."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from PIL import Image

from dvlm.data.images import ImageLimits, ImageTooLargeError, load_image
from dvlm.serve.engine import Engine
from dvlm.serve.errors import APIError
from dvlm.serve.images import ImagePolicy, load_image_url
from dvlm.serve.requests import EngineObserver, EngineRequest, QueueFullError
from tests.decode.scripted import prompt, scripted_lm
from tests.serve.conftest import MODEL_NAME
from tests.serve.test_app import prompt_length, user
from tests.serve.test_errors import HI, assert_error, body
from tests.serve.test_images import WHERE, png_bytes


def post(server, payload: dict | bytes, **headers):
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return server.http.post("/v1/chat/completions", content=content,
                            headers={"content-type": "application/json", **headers})


# -- the engine --------------------------------------------------------------------------------------
class Rows(EngineObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[tuple, int]] = []

    def on_step(self, group_key, rows, forwards) -> None:
        self.steps.append((group_key, rows))


def test_a_group_holds_exactly_max_batch_size_rows():
    """Five requests of one group and three of another wait before the engine starts: each group's
    batch starts with max_batch_size = 2 rows, never more; the rest join as rows leave."""
    observer = Rows()
    engine = Engine(scripted_lm(), max_batch_size=2, observer=observer)
    ar = [EngineRequest(id=f"a{i}", prompt=prompt(8), decoder="ar", max_new_tokens=3 + i) for i in range(5)]
    spec = [EngineRequest(id=f"s{i}", prompt=prompt(8), decoder="spec", block_size=4, max_new_tokens=8)
            for i in range(3)]
    handles = [engine.submit(r) for r in ar + spec]
    engine.start()
    try:
        finished = [list(h.iter_events())[-1] for h in handles]
    finally:
        engine.shutdown()
    assert [f.output.finish_reason for f in finished] == ["length"] * 8
    first = {key[0]: rows for key, rows in observer.steps[:2]}
    assert first == {"ar": 2, "spec": 2}
    assert max(rows for _, rows in observer.steps) == 2


def test_the_engine_queue_holds_exactly_max_queue_requests():
    engine = Engine(scripted_lm(), max_queue=3)  # not started: nothing leaves the queue
    for i in range(3):
        engine.submit(EngineRequest(id=f"r{i}", prompt=prompt(8), decoder="ar"))
    with pytest.raises(QueueFullError, match=r"\(3 requests waiting\)"):
        engine.submit(EngineRequest(id="r3", prompt=prompt(8), decoder="ar"))
    engine.shutdown(timeout_s=1)


# -- the HTTP layer (fake engine) --------------------------------------------------------------------
def test_max_images_itself_is_accepted(serve, image):
    server = serve(max_images=2)
    assert post(server, body(messages=user("Hi", image, image))).status_code == 200
    assert_error(post(server, body(messages=user("Hi", image, image, image))), 413,
                 "the request has 3 images; this server takes at most 2 per request")


def test_max_tokens_itself_is_accepted(serve):
    server = serve(max_tokens=12)
    assert post(server, body(max_tokens=12)).status_code == 200
    assert server.engine.submitted[-1].max_new_tokens == 12
    assert post(server, body(max_completion_tokens=12)).status_code == 200
    assert_error(post(server, body(max_tokens=13)), 400,
                 "max_tokens=13 is more than this server allows (12, its --max-tokens)")


def padded(payload: dict, size: int) -> bytes:
    """The request as JSON of exactly `size` bytes (trailing whitespace is valid JSON)."""
    raw = json.dumps(payload).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_max_body_bytes_is_accepted(serve, chunked):
    server = serve(max_body_bytes=1000)
    for size, status in ((1000, 200), (1001, 413)):
        raw = padded(body(), size)
        content = iter([raw[:300], raw[300:]]) if chunked else raw  # a generator: no Content-Length
        response = server.http.post("/v1/chat/completions", content=content,
                                    headers={"content-type": "application/json"})
        assert response.status_code == status, (size, response.text)
    assert len(server.engine.submitted) == 1


def test_a_prompt_of_exactly_max_prompt_tokens_is_accepted(serve, lm):
    length = prompt_length(lm, HI)
    server = serve(max_prompt_tokens=length)
    assert post(server, body()).status_code == 200
    assert len(server.engine.submitted[-1].prompt) == length
    tight = serve(max_prompt_tokens=length - 1)
    assert_error(post(tight, body()), 400, f"the prompt has {length} tokens (images included); this server "
                 f"takes at most {length - 1} (its --max-prompt-tokens)", "context_length_exceeded")


def test_the_last_position_of_the_model_is_usable(serve, served, lm):
    """A prompt that leaves one position: the answer gets exactly that one; leaving none is refused."""
    length = prompt_length(lm, HI)
    one_left = serve(model=dataclasses.replace(served, max_positions=length + 1))
    assert post(one_left, body()).status_code == 200
    assert one_left.engine.submitted[-1].max_new_tokens == 1
    assert post(one_left, body(max_tokens=1)).status_code == 200
    assert_error(post(one_left, body(max_tokens=2)), 400, "leaving 1 for the answer; max_tokens=2 does not fit")
    none_left = serve(model=dataclasses.replace(served, max_positions=length))
    assert_error(post(none_left, body()), 400, f"the prompt takes {length} positions; the model has {length}")


def test_up_to_four_stop_strings(serve):
    server = serve()
    assert post(server, body(stop=["a", "b", "c", "d"])).status_code == 200
    assert server.engine.submitted[-1].stop == ("a", "b", "c", "d")
    assert_error(post(server, body(stop=["a", "b", "c", "d", "e"])), 400, "stop: List should have at most 4 items")


def test_max_queue_requests_may_wait_to_start(serve):
    """--max-queue counts requests waiting to start: with 2, two may wait behind a running one."""
    server = serve(max_queue=2, engine_options={"max_batch_size": 1})
    server.engine.hang = True
    streams = [server.http.stream("POST", "/v1/chat/completions", json=body(stream=True)) for _ in range(3)]
    try:
        for stream in streams:
            assert stream.__enter__().status_code == 200  # one running, two waiting
        refused = server.http.post("/v1/chat/completions", json=body(), timeout=10)  # admitted, it would hang
        assert_error(refused, 429, "queue is full (2 requests waiting)")
    finally:
        server.engine.hang = False
        for stream in streams:
            stream.__exit__(None, None, None)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(serve, scheme):
    server = serve(api_key="sesame")
    assert post(server, body(), Authorization=f"{scheme} sesame").status_code == 200
    assert server.http.get("/v1/models", headers={"Authorization": f"{scheme}  sesame"}).status_code == 200
    assert_error(post(server, body(), Authorization=f"{scheme} sesamE"), 401, "invalid API key")


# -- image bytes ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def png() -> bytes:
    """A PNG whose byte count is not a multiple of 3: its base64 form ends in padding."""
    data = png_bytes(Image.new("RGB", (20, 20), "teal"))
    assert len(data) % 3 != 0
    return data


def test_an_image_of_exactly_the_byte_limit_is_accepted(png, tmp_path):
    """As a data URL (whose padding the size check used to count as bytes), a local file, raw bytes."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    (tmp_path / "x.png").write_bytes(png)
    exact, under = ImageLimits(max_bytes=len(png)), ImageLimits(max_bytes=len(png) - 1)
    for source in (url, "x.png"):
        assert load_image_url(source, ImagePolicy(local_root=tmp_path, limits=exact), WHERE).size == (20, 20)
        with pytest.raises(APIError, match=f"{len(png)} bytes, more than the server's limit of {len(png) - 1}"):
            load_image_url(source, ImagePolicy(local_root=tmp_path, limits=under), WHERE)
    for source in (url, png, tmp_path / "x.png"):
        assert load_image(source, limits=exact).size == (20, 20)
        with pytest.raises(ImageTooLargeError, match=f"{len(png)} bytes, more than the limit of {len(png) - 1}"):
            load_image(source, limits=under)


def test_an_image_of_exactly_the_byte_limit_over_http(serve, served, png):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    image_part = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "Hi"}]}]
    exact = serve(model=dataclasses.replace(served, image_limits=ImageLimits(max_bytes=len(png))))
    assert post(exact, {"model": MODEL_NAME, "messages": image_part}).status_code == 200
    under = serve(model=dataclasses.replace(served, image_limits=ImageLimits(max_bytes=len(png) - 1)))
    assert_error(post(under, {"model": MODEL_NAME, "messages": image_part}), 413,
                 f"the image has {len(png)} bytes, more than the server's limit of {len(png) - 1}")
