"""Pad :class:`~dvlm.data.processor.Encoded` samples into one :class:`Batch`.

Right padding is for training (real tokens start at index 0, so positions and labels line up
with the unpadded sample); left padding is for decoding (every prompt ends at the same index,
so new tokens are appended at the same column for the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dvlm.data.processor import IGNORE_INDEX, Encoded

PADDING_SIDES = ("left", "right")


@dataclass
class Batch:
    """A padded batch. Padding positions carry pad ids, IGNORE_INDEX labels and position 0."""

    input_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor  # (B, L) long, IGNORE_INDEX at padding
    attention_mask: torch.Tensor  # (B, L) bool, True = real token
    mm_token_type_ids: torch.Tensor  # (B, L) long, 1 at image tokens
    position_ids: torch.Tensor  # (3, B, L) long, M-RoPE; 0 at padding (masked anyway)
    # (B,) long, per sample as in Encoded: the next position of sample b is
    # attention_mask[b].sum() + rope_deltas[b], whatever the padding side.
    rope_deltas: torch.Tensor
    pixel_values: torch.Tensor | None  # (total_patches, C*tp*p*p), samples' images in order
    image_grid_thw: torch.Tensor | None  # (total_images, 3) long

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        moved = {}
        for field in fields(self):
            value = getattr(self, field.name)
            moved[field.name] = value.to(device) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(samples: list[Encoded], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad ``samples`` to the longest one and concatenate their images.

    Example, lengths 3 and 1, right padding (p = pad id)::

        input_ids       [[a, b, c], [d, p, p]]
        attention_mask  [[1, 1, 1], [1, 0, 0]]
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    batch_size, width = len(samples), max(len(s) for s in samples)
    input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
    labels = torch.full((batch_size, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, width, dtype=torch.bool)
    mm_token_type_ids = torch.zeros(batch_size, width, dtype=torch.long)
    position_ids = torch.zeros(3, batch_size, width, dtype=torch.long)
    for b, sample in enumerate(samples):
        n = len(sample)
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[b, span] = sample.input_ids
        labels[b, span] = sample.labels
        attention_mask[b, span] = True
        mm_token_type_ids[b, span] = sample.mm_token_type_ids
        position_ids[:, b, span] = sample.position_ids
    rope_deltas = torch.tensor([s.rope_delta for s in samples], dtype=torch.long)
    pixel_values = [s.pixel_values for s in samples if s.pixel_values is not None]
    grids = [s.image_grid_thw for s in samples if s.image_grid_thw is not None]
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
        position_ids=position_ids,
        rope_deltas=rope_deltas,
        pixel_values=torch.cat(pixel_values) if pixel_values else None,
        image_grid_thw=torch.cat(grids) if grids else None,
    )
