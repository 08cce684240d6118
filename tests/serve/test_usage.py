"""`usage` for every way an answer ends, through the real engine on the scripted model
(tests/decode/scripted.py), whose answers are known in advance: from an 8-token prompt the script
writes 7 0 5 10 3 8 1 6 11 4 9 2 ... (the text of token t is str(t), joined by spaces).

completion_tokens counts the answer's tokens, and the end-of-answer token when the model produced
the one that ended it (as OpenAI and vLLM count it). An answer cut by a stop string counts through
the token that completed the stop string: neither an end token the model never produced nor the
tokens a block committed after the stop string."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dvlm.serve.engine import Engine
from dvlm.serve.requests import EngineObserver, EngineRequest, Finished
from dvlm.serve.schemas import usage
from tests.decode.scripted import (
    EOS,
    HIGH_LOGIT,
    LOW_LOGIT,
    VOCAB,
    ScriptedAdapter,
    is_confident,
    prompt,
    script_token,
    scripted_lm,
)

PROMPT = 8
END_AT = 13  # the ending model writes its end token at position 13: the answer is 7 0 5 10 3


class EndingAdapter(ScriptedAdapter):
    """The script, with the end-of-answer token at position END_AT."""

    def hidden_states(self, model, inputs_embeds, position_ids, attention_mask, cache=None) -> torch.Tensor:
        target = position_ids[0] + 1  # (B, Q): the position each output predicts
        logit = torch.where(is_confident(target), HIGH_LOGIT, LOW_LOGIT)
        token = torch.where(target == END_AT, EOS, script_token(target))
        return nn.functional.one_hot(token, VOCAB).float() * logit[..., None]


class OnStep(EngineObserver):
    """Calls `action` after the engine's `at`-th step (from the loop thread: deterministic)."""

    def __init__(self, at: int, action) -> None:
        self.at, self.action, self.steps = at, action, 0

    def on_step(self, group_key, rows, forwards) -> None:
        self.steps += 1
        if self.steps == self.at:
            self.action()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def finished(engine: Engine, **settings) -> Finished:
    handle = engine.submit(EngineRequest(id="r", prompt=prompt(PROMPT), **settings))
    return list(handle.iter_events())[-1]


def served(lm=None, **options) -> Engine:
    engine = Engine(lm or scripted_lm(), **options)
    engine.start()
    return engine


@pytest.fixture
def engines():
    made = []

    def make(lm=None, **options) -> Engine:
        made.append(served(lm, **options))
        return made[-1]

    yield make
    for engine in made:
        engine.shutdown()


def usage_of(done: Finished) -> tuple[dict, str, str, list[int]]:
    return usage(done), done.output.finish_reason, done.output.text, done.output.tokens


@pytest.mark.parametrize("decoder, options", [("ar", {}), ("block", {"block_size": 8}), ("spec", {"block_size": 4})])
def test_an_answer_ended_by_the_end_token_counts_it(engines, decoder, options):
    lm = scripted_lm()
    lm.adapter = EndingAdapter()
    done = finished(engines(lm), decoder=decoder, max_new_tokens=12, **options)
    assert usage_of(done) == ({"prompt_tokens": 8, "completion_tokens": 6, "total_tokens": 14}, "stop",
                              "7 0 5 10 3", [7, 0, 5, 10, 3])


