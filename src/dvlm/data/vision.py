"""`VisionInputs`: a sample's (or a batch's) images as its family's vision tower takes them.

The tensors are the family's image processor's outputs under the names the Hugging Face model's
forward takes (for example patches and their grids, or tiles and the images' sizes). Shared code
never looks inside: it moves them to a device, joins the samples of a batch, and hands them to the
adapter. A family whose tensors cannot simply be concatenated along their first dimension (tiles
padded to a common count, per-sample image counts) subclasses this and overrides `concat`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionInputs:
    tensors: dict[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def to(self, device: torch.device | str) -> VisionInputs:
        return type(self)({name: t.to(device) for name, t in self.tensors.items()})

    @classmethod
    def concat(cls, parts: list[VisionInputs]) -> VisionInputs:
        """The images of several samples, in sample order: each tensor concatenated along dim 0."""
        return cls({name: torch.cat([p.tensors[name] for p in parts]) for name in parts[0].tensors})


def concat_vision(parts: list[VisionInputs | None]) -> VisionInputs | None:
    """A batch's images from its samples' (None for samples without images); None when no sample has any."""
    present = [p for p in parts if p is not None]
    return type(present[0]).concat(present) if present else None
