"""--request-timeout over real HTTP: it counts from the request's arrival (reading and preparing it
included), and the real engine ends a request at the first block boundary past it: a whole answer
is a 504, a stream ends with an error event, and the row leaves its batch."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from dvlm.convert.verify import probe_image
from dvlm.decode.stepper import Stepper
from tests.serve.test_app import sse_events, user
from tests.serve.test_errors import assert_error, body, wait_for

STEP_DELAY_S = 0.2  # per engine step: an ar answer of 30 tokens takes 6 s, far past a 2 s timeout


def test_the_timeout_counts_from_the_request_s_arrival(serve, served):
    """Preparing the request (here a slow encode) takes longer than the timeout: 504 before the
    engine ever sees it, streamed or not."""
    def slow_encode(messages):
        time.sleep(0.5)
        return served.encode(messages)

    server = serve(model=dataclasses.replace(served, encode=slow_encode), request_timeout_s=0.3)
    for stream in (False, True):
        assert_error(server.http.post("/v1/chat/completions", json=body(stream=stream)), 504,
                     "ran past the server's timeout of 0.3 s", "timeout")
    assert server.engine.submitted == []
    assert server.metric("dvlm_http_responses_total", path="/v1/chat/completions", code=504) == 2


@pytest.fixture
def slow_steps(monkeypatch):
    original = Stepper.step

    def step(self):
        time.sleep(STEP_DELAY_S)
        return original(self)

    monkeypatch.setattr(Stepper, "step", step)


def test_the_engine_ends_a_running_request_past_its_timeout(serve_engine, slow_steps):
    """The engine, not the HTTP layer's last-resort deadline, ends them (finish_reason "timeout" in the
    metrics, where a deadline cut-off would count a cancel); the rows leave the batch."""
    server = serve_engine(request_timeout_s=2.0)
    # The built-in model describes this image in 31 tokens: at least 6 s of steps.
    request = body(messages=user("Describe the image.", probe_image(112)), max_tokens=64, decoder="ar")
    assert_error(server.http.post("/v1/chat/completions", json=request), 504,
                 "the request ran past the server's timeout of 2 s", "timeout")
    events = sse_events(server.http.post("/v1/chat/completions", json={**request, "stream": True}).text)
    assert any(json.loads(e)["choices"][0]["delta"].get("content") for e in events[1:-2])  # it was streaming
    assert json.loads(events[-2])["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    assert server.metric("dvlm_requests_total", finish_reason="timeout") == 2
    assert server.metric("dvlm_requests_total", finish_reason="cancelled") == 0
    wait_for(lambda: server.engine.running_rows == 0)
