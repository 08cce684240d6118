"""Invariant 12 for the caches: decoding that reuses kept keys/values (the prefix cache) and kept
image features (the vision cache) gives every answer token for token as decoding without them,
for ar, block and spec, both presets, every family (the fixtures are built per family); with a
row that hits next to rows that miss, a row that hits joining a running batch, an entry evicted
mid-conversation, two pictures whose image tokens have the same ids, and a prompt that shares
only part of a block with a kept one (DiffusionVL's absolute blocks). Invariant 7 holds on
top: each row equals the row decoded alone."""

import pytest
import torch
from PIL import ImageOps

from dvlm.config import DecodeConfig
from dvlm.convert.verify import probe_image
from dvlm.decode.ar import ARStepper
from dvlm.decode.block import BlockStepper
from dvlm.decode.prompts import Caches, open_prompts, plain_prompts, prompt_images, prompt_key
from dvlm.decode.speculative import SpecStepper
from dvlm.decode.stepper import run_to_completion
from dvlm.model.prefix_cache import INDEX_CHUNK, PrefixStore, common_length, usable_length
from dvlm.model.vision_cache import VisionCache

STEPPERS = {"ar": ARStepper, "block": BlockStepper, "spec": SpecStepper}
CASES = [
    ("ar", "fast-dvlm", {}),
    ("ar", "diffusionvl", {}),
    ("block", "fast-dvlm", dict(block_size=4, threshold=0.9)),
    ("block", "fast-dvlm", dict(block_size=4, steps=2)),
    ("block", "diffusionvl", dict(block_size=4, threshold=0.9)),
    ("block", "diffusionvl", dict(block_size=8, steps=4)),
    ("spec", "fast-dvlm", dict(block_size=4)),
]
QUESTIONS = ["Describe the image.", "How many shapes are there?", "What colour is the circle?"]
BIG = 2**30


def _caches(**kw):
    return Caches(PrefixStore(BIG, **kw), VisionCache(BIG))


def _stats(out):
    return out.tokens, out.tokens_per_step, out.accept_lengths, out.finish_reason


def _settings(lm, decoder, settings, max_new_tokens=10):
    cfg = DecodeConfig(decoder=decoder, max_new_tokens=max_new_tokens, **settings)
    return STEPPERS[decoder].settings_for(lm, cfg)


def _decode(lm, decoder, settings, prompts, caches=None, rows=None):
    group, row = _settings(lm, decoder, settings)
    return run_to_completion(STEPPERS[decoder](lm, group, caches=caches), prompts, row)


def _turn(messages, question, images=()):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    return [*messages, {"role": "user", "content": content}]


def _conversation(lm, decoder, settings, caches):
    """Three turns (a picture, then text, then a second picture), each decoded with `caches` and
    without; returns the (with, without) outputs and the prompts."""
    messages, pairs, prompts = [], [], []
    for turn, question in enumerate(QUESTIONS):
        messages = _turn(messages, question, [probe_image(56 + 14 * turn)] if turn != 1 else [])
        prompt = lm.encode(messages)
        with_caches = _decode(lm, decoder, settings, [prompt], caches)[0]
        without = _decode(lm, decoder, settings, [prompt])[0]
        pairs.append((with_caches, without))
        prompts.append(prompt)
        messages = [*messages, {"role": "assistant", "content": without.text}]
    return pairs, prompts


def _align(lm, decoder, settings):
    """The block a reused prefix must be a multiple of (absolute blocks), else 1."""
    group, _ = _settings(lm, decoder, settings)
    absolute = decoder == "block" and lm.diffusion.block_layout == "absolute"
    return group.block_size if absolute else 1


@pytest.mark.parametrize("decoder,preset,settings", CASES)
def test_a_conversation_with_caches_equals_it_without(confident_models, decoder, preset, settings):
    lm = confident_models[preset]
    caches = _caches()
    pairs, prompts = _conversation(lm, decoder, settings, caches)
    assert [_stats(a) for a, _ in pairs] == [_stats(b) for _, b in pairs]
    assert sum(len(b.tokens) for _, b in pairs) >= 6  # real answers, not empty ones
    cached = [a.cached_tokens for a, _ in pairs]
    align = _align(lm, decoder, settings)
    assert cached[0] == 0 and all(n % align == 0 for n in cached) and cached[1] >= len(prompts[0]) // align * align
    # Each turn reuses at least what it shares with the turn before, as the rules allow (LLaVA-OneVision
    # tiles a picture only while it is alone: turn 3's second picture changes the first one's tokens).
    keys = [prompt_key(p, prompt_images(lm, p, digests=True)) for p in prompts]
    for turn in (1, 2):
        shared = common_length(keys[turn - 1], keys[turn])
        if shared >= INDEX_CHUNK:  # kept prefixes are found through whole chunks of tokens
            assert cached[turn] >= usable_length(shared, keys[turn], len(prompts[turn]) - 1, align)
    stats = caches.prefixes.stats
    assert stats.hits + stats.misses == 3 and stats.hit_tokens == sum(cached)


