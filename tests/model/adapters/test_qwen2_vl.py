"""Qwen2-VL's own layout and positions, against Qwen2-VL's HF implementation.

The adapter reuses Qwen2.5-VL's chat layout (`qwen_chat`) and M-RoPE rule (`mrope`); these tests
check that both are Qwen2-VL's too: the processor's position ids equal `Qwen2VLModel.get_rope_index`,
its image-token counts equal what Qwen2-VL's vision tower (its own merger) yields per image, and
the vision parameters trained at their own rate are the ViT without that merger. The shared
invariant suite runs on Qwen2-VL through `FAMILIES` in tests/conftest.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration

from dvlm.convert.conversion import convert_checkpoint
from dvlm.convert.verify import causal_logits, probe_input
from dvlm.data.collate import collate
from dvlm.data.processor import ChatProcessor
from dvlm.model.adapters.base import TinyShape
from dvlm.model.adapters.registry import adapter_for_architecture
from dvlm.model.loaded import LoadedModel
from dvlm.zoo.tiny import build_random_checkpoint, tiny_image_processor
from dvlm.zoo.tokenizer import build_tokenizer

ARCHITECTURE = "Qwen2VLForConditionalGeneration"


@pytest.fixture(scope="module")
def adapter():
    return adapter_for_architecture(ARCHITECTURE)


@pytest.fixture(scope="module")
def processor(adapter) -> ChatProcessor:
    return ChatProcessor(adapter.chat_format(build_tokenizer(adapter=adapter), tiny_image_processor(adapter=adapter)))


@pytest.fixture(scope="module")
def model(adapter, processor):
    torch.manual_seed(0)
    return adapter.random_model(processor.tokenizer, TinyShape()).eval()


def red(size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, (255, 0, 0))


def hub_layout(config: dict) -> dict:
    """config.json as the Qwen2-VL checkpoints on the hub lay it out (saved by transformers 4.4x):
    the language model's settings at the top level, M-RoPE under `rope_scaling`, `torch_dtype`, and
    a vision config with `in_chans` and the old `model_type`."""
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types", "dtype"):
        text.pop(key, None)
    flat = {**text, **config, "model_type": "qwen2_vl", "transformers_version": "4.45.0"}
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat["rope_theta"] = rope["rope_theta"]
    flat["torch_dtype"] = flat.pop("dtype")
    vision = flat["vision_config"]
    vision.pop("rope_parameters")
    vision["in_chans"] = vision.pop("in_channels")
    vision["model_type"] = "qwen2_vl"
    return flat


def test_the_adapter_builds_qwen2_vl_with_the_tokenizers_special_ids(adapter, processor, model):
    assert type(model) is Qwen2VLForConditionalGeneration and adapter.family == "Qwen2-VL"
    ids = processor.format.structure_token_ids()
    assert (model.config.image_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id) == \
        (ids["image_pad"], ids["vision_start"], ids["vision_end"])
    # Qwen2-VL's tower: ViT width `embed_dim`, projected by its merger to the language model's width.
    assert model.config.vision_config.hidden_size == model.config.get_text_config().hidden_size


@pytest.mark.parametrize("messages, sizes", [
    ("Describe the image.", []),
    ("Describe the image.", [(56, 56)]),
    ("<image> Compare <image> and <image>", [(112, 56), (56, 112), (112, 112)]),
    ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red square."},
      {"role": "user", "content": "and <image>"}], [(84, 112), (56, 84)]),
])
def test_positions_equal_qwen2_vl_get_rope_index(processor, model, messages, sizes):
    encoded = processor.encode(messages, images=[red(s) for s in sizes] or None, add_generation_prompt=True)
    grids = encoded.vision["image_grid_thw"] if encoded.vision else None
    expected, deltas = model.model.get_rope_index(
        encoded.input_ids[None], mm_token_type_ids=encoded.mm_token_type_ids[None], image_grid_thw=grids)
    assert torch.equal(encoded.position_ids, expected[:, 0])
    assert encoded.next_position == len(encoded) + int(deltas[0, 0])
    if sizes:
        assert int(deltas[0, 0]) < 0  # images really fold the positions: the comparison has teeth


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_positions_equal_get_rope_index_with_padding(processor, model, padding_side):
    samples = [processor.encode("Describe the image.", images=[red((112, 56))]),
               processor.encode("Hi"),
               processor.encode("<image> and <image>", images=[red((56, 56)), red((84, 112))])]
    batch = collate(samples, processor.pad_token_id, padding_side)
    expected, deltas = model.model.get_rope_index(
        batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids,
        image_grid_thw=batch.vision["image_grid_thw"], attention_mask=batch.attention_mask)
    assert torch.equal(batch.position_ids, expected)
    assert batch.next_positions.tolist() == (batch.attention_mask.sum(dim=1) + deltas[:, 0]).tolist()


def test_image_tokens_per_image_equal_the_vision_towers_features(processor, model):
    encoded = processor.encode("<image> and <image>", images=[red((56, 56)), red((84, 112))])
    with torch.no_grad():
        features = model.model.get_image_features(
            encoded.vision["pixel_values"], encoded.vision["image_grid_thw"]).pooler_output
    assert [f.shape[0] for f in features] == [4, 12]  # (56/14)·(56/14)/2², (84/14)·(112/14)/2²
    assert int(encoded.mm_token_type_ids.sum()) == 16
    assert features[0].shape[1] == model.config.get_text_config().hidden_size


def test_vision_parameters_are_the_vit_without_its_merger(adapter, model):
    chosen = {id(p) for p in adapter.vision_parameters(model)}
    visual = model.model.visual
    merger = {id(p) for p in visual.merger.parameters()}
    assert chosen and not chosen & merger
    assert chosen | merger == {id(p) for p in visual.parameters()}
    assert not chosen & {id(p) for p in model.model.language_model.parameters()}


def test_a_hub_layout_checkpoint_loads_and_converts_to_the_same_model(tmp_path: Path, adapter, processor):
    """Real Qwen2-VL checkpoints carry the flat 4.x config.json: it must give the same network."""
    nested = build_random_checkpoint(tmp_path / "nested", processor.tokenizer, TinyShape(initializer_range=0.3),
                                     adapter=adapter)
    flat = Path(shutil.copytree(nested, tmp_path / "flat"))
    config = hub_layout(json.loads((nested / "config.json").read_text()))
    assert "text_config" not in config and "hidden_size" in config  # really the flat layout
    (flat / "config.json").write_text(json.dumps(config))
    reference, loaded = LoadedModel.load(nested), LoadedModel.load(flat)
    assert type(loaded.adapter) is type(adapter)
    probe = probe_input(loaded.processor)
    assert torch.equal(probe.input_ids, probe_input(reference.processor).input_ids)
    pad = loaded.processor.pad_token_id
    logits = [causal_logits(adapter, lm.model, probe, pad) for lm in (loaded, reference)]
    assert torch.equal(logits[0], logits[1])
    report = convert_checkpoint(flat, tmp_path / "converted", log=lambda _: None)
    assert report.architecture == ARCHITECTURE and report.max_logit_difference <= report.tolerance
