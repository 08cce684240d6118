"""max_length comes from the model, and the run says before training how many samples exceed it
(issue 24): LLaVA-OneVision at its real tile geometry trains on an ordinary photo with the defaults."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from dvlm.config import ConfigError, TrainConfig
from dvlm.convert.conversion import convert_checkpoint
from dvlm.model.adapters.base import TinyShape
from dvlm.model.adapters.llava_onevision import LlavaOnevisionAdapter, tiny_config
from dvlm.train.lengths import LengthScan, resolve_max_length
from dvlm.train.loop import train
from dvlm.zoo.tokenizer import build_tokenizer

ADAPTER = LlavaOnevisionAdapter()
# From llava-hf/llava-onevision-qwen2-0.5b-ov-hf's config.json: SigLIP's 384 px tiles of 14 px patches,
# anyres_max_9, Qwen2-0.5B's 32768 positions, and its image_grid_pinpoints, in their published order.
TILE, PATCH, ASPECT, POSITIONS = 384, 14, "anyres_max_9", 32768
PUBLISHED_PINPOINTS = [
    [384, 384], [384, 768], [384, 1152], [384, 1536], [384, 1920], [384, 2304],
    [768, 384], [768, 768], [768, 1152], [768, 1536], [768, 1920], [768, 2304],
    [1152, 384], [1152, 768], [1152, 1152], [1152, 1536], [1152, 1920], [1152, 2304],
    [1536, 384], [1536, 768], [1536, 1152], [1536, 1536], [1536, 1920], [1536, 2304],
    [1920, 384], [1920, 768], [1920, 1152], [1920, 1536], [1920, 1920], [1920, 2304],
    [2304, 384], [2304, 768], [2304, 1152], [2304, 1536], [2304, 1920], [2304, 2304],
]
PHOTO_IMAGE_TOKENS = 2929
"""A 640x480 photo at this geometry: transformers' processor counts 2,929 image tokens (issue 19)."""
ANSWER = "A purple square on a plain background."


@pytest.fixture(scope="module")
def real_geometry(tmp_path_factory) -> Path:
    """A converted LLaVA-OneVision at the published geometry with tiny widths: the image-token count
    depends on the geometry alone."""
    tokenizer = build_tokenizer(adapter=ADAPTER)
    config = tiny_config(tokenizer, TinyShape(hidden_size=32, intermediate_size=64, num_layers=1, vision_hidden_size=16,
                                              vision_depth=1, max_position_embeddings=POSITIONS))
    config.vision_config.image_size, config.vision_config.patch_size = TILE, PATCH
    config.image_grid_pinpoints, config.vision_aspect_ratio = PUBLISHED_PINPOINTS, ASPECT
    root = tmp_path_factory.mktemp("llava-real")
    type(ADAPTER.random_model(tokenizer, TinyShape()))(config).save_pretrained(root / "ar")
    tokenizer.save_pretrained(root / "ar")
    LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                    image_grid_pinpoints=PUBLISHED_PINPOINTS).save_pretrained(root / "ar")
    convert_checkpoint(root / "ar", root / "dvlm", log=lambda _: None)
    return root / "dvlm"


def llava_data(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """One record per image size (width, height): a picture and a short answer about it."""
    records = []
    for i, (width, height) in enumerate(sizes):
        Image.new("RGB", (width, height), (120, 30, 200)).save(folder / f"img{i}.png")
        records.append({"id": f"s{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": ANSWER}]})
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def scan_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith("lengths:"))


def test_a_photo_trains_with_the_defaults(tmp_path, capsys, real_geometry):
    """640x480 at the real tiling is ~2,950 tokens: the old fixed max_length of 2048 skipped it and
    the run stopped with "nothing to train on"."""
    data = llava_data(tmp_path, [(640, 480)])
    result = train(real_geometry, data, tmp_path / "run", TrainConfig(max_steps=1), progress=True)
    assert result.skipped == 0 and math.isfinite(result.losses[0])
    line = scan_line(capsys.readouterr().out)
    assert line.startswith("lengths: 0 of 1 sample exceed max_length 32,768 (the model's position limit); the "
                           "longest has ")
    length = int(line.removesuffix(" tokens").rsplit(" ", 1)[-1].replace(",", ""))
    assert 2048 < PHOTO_IMAGE_TOKENS < length < PHOTO_IMAGE_TOKENS + 40  # the image, then the chat's few tokens
    state = json.loads(next((tmp_path / "run").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["data_order"]["max_length"] == POSITIONS and state["train_config"]["max_length"] is None


def test_too_long_samples_are_counted_before_training(tmp_path, capsys, real_geometry):
    data = llava_data(tmp_path, [(640, 480), (200, 150), (300, 300)])
    result = train(real_geometry, data, tmp_path / "run", TrainConfig(max_steps=1, batch_size=3, max_length=2048),
                   progress=True)
    line = scan_line(capsys.readouterr().out)
    assert line.startswith("lengths: 1 of 3 samples exceed max_length 2,048 (as set); they will be skipped; the "
                           "longest has ")
    assert result.skipped == 1


def test_data_that_cannot_fit_is_refused_before_the_model_loads(tmp_path, capsys, real_geometry, monkeypatch):
    from dvlm.train import loop

    monkeypatch.setattr(loop.LoadedModel, "load", lambda *a, **k: pytest.fail("the model loaded"))
    data = llava_data(tmp_path, [(640, 480)])
    with pytest.raises(ConfigError, match=r"every sample is longer than max_length 2,048 \(the shortest has "
                                          r"[0-9,]+ tokens\): nothing would train; raise max_length"):
        train(real_geometry, data, tmp_path / "run", TrainConfig(max_steps=1, max_length=2048), progress=True)
    assert not (tmp_path / "run").exists()


def test_max_length_is_the_given_one_else_the_resumed_runs_else_the_models():
    assert resolve_max_length(TrainConfig(max_length=100), 32768, 2048) == (TrainConfig(max_length=100), "as set")
    assert resolve_max_length(TrainConfig(), 32768, 2048) == (TrainConfig(max_length=2048), "the resumed run's")
    assert resolve_max_length(TrainConfig(), 32768) == (TrainConfig(max_length=32768), "the model's position limit")
    with pytest.raises(ConfigError, match="states no position limit"):
        resolve_max_length(TrainConfig(), None)


def test_the_scan_line_names_a_draw_and_unusable_samples():
    scan = LengthScan(total=5000, measured=1000, lengths=(10, 3000, 70) + (5,) * 995, max_length=2048)
    assert scan.describe("as set") == ("lengths: 1 of 1,000 samples drawn from 5,000 exceed max_length 2,048 (as set); "
                                       "they will be skipped; the longest has 3,000 tokens; 2 cannot be used (skipped "
                                       "too, each reported with its reason when drawn)")
    scan.require_some_fit()  # a draw never proves that nothing fits
    with pytest.raises(ConfigError, match="the shortest has 3,000 tokens"):
        LengthScan(total=1, measured=1, lengths=(3000,), max_length=2048).require_some_fit()
