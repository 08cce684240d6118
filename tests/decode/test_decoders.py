"""Decoders: invariants 4 (cache == no cache) and 7 (batched == alone), AR == HF, stopping rules."""

import pytest
import torch

import dvlm
from dvlm.config import DecodeConfig
from dvlm.convert.verify import probe_image
from dvlm.decode.ar import generate_ar
from dvlm.decode.block import generate_block
from dvlm.model.cache import RecomputeContext

PROMPTS = [
    ("What colour is the circle?", 1),
    ("Read the digits.", 2),
    ("Describe the image. How many shapes are there? Where is the red square?", 1),
    ("How many shapes are there?", 0),
]


def _images(n):
    return [probe_image(56 + 28 * i) for i in range(n)]


@pytest.fixture(scope="module")
def models(dvlm_checkpoints):
    return {preset: dvlm.load(path) for preset, path in dvlm_checkpoints.items()}


def _encode(lm, which):
    return [lm.encode(PROMPTS[i][0], _images(PROMPTS[i][1])) for i in which]


BLOCK_SETTINGS = [
    dict(block_size=4, threshold=0.3),
    dict(block_size=8, threshold=0.9),
    dict(block_size=4, steps=2),
    dict(block_size=5, steps=5),
]


@pytest.mark.parametrize("preset", ["fast-dvlm", "diffusionvl"])
@pytest.mark.parametrize("settings", BLOCK_SETTINGS)
def test_cached_block_decoding_equals_recomputation(models, preset, settings):
    """Invariant 4: cached block decoding == the same decoding recomputed without a cache."""
    lm = models[preset]
    prompts = _encode(lm, [0, 1])
    cfg = DecodeConfig(decoder="block", max_new_tokens=14, **settings)
    cached = generate_block(lm, prompts, cfg)
    recomputed = generate_block(lm, prompts, cfg, context_cls=RecomputeContext)
    for a, b in zip(cached, recomputed):
        assert a.tokens == b.tokens and len(a.tokens) > 0
        assert a.nfe == b.nfe


@pytest.mark.parametrize("preset", ["fast-dvlm", "diffusionvl"])
def test_confident_model_threshold_decoding_unmasks_several_per_pass(confident_models, preset):
    """Invariants 4 and 7 where a threshold of 0.9 really unmasks several tokens in one pass
    (on the random weights it only ever takes the one-token fallback)."""
    lm = confident_models[preset]
    texts, images = [p for p, _ in PROMPTS], [_images(n) for _, n in PROMPTS]
    kw = dict(decoder="block", block_size=8, threshold=0.9, max_new_tokens=24)
    batched = lm.generate(texts, images, **kw)
    steps = [n for o in batched for n in o.tokens_per_step]
    assert max(steps) >= 3 and 1 in steps  # both regimes: thresholded passes and the fallback
    alone = [lm.generate(t, i, **kw) for t, i in zip(texts, images)]
    assert [o.tokens for o in batched] == [o.tokens for o in alone]
    assert [o.tokens_per_step for o in batched] == [o.tokens_per_step for o in alone]
    prompts = _encode(lm, range(4))
    recomputed = generate_block(lm, prompts, DecodeConfig(**kw), context_cls=RecomputeContext)
    assert [o.tokens for o in recomputed] == [o.tokens for o in batched]
    assert [o.nfe for o in recomputed] == [o.nfe for o in batched]


def test_cached_ar_decoding_equals_recomputation(models):
    lm = models["fast-dvlm"]
    prompts = _encode(lm, [0, 3])
    cfg = DecodeConfig(decoder="ar", max_new_tokens=10)
    assert [o.tokens for o in generate_ar(lm, prompts, cfg)] == \
        [o.tokens for o in generate_ar(lm, prompts, cfg, context_cls=RecomputeContext)]


@pytest.mark.parametrize("preset", ["fast-dvlm", "diffusionvl"])
@pytest.mark.parametrize("decoder,settings", [("ar", {}), ("block", dict(block_size=4, threshold=0.5)),
                                              ("block", dict(block_size=8, steps=4))])
