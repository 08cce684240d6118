"""How many image tokens a LLaVA-OneVision image takes ("anyres" tiling), computed from sizes alone.

The chat layout must put exactly as many image tokens in the text as the model's feature packing
produces (`LlavaOnevisionModel.pack_image_features`), before any pixel reaches the model. The
packing of one image of H×W pixels, with tiles of T pixels and vision patches of P pixels
(s = T // P features per tile side):

1. the image is resized into the best of the grid pinpoints (a multiple of T on both sides) and
   cut into tiles; a downscaled copy of the whole image is one more tile, the "base";
2. the base tile gives s² tokens;
3. the other tiles give a feature grid of (s·rows) × (s·cols); the rows (or columns) that are
   letterbox padding of the resize are cut off again (`unpadded_grid`);
4. a grid larger than about N tiles' worth ("anyres_max_N") is shrunk by bilinear interpolation
   to N tiles' worth (`capped_grid`);
5. each grid row ends with the `image_newline` token: rows × (cols + 1) tokens.

Example, T=28, P=14 (s=2), pinpoints [[28, 28], [28, 56], [56, 28], [56, 56]], anyres_max_9, a
56×28 (H×W) image: best pinpoint 56×28 (2×1 tiles), grid 4×2, no padding, no cap:
4 + 4·(2+1) = 16 tokens. A 40×56 image: pinpoint 56×56, grid 4×4, of which the image fills
2 rows (`unpadded_grid`): 4 + 2·(4+1) = 14 tokens.

An image that shares its sample with other images is not tiled (LLaVA-OneVision's multi-image
layout): it is padded to a square, one tile, s² tokens plus one `image_newline`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from transformers.image_processing_utils import select_best_resolution

ASPECT_PREFIX = "anyres_max_"
"""The `vision_aspect_ratio` values the packing understands: "anyres_max_N"."""


@dataclass(frozen=True)
class TileFeatures:
    """The sizes that decide an image's token count: the image processor's tiles and pinpoints,
    the vision tower's patch size and the model's feature cap."""

    tile_size: int
    """Pixels per tile side (the image processor's size, the vision tower's image_size)."""
    patch_size: int
    """Pixels per vision patch side: a tile gives (tile_size // patch_size)² features (SigLIP's 384 px
    tiles of 14 px patches: 27², the last 6 px of each side unread)."""
    max_tiles: int
    """N of the model's `vision_aspect_ratio` "anyres_max_N": feature grids above ~N tiles shrink."""
    pinpoints: tuple[tuple[int, int], ...]
    """The (height, width) resolutions an image may be tiled into, multiples of tile_size."""

    @classmethod
    def from_image_processor(cls, image_processor: Any, patch_size: int, vision_aspect_ratio: str) -> TileFeatures:
        size = image_processor.size  # {height, width} of a square tile, or its {shortest_edge}
        tile = size.get("height") or size.get("shortest_edge")
        if not tile or size.get("height") != (size.get("width") if size.get("height") else None):
            raise ValueError(f"the image processor's size {size} is not a square tile")
        return cls(tile_size=int(tile), patch_size=patch_size,
                   max_tiles=max_tiles(vision_aspect_ratio),
                   pinpoints=tuple((int(h), int(w)) for h, w in image_processor.image_grid_pinpoints))

    def __post_init__(self) -> None:
        odd = [p for p in self.pinpoints if p[0] % self.tile_size or p[1] % self.tile_size]
        if odd or not self.pinpoints:
            raise ValueError(f"grid pinpoints {odd or 'none'}: each must be a multiple of the tile size "
                             f"{self.tile_size} on both sides")

    @property
    def side(self) -> int:
        """Features per tile side (the vision tower's patch grid: a remainder of pixels is not read)."""
        return self.tile_size // self.patch_size

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of tiles an image of height × width pixels is cut into (besides the base tile)."""
        best_height, best_width = select_best_resolution((height, width), [list(p) for p in self.pinpoints])
        return best_height // self.tile_size, best_width // self.tile_size

    def tiles(self, height: int, width: int) -> int:
        """Tiles of a tiled image, the base tile included: its rows of pixel_values."""
        rows, cols = self.tile_grid(height, width)
        return 1 + rows * cols

    def tokens(self, height: int, width: int) -> int:
        """Image tokens of a tiled image (the module docstring's steps 2-5)."""
        rows, cols = self.tile_grid(height, width)
        grid = unpadded_grid(height, width, rows * self.side, cols * self.side)
        rows, cols = capped_grid(*grid, self.max_tiles * self.side ** 2)
        return self.side ** 2 + rows * (cols + 1)

    def untiled_tokens(self) -> int:
        """Image tokens of an image that is not tiled (one of several in a sample): s² + a newline."""
        return self.side ** 2 + 1


def max_tiles(vision_aspect_ratio: str) -> int:
    """"anyres_max_9" -> 9."""
    if not vision_aspect_ratio.startswith(ASPECT_PREFIX) or not vision_aspect_ratio[len(ASPECT_PREFIX):].isdigit():
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not of the form '{ASPECT_PREFIX}N'")
    return int(vision_aspect_ratio[len(ASPECT_PREFIX):])


def unpadded_grid(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """The part of a rows × cols feature grid that covers the image, not its letterbox padding.

    The tiler resized the image to fit the grid keeping its aspect ratio and centred it; the side
    that did not fill the grid loses its padding, the same amount at both ends (so an odd
    remainder keeps one padding row). Example, a 4×4 grid: a 40×56 (H×W) image fills 4·40/56 = 2.86
    rows, truncated to 2, so (4 - 2) // 2 = 1 row per end goes: 2 rows stay; a 48×56 image fills
    3.43 -> 3 rows, (4 - 3) // 2 = 0 per end: all 4 rows stay."""
    if width / height > cols / rows:  # wider than the grid: rows of padding above and below
        filled = int(round(height * (cols / width), 7))
        return rows - 2 * ((rows - filled) // 2), cols
    filled = int(round(width * (rows / height), 7))
    return rows, cols - 2 * ((cols - filled) // 2)


def capped_grid(rows: int, cols: int, max_features: int) -> tuple[int, int]:
    """A feature grid shrunk to about `max_features` when it is more than 1.1 times (per side) larger,
    keeping its aspect ratio; the model interpolates the features to this size."""
    ratio = math.sqrt(rows * cols / max_features)
    if ratio <= 1.1:
        return rows, cols
    return int(rows // ratio), int(cols // ratio)
