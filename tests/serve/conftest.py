"""Servers for the HTTP tests: the real app under the real uvicorn server class, on a free loopback
port, over the fake engine (tests/serve/fake_engine.py) and the built-in model's processor
(`serve`), or over the real engine and the built-in model (`serve_engine`)."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import pytest
import uvicorn

import dvlm
from dvlm.serve.app import ServerState, create_app
from dvlm.serve.metrics import ServeMetrics, sample_value
from dvlm.serve.server import Server, bind, build_app, url_of
from dvlm.serve.settings import ServedModel, ServeSettings
from tests.serve.fake_engine import FakeEngine

MODEL_NAME = "tiny-dvlm"


@pytest.fixture(scope="session")
def lm():
    """The built-in dVLM: its processor encodes the test requests (the fake engine never runs it)."""
    return dvlm.load(MODEL_NAME)


@pytest.fixture(scope="session")
def served(lm) -> ServedModel:
    return ServedModel.from_lm(lm, MODEL_NAME)


@dataclass
class Running:
    """One app served on loopback in a background thread."""

    url: str
    engine: Any  # a FakeEngine, or the real one
    metrics: ServeMetrics
    state: ServerState
    server: Server
    thread: threading.Thread
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def openai(self, api_key: str = "unused", **options: Any):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=30, **options)

    def metric(self, name: str, **labels: Any) -> float:
        return sample_value(self.metrics, name, labels)

    def stop(self) -> None:
        self.http.close()
        self.server.handle_exit(signal.SIGTERM, None)  # what a SIGTERM does: stop the engine, then uvicorn
        self.thread.join(20)
        assert not self.thread.is_alive(), "the server did not stop"


def _run(app, started: list[Running]) -> Running:
    """Serve `app` on a free loopback port in a background thread, as `dvlm serve` does."""
    state = app.state.dvlm
    sock = bind("127.0.0.1", 0)
    ready = threading.Event()
    server = Server(uvicorn.Config(app, lifespan="on", log_level="warning"), on_ready=ready.set,
                    on_stop=state.begin_shutdown)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert ready.wait(15), "the server did not start"
    running = Running(url_of(sock), state.engine, state.metrics, state, server, thread)
    started.append(running)
    return running


@pytest.fixture
def serve(lm, served) -> Callable[..., Running]:
    """`serve(engine_options={...}, model=..., **ServeSettings fields)` -> a Running server."""
    started: list[Running] = []

    def start(*, engine_options: dict[str, Any] | None = None, model: ServedModel | None = None,
              **settings: Any) -> Running:
        metrics = ServeMetrics()
        engine = FakeEngine(lambda text: lm.processor.tokenizer(text, add_special_tokens=False)["input_ids"],
                            lm.processor.decode, observer=metrics, **(engine_options or {}))
        return _run(create_app(engine, model or served, ServeSettings(**settings), metrics), started)

    yield start
    for running in started:
        running.stop()


@pytest.fixture
def serve_engine(lm) -> Callable[..., Running]:
    """`serve_engine(**ServeSettings fields)` -> a Running server over the real engine and the built-in model."""
    started: list[Running] = []
    yield lambda **settings: _run(build_app(lm, MODEL_NAME, ServeSettings(**settings)), started)
    for running in started:
        running.stop()