def test_batched_decoding_equals_each_row_alone(models, preset, decoder, settings):
    """Invariant 7: prompts of different lengths (and image counts) decoded together == alone."""
    lm = models[preset]
    texts = [p for p, _ in PROMPTS]
    images = [_images(n) for _, n in PROMPTS]
    batched = lm.generate(texts, images, decoder=decoder, max_new_tokens=12, **settings)
    alone = [lm.generate(t, imgs, decoder=decoder, max_new_tokens=12, **settings) for t, imgs in zip(texts, images)]
    assert [o.tokens for o in batched] == [o.tokens for o in alone]
    assert [o.nfe for o in batched] == [o.nfe for o in alone]
    assert len({len(e.input_ids) for e in _encode(lm, range(4))}) == 4  # the prompt lengths differ


@pytest.mark.parametrize("decoder", ["ar", "block"])
def test_rows_stop_on_their_own(models, decoder):
    """Row 0 hits EOS early and leaves the batch; the other rows go on unaffected."""
    lm = models["fast-dvlm"]
    texts, images = [PROMPTS[0][0], PROMPTS[1][0]], [_images(1), _images(2)]
    options = dict(decoder=decoder, max_new_tokens=12, block_size=4, threshold=0.5)
    if decoder == "ar":
        options = dict(decoder="ar", max_new_tokens=12)
    free = lm.generate(texts, images, **options)
    # An "EOS" that row 0 produces early and row 1 never produces.
    eos = next(t for t in free[0].tokens[1:6] if t not in free[1].tokens)
    original = lm.diffusion.eos_token_ids
    lm.diffusion.eos_token_ids = original + [eos]
    try:
        stopped = lm.generate(texts, images, **options)
        alone = lm.generate(texts[1], images[1], **options)
    finally:
        lm.diffusion.eos_token_ids = original
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].tokens == free[0].tokens[:free[0].tokens.index(eos)]
    assert stopped[1].tokens == alone.tokens
    if decoder == "ar":
        assert stopped[1].tokens == free[1].tokens[:len(stopped[1].tokens)]


def test_our_ar_loop_equals_hf_generate(models):
    lm = models["fast-dvlm"]
    texts = [p for p, _ in PROMPTS]
    images = [_images(n) for _, n in PROMPTS]
    ours = lm.generate(texts, images, decoder="ar", max_new_tokens=12)
    hf = lm.generate(texts, images, decoder="hf", max_new_tokens=12)
    assert [o.tokens for o in ours] == [o.tokens for o in hf]


def test_ar_statistics(models):
    out = models["fast-dvlm"].generate("Read the digits.", _images(1), decoder="ar", max_new_tokens=9)
    assert out.finish_reason == "length" and len(out.tokens) == 9
    assert out.nfe == 9 and out.tokens_per_nfe == 1.0
    assert out.timings["total_s"] > 0 and "prefill_s" in out.timings


def test_block_statistics_and_length_limit(models):
    lm = models["fast-dvlm"]
    out = lm.generate("Read the digits.", _images(1), decoder="block", block_size=4, steps=3, max_new_tokens=10,
                      fuse_commit=False)
    assert len(out.tokens) == 10 and out.finish_reason == "length"
    # Token shift: prefill seeds block 1; blocks 1-2 = 3 denoising passes (1 token each) + commit;
    # the last block is cut to the 2 remaining tokens (seed + 1 mask): 1 pass, no commit.
    assert out.tokens_per_step == [1] * 7
    assert out.nfe == 1 + 4 + 4 + 1
    assert lm.mask_token_id not in out.tokens


@pytest.mark.parametrize("settings", [dict(block_size=4, threshold=0.3), dict(block_size=8, threshold=0.9),
                                      dict(block_size=4, steps=2), dict(block_size=6, threshold=0.0)])
