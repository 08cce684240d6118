"""3-axis M-RoPE position ids (Qwen2-VL, Qwen2.5-VL; Qwen3-VL numbers its tokens the same way and
interleaves the axes inside its rotary embedding), for images: `MRopePositions`."""

from __future__ import annotations

import torch

from dvlm.data.positions import PositionScheme
from dvlm.data.vision import VisionInputs

TEXT_TOKEN_TYPE, IMAGE_TOKEN_TYPE = 0, 1


class MRopePositions(PositionScheme):
    """Three axes (temporal, height, width); image tokens on their merged patch grid."""

    axes = 3

    def __init__(self, spatial_merge_size: int) -> None:
        self.spatial_merge_size = spatial_merge_size

    def sample(self, image_tokens: torch.Tensor, vision: VisionInputs | None) -> tuple[torch.Tensor, int]:
        grids = None if vision is None else vision["image_grid_thw"]
        positions, rope_delta = mrope_position_ids(image_tokens, image_tokens, grids, self.spatial_merge_size)
        return positions, len(image_tokens) + rope_delta


def mrope_position_ids(input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                       image_grid_thw: torch.Tensor | None,
                       spatial_merge_size: int) -> tuple[torch.Tensor, int]:
    """M-RoPE position ids of one sequence, as Qwen2.5-VL's ``get_rope_index`` for images.

    Text tokens advance all three coordinates by 1. An image of grid (t, h, w) patches covers
    t·(h/m)·(w/m) tokens (m = spatial_merge_size) placed on a (t, h/m, w/m) grid offset by the
    current position; afterwards the current position advances by max(h/m, w/m).
    Example, m=2, two text tokens, one image of grid (1, 4, 6) (6 tokens), one text token::

        type      0 0  1 1 1 1 1 1  0
        temporal  0 1  2 2 2 2 2 2  5
        height    0 1  2 2 2 3 3 3  5
        width     0 1  2 3 4 2 3 4  5      rope_delta = 5 + 1 - 9 = -3

    Args:
        input_ids: (L,) token ids (only the shape and device are used).
        mm_token_type_ids: (L,) 0 for text, 1 for image tokens.
        image_grid_thw: (num_images, 3) or None, one row per image block in order.
    Returns:
        position_ids (3, L) long and rope_delta (int): the next position is L + rope_delta.
    """
    types = mm_token_type_ids.tolist()
    if input_ids.shape != mm_token_type_ids.shape or input_ids.dim() != 1:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and mm_token_type_ids "
                         f"{tuple(mm_token_type_ids.shape)} must be the same 1-D shape")
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    length = len(types)
    positions = torch.empty(3, length, dtype=torch.long)
    current, i, image = 0, 0, 0
    while i < length:
        if types[i] == TEXT_TOKEN_TYPE:
            end = i
            while end < length and types[end] == TEXT_TOKEN_TYPE:
                end += 1
            positions[:, i:end] = torch.arange(current, current + end - i)
            current += end - i
        elif types[i] == IMAGE_TOKEN_TYPE:
            if image >= len(grids):
                raise ValueError(f"image tokens at {i} but only {len(grids)} image_grid_thw rows")
            t, h, w = grids[image]
            h, w = h // spatial_merge_size, w // spatial_merge_size  # merged grid
            end = i + t * h * w
            # Blocks are consumed by their grid size, so adjacent images stay separate.
            if types[i:end] != [IMAGE_TOKEN_TYPE] * (t * h * w):
                raise ValueError(f"image {image} needs {t * h * w} image tokens from {i}")
            grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            positions[:, i:end] = torch.stack(grid).reshape(3, -1) + current
            current += max(h, w)
            image += 1
        else:
            raise ValueError(f"unsupported mm_token_type {types[i]} at {i} (images only)")
        i = end
    if image != len(grids):
        raise ValueError(f"{len(grids)} image_grid_thw rows but {image} image blocks")
    rope_delta = int(positions.max()) + 1 - length if length else 0
    return positions.to(input_ids.device), rope_delta


ROPE_KEYS = ("rope_scaling", "rope_parameters")
"""Where a Qwen-VL config.json keeps `mrope_section` (older and newer transformers names)."""


def check_mrope_section(config: dict, source: str) -> None:
    """A one-line ValueError unless config.json's `mrope_section` (the temporal / height / width split
    of half a head's rotary dimensions) sums to head_dim / 2: otherwise transformers fails deep in the
    rotary embedding (a split_with_sizes error) or, interleaved, numbers positions wrongly."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    for section_name, section in (("text_config", text), ("", config)):
        for key in ROPE_KEYS:
            rope = section.get(key)
            if isinstance(rope, dict) and "mrope_section" in rope:
                field = ".".join(filter(None, (section_name, key, "mrope_section")))
                return _check_sum(rope["mrope_section"], head_dim(section or config), source, field)
    raise ValueError(f"{source} has no mrope_section (under text_config.rope_scaling or rope_parameters): "
                     "a Qwen-VL config needs one")


def head_dim(section: dict) -> int | None:
    """The attention head size a text config gives: `head_dim`, else hidden_size / num_attention_heads."""
    if isinstance(section.get("head_dim"), int):
        return section["head_dim"]
    hidden, heads = section.get("hidden_size"), section.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def _check_sum(sections, size: int | None, source: str, field: str) -> None:
    if not (isinstance(sections, list) and sections and all(isinstance(s, int) and s > 0 for s in sections)):
        raise ValueError(f"{source}: {field} must be a list of positive integers, got {sections!r}")
    if size is not None and 2 * sum(sections) != size:
        raise ValueError(f"{source}: {field} {sections} sums to {sum(sections)}, but the attention heads have "
                         f"{size} dimensions, so it must sum to head_dim / 2 = {size // 2}")
