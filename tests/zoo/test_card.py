"""The model card's architecture lines read any family's config keys."""

from __future__ import annotations

import json

from dvlm.zoo.card import vision_line
from dvlm.zoo.registry import builtin_path


def test_vision_line_of_a_shipped_model_is_its_cards():
    path = builtin_path("tiny-dvlm")
    line = vision_line(json.loads((path / "config.json").read_text())["vision_config"])
    assert line in (path / "README.md").read_text().splitlines()


def test_vision_line_without_a_patch_merge():
    tower = {"num_hidden_layers": 3, "hidden_size": 32, "patch_size": 16}  # a tower that merges no patches
    assert vision_line(tower) == "- vision: depth 3, hidden 32, patch 16"
