"""Slow: each family in its published shapes (every width, the vocabulary and the image geometry as
published; only fewer layers), laid out as published: it converts, and the converted model decodes
with every decoder, its prompt ids equal to transformers' (the reference processor of
`tests.model.adapters.reference`) and its speculative answer equal to its AR answer."""

from __future__ import annotations

import pytest
from PIL import Image

import dvlm
from dvlm.convert.conversion import convert_checkpoint
from tests.model.adapters.published import FAMILIES, write_checkpoint
from tests.model.adapters.reference import reference_inputs

pytestmark = pytest.mark.slow

QUESTION = "Describe the image."
PHOTO = (640, 480)  # (width, height): what users send


@pytest.mark.parametrize("family", list(FAMILIES))
def test_published_shapes_convert_and_decode_with_the_reference_prompt(family, tmp_path):
    published = FAMILIES[family]()
    source = write_checkpoint(published, tmp_path / "source", shrink=False)
    convert_checkpoint(source, tmp_path / "converted", preset="fast-dvlm", log=lambda _: None)
    lm = dvlm.load(str(tmp_path / "converted"), dtype="float32")
    image = Image.new("RGB", PHOTO, (90, 120, 200))
    ours = lm.encode(QUESTION, [image])
    reference = reference_inputs(source, published, [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION}]}], [image])
    assert ours.input_ids.tolist() == reference["input_ids"][0].tolist()
    answers = {decoder: lm.generate(QUESTION, images=[image], decoder=decoder, max_new_tokens=6)
               for decoder in ("ar", "block", "spec", "hf")}
    assert answers["spec"].tokens == answers["ar"].tokens
    assert all(out.num_tokens > 0 for out in answers.values())
    assert set(lm.eos_token_ids) >= set(published.generation_config["eos_token_id"]
                                        if isinstance(published.generation_config["eos_token_id"], list)
                                        else [published.generation_config["eos_token_id"]])
