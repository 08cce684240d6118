"""The compiled decode path (`DecodeConfig.compile`, invariant 12): the same tokens and forwards as
eager decoding in float32, for every decoder; static shapes (buckets) compiled once each.

Compiling costs seconds per shape, so the default suite compiles one small model once (the
reference family's test checkpoint; one prompt, B=8: four shapes shared by ar, block and spec)
and the wider checks (batches, joins, both presets, every family) are marked slow."""

import dataclasses

import pytest
import torch

import dvlm
from dvlm.config import DecodeConfig
from dvlm.convert.verify import probe_image
from dvlm.decode.compiled import CompiledKVContext, StaticLayer, compiled_forward, query_bucket, static_capacity
from dvlm.model.adapters.registry import REFERENCE_ARCHITECTURE

from .test_join import STEPPERS, decode_alone, decode_with_join

PROMPT = ("Describe the image.", [probe_image()])


def _stats(out):
    return out.tokens, out.nfe, out.tokens_per_step, out.accept_lengths, out.finish_reason


@pytest.fixture(scope="module")
def reference_lm(dvlm_checkpoints, adapter):
    if adapter.architectures[0] != REFERENCE_ARCHITECTURE:
        pytest.skip("compiled once, on the reference family (every family: the slow tests)")
    return dvlm.load(dvlm_checkpoints["fast-dvlm"])


def test_buckets_and_capacities():
    assert [query_bucket(n) for n in (1, 2, 7, 8, 9, 16, 17, 32, 33)] == [1, 8, 8, 8, 16, 16, 32, 32, 64]
    assert [static_capacity(n) for n in (0, 1, 256, 257, 600, 1025)] == [256, 256, 256, 512, 1024, 2048]


@pytest.mark.parametrize("decoder", ["ar", "block", "spec"])
def test_compiled_decoding_equals_eager(reference_lm, decoder):
    lm = reference_lm
    kw = dict(decoder=decoder, max_new_tokens=20, block_size=8)
    eager = lm.generate(*PROMPT, **kw)
    compiled = lm.generate(*PROMPT, compile=True, **kw)
    assert compiled.settings["compile"] and not eager.settings["compile"]
    assert _stats(compiled) == _stats(eager) and len(eager.tokens) == 20
    assert "compile_s" in compiled.timings and "compile_s" not in eager.timings


def test_compiled_shapes_are_few_and_compiled_once(reference_lm):
    """After the test above, one more decode of each decoder compiles nothing new: every
    forward (prefill, AR step, blocks of 8, a fused commit or a verify with a draft) is one of a
    few static shapes."""
    lm = reference_lm
    forward = compiled_forward(lm.adapter, lm.model)
    before, warmup = forward.shapes, forward.warmup_s
    for decoder in ("ar", "block", "spec"):
        lm.generate(*PROMPT, decoder=decoder, max_new_tokens=20, block_size=8, compile=True)
    assert forward.shapes == before <= 5 and forward.warmup_s == warmup
    assert {(rows, capacity) for rows, _, capacity, _ in forward.calls} == {(1, 256)}


@torch.inference_mode()
def test_static_buffers_keep_their_shape_through_growth_and_row_changes(reference_lm):
    lm = reference_lm
    ctx = CompiledKVContext(lm.adapter, lm.model, 3, lm.device)
    layer = ctx.cache.layers[0]
    assert isinstance(layer, StaticLayer) and layer.key_buffer.shape[-2] == 256
    keys = torch.randn(3, layer.key_buffer.shape[1], 5, layer.key_buffer.shape[3])
    layer.update(keys, keys)
    layer.reserve(300)
    assert layer.key_buffer.shape[-2] == 512 and torch.equal(layer.keys, keys)
    layer.batch_select_indices(torch.tensor([0, 2]))
    layer.drop_leading(2)
    assert layer.key_buffer.shape[-2] == 512 and torch.equal(layer.keys, keys[[0, 2], :, 2:])
    assert not layer.key_buffer[..., 3:, :].any()  # past the entries: zeros (finite), never garbage


# -- the wider checks (slow: each new shape compiles) -------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("decoder,preset,settings", [
    ("ar", "fast-dvlm", {}), ("block", "fast-dvlm", dict(block_size=4, threshold=0.9)),
    ("block", "diffusionvl", dict(block_size=8, steps=4)), ("spec", "fast-dvlm", dict(block_size=4)),
])
def test_compiled_joins_equal_eager_alone(confident_models, decoder, preset, settings):
    """Invariants 7 and 12 together, in every family: rows joining a running compiled batch (the
    server's engine) decode what each decodes alone, eagerly."""
    from .test_join import JOINING, RUNNING, _encode

    lm = confident_models[preset]
    cfg = DecodeConfig(decoder=decoder, max_new_tokens=14, **settings)
    _, row = STEPPERS[decoder].settings_for(lm, cfg)
    running, joining = [_encode(lm, *p) for p in RUNNING], [_encode(lm, *JOINING)]
    together = decode_with_join(lm, decoder, dataclasses.replace(cfg, compile=True), running, [row, row], joining,
                                [row], 1)
    alone = [decode_alone(lm, decoder, cfg, p, row) for p in running + joining]
    assert [_stats(o) for o in together] == [_stats(o) for o in alone]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decoder", ["ar", "block", "spec"])
def test_cuda_graphs_decode_what_eager_decodes(decoder):
    """On a GPU the compiled path runs as CUDA graphs (mode="reduce-overhead"): float32 tokens
    equal eager decoding's, batched and alone."""
    lm = dvlm.load("tiny-dvlm", device="cuda", dtype="float32")
    texts = ["Describe the image.", "What colour is the circle?"]
    images = [[probe_image()], [probe_image(84)]]
    kw = dict(decoder=decoder, max_new_tokens=32)
    eager = lm.generate(texts, images, **kw)
    for _ in range(2):  # the first run records the graphs, the second replays them
        compiled = lm.generate(texts, images, compile=True, **kw)
        assert [_stats(o) for o in compiled] == [_stats(o) for o in eager]
    assert compiled_forward(lm.adapter, lm.model).cuda
