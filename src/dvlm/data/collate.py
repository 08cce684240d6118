"""Pad :class:`~dvlm.data.processor.Encoded` samples into one :class:`Batch`.

Right padding is for training (real tokens start at index 0, so positions and labels line up
with the unpadded sample); left padding is for decoding (every prompt ends at the same index,
so new tokens are appended at the same column for the whole batch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from dvlm.data.processor import IGNORE_INDEX, Encoded
from dvlm.data.vision import VisionInputs, concat_vision

PADDING_SIDES = ("left", "right")


@dataclass
class Batch:
    """A padded batch of R rows. Padding positions carry pad ids, IGNORE_INDEX labels and position 0."""

    input_ids: torch.Tensor  # (R, L) long
    labels: torch.Tensor  # (R, L) long, IGNORE_INDEX at padding
    attention_mask: torch.Tensor  # (R, L) bool, True = real token
    mm_token_type_ids: torch.Tensor  # (R, L) long, 1 at image tokens
    position_ids: torch.Tensor  # (A, R, L) long, the family's axes; 0 at padding (masked anyway)
    next_positions: torch.Tensor  # (R,) long: the position of each row's first generated token
    vision: VisionInputs | None  # the rows' images in row order (None: no row has one)

    def to(self, device: torch.device | str) -> "Batch":
        """A copy with every tensor on ``device`` (dtypes unchanged)."""
        moved = {}
        for field in fields(self):
            value = getattr(self, field.name)
            moved[field.name] = value.to(device) if isinstance(value, (torch.Tensor, VisionInputs)) else value
        return Batch(**moved)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def collate(samples: list[Encoded], pad_token_id: int, padding_side: str = "right") -> Batch:
    """Pad ``samples`` to the longest one and join their images.

    Example, lengths 3 and 1, right padding (p = pad id)::

        input_ids       [[a, b, c], [d, p, p]]
        attention_mask  [[1, 1, 1], [1, 0, 0]]
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    rows, width = len(samples), max(len(s) for s in samples)
    axes = samples[0].position_ids.shape[0]
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.bool)
    mm_token_type_ids = torch.zeros(rows, width, dtype=torch.long)
    position_ids = torch.zeros(axes, rows, width, dtype=torch.long)
    for r, sample in enumerate(samples):
        n = len(sample)
        span = slice(width - n, width) if padding_side == "left" else slice(0, n)
        input_ids[r, span] = sample.input_ids
        labels[r, span] = sample.labels
        attention_mask[r, span] = True
        mm_token_type_ids[r, span] = sample.mm_token_type_ids
        position_ids[:, r, span] = sample.position_ids
    return Batch(
        input_ids=input_ids,
        labels=labels,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
        position_ids=position_ids,
        next_positions=torch.tensor([s.next_position for s in samples], dtype=torch.long),
        vision=concat_vision([s.vision for s in samples]),
    )