def test_fused_commit_changes_nothing_but_the_forward_count(models, settings):
    lm = models["fast-dvlm"]
    texts = [p for p, _ in PROMPTS]
    images = [_images(n) for _, n in PROMPTS]
    fused = lm.generate(texts, images, decoder="block", max_new_tokens=20, **settings)
    plain = lm.generate(texts, images, decoder="block", max_new_tokens=20, fuse_commit=False, **settings)
    assert [o.tokens for o in fused] == [o.tokens for o in plain]
    assert [o.tokens_per_step for o in fused] == [o.tokens_per_step for o in plain]
    assert all(f.nfe <= p.nfe for f, p in zip(fused, plain))


def test_fused_commit_saves_forwards_when_the_guess_is_right(models):
    lm = models["fast-dvlm"]
    # threshold 0: one pass per block, whose last output is the guess; count the saved passes.
    kw = dict(decoder="block", block_size=4, threshold=0.0, max_new_tokens=24)
    fused = lm.generate("Read the digits.", _images(1), **kw)
    plain = lm.generate("Read the digits.", _images(1), fuse_commit=False, **kw)
    prompts = [lm.encode("Read the digits.", _images(1))]
    recomputed = generate_block(lm, prompts, DecodeConfig(**kw), context_cls=RecomputeContext)[0]
    assert fused.tokens == plain.tokens == recomputed.tokens
    assert fused.nfe == recomputed.nfe
    # Random weights rarely guess the seed, so this cannot show a saving; test_scripted.py pins
    # the exact count on a model that always guesses right.
    assert fused.nfe <= plain.nfe


def test_diffusionvl_static_schedule_one_token_per_step(models):
    lm = models["diffusionvl"]
    out = lm.generate("What colour is the circle?", _images(1), decoder="block", max_new_tokens=16)
    assert lm.diffusion.decode_steps == lm.diffusion.block_size == 8
    assert set(out.tokens_per_step) == {1}
    assert lm.mask_token_id not in out.tokens


def test_low_threshold_decodes_several_tokens_per_forward(models):
    lm = models["fast-dvlm"]
    out = lm.generate("Read the digits.", _images(1), decoder="block", block_size=8, threshold=0.0, max_new_tokens=16)
    assert out.tokens_per_step == [7, 7, 1] or max(out.tokens_per_step) == 7
    assert out.tokens_per_nfe > 2.0


def test_sampling_is_reproducible_with_a_seed(models):
    lm = models["fast-dvlm"]
    kw = dict(decoder="block", temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=12, block_size=4)
    a = lm.generate("Read the digits.", _images(1), seed=1, **kw)
    b = lm.generate("Read the digits.", _images(1), seed=1, **kw)
    others = [lm.generate("Read the digits.", _images(1), seed=s, **kw).tokens for s in (2, 3, 4)]
    assert a.tokens == b.tokens
    assert any(t != a.tokens for t in others)


def test_chat_messages_equal_plain_prompt(models):
    lm = models["fast-dvlm"]
    img = _images(1)[0]
    plain = lm.generate("What colour is the circle?", [img], decoder="ar", max_new_tokens=6)
    chat = lm.generate([{"role": "user", "content": [{"type": "image", "image": img},
                                                     {"type": "text", "text": "What colour is the circle?"}]}],
                       decoder="ar", max_new_tokens=6)
    assert plain.tokens == chat.tokens


def test_block_decoder_on_ar_checkpoint_is_a_clear_error(ar_checkpoint):
    lm = dvlm.load(ar_checkpoint)
    with pytest.raises(dvlm.config.ConfigError, match="dvlm convert"):
        lm.generate("Read the digits.", decoder="block")
    assert len(lm.generate("Read the digits.", max_new_tokens=3).tokens) == 3  # AR is the default there


def test_invalid_decode_settings(models):
    lm = models["fast-dvlm"]
    with pytest.raises(dvlm.config.ConfigError, match="not both"):
        lm.generate("hi", threshold=0.9, steps=4)
    with pytest.raises(dvlm.config.ConfigError):
        lm.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="image lists"):
        lm.generate(["a", "b"], images=[[]])


@pytest.mark.parametrize("decoder,options", [("ar", {}), ("block", dict(block_size=4, threshold=0.5)),
                                             ("spec", dict(block_size=4)), ("hf", {})])
