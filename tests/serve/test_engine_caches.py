"""The engine with its caches (every family): a conversation's next turn, sent while other
requests run, starts from the keys/values of the turn before and answers as `generate` alone; a
request with `cache` False neither reuses nor leaves anything; the caches' counts reach the
server's metrics."""

import pytest

import dvlm
from dvlm.convert.verify import probe_image
from dvlm.decode.prompts import Caches
from dvlm.serve.engine import Engine
from dvlm.serve.metrics import ServeMetrics, sample_value
from dvlm.serve.requests import EngineRequest, Finished

from ..decode.conftest import sharpen

SETTINGS = [dict(decoder="block", block_size=4, threshold=0.9), dict(decoder="ar"), dict(decoder="spec", block_size=4)]


@pytest.fixture(scope="module")
def lm(fast_checkpoint):
    return sharpen(dvlm.load(fast_checkpoint))


@pytest.fixture
def engine(lm):
    metrics = ServeMetrics()
    caches = Caches.sized(vision_mb=16, prefix_mb=64)
    metrics.watch_caches(caches)
    engine = Engine(lm, max_batch_size=4, observer=metrics, caches=caches)
    engine.start()
    yield engine, metrics
    engine.shutdown(timeout_s=10)


def _finished(handle) -> Finished:
    return list(handle.iter_events())[-1]


def _turn(history, text, images=()):
    return [*history, {"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                                   {"type": "text", "text": text}]}]


def test_a_next_turn_reuses_the_turn_before_among_other_requests(lm, engine):
    engine, metrics = engine
    first = _turn([], "Describe the image.", [probe_image()])
    answers = {}
    for i, settings in enumerate(SETTINGS):
        request = EngineRequest(id=f"t1-{i}", prompt=lm.encode(first), max_new_tokens=10, **settings)
        answers[i] = _finished(engine.submit(request)).output
    # Next turns of the three conversations, beside requests that share nothing with them.
    handles = []
    for i, settings in enumerate(SETTINGS):
        second = _turn([*first, {"role": "assistant", "content": answers[i].text}], "How many shapes are there?")
        other = lm.encode("Read the digits.", [probe_image(84)])
        handles.append((second, engine.submit(EngineRequest(id=f"t2-{i}", prompt=lm.encode(second), max_new_tokens=10,
                                                            **settings))))
        handles.append(("Read the digits.", engine.submit(EngineRequest(id=f"o-{i}", prompt=other, max_new_tokens=10,
                                                                        **settings))))
    outputs = [_finished(handle).output for _, handle in handles]
    for (prompt, _), out, settings in zip(handles, outputs, [s for s in SETTINGS for _ in range(2)]):
        images = [probe_image(84)] if prompt == "Read the digits." else None
        alone = lm.generate(prompt, images, max_new_tokens=10, **settings)
        assert out.tokens == alone.tokens
    assert all(out.cached_tokens >= len(lm.encode(first)) for out in outputs[::2])  # the turns before, reused
    hit_tokens = sum(a.cached_tokens for a in [*answers.values(), *outputs])
    assert sample_value(metrics, "dvlm_prefix_cache_hit_tokens_total") == hit_tokens > 0
    assert sample_value(metrics, "dvlm_vision_cache_hits_total") >= 2  # the later "Read the digits." pictures
    assert sample_value(metrics, "dvlm_prefix_cache_entries") >= 1
    assert sample_value(metrics, "dvlm_prefix_cache_bytes") > 0


def test_a_request_that_opts_out_neither_reuses_nor_leaves_anything(lm, engine):
    engine, metrics = engine
    prompt = lm.encode("What colour is the circle?", [probe_image()])
    settings = dict(max_new_tokens=8, decoder="block", block_size=4)
    outs = [_finished(engine.submit(EngineRequest(id=f"x{i}", prompt=prompt, cache=False, **settings))).output
            for i in range(2)]
    assert [o.cached_tokens for o in outs] == [0, 0] and outs[0].tokens == outs[1].tokens
    counts = ("dvlm_prefix_cache_hits_total", "dvlm_prefix_cache_misses_total", "dvlm_prefix_cache_entries",
              "dvlm_vision_cache_misses_total", "dvlm_vision_cache_entries")
    assert [sample_value(metrics, name) for name in counts] == [0, 0, 0, 0, 0]
    kept = _finished(engine.submit(EngineRequest(id="y", prompt=prompt, **settings))).output
    assert kept.cached_tokens == 0 and kept.tokens == outs[0].tokens
    assert [sample_value(metrics, name) for name in counts] == [0, 1, 1, 1, 1]
