"""The serving engine on the tiny random models: every request's answer equals `generate` of that
request alone (invariant 7 through the engine), groups run side by side, and requests end the
way they should (cancel, timeout, stop strings, a failing group, shutdown, a full queue)."""

import asyncio
import random
import threading
import time

import pytest

import dvlm
from dvlm.config import ConfigError
from dvlm.convert.verify import probe_image
from dvlm.decode.speculative import SpecStepper
from dvlm.decode.stepper import Stepper
from dvlm.serve.answer_text import held_back, tokens_through_stop
from dvlm.serve.engine import Engine
from dvlm.serve.requests import (
    Delta,
    EngineObserver,
    EngineRequest,
    EngineStoppedError,
    Finished,
    QueueFullError,
)

from ..decode.conftest import sharpen

TEXTS = ["Read the digits.", "What colour is the circle?", "Describe the image. How many shapes are there?",
         "Hi", "Where is the red square?"]


@pytest.fixture(scope="module")
def lm(fast_checkpoint):
    return sharpen(dvlm.load(fast_checkpoint))  # confident: thresholds unmask several tokens per pass


class Recorder(EngineObserver):
    def __init__(self):
        self.steps, self.finished = [], []

    def on_step(self, group_key, rows, forwards):
        self.steps.append((group_key, rows, forwards))

    def on_finished(self, request, finished):
        self.finished.append((request.id, finished.output.finish_reason))


