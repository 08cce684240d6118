"""A request's life after submission, over real HTTP with the fake engine: clients that go away,
timeouts, engine failures, shutdown with streams in flight, and what /metrics shows of it."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from typing import Iterator

import httpx
import openai
import pytest

from dvlm.serve import relay as relay_module
from dvlm.serve.metrics import ServeMetrics
from dvlm.serve.server import GRACEFUL_TIMEOUT_S
from tests.serve.conftest import MODEL_NAME
from tests.serve.test_app import sse_events
from tests.serve.test_errors import HI, assert_error, assert_still_serving, body, wait_for


def open_stream(server, **fields) -> tuple[httpx.Response, Iterator[str]]:
    """Start a streamed request and read its first event (the role chunk). Returns the response and
    its live event iterator (dropping the iterator would close the response)."""
    request = server.http.build_request("POST", "/v1/chat/completions", json=body(stream=True, **fields))
    response = server.http.send(request, stream=True)
    assert response.status_code == 200
    events = (line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(next(events))["choices"][0]["delta"]["role"] == "assistant"
    return response, events


def test_stream_client_that_disconnects_frees_its_row(serve):
    server = serve()
    server.engine.hang = True  # the row would run forever: only the disconnect can end it
    response, events = open_stream(server)
    wait_for(lambda: server.engine.running_rows == 1)
    time.sleep(0.1)  # several engine steps: the row stays while its client is connected
    assert 'dvlm_running_rows 1.0' in server.http.get("/metrics").text and server.engine.cancelled == []
    response.close()
    wait_for(lambda: server.engine.running_rows == 0)
    assert server.engine.cancelled == [server.engine.submitted[0].id]
    metrics = server.http.get("/metrics").text
    assert 'dvlm_running_rows 0.0' in metrics
    assert 'dvlm_requests_total{finish_reason="cancelled"} 1.0' in metrics
    server.engine.hang = False
    assert_still_serving(server)


def test_waiting_client_that_disconnects_cancels_its_request(serve):
    server = serve()
    server.engine.hang = True
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body(), timeout=0.5)
    wait_for(lambda: server.engine.cancelled == [server.engine.submitted[0].id])
    assert server.engine.running_rows == 0
    server.engine.hang = False
    assert_still_serving(server)


def test_engine_timeout_is_504_or_an_error_event(serve):
    server = serve(request_timeout_s=0.2)
    server.engine.hang = True
    assert_error(server.http.post("/v1/chat/completions", json=body()), 504, "timeout of 0.2 s", "timeout")
    with pytest.raises(openai.APIError, match="timeout of 0.2 s"):
        list(server.openai().chat.completions.create(model=MODEL_NAME, messages=HI, stream=True))
    assert server.metric("dvlm_requests_total", finish_reason="timeout") == 2


def test_an_engine_that_overruns_the_timeout_is_cut_off(serve, monkeypatch):
    """The HTTP layer's own deadline (timeout + grace): a stuck engine cannot hold a connection forever."""
    monkeypatch.setattr(relay_module, "TIMEOUT_GRACE_S", 0.2)
    server = serve(request_timeout_s=0.2)
    server.engine.hang, server.engine.honour_timeouts = True, False
    started = time.monotonic()
    assert_error(server.http.post("/v1/chat/completions", json=body()), 504, "ran past the server's timeout")
    assert time.monotonic() - started < 5
    response = server.http.post("/v1/chat/completions", json=body(stream=True))
    events = sse_events(response.text)
    assert json.loads(events[-2])["error"]["code"] == "timeout" and events[-1] == "[DONE]"
    wait_for(lambda: server.engine.running_rows == 0)  # both rows were cancelled
    assert len(server.engine.cancelled) == 2


def test_engine_failure_is_500_with_its_reason_or_an_error_event(serve):
    server = serve()
    server.engine.fail_with = "CUDA out of memory"
    error = assert_error(server.http.post("/v1/chat/completions", json=body()), 500,
                         "generation failed: CUDA out of memory", "engine_error")
    assert error["type"] == "server_error"
    with pytest.raises(openai.APIError, match="generation failed: CUDA out of memory"):
        list(server.openai().chat.completions.create(model=MODEL_NAME, messages=HI, stream=True))
    server.engine.fail_with = None
    assert_still_serving(server)


