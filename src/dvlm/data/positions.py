"""Position ids, one rule for the clean stream, the noisy stream and decoding.

A family's position ids have `axes` coordinates per token: 3 for a rotary embedding over
(temporal, height, width), 1 for plain 1-D positions. Tensors of position ids are (A, ...) with A = axes, always, so shared
code never special-cases a family:

* a prompt's positions come from its family (`PositionScheme.sample`, from the image tokens and
  the images' grids): the clean stream;
* a noisy token carries the position of the clean token it copies (`copy_positions`);
* text after a known position, whether decoded (prefill, canvases, AR steps, speculative drafts)
  or a noisy fill token, advances by one per token, equally on every axis (`text_positions`,
  `along_axes`): that is how every supported family lays out text.
"""

from __future__ import annotations

import torch

from dvlm.data.vision import VisionInputs


class PositionScheme:
    """A family's position ids. This base class is plain 1-D positions (one axis, 0, 1, 2, ...
    over text and image tokens alike, as most families number them); a family with another
    layout overrides `axes` and `sample`."""

    axes = 1

    def sample(self, image_tokens: torch.Tensor, vision: VisionInputs | None) -> tuple[torch.Tensor, int]:
        """Positions of one encoded sample.

        Args:
            image_tokens: (L,) long, 1 at the tokens whose embeddings are image features, else 0.
            vision: the sample's images as the family's processor made them (None: no image).
        Returns:
            position ids (A, L) long, and the position of the token that would follow the sample.
        """
        length = image_tokens.shape[0]
        return torch.arange(length, device=image_tokens.device)[None], length

    def along_axes(self, text: torch.Tensor) -> torch.Tensor:
        """(...) text positions -> (A, ...): a text token has the same coordinate on every axis."""
        return text[None].expand(self.axes, *text.shape)

    def text(self, start: torch.Tensor, length: int) -> torch.Tensor:
        """(A, R, Q) positions of Q text tokens per row, row r starting at start[r] (R,)."""
        return self.along_axes(start[:, None] + torch.arange(length, device=start.device)[None, :])


def copy_positions(positions: torch.Tensor, source: torch.Tensor, advance: torch.Tensor) -> torch.Tensor:
    """The positions of a noisy stream: each noisy token at the position of the clean token it
    copies, advanced as text by `advance` (0 for a plain copy; k for the k-th fill token after a
    response's last token).

    Args:
        positions: (A, R, L) clean-stream positions; source, advance: (R, N) long.
    Returns:
        (A, R, N).
    """
    copied = positions.gather(2, source[None].expand(positions.shape[0], -1, -1))
    return copied + advance[None]