@pytest.mark.parametrize("decoder,preset,settings", [CASES[0], CASES[2], CASES[4], CASES[6]])
def test_a_row_that_hits_beside_rows_that_miss(confident_models, decoder, preset, settings):
    """One prefill of three rows, the first reusing a kept conversation, the others not (one with
    the caches' use turned off for it); then the same hit joining a running batch after a step.
    Every row equals its decoding alone without caches."""
    lm = confident_models[preset]
    caches = _caches()
    first = _turn([], QUESTIONS[0], [probe_image()])
    answer = _decode(lm, decoder, settings, [lm.encode(first)], caches)[0]
    hit = lm.encode(_turn([*first, {"role": "assistant", "content": answer.text}], QUESTIONS[1]))
    others = [lm.encode("Read the digits.", [probe_image(84)]), lm.encode(QUESTIONS[2])]
    group, row = _settings(lm, decoder, settings)
    stepper = STEPPERS[decoder](lm, group, caches=caches)
    started = stepper.start([hit, *others], [row] * 3, [True, True, False])
    stepper.join(started)
    while stepper.num_active:
        stepper.step()
    together = [stepper.output(i, {}) for i in started.ids]
    alone = [_decode(lm, decoder, settings, [p])[0] for p in (hit, *others)]
    assert [_stats(o) for o in together] == [_stats(o) for o in alone]
    # The second row shares at most the system prompt with the kept conversation; the third opted out.
    assert together[0].cached_tokens > len(lm.encode(first)) - 4 and together[2].cached_tokens == 0
    assert together[1].cached_tokens <= int((others[0].mm_token_type_ids == 1).nonzero()[0])

    stepper = STEPPERS[decoder](lm, group, caches=caches)
    running = stepper.start(others, [row] * 2, [False, False])
    stepper.join(running)
    stepper.step()
    assert stepper.num_active
    late = stepper.start([hit], [row])
    stepper.join(late)
    while stepper.num_active:
        stepper.step()
    joined = [stepper.output(i, {}) for i in running.ids + late.ids]
    assert [_stats(o) for o in joined] == [_stats(o) for o in alone[1:] + alone[:1]]
    align = _align(lm, decoder, settings)
    assert joined[2].cached_tokens == (len(hit) - 1) // align * align  # kept by the first batch: all but its last token


@pytest.mark.parametrize("decoder,preset,settings", [CASES[2], CASES[5]])
def test_an_entry_evicted_mid_conversation(confident_models, decoder, preset, settings):
    """A store of one entry: another request between two turns evicts the conversation's entry;
    the next turn reuses only what that request shares with it (the system prompt, at most) and
    answers as without caches."""
    lm = confident_models[preset]
    caches = _caches(max_entries=1)
    first = _turn([], QUESTIONS[0], [probe_image()])
    answer = _decode(lm, decoder, settings, [lm.encode(first)], caches)[0]
    _decode(lm, decoder, settings, [lm.encode("Read the digits.", [probe_image(84)])], caches)
    assert caches.prefixes.stats.evictions == 1 and len(caches.prefixes) == 1
    second = lm.encode(_turn([*first, {"role": "assistant", "content": answer.text}], QUESTIONS[1]))
    out = _decode(lm, decoder, settings, [second], caches)[0]
    assert _stats(out) == _stats(_decode(lm, decoder, settings, [second])[0])
    assert out.cached_tokens < len(lm.encode(first))


@pytest.mark.parametrize("decoder,preset,settings", [CASES[0], CASES[4]])
def test_another_picture_with_the_same_token_ids_is_not_reused(confident_models, decoder, preset, settings):
    """A mirrored picture has the image tokens of the original (same size, same ids): the kept
    entries of the original are reused up to its first image token, never past it."""
    lm = confident_models[preset]
    picture, mirrored = probe_image(), ImageOps.mirror(probe_image())
    original, other = lm.encode(QUESTIONS[0], [picture]), lm.encode(QUESTIONS[0], [mirrored])
    assert torch.equal(original.input_ids, other.input_ids)
    caches = _caches()
    _decode(lm, decoder, settings, [original], caches)
    out = _decode(lm, decoder, settings, [other], caches)[0]
    first_image_token = int((other.mm_token_type_ids == 1).nonzero()[0])
    assert out.cached_tokens <= first_image_token
    assert _stats(out) == _stats(_decode(lm, decoder, settings, [other])[0])
    assert out.tokens != _decode(lm, decoder, settings, [original])[0].tokens  # the pictures give other answers