def test_stream_pieces_add_up_to_the_answer(models, decoder, options):
    lm = models["fast-dvlm"]
    stream = lm.stream("Read the digits.", _images(1), decoder=decoder, max_new_tokens=12, **options)
    pieces = list(stream)
    full = lm.generate("Read the digits.", _images(1), decoder=decoder, max_new_tokens=12, **options)
    assert "".join(pieces) == full.text == stream.output.text
    assert stream.output.tokens == full.tokens
    if decoder == "ar":
        assert len(pieces) > 1  # token by token


def test_stream_reraises_decoder_errors_in_the_caller():
    from dvlm.decode.stream import TextStream

    def failing(listener):
        listener(0, [1, 2])
        raise RuntimeError("decoder broke")

    stream = TextStream(failing, lambda tokens: " ".join(map(str, tokens)))
    pieces = []
    with pytest.raises(RuntimeError, match="decoder broke"):
        for piece in stream:
            pieces.append(piece)
    assert pieces == ["1 2"]


def test_stream_takes_one_prompt(models):
    with pytest.raises(ValueError, match="one prompt"):
        models["fast-dvlm"].stream(["a", "b"])


def test_prompt_with_the_mask_token_is_refused(models):
    lm = models["fast-dvlm"]
    with pytest.raises(ValueError, match=f"special token {lm.diffusion.mask_token!r}"):
        lm.generate(f"Read {lm.diffusion.mask_token} digits.", decoder="block")


def test_current_sub_block_literal():
    from dvlm.decode.block import current_sub_block

    masked = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert current_sub_block(masked, 2).int().tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1], [0] * 6]


def test_sub_blocks_unmask_left_to_right(models):
    lm = models["fast-dvlm"]
    out = lm.generate("Read the digits.", _images(1), decoder="block", block_size=8, sub_block_size=4,
                      threshold=0.0, max_new_tokens=16, fuse_commit=False)
    # threshold 0 fills a whole open sub-block per pass: [seed + 3 masks], then [4 masks] per block.
    assert out.tokens_per_step[:2] == [3, 4]
    prompts = [lm.encode("Read the digits.", _images(1))]
    cfg = DecodeConfig(decoder="block", block_size=8, sub_block_size=4, threshold=0.5, max_new_tokens=16)
    assert generate_block(lm, prompts, cfg)[0].tokens == \
        generate_block(lm, prompts, cfg, context_cls=RecomputeContext)[0].tokens


def test_positions_after_a_finished_answer_need_no_denoising():
    from dvlm.decode.block import Canvas, after_finished_answer

    M, E = 99, 7
    ids = torch.tensor([[5, E, M, M], [5, M, E, M], [1, 2, E, M]])
    masked = ids == M
    canvas = Canvas(ids, torch.zeros(3, 3, 4, dtype=torch.long), torch.tensor([0, 0, 3]))
    # Row 0: EOS with nothing masked before it -> the rest is dropped. Row 1: a mask before the
    # EOS -> keep denoising. Row 2: the EOS is a prompt token (prompt_part 3) -> not an answer end.
    assert after_finished_answer(canvas, masked, [E]).int().tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("preset,prefill", [("fast-dvlm", 1), ("diffusionvl", 0)])
def test_first_block_is_no_wider_than_the_answer(models, preset, prefill):
    """N2: B=64 for 6 new tokens, one token per pass. fast-dvlm: a first block of 6 (seed + 5
    masks) after the prefill; diffusionvl: the prompt (shorter than B, so no prefill) and 6 masks
    in one block of P + 6, as DiffusionVL does. Before, both denoised a block of 64."""
    lm = models[preset]
    out = lm.generate("Hi", decoder="block", block_size=64, steps=64, max_new_tokens=6)
    assert len(lm.encode("Hi")) + 6 <= 64
    assert len(out.tokens) == 6 and out.finish_reason == "length"
    assert out.tokens_per_step == [1] * (6 - prefill)  # the seed comes from the prefill
    assert out.nfe == 6