@pytest.mark.parametrize("decoder, options", [("ar", {}), ("block", {"block_size": 8}), ("spec", {"block_size": 4})])
def test_an_answer_cut_at_max_tokens(engines, decoder, options):
    done = finished(engines(), decoder=decoder, max_new_tokens=5, **options)
    assert usage_of(done) == ({"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}, "length",
                              "7 0 5 10 3", [7, 0, 5, 10, 3])


@pytest.mark.parametrize("decoder, options", [("ar", {}), ("block", {"block_size": 8}), ("spec", {"block_size": 4})])
def test_an_answer_cut_by_a_stop_string_counts_through_the_token_that_completed_it(engines, decoder, options):
    """Block decoding commits 7 0 5 10 3 8 1 6 in one step: the four after "10" are not counted,
    and no end token either (the model produced none)."""
    done = finished(engines(), decoder=decoder, max_new_tokens=12, stop=("10",), **options)
    assert usage_of(done) == ({"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}, "stop",
                              "7 0 5 ", [7, 0, 5, 10])
    assert done.stop_string


def test_a_stop_string_in_an_answer_that_also_produced_its_end_token(engines):
    """The end token comes after the stop string (position 13, after "10" at 11): the answer is cut
    at the stop string, and the end token past it does not count."""
    lm = scripted_lm()
    lm.adapter = EndingAdapter()
    done = finished(engines(lm), decoder="block", block_size=8, max_new_tokens=12, stop=("10",))
    assert usage_of(done) == ({"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}, "stop",
                              "7 0 5 ", [7, 0, 5, 10])


def test_a_cancelled_answer_counts_what_it_committed(engines):
    """ar commits one token per step: cancelled after its second step, the answer holds two."""
    handles = []
    engine = engines(observer=OnStep(2, lambda: handles[0].cancel()))
    handles.append(engine.submit(EngineRequest(id="r", prompt=prompt(PROMPT), decoder="ar", max_new_tokens=12)))
    done = list(handles[0].iter_events())[-1]
    assert usage_of(done) == ({"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}, "cancelled",
                              "7 0", [7, 0])


def test_a_timed_out_answer_counts_what_it_committed(engines):
    """The clock passes the 10 s timeout during the third step: the answer ends there with three tokens."""
    clock = Clock()

    def late() -> None:
        clock.now += 11.0

    done = finished(engines(observer=OnStep(3, late), clock=clock), decoder="ar", max_new_tokens=12, timeout_s=10.0)
    assert usage_of(done) == ({"prompt_tokens": 8, "completion_tokens": 3, "total_tokens": 11}, "timeout",
                              "7 0 5", [7, 0, 5])
    assert done.error == "the request ran past its timeout of 10 s"


def test_an_answer_completed_in_the_step_that_passed_its_timeout_is_a_timeout(engines):
    """Block decoding writes the whole 5-token answer in one step; the clock passed the timeout
    during it: past its timeout, the request ends so (the HTTP layer answers 504), with what it
    committed."""
    clock = Clock()

    def late() -> None:
        clock.now += 11.0

    done = finished(engines(observer=OnStep(1, late), clock=clock), decoder="block", block_size=8,
                    max_new_tokens=5, timeout_s=10.0)
    assert usage_of(done) == ({"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}, "timeout",
                              "7 0 5 10 3", [7, 0, 5, 10, 3])


def test_requests_that_end_before_their_prefill_count_nothing(engines):
    clock = Clock()
    engine = Engine(scripted_lm(), clock=clock)  # not started: the requests wait
    cancelled = engine.submit(EngineRequest(id="c", prompt=prompt(PROMPT), decoder="ar"))
    expired = engine.submit(EngineRequest(id="t", prompt=prompt(PROMPT), decoder="ar", timeout_s=10.0))
    cancelled.cancel()
    clock.now = 11.0
    engine.start()
    try:
        for handle, reason in ((cancelled, "cancelled"), (expired, "timeout")):
            assert usage_of(list(handle.iter_events())[-1]) == (
                {"prompt_tokens": 8, "completion_tokens": 0, "total_tokens": 8}, reason, "", [])
    finally:
        engine.shutdown()


def test_a_request_that_is_not_streamed_gets_only_its_finished(engines):
    """No Delta events (the HTTP layer would drop them), the same answer and usage."""
    engine = engines()
    streamed = list(engine.submit(EngineRequest(id="s", prompt=prompt(PROMPT), decoder="block", block_size=4,
                                                max_new_tokens=12)).iter_events())
    whole = list(engine.submit(EngineRequest(id="w", prompt=prompt(PROMPT), decoder="block", block_size=4,
                                             max_new_tokens=12, stream=False)).iter_events())
    assert [type(e).__name__ for e in streamed] == ["Delta", "Delta", "Delta", "Finished"]
    assert [type(e).__name__ for e in whole] == ["Finished"]
    assert usage_of(whole[-1]) == usage_of(streamed[-1]) == (
        {"prompt_tokens": 8, "completion_tokens": 12, "total_tokens": 20}, "length",
        "7 0 5 10 3 8 1 6 11 4 9 2", [7, 0, 5, 10, 3, 8, 1, 6, 11, 4, 9, 2])