def _parting_prompts(lm, align):
    """Two questions about one picture that part after a run of shared tokens ending, under absolute
    blocks of `align`, inside a block after the picture: (kept, asked, tokens shared)."""
    words = ("Look at the picture and say what colour the circle in the middle of the picture has, where the square "
             "is and how many shapes there are in the picture?").split()
    kept = lm.encode(" ".join(words), [probe_image()])
    key = prompt_key(kept, prompt_images(lm, kept, digests=True))
    text_after_image = int((kept.mm_token_type_ids == 1).nonzero()[-1]) + 1
    for k in range(1, len(words) - 1):  # a question sharing k words
        asked = lm.encode(" ".join(words[:k] + ["square", "there?"]), [probe_image()])
        shared = common_length(key, prompt_key(asked, prompt_images(lm, asked, digests=True)))
        if (align == 1 or shared % align) and shared // align * align > max(text_after_image, INDEX_CHUNK):
            return kept, asked, shared
    raise AssertionError("no question parts inside a block after the picture")


@pytest.mark.parametrize("decoder,preset,settings", [CASES[2], CASES[4], CASES[5]])
def test_a_prompt_sharing_part_of_a_block(confident_models, decoder, preset, settings):
    """Another question about the same picture shares the system prompt, the picture and part of
    the user turn with a kept prompt: under absolute blocks only the whole blocks before the
    first difference are reused (fewer tokens than shared: the block they part in is run again);
    the answer is the one without caches."""
    lm = confident_models[preset]
    align = _align(lm, decoder, settings)
    kept, asked, shared = _parting_prompts(lm, align)
    caches = _caches()
    _decode(lm, decoder, settings, [kept], caches)
    out = _decode(lm, decoder, settings, [asked], caches)[0]
    assert out.cached_tokens % align == 0 and 0 < out.cached_tokens <= shared
    assert out.cached_tokens == shared if align == 1 else out.cached_tokens < shared
    assert _stats(out) == _stats(_decode(lm, decoder, settings, [asked])[0])


def _entries(ctx, row):
    """(layers, 2, H, T, hd) the keys and values of one row's valid entries."""
    valid = ctx.key_valid[row].nonzero().squeeze(1)
    return torch.stack([torch.stack([layer.keys[row][:, valid], layer.values[row][:, valid]])
                        for layer in ctx.cache.layers])


@pytest.mark.parametrize("decoder,preset,settings", [CASES[0], CASES[2], CASES[4], CASES[5], CASES[6]])
def test_a_context_started_from_kept_entries_equals_a_fresh_prefill(confident_models, decoder, preset, settings):
    """Right after the prefill, a row that reused kept entries holds the keys/values a fresh
    prefill computes for its prompt (up to float rounding), entry for entry: a kept conversation's
    next turn, and a question that parts from a kept one inside a block."""
    lm = confident_models[preset]
    caches = _caches()
    first = _turn([], QUESTIONS[0], [probe_image()])
    answer = _decode(lm, decoder, settings, [lm.encode(first)], caches)[0]
    next_turn = lm.encode(_turn([*first, {"role": "assistant", "content": answer.text}], QUESTIONS[1]))
    kept, other_question, _ = _parting_prompts(lm, _align(lm, decoder, settings))
    _decode(lm, decoder, settings, [kept], caches)
    group, row = _settings(lm, decoder, settings)
    stepper = STEPPERS[decoder](lm, group, caches=caches)
    reused = stepper.start([next_turn, other_question], [row] * 2)
    fresh = STEPPERS[decoder](lm, group).start([next_turn, other_question], [row] * 2)
    assert all(stepper.rows[i].cached_tokens > 0 for i in reused.ids)
    for r in range(2):
        a, b = _entries(reused.state.context, r), _entries(fresh.state.context, r)
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_vision_cache_hit_gives_the_features_a_miss_computes(confident_models):
    """The same pictures twice through a vision cache (prefix cache off): the second prefill's input
    features equal the first's bit for bit, and its answer is the same."""
    lm = confident_models["fast-dvlm"]
    caches = Caches(vision=VisionCache(BIG))
    prompt = lm.encode("Read the digits.", [probe_image(), probe_image(84)])
    embeds = []
    for _ in range(2):
        batch, _ = open_prompts(lm, [prompt], caches, [True], None)
        embeds.append(batch.embed(lm, batch.collate(lm).input_ids))
    assert (caches.vision.stats.misses, caches.vision.stats.hits, caches.vision.stats.entries) == (2, 2, 2)
    plain = plain_prompts(lm, [prompt])
    assert torch.equal(embeds[0], embeds[1]) and torch.equal(embeds[0], plain.embed(lm, plain.collate(lm).input_ids))
    outs = [_decode(lm, "block", dict(block_size=4), [prompt], caches)[0] for _ in range(2)]
    assert _stats(outs[0]) == _stats(outs[1]) == _stats(_decode(lm, "block", dict(block_size=4), [prompt])[0])