def test_an_engine_bug_is_a_500_or_an_error_event_never_a_trace(serve):
    server = serve()
    server.engine.broken_events = True
    assert_error(server.http.post("/v1/chat/completions", json=body()), 500, "internal server error", "internal_error")
    events = sse_events(server.http.post("/v1/chat/completions", json=body(stream=True)).text)
    assert json.loads(events[-2])["error"]["code"] == "internal_error" and events[-1] == "[DONE]"
    server.engine.broken_events = False
    wait_for(lambda: server.engine.running_rows == 0)
    assert_still_serving(server)


def test_shutdown_ends_streams_in_flight_with_an_error_and_refuses_new_requests(serve):
    server = serve()
    server.engine.hang = True
    streams = [open_stream(server) for _ in range(3)]
    waiting = []
    thread = threading.Thread(target=lambda: waiting.append(
        httpx.post(f"{server.url}/v1/chat/completions", json=body(), timeout=30)))
    thread.start()
    wait_for(lambda: server.engine.running_rows == 4)
    stopper = threading.Thread(target=server.state.begin_shutdown)
    stopper.start()
    for response, events in streams:
        rest = list(events)
        assert json.loads(rest[0])["error"]["message"] == "the server is shutting down; retry on another instance"
        assert rest[1:] == ["[DONE]"]
        response.close()
    thread.join(10)
    stopper.join(10)
    assert_error(waiting[0], 503, "shutting down")
    assert server.engine.stopped
    assert server.http.get("/health").status_code == 503
    assert_error(server.http.post("/v1/chat/completions", json=body()), 503, "shutting down", "unavailable")


def test_metrics_count_requests_tokens_forwards_and_latency(serve):
    server = serve()
    client = server.openai()
    for _ in range(2):
        client.chat.completions.create(model=MODEL_NAME, messages=HI)
    list(client.chat.completions.create(model=MODEL_NAME, messages=HI, stream=True))
    server.http.post("/v1/chat/completions", json=body(threshold=7))
    text = server.http.get("/metrics").text
    assert server.metric("dvlm_requests_total", finish_reason="stop") == 3
    assert server.metric("dvlm_generated_tokens_total") == 3 * 9
    assert server.metric("dvlm_forwards_total") >= 3 * 3 and server.metric("dvlm_engine_steps_total") >= 3
    assert server.metric("dvlm_tokens_per_forward_count") == 3
    assert server.metric("dvlm_time_to_first_token_seconds_count") == 3
    assert server.metric("dvlm_request_latency_seconds_count") == 3
    assert server.metric("dvlm_http_responses_total", path="/v1/chat/completions", code=200) == 3
    assert server.metric("dvlm_http_responses_total", path="/v1/chat/completions", code=400) == 1
    for name in ("dvlm_queue_depth", "dvlm_running_rows", "dvlm_queue_seconds_bucket", "dvlm_step_rows_bucket"):
        assert name in text
    assert server.http.get("/metrics").headers["content-type"].startswith("text/plain")


def test_each_app_has_its_own_registry(serve):
    first, second = serve(), serve()
    first.openai().chat.completions.create(model=MODEL_NAME, messages=HI)
    assert first.metric("dvlm_requests_total", finish_reason="stop") == 1
    assert second.metric("dvlm_requests_total", finish_reason="stop") == 0
    assert ServeMetrics().registry is not ServeMetrics().registry


def test_health_is_503_once_the_engine_loop_is_gone(serve):
    """A load balancer must stop sending to an instance whose engine can no longer answer."""
    server = serve()
    server.engine.hang = True
    response, events = open_stream(server)
    wait_for(lambda: server.engine.running_rows == 1)
    assert server.http.get("/health").json() == {"status": "ok"}
    server.engine.die()
    rest = list(events)
    assert json.loads(rest[0])["error"]["message"] == "generation failed: engine failure: the loop died"
    response.close()
    health = server.http.get("/health")
    assert (health.status_code, health.json()) == (503, {"status": "engine stopped"})
    assert_error(server.http.post("/v1/chat/completions", json=body()), 503, "not taking requests", "unavailable")


def test_shutdown_does_not_wait_for_clients_still_sending_their_bodies(serve):
    """A client hanging mid-body used to hold the shutdown for uvicorn's whole graceful timeout
    (15 s), then fail with a traceback; it gets a 503 at once, and the server stops."""
    server = serve()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        wait_for(lambda: server.state.preparing == 1)  # its body is being read
        server.server.handle_exit(signal.SIGTERM, None)
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            answer += chunk
        answer = answer.decode()
        assert answer.startswith("HTTP/1.1 503 ") and "the server is shutting down" in answer
    server.thread.join(GRACEFUL_TIMEOUT_S - 5)
    assert not server.thread.is_alive(), "the shutdown waited for the hanging client"
