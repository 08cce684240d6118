"""The engine outlives its own failures, on the scripted model (tests/decode/scripted.py): a group
whose serving fails, and whose failure path fails again, ends only its own requests; an iteration
that fails outside any group ends what it was serving; a loop thread that ends anyway ends every
request and refuses new ones. Nothing hangs: every wait here is bounded."""

from __future__ import annotations

import logging
import threading

import pytest

from dvlm.config import DecodeConfig
from dvlm.decode.generate import decoder_function
from dvlm.serve import engine as engine_module
from dvlm.decode.block import BlockStepper
from dvlm.serve.answer_text import AnswerText
from dvlm.serve.engine import Engine
from dvlm.serve.requests import EngineRequest, EngineStoppedError, Finished
from tests.decode.scripted import prompt, scripted_lm

WAIT_S = 30
BREAK = "\x00break"  # a stop string no answer contains: the requests carrying it have broken text


def events_within(handle, seconds: float = WAIT_S) -> list:
    """The handle's events, failing (instead of hanging) if its Finished does not come in time."""
    got: list = []
    reader = threading.Thread(target=lambda: got.extend(handle.iter_events()), daemon=True)
    reader.start()
    reader.join(seconds)
    assert got and isinstance(got[-1], Finished), f"no Finished within {seconds} s: the engine hangs"
    return got


def request(i: int, decoder: str = "block", **settings) -> EngineRequest:
    options = {"block_size": 4} if decoder != "ar" else {}
    return EngineRequest(id=f"r{i}", prompt=prompt(8 + i), decoder=decoder, max_new_tokens=12,
                         **{**options, **settings})


@pytest.fixture
def lm():
    return scripted_lm()


@pytest.fixture
def engine(lm):
    engine = Engine(lm, max_batch_size=4)
    yield engine
    engine.shutdown(timeout_s=10)


@pytest.fixture
def broken_text(monkeypatch):
    """Decoding the answer of a request whose stop strings include BREAK raises, in the step and in
    the failure path alike (its text, its final text and its partial answer)."""
    def breaks(original):
        def method(self, *args):
            if BREAK in self.stop:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "the tokenizer broke")
            return original(self, *args)
        return method

    monkeypatch.setattr(AnswerText, "add", breaks(AnswerText.add))
    monkeypatch.setattr(AnswerText, "final", breaks(AnswerText.final))
    original_partial = engine_module.partial_output

    def partial(entry, *args):
        if BREAK in entry.request.stop:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "the tokenizer broke")
        return original_partial(entry, *args)

    monkeypatch.setattr(engine_module, "partial_output", partial)


def stats(done: Finished) -> tuple:
    out = done.output
    return out.tokens, out.text, out.finish_reason, out.nfe


def stats_alone(lm, req: EngineRequest) -> tuple:
    """What `generate` gives the request alone."""
    cfg = DecodeConfig(decoder=req.decoder, block_size=req.block_size, max_new_tokens=req.max_new_tokens)
    out = decoder_function(req.decoder)(lm, [req.prompt], cfg)[0]
    return out.tokens, out.text, out.finish_reason, out.nfe


def test_a_failure_inside_the_failure_path_ends_only_its_group(lm, engine, broken_text, caplog):
    """Requests of the spec group break their text, and again while their group is being ended: they
    end with "error" and the reason; the block and ar groups, running at the same time, answer as
    `generate` alone; the failure is logged once; the engine serves new spec requests afterwards."""
    caplog.set_level(logging.ERROR, logger=engine_module.__name__)
    made = [request(0, "spec", stop=(BREAK,)), request(1, "block"), request(2, "spec", stop=(BREAK,)),
            request(3, "ar"), request(4, "block")]
    handles = [engine.submit(r) for r in made]
    engine.start()
    for req, handle in zip(made, handles):
        done = events_within(handle)[-1]
        if BREAK in req.stop:
            assert done.output.finish_reason == "error"
            assert done.error == "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0: the tokenizer broke"
            assert done.output.text == "" and done.output.tokens == []
        else:
            assert stats(done) == stats_alone(lm, req), req.id
    failures = [r for r in caplog.records if "serving group" in r.getMessage()]
    assert len(failures) == 1 and failures[0].getMessage() == "serving group ('spec', 4, None) failed"
    assert engine.alive and engine.running_rows == 0 and engine.queue_depth == 0
    again = request(5, "spec")
    assert stats(events_within(engine.submit(again))[-1]) == stats_alone(lm, again)


def test_a_failing_step_whose_rows_cannot_even_be_ended(lm, engine, monkeypatch):
    """The step of the block group raises, and so does building its rows' outputs: its requests
    still end (with the step's error), the ar group goes on."""
    def broken(self, *args):
        raise RuntimeError("the accelerator fell over")

    monkeypatch.setattr(BlockStepper, "step", broken)
    monkeypatch.setattr(BlockStepper, "output", broken)
    made = [request(0, "block"), request(1, "ar"), request(2, "block")]
    handles = [engine.submit(r) for r in made]
    engine.start()
    results = [events_within(h)[-1] for h in handles]
    assert [r.output.finish_reason for r in results] == ["error", "length", "error"]
    assert results[0].error == results[2].error == "RuntimeError: the accelerator fell over"
    assert stats(results[1]) == stats_alone(lm, made[1])
    monkeypatch.undo()
    assert stats(events_within(engine.submit(made[2]))[-1]) == stats_alone(lm, made[2])


def test_an_iteration_that_fails_outside_any_group(lm, engine, monkeypatch):
    """A bug in the loop's own code (here: stepping the groups, once): the requests it was serving end
    with "error"; a request still waiting in the queue is served after."""
    original = Engine._step_groups
    calls = []

    def fails_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug in the loop")
        original(self)

    monkeypatch.setattr(Engine, "_step_groups", fails_once)
    engine.max_batch_size = 1  # the second request of the group waits in the queue
    first, second = request(0, "ar"), request(1, "ar")
    handles = [engine.submit(first), engine.submit(second)]
    engine.start()
    done = [events_within(h)[-1] for h in handles]
    assert done[0].output.finish_reason == "error" and done[0].error == "KeyError: 'a bug in the loop'"
    assert stats(done[1]) == stats_alone(lm, second)
    assert engine.alive


def test_a_loop_thread_that_ends_ends_every_request_and_refuses_new_ones(lm, engine, monkeypatch):
    """Only a BaseException gets past the loop's recovery; the thread then ends, and nothing hangs."""
    def dies(self):
        raise SystemExit("the loop was told to exit")

    waiting = engine.submit(request(0, "ar"))
    monkeypatch.setattr(Engine, "_iterate", dies)
    engine.start()
    done = events_within(waiting)[-1]
    assert done.output.finish_reason == "error"
    assert done.error == "engine failure: SystemExit: the loop was told to exit"
    engine._thread.join(WAIT_S)
    assert not engine.alive
    with pytest.raises(EngineStoppedError, match="the engine has stopped"):
        engine.submit(request(1, "ar"))
