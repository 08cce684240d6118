"""Qwen3-VL specifics the shared invariant suite takes for granted: DeepStack features travel in the
wide embedding rows of image tokens only and change the forward, and the M-RoPE position ids are
HF's own. (Lossless conversion through HF's forward and AR == HF generate, in the shared suite,
prove the DeepStack forward itself.)"""

from __future__ import annotations

import pytest
import torch

from dvlm.convert.verify import probe_image
from dvlm.model.adapters.base import TinyShape
from dvlm.model.adapters.qwen3_vl import deepstack_levels, image_features
from dvlm.model.adapters.registry import adapter_for_architecture
from dvlm.model.masks import context_mask, to_additive
from dvlm.zoo.tokenizer import build_tokenizer

ARCHITECTURE = "Qwen3VLForConditionalGeneration"
SHAPE = TinyShape(initializer_range=0.3)


@pytest.fixture(scope="module")
def qwen3():
    adapter = adapter_for_architecture(ARCHITECTURE)
    tokenizer = build_tokenizer(adapter=adapter)
    torch.manual_seed(0)
    model = adapter.random_model(tokenizer, SHAPE).eval()
    fmt = adapter.chat_format(tokenizer, adapter.tiny_image_processor(56 * 56, 112 * 112))
    return adapter, model, fmt


def _prompt(fmt, images):
    """Ids (1, L) of text, each image's tokens, text; the images' VisionInputs; the image slots (1, L)."""
    vision, counts = fmt.process_images(images)
    text = fmt.tokenizer("a red circle", add_special_tokens=False)["input_ids"]
    ids = list(text)
    for count in counts:
        ids += [fmt.token_ids.vision_start, *[fmt.image_token_id] * count, fmt.token_ids.vision_end, *text]
    ids = torch.tensor([ids])
    return ids, vision, ids == fmt.image_token_id


@torch.no_grad()
def test_embed_carries_deepstack_features_on_image_tokens_only(qwen3):
    adapter, model, fmt = qwen3
    ids, vision, slots = _prompt(fmt, [probe_image(56), probe_image(84)])
    hidden, levels = SHAPE.hidden_size, deepstack_levels(model)
    assert levels >= 2  # the tiny model feeds several LM layers
    wide = adapter.embed(model, ids, vision)
    assert wide.shape == (1, ids.shape[1], hidden * (1 + levels))
    features, deepstack = image_features(model, vision)
    assert torch.equal(wide[slots][:, :hidden], features)
    assert torch.equal(wide[slots][:, hidden:], deepstack.flatten(1))
    assert torch.equal(wide[~slots][:, :hidden], model.get_input_embeddings()(ids[~slots]))
    assert not wide[~slots][:, hidden:].any()  # text tokens get nothing added
    without_images = adapter.embed(model, ids)
    assert without_images.shape == wide.shape and not without_images[..., hidden:].any()


@torch.no_grad()
def test_deepstack_injection_changes_the_forward_from_the_image_on(qwen3):
    adapter, model, fmt = qwen3
    ids, vision, slots = _prompt(fmt, [probe_image(84)])
    positions, _ = fmt.positions.sample(slots[0].long(), vision)
    blocks = torch.zeros_like(ids)
    mask = to_additive(context_mask(blocks, blocks, torch.ones_like(slots), "causal"), torch.float32)
    wide = adapter.embed(model, ids, vision)
    plain = wide.clone()
    plain[..., SHAPE.hidden_size:] = 0
    with_deepstack = adapter.hidden_states(model, wide, positions[:, None], mask)
    without = adapter.hidden_states(model, plain, positions[:, None], mask)
    first_image = int(slots[0].nonzero()[0])
    assert torch.equal(with_deepstack[:, :first_image], without[:, :first_image])  # causal: before the image
    assert not torch.allclose(with_deepstack[:, first_image:], without[:, first_image:], atol=1e-3)


def test_positions_are_hf_rope_index(qwen3):
    _, model, fmt = qwen3
    ids, vision, slots = _prompt(fmt, [probe_image(56), probe_image(112)])
    ours, next_position = fmt.positions.sample(slots[0].long(), vision)
    hf, delta = model.model.get_rope_index(ids, mm_token_type_ids=slots.long(), image_grid_thw=vision["image_grid_thw"])
    assert torch.equal(ours, hf[:, 0])
    assert next_position == ids.shape[1] + int(delta)


def test_vision_parameters_leave_out_every_projector(qwen3):
    adapter, model, _ = qwen3
    chosen = {id(p) for p in adapter.vision_parameters(model)}
    for name, param in model.model.visual.named_parameters():
        is_projector = name.startswith(("merger.", "deepstack_merger_list."))
        assert (id(param) in chosen) != is_projector, name