@pytest.fixture
def engine_of():
    engines = []

    def make(lm, **kw):
        engine = Engine(lm, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown(timeout_s=10)


def _images(i):
    return [probe_image(56 + 28 * j) for j in range(i % 3)]  # 0, 1 or 2 images


def _request(lm, i, **settings):
    text = TEXTS[i % len(TEXTS)]
    return EngineRequest(id=f"r{i}", prompt=lm.encode(text, _images(i)), **settings), (text, _images(i))


def _alone(lm, request, text, images):
    return lm.generate(text, images, decoder=request.decoder, block_size=request.block_size,
                       threshold=request.threshold, steps=request.steps, temperature=request.temperature,
                       seed=request.seed, max_new_tokens=request.max_new_tokens)


def _events(handle):
    events = list(handle.iter_events())
    assert all(isinstance(e, Delta) for e in events[:-1]) and isinstance(events[-1], Finished)
    return events[:-1], events[-1]


def _stats(out):
    return out.tokens, out.text, out.finish_reason, out.nfe, out.tokens_per_step, out.accept_lengths


MIXED = [
    dict(decoder="block", block_size=4, threshold=0.9),
    dict(decoder="block", block_size=4, threshold=0.5),
    dict(decoder="block", block_size=8, threshold=0.9),
    dict(decoder="block", block_size=4, threshold=0.9, temperature=1.5, seed=7),
    dict(decoder="ar"),
    dict(decoder="ar", temperature=1.0, seed=3),
    dict(decoder="spec", block_size=4),
    dict(decoder="block"),  # the model's block size and threshold
]


def test_concurrent_requests_equal_generate_alone(lm, engine_of, monkeypatch):
    """24 requests (prompts with 0-2 images, budgets 2-20, thresholds, temperatures, three
    decoders, block sizes 4, 8 and the model's 16) from 4 threads at staggered times: each
    answer, its forward count and its per-pass counts equal `generate` of the request alone; the
    Deltas add up to the answer; rows really joined running batches."""
    joins = []
    original_join = Stepper.join

    def counting_join(self, started):
        joins.append(self.num_active)
        original_join(self, started)

    monkeypatch.setattr(Stepper, "join", counting_join)
    recorder = Recorder()
    engine = engine_of(lm, max_batch_size=6, observer=recorder)
    engine.start()
    rng = random.Random(0)
    requests = [_request(lm, i, max_new_tokens=rng.randint(2, 20), **MIXED[i % len(MIXED)]) for i in range(24)]
    handles = {}

    def client(part):
        for request, _ in part:
            time.sleep(rng.random() * 0.03)
            handles[request.id] = engine.submit(request)

    threads = [threading.Thread(target=client, args=(requests[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = {rid: _events(h) for rid, h in handles.items()}
    assert sum(1 for n in joins if n > 0) >= 3  # several requests joined a batch that was running
    assert max(rows for _, rows, _ in recorder.steps) > 1
    assert engine.running_rows == 0 and engine.queue_depth == 0
    for request, (text, images) in requests:
        deltas, finished = results[request.id]
        alone = _alone(lm, request, text, images)
        assert _stats(finished.output) == _stats(alone), request
        assert "".join(d.text for d in deltas) == finished.output.text
        sent = [t for d in deltas for t in d.tokens]
        assert sent == finished.output.tokens[:len(sent)]
        assert finished.error is None and finished.queue_seconds >= 0
        assert 0 < finished.output.timings["total_s"] < 60
    assert sorted(rid for rid, _ in recorder.finished) == sorted(handles)


def test_groups_of_different_block_sizes_run_side_by_side(lm, engine_of):
    recorder = Recorder()
    engine = engine_of(lm, observer=recorder)
    made = [_request(lm, i, decoder="block", block_size=b, max_new_tokens=16) for i, b in enumerate([4, 8, 4, 8])]
    handles = [engine.submit(r) for r, _ in made]
    engine.start()
    outputs = [_events(h)[1].output for h in handles]
    keys = [key for key, _, _ in recorder.steps]
    assert {key[1] for key in keys} == {4, 8}
    first_end = min(len(keys) - keys[::-1].index(k) for k in set(keys))  # where the first group stopped
    assert len(set(keys[:first_end])) == 2  # both groups stepped before either was done
    assert all(rows == 2 for key, rows, _ in recorder.steps[:2])  # two rows per group, one batch each
    for (request, (text, images)), out in zip(made, outputs):
        assert _stats(out) == _stats(_alone(lm, request, text, images))


def _long_request(lm, i, **settings):
    return _request(lm, i, max_new_tokens=400, decoder="ar", **settings)


@pytest.fixture
def no_eos(lm, monkeypatch):
    monkeypatch.setattr(lm.diffusion, "eos_token_ids", [])


def _wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def test_cancel_mid_run_frees_the_row(lm, engine_of, no_eos):
    engine = engine_of(lm)
    engine.start()
    (cancelled, _), (kept, prompt) = _long_request(lm, 0), _request(lm, 1, decoder="ar", max_new_tokens=150)
    handle = engine.submit(cancelled)
    events = handle.iter_events()
    assert isinstance(next(events), Delta)  # running
    other = engine.submit(kept)
    other_events = other.iter_events()
    first = next(other_events)
    assert isinstance(first, Delta) and engine.running_rows == 2  # both running
    handle.cancel()
    _wait_for(lambda: engine.running_rows == 1)
    rest = list(events)
    assert rest[-1].output.finish_reason == "cancelled" and 0 < len(rest[-1].output.tokens) < 400
    handle.cancel()  # idempotent
    finished = list(other_events)[-1]
    assert _stats(finished.output) == _stats(_alone(lm, kept, *prompt))


def test_timeout_ends_a_request(lm, engine_of, no_eos):
    engine = engine_of(lm)
    engine.start()
    request, _ = _long_request(lm, 0, timeout_s=0.05)
    _, finished = _events(engine.submit(request))
    assert finished.output.finish_reason == "timeout" and "timeout" in finished.error
    assert engine.running_rows == 0


def test_queue_full_raises_and_shutdown_ends_the_waiting(lm, engine_of):
    engine = engine_of(lm, max_queue=2)  # not started: nothing leaves the queue
    handles = [engine.submit(_request(lm, i, decoder="ar")[0]) for i in range(2)]
    with pytest.raises(QueueFullError):
        engine.submit(_request(lm, 2, decoder="ar")[0])
    assert engine.queue_depth == 2
    engine.shutdown(timeout_s=1)
    for h in handles:
        _, finished = _events(h)
        assert finished.output.finish_reason == "error" and finished.error == "server shutting down"
    with pytest.raises(EngineStoppedError):
        engine.submit(_request(lm, 3, decoder="ar")[0])


def test_a_failing_step_ends_only_its_group(lm, engine_of, monkeypatch):
    def broken(self):
        raise RuntimeError("the accelerator fell over")

    monkeypatch.setattr(SpecStepper, "step", broken)
    recorder = Recorder()
    engine = engine_of(lm, observer=recorder)
    made = [_request(lm, 0, decoder="spec", block_size=4, max_new_tokens=16),
            _request(lm, 1, decoder="block", block_size=4, max_new_tokens=16),
            _request(lm, 2, decoder="spec", block_size=4, max_new_tokens=16),
            _request(lm, 3, decoder="ar", max_new_tokens=16)]
    handles = [engine.submit(r) for r, _ in made]
    engine.start()
    results = [_events(h)[1] for h in handles]
    for (request, prompt), finished in zip(made, results):
        if request.decoder == "spec":
            assert finished.output.finish_reason == "error" and "accelerator fell over" in finished.error
        else:
            assert _stats(finished.output) == _stats(_alone(lm, request, *prompt))
    # The engine goes on serving, spec requests included (in a new group).
    monkeypatch.undo()
    request, prompt = _request(lm, 4, decoder="spec", block_size=4, max_new_tokens=16)
    assert _stats(_events(engine.submit(request))[1].output) == _stats(_alone(lm, request, *prompt))


def test_shutdown_with_requests_in_flight(lm, engine_of, no_eos):
    engine = engine_of(lm)
    engine.start()
    handles = [engine.submit(_long_request(lm, i)[0]) for i in range(3)]
    _wait_for(lambda: engine.running_rows == 3)
    began = time.monotonic()
    engine.shutdown(timeout_s=5)
    assert time.monotonic() - began < 5
    assert not engine._thread.is_alive()
    for h in handles:
        _, finished = _events(h)
        assert finished.output.finish_reason == "error" and finished.error == "server shutting down"
        assert len(finished.output.tokens) < 400
    with pytest.raises(EngineStoppedError):
        engine.submit(_long_request(lm, 4)[0])


def test_shutdown_returns_in_time_when_a_step_outlasts_it(lm, engine_of, monkeypatch):
    """A step that hangs longer than the shutdown timeout: the requests still end at once."""
    release = threading.Event()
    original = SpecStepper.step

    def slow(self):
        release.wait(10)
        return original(self)

    monkeypatch.setattr(SpecStepper, "step", slow)
    engine = engine_of(lm)
    handles = [engine.submit(_request(lm, i, decoder="spec", block_size=4, max_new_tokens=8)[0]) for i in range(2)]
    engine.start()  # both are admitted in the first iteration, whose step then hangs
    _wait_for(lambda: engine.running_rows == 2)
    began = time.monotonic()
    engine.shutdown(timeout_s=0.2)
    assert time.monotonic() - began < 2
    for h in handles:
        events = list(h.iter_events())
        assert events[-1].error == "server shutting down" and sum(isinstance(e, Finished) for e in events) == 1
    release.set()
    engine._thread.join(10)
    assert not engine._thread.is_alive()


@pytest.mark.parametrize("decoder", ["ar", "block"])
def test_stop_strings_cut_the_text(lm, engine_of, decoder):
    request, prompt = _request(lm, 2, decoder=decoder, block_size=8, max_new_tokens=30)
    full = _alone(lm, request, *prompt)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    assert len(stop) == 3 and full.text.index(stop) > 0
    engine = engine_of(lm)
    engine.start()
    deltas, finished = _events(engine.submit(EngineRequest(**{**request.__dict__, "stop": ("never there", stop)})))
    out = finished.output
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(stop)]
    assert "".join(d.text for d in deltas) == out.text  # the stop string was never sent
    assert stop in lm.processor.decode(out.tokens) and stop not in lm.processor.decode(out.tokens[:-1])
    assert out.tokens == full.tokens[:len(out.tokens)]
    assert out.nfe < full.nfe  # the row left its batch when the stop string appeared


def test_stop_string_text_is_held_back_until_it_is_known(lm, engine_of):
    """Token by token (ar): a stop string spanning two tokens is never sent in part; text that
    only begins a stop string is held back and sent when the answer ends without it."""
    request, prompt = _request(lm, 2, decoder="ar", max_new_tokens=20)
    full = _alone(lm, request, *prompt)
    decode = lm.processor.decode
    boundary = next(m for m in range(3, 20) if len(decode(full.tokens[:m])) >= 2
                    and len(decode(full.tokens[:m + 1])) >= len(decode(full.tokens[:m])) + 2)
    before = decode(full.tokens[:boundary])
    spanning = before[-2:] + decode(full.tokens[:boundary + 1])[len(before):][:2]
    dangling = full.text[-2:] + "\u2603"  # begins at the answer's end, never completed
    engine = engine_of(lm)
    engine.start()
    results = [_events(engine.submit(EngineRequest(**{**request.__dict__, "stop": (stop,)})))
               for stop in (spanning, dangling)]
    (deltas, finished), (late_deltas, late) = results
    assert finished.output.finish_reason == "stop" and finished.output.text == full.text[:full.text.index(spanning)]
    assert "".join(d.text for d in deltas) == finished.output.text
    assert _stats(late.output) == _stats(full)
    assert "".join(d.text for d in late_deltas) == full.text


def test_invalid_settings_end_the_request_with_an_error(lm, engine_of, dvlm_checkpoints):
    engine = engine_of(lm)
    engine.start()
    request = _request(lm, 0, decoder="hf")[0]
    with pytest.raises(ConfigError, match="not served"):
        engine.check(request)
    engine.check(_request(lm, 0, decoder="spec")[0])  # servable: no error
    _, finished = _events(engine.submit(request))
    assert finished.output.finish_reason == "error" and "not served" in finished.error
    other = engine_of(dvlm.load(dvlm_checkpoints["diffusionvl"]))
    other.start()
    _, finished = _events(other.submit(_request(lm, 0, decoder="spec")[0]))
    assert finished.output.finish_reason == "error" and "token-shift" in finished.error


def test_events_on_the_submitting_event_loop(lm, engine_of):
    recorder = Recorder()
    engine = engine_of(lm, observer=recorder)
    engine.start()
    request, prompt = _request(lm, 1, decoder="block", block_size=4, max_new_tokens=12)

    async def client():
        handle = engine.submit(request)
        return [event async for event in handle.events()], handle

    events, handle = asyncio.run(client())
    assert isinstance(events[-1], Finished) and all(isinstance(e, Delta) for e in events[:-1])
    assert _stats(events[-1].output) == _stats(_alone(lm, request, *prompt))
    assert "".join(e.text for e in events[:-1]) == events[-1].output.text
    # One row alone: the forwards the observer saw (its prefill included) are the row's own.
    assert sum(forwards for _, _, forwards in recorder.steps) == events[-1].output.nfe
    assert recorder.finished == [(request.id, events[-1].output.finish_reason)]

    async def elsewhere():
        return [e async for e in handle.events()]

    with pytest.raises(RuntimeError, match="event loop"):
        asyncio.run(elsewhere())


def test_diffusionvl_requests_joining_equal_generate_alone(dvlm_checkpoints, engine_of):
    """The absolute layout (prompt tails in the first canvas, B-wide blocks) through the engine."""
    lm = sharpen(dvlm.load(dvlm_checkpoints["diffusionvl"]))
    engine = engine_of(lm, max_batch_size=4)
    engine.start()
    made = [_request(lm, i, decoder="block", max_new_tokens=6 + 3 * i, **s)
            for i, s in enumerate([{}, dict(threshold=0.9), {}, dict(threshold=0.7), {}, {}])]
    handles = []
    for request, _ in made:
        handles.append(engine.submit(request))
        time.sleep(0.01)
    for (request, prompt), h in zip(made, handles):
        assert _stats(_events(h)[1].output) == _stats(_alone(lm, request, *prompt))


def test_held_back_and_tokens_through_stop_literal():
    assert held_back("the end is ne", ("near",)) == 2
    assert held_back("the end", ("near", "xx")) == 0
    assert held_back("abc", ("c", "bcd")) == 2  # a one-character stop is never held: it is found
    decode = "".join
    assert tokens_through_stop(["a", "b", "S", "T", "c"], decode, ("ST",)) == ["a", "b", "S", "T"]
    assert tokens_through_stop(["xS", "Ty"], decode, ("ST",)) == ["xS", "Ty"]
