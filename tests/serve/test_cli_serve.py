"""`dvlm serve` on the command line: one-line errors before anything starts, and the real process
(started as a user starts it, engine replaced by the fake one: tests/serve/fake_serve.py) printing
its URL, serving, and stopping cleanly on SIGTERM with streams in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from dvlm import cli
from dvlm.serve import server as server_module
from tests.serve.fake_serve import HANG_TOKENS
from tests.serve.test_errors import HI
from tests.test_cli import one_line_error, run

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--threshold", "2"], "threshold must be in [0, 1], got 2.0"),
    (["--block-size", "0"], "block_size must be >= 1, got 0"),
    (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1, got 0"),
    (["--request-timeout", "-1"], "--request-timeout must be > 0"),
    (["--max-body-mb", "0"], "--max-body-mb must be > 0"),
    (["--max-body-mb", "1e-300"], "--max-body-mb must be > 0 (one byte at least), got 1e-300"),
    (["--port", "eighty"], "argument --port: invalid int value: 'eighty' (see dvlm serve --help)"),
    (["--max-batch", "2", "--bogus"], "unrecognized arguments: --bogus (see dvlm serve --help)"),
    (["--api-key="], "--api-key (or DVLM_API_KEY) is empty"),
    (["--allow-local-images", "/nonexistent/dir"], "--allow-local-images: /nonexistent/dir is not a directory"),
    (["--prefix-cache-mb", "-0.5"], "--prefix-cache-mb must be >= 0 (0: off), got -0.5"),
    (["--vision-cache-mb", "nan"], "argument --vision-cache-mb: must be a finite number, got 'nan'"),
])
def test_settings_are_refused_in_one_line_before_anything_starts(capsys, argv, message):
    code, out, err = run(capsys, "serve", *argv)
    assert code == 2 and out == ""
    assert message in one_line_error(err, "serve")


def real_options() -> list[tuple[str, str]]:
    """(verb, option) of every real-valued option of every verb."""
    verbs = next(a for a in cli.build_parser()._actions if a.dest == "verb").choices
    return [(name, action.option_strings[0]) for name, sub in verbs.items() for action in sub._actions
            if action.type is cli.real]


def test_every_real_valued_option_is_one_argument_type():
    options = real_options()
    assert ("serve", "--max-body-mb") in options and ("serve", "--request-timeout") in options
    assert ("train", "--lr") in options and ("generate", "--temperature") in options
    for verb, sub in next(a for a in cli.build_parser()._actions if a.dest == "verb").choices.items():
        assert not [a.dest for a in sub._actions if a.type is float], verb  # none left on the plain float


@pytest.mark.parametrize("verb, option", real_options())
@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e999"])
def test_non_finite_numbers_are_a_one_line_usage_error(capsys, verb, option, value):
    """`dvlm serve --max-body-mb inf` used to end in an OverflowError traceback."""
    code, out, err = run(capsys, verb, f"{option}={value}")
    assert code == 2 and out == ""
    assert one_line_error(err, verb) == (f"dvlm {verb}: error: argument {option}: must be a finite number, "
                                         f"got {value!r} (see dvlm {verb} --help)")


def test_a_taken_port_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "serve_modules", lambda: server_module)  # the port check, with or without the engine
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code, _, err = run(capsys, "serve", "--port", taken.getsockname()[1])
    assert code == 2 and "cannot listen on 127.0.0.1:" in one_line_error(err, "serve")
    assert "in use" in err


def test_an_unknown_model_is_one_line_and_frees_the_port(capsys, monkeypatch):
    monkeypatch.setattr(cli, "serve_modules", lambda: server_module)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = run(capsys, "serve", "--model", "/nonexistent/model", "--port", port)
    assert code == 2 and "model '/nonexistent/model': no such directory" in one_line_error(err, "serve")
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # the server's socket was closed


def test_without_the_engine_serve_says_so(capsys):
    try:
        import dvlm.serve.engine  # noqa: F401
    except ImportError:
        code, _, err = run(capsys, "serve", "--port", "0")
        assert code == 2 and "no serving engine" in one_line_error(err, "serve")
    else:
        pytest.skip("dvlm.serve.engine is installed")


# -- the real process ------------------------------------------------------------------------------
class Process:
    """A `dvlm serve` process (fake engine) started on a free port; its URL read from its stdout."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.serve.fake_serve", "serve", "--port", "0", *argv], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})
        self.url = self._read_url()
        wait_healthy(self.url)

    def _read_url(self) -> str:
        line = read_line(self.proc, START_TIMEOUT_S)
        assert line.startswith("dvlm serve: tiny-dvlm at http://127.0.0.1:"), line + self.proc.stderr.read()
        return line.split(" at ")[1].split(" ")[0]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, out, err


def read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The next stdout line of `proc`, failing (and killing it) after `timeout_s`."""
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    try:
        return proc.stdout.readline().strip()
    finally:
        timer.cancel()


def wait_healthy(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} never became healthy"
        time.sleep(0.1)


def test_the_process_serves_then_sigterm_ends_streams_with_an_error_and_exits_cleanly():
    """One process for the module (starting one costs seconds): it answers, refuses, then stops."""
    server = Process("--api-key", "sesame")
    headers = {"Authorization": "Bearer sesame"}
    request = {"model": "tiny-dvlm", "messages": HI}
    hanging = {**request, "max_tokens": HANG_TOKENS}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        assert http.get("/v1/models").json()["data"][0]["id"] == "tiny-dvlm"
        assert http.post("/v1/chat/completions", json=request).json()["choices"][0]["finish_reason"] == "stop"
        refused = http.post("/v1/chat/completions", json=request, headers={"Authorization": "Bearer no"})
        assert refused.status_code == 401
        streams = []
        for _ in range(2):
            response = http.send(http.build_request("POST", "/v1/chat/completions", json={**hanging, "stream": True}),
                                 stream=True)
            events = (line[6:] for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(next(events))["choices"][0]["delta"]["role"] == "assistant"
            streams.append((response, events))
        waiting: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: waiting.append(http.post("/v1/chat/completions", json=hanging)))
        thread.start()
        time.sleep(0.5)  # the waiting request reaches the engine
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        for response, events in streams:
            rest = list(events)
            assert "shutting down" in json.loads(rest[0])["error"]["message"] and rest[1:] == ["[DONE]"]
            response.close()
        thread.join(20)
    assert waiting[0].status_code == 503 and "shutting down" in waiting[0].json()["error"]["message"]
    code, out, err = server.stop(timeout_s=20)
    assert time.monotonic() - started < 15
    assert code == 0, err
    assert out.strip().splitlines()[-1] == "dvlm serve: stopped"
    assert "Traceback" not in err


def test_sigterm_during_a_long_forward_exits_cleanly(tmp_path):
    """The real engine mid-step (inside torch) when SIGTERM comes and no client waits any more: the
    process used to exit around the running step and die with SIGABRT (status -6) after printing
    "dvlm serve: stopped"; it must let the step finish and exit with 0."""
    mark = tmp_path / "step-began"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DVLM_TEST_STEP_S": "4",
           "DVLM_TEST_STEP_MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.serve.slow_serve", "serve", "--port", "0"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = read_line(proc, START_TIMEOUT_S)
    assert " at http://127.0.0.1:" in line, line + proc.stderr.read()
    url = line.split(" at ")[1].split(" ")[0]
    body = {"model": "tiny-dvlm", "messages": HI, "stream": True, "max_tokens": 64}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert time.monotonic() < deadline, "no engine step began"
            time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the client has gone; the step has seconds to run
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == "dvlm serve: stopped"
    assert "terminate called" not in err and "Traceback" not in err
