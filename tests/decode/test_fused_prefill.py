"""The first block inside the prefill (`DecodeConfig.fuse_prefill`, invariant 12): the prefill
forward also runs the first block's first denoising pass (block decoding without token shift) or
the first draft (spec, spec-quadratic). The same tokens as the unfused decoders (float32), one
forward fewer per request that has a prefill, and the KV cache after the prefill holds exactly what
it holds unfused. Exact forward counts on a model whose predictions are known: test_scripted.py."""

import dataclasses

import pytest
import torch

import dvlm
from dvlm.config import DecodeConfig
from dvlm.convert.verify import probe_image
from dvlm.decode.block import BlockStepper
from dvlm.decode.settings import resolve
from dvlm.decode.speculative import QuadraticStepper, SpecStepper

from .test_settings import recipe
from .test_speculative import spec_forwards

PROMPTS = [("What colour is the circle?", 1), ("Read the digits.", 2), ("Hi", 0),
           ("Describe the image. How many shapes are there? Where is the red square?", 1)]
STEPPERS = {"block": BlockStepper, "spec": SpecStepper, "spec-quadratic": QuadraticStepper}

# (decoder, preset, recipe changes, settings): both presets, both block layouts, both clean streams.
CASES = [
    ("block", "diffusionvl", {}, dict(block_size=4, steps=2)),
    ("block", "diffusionvl", {}, dict(block_size=8, threshold=0.5)),
    ("block", "fast-dvlm", dict(token_shift=False), dict(block_size=4, threshold=0.5)),
    ("block", "fast-dvlm", dict(token_shift=False, clean_attention="block_causal", ar_loss_weight=0.0),
     dict(block_size=4, steps=2)),
    ("spec", "fast-dvlm", {}, dict(block_size=4)),
    ("spec", "fast-dvlm", {}, dict(block_size=8)),
    ("spec-quadratic", "fast-dvlm", {}, dict(block_size=4)),
]
IDS = [f"{d}-{p}-{'-'.join(f'{k}={v}' for k, v in r.items()) or 'recipe'}-{'-'.join(f'{k}={v}' for k, v in s.items())}"
       for d, p, r, s in CASES]


def _images(n):
    return [probe_image(56 + 28 * i) for i in range(n)]


def _model(dvlm_checkpoints, preset, recipe):
    lm = dvlm.load(dvlm_checkpoints[preset])
    lm.diffusion = dataclasses.replace(lm.diffusion, **recipe)
    return lm


def _has_prefill(lm, text, n_images, block_size):
    """Whether unfused decoding runs a prefill forward for this prompt (the absolute layout
    prefills only complete prompt blocks)."""
    if lm.diffusion.block_layout == "response":
        return True
    return len(lm.encode(text, _images(n_images)).input_ids) >= block_size


@pytest.mark.parametrize("decoder,preset,recipe,settings", CASES, ids=IDS)
def test_fused_prefill_changes_nothing_but_one_forward(dvlm_checkpoints, decoder, preset, recipe, settings):
    lm = _model(dvlm_checkpoints, preset, recipe)
    texts, images = [t for t, _ in PROMPTS], [_images(n) for _, n in PROMPTS]
    kw = dict(decoder=decoder, max_new_tokens=14, **settings)
    fused = lm.generate(texts, images, **kw)
    plain = lm.generate(texts, images, fuse_prefill=False, **kw)
    assert fused[0].settings["fuse_prefill"] and not plain[0].settings["fuse_prefill"]
    assert [o.tokens for o in fused] == [o.tokens for o in plain]
    assert all(len(o.tokens) > 0 for o in fused)
    assert [o.tokens_per_step for o in fused] == [o.tokens_per_step for o in plain]
    if decoder == "block":
        saved = [int(_has_prefill(lm, t, n, settings["block_size"])) for t, n in PROMPTS]
        assert [p.nfe - f.nfe for f, p in zip(fused, plain)] == saved
        assert any(saved)
        return
    # Speculative decoding: the first draft is made without the seed, so its acceptance, and with
    # it the number of blocks, may differ; the forwards of each block do not.
    if decoder == "spec":
        assert [f.nfe for f in fused] == [spec_forwards(f.accept_lengths, True) for f in fused]
        assert [p.nfe for p in plain] == [spec_forwards(p.accept_lengths, False) for p in plain]
    else:  # quadratic: the prefill (+ the first draft pass, unfused), then one pass per block
        assert [f.nfe for f in fused] == [1 + len(f.accept_lengths) for f in fused]
        assert [p.nfe for p in plain] == [2 + len(p.accept_lengths) for p in plain]


@pytest.mark.parametrize("decoder,preset,recipe,settings", [CASES[0], CASES[3], CASES[4]], ids=[IDS[0], IDS[3], IDS[4]])
@torch.inference_mode()
def test_the_context_after_a_fused_prefill_holds_what_it_holds_unfused(dvlm_checkpoints, decoder, preset, recipe,
                                                                         settings):
    """The block that rode along is not in the cache: same entries, validity and block ids."""
    lm = _model(dvlm_checkpoints, preset, recipe)
    prompts = [lm.encode(t, _images(n)) for t, n in PROMPTS]
    contexts = []
    for fuse in (True, False):
        cfg = DecodeConfig(decoder=decoder, max_new_tokens=14, fuse_prefill=fuse, **settings)
        group, row = STEPPERS[decoder].settings_for(lm, cfg)
        started = STEPPERS[decoder](lm, group).start(prompts, [row] * len(prompts))
        state = started.state
        assert (getattr(state, "first_pass", None) or getattr(state, "draft", None)) is not None or not fuse
        contexts.append(state.context)
    fused, plain = contexts
    assert fused.length == plain.length > 0
    assert torch.equal(fused.key_valid, plain.key_valid) and torch.equal(fused.key_block, plain.key_block)
    valid = plain.key_valid  # (R, T); padding entries are never attended to (what they hold differs)
    for a, b in zip(fused.cache.layers, plain.cache.layers):
        assert a.keys.shape == b.keys.shape
        for x, y in ((a.keys, b.keys), (a.values, b.values)):  # (R, H, T, hd)
            assert torch.allclose(x.transpose(1, 2)[valid], y.transpose(1, 2)[valid], atol=1e-5)


def test_which_decoders_fuse_the_prefill():
    """Token-shift block decoding has nothing to fuse: its first block opens with the seed the
    prefill predicts. Without token shift, and for speculative decoding, the prefill is fused
    unless asked not to be."""
    fast, dvl = recipe("fast-dvlm"), recipe("diffusionvl")
    unshifted = recipe("fast-dvlm", token_shift=False)
    fused = {(d, name): resolve(DecodeConfig(decoder=d), r).fuse_prefill
             for d, (name, r) in [("block", ("fast", fast)), ("block", ("dvl", dvl)), ("block", ("unshifted", unshifted)),
                                  ("spec", ("fast", fast)), ("spec-quadratic", ("fast", fast)), ("ar", ("fast", fast))]}
    assert fused == {("block", "fast"): False, ("block", "dvl"): True, ("block", "unshifted"): True,
                     ("spec", "fast"): True, ("spec-quadratic", "fast"): True, ("ar", "fast"): False}
    assert not resolve(DecodeConfig(decoder="spec", fuse_prefill=False), fast).fuse_prefill
    assert not resolve(DecodeConfig(decoder="block", fuse_prefill=False), dvl).fuse_prefill
