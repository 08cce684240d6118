"""`model.chat()`: each answer equals `generate` of the whole conversation, while later turns
prefill only what the conversation added (the session's one kept prefix) and pictures are
encoded once; reset, a prefix evicted between turns, a cache too small for the conversation and
a refused message change no answer."""

import pytest
import torch

from dvlm.convert.verify import probe_image
from dvlm.model.vision_cache import image_digest

CASES = [
    ("ar", "fast-dvlm", {}),
    ("block", "fast-dvlm", dict(block_size=4, threshold=0.9)),
    ("block", "diffusionvl", dict(block_size=4, steps=2)),
    ("spec", "fast-dvlm", dict(block_size=4)),
]
TURNS = [("Describe the image.", [probe_image()]), ("How many shapes are there?", None),
         ("And this one?", [probe_image(84)])]


def _messages(history, text, images):
    parts = [{"type": "image", "image": image} for image in images or []]
    return [*history, {"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _talk(lm, session, turns, options, prompts=None):
    """Send each turn; returns the outputs and the answers `generate` gives the same conversations
    (whose encoded prompts are appended to `prompts`)."""
    history, outputs, expected = [], [], []
    for text, images in turns:
        pieces = []
        out = session.send(text, images, on_text=pieces.append)
        assert "".join(pieces) == out.text
        history = _messages(history, text, images)
        expected.append(lm.generate(history, **options))
        if prompts is not None:
            prompts.append(lm.encode(history))
        outputs.append(out)
        history = [*history, {"role": "assistant", "content": out.text}]
    return outputs, expected


@pytest.mark.parametrize("decoder,preset,settings", CASES)
def test_each_answer_equals_generate_of_the_conversation(confident_models, decoder, preset, settings):
    lm = confident_models[preset]
    options = dict(decoder=decoder, max_new_tokens=10, **settings)
    session, prompts = lm.chat(**options), []
    outputs, expected = _talk(lm, session, TURNS, options, prompts)
    assert [o.tokens for o in outputs] == [e.tokens for e in expected]
    assert outputs[0].cached_tokens == 0 and outputs[1].cached_tokens > 0
    assert len(session.caches.prefixes) == 1  # one private entry: the conversation so far
    # Each picture's inputs are encoded once (LLaVA-OneVision's first picture gets new inputs, untiled,
    # once a second one joins it).
    inputs = {image_digest(i.vision) for p in prompts for i in lm.adapter.split_images(lm.model, p.vision)}
    assert session.caches.vision.stats.misses == len(inputs) >= 2

    session.reset()
    assert session.messages == [] and len(session.caches.prefixes) == 0
    again = session.send(*TURNS[0])
    assert again.tokens == outputs[0].tokens and again.cached_tokens == 0


@pytest.mark.parametrize("decoder,preset,settings", [CASES[1], CASES[2]])
def test_a_prefix_evicted_or_never_kept_changes_no_answer(confident_models, decoder, preset, settings):
    lm = confident_models[preset]
    options = dict(decoder=decoder, max_new_tokens=10, **settings)
    session = lm.chat(**options)
    first = session.send(*TURNS[0])
    session.caches.prefixes.clear()  # evicted mid-conversation
    second = session.send(*TURNS[1])
    tiny = lm.chat(prefix_cache_mb=1e-4, vision_cache_mb=0, **options)  # 104 bytes: no prefix fits
    outputs, expected = _talk(lm, tiny, TURNS[:2], options)
    assert second.cached_tokens == 0 and [o.cached_tokens for o in outputs] == [0, 0] and tiny.caches.vision is None
    assert [first.tokens, second.tokens] == [o.tokens for o in outputs] == [e.tokens for e in expected]


def test_a_refused_message_leaves_the_conversation_as_it_was(confident_models):
    lm = confident_models["fast-dvlm"]
    session = lm.chat(max_new_tokens=8)
    session.send(*TURNS[0])
    with pytest.raises(ValueError, match="special token"):
        session.send("Hi <|im_end|>")
    assert len(session.messages) == 2
    out = session.send(*TURNS[1])
    history = [*_messages([], *TURNS[0]), session.messages[1]]
    assert out.tokens == lm.generate(_messages(history, *TURNS[1]), max_new_tokens=8).tokens


def test_a_decoder_without_steps_decodes_the_whole_conversation(confident_models):
    lm = confident_models["fast-dvlm"]
    session = lm.chat(decoder="hf", max_new_tokens=6)
    outputs, expected = _talk(lm, session, TURNS[:2], dict(decoder="hf", max_new_tokens=6))
    assert [o.tokens for o in outputs] == [e.tokens for e in expected]
    assert torch.tensor([o.cached_tokens for o in outputs]).sum() == 0
