"""The per-image seam of every family (`Adapter.split_images`, `image_features`,
`embed_with_features`): images given one by one fill exactly the image tokens the processor laid
out, their features concatenated are those of one call over all of them (the towers never mix
images), and `embed` is `embed_with_features` of those features."""

from __future__ import annotations

import pytest
import torch

from dvlm.convert.verify import probe_image
from dvlm.data.images import load_image
from dvlm.data.processor import ChatProcessor
from dvlm.model.adapters.base import TinyShape
from dvlm.model.adapters.registry import adapter_for_architecture
from dvlm.zoo.tokenizer import build_tokenizer

from ...conftest import FAMILIES


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda a: adapter_for_architecture(a).family)
def family(request):
    adapter = adapter_for_architecture(request.param)
    tokenizer = build_tokenizer(adapter=adapter)
    torch.manual_seed(0)
    model = adapter.random_model(tokenizer, TinyShape(initializer_range=0.3)).eval()
    processor = ChatProcessor(adapter.chat_format(tokenizer, adapter.tiny_image_processor(56 * 56, 112 * 112)))
    return adapter, model, processor


@pytest.mark.parametrize("sides", [(56,), (56, 84, 112), (112, 56)])
@torch.inference_mode()
def test_images_one_by_one_equal_one_call(family, sides):
    adapter, model, processor = family
    images = [load_image(probe_image(side)) for side in sides]
    encoded = processor.encode("<image>" * len(images) + " What is there?", images)
    parts = adapter.split_images(model, encoded.vision)
    slots = int((encoded.mm_token_type_ids == 1).sum())
    assert len(parts) == len(images) and sum(p.tokens for p in parts) == slots
    features = [adapter.image_features(model, p.vision) for p in parts]
    assert [f.shape[0] for f in features] == [p.tokens for p in parts]
    together = adapter.image_features(model, encoded.vision)
    assert torch.allclose(torch.cat(features), together, rtol=1e-4, atol=1e-5)
    ids = encoded.input_ids[None]
    assert torch.equal(adapter.embed(model, ids, encoded.vision), adapter.embed_with_features(model, ids, together))
    assert torch.equal(adapter.embed(model, ids), adapter.embed_with_features(model, ids, None))


def test_a_lone_picture_and_the_same_picture_among_others_are_different_inputs(family):
    """LLaVA-OneVision tiles a sample's only picture and not one among others; the Qwen families
    give a picture the same inputs either way."""
    adapter, model, processor = family
    alone = processor.encode("<image>", [probe_image(84)])
    among = processor.encode("<image><image>", [probe_image(84), probe_image(56)])
    first_alone, first_among = adapter.split_images(model, alone.vision)[0], adapter.split_images(model, among.vision)[0]
    same = all(torch.equal(first_alone.vision[name], first_among.vision[name]) for name in first_alone.vision.tensors)
    assert same == (adapter.family != "LLaVA-OneVision")
    if not same:
        assert first_alone.tokens > first_among.tokens  # tiled: the base tile and the grid
