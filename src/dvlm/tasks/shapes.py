"""Synthetic shape scenes for the built-in model: sampling, rendering, and the text about them.

Image format (fixed): 84x84 RGB, plain white background, a 3x3 grid of 28 px cells; a scene
holds 1-4 shapes, each in its own cell, centred in that cell plus an integer jitter of at most
2 px per axis. 28 px is one merged vision token of the built-in models (14 px patches, 2x2 merge), so
each cell is exactly one image token (at 112 px, cell borders fell inside tokens). Shapes are
drawn at 4x resolution and downsampled (anti-aliasing), so a shape's interior is exactly its
colour and empty cells are exactly the background.

Vocabulary: 5 kinds x 6 colours x 2 sizes. Size is a visual nuisance only: no text mentions it.

Text (all generated here, so the tokenizer can enumerate it from these constants):

* questions: "What colour is the circle?" (asked only when the kind is unique in the scene),
  "What colour is the shape in the top left?" and "What shape is in the top left?" (occupied
  cells only), "How many shapes are there?",
  "Where is the red square?" (asked only when that colour+kind is unique);
* caption: "There are 3 shapes. A red circle is in the top left. An orange star is in the
  center. ..." with one sentence per shape in row-major cell order ("There is 1 shape." for one).

This module is mechanism only; which scenes belong to which split is decided by the caller
through ``buckets`` (see ``dvlm.tasks.builtin``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Collection
from dataclasses import astuple, dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 84
GRID = 3
CELL_SIZE = IMAGE_SIZE / GRID
SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges without a dependency
BACKGROUND = (255, 255, 255)
MIN_SHAPES = 1
MAX_SHAPES = 4
MAX_JITTER = 2  # px; the large radius (11) + 2 stays inside half a cell (14)
MAX_SCENE_DRAWS = 10_000  # rejection sampling into a split; ~10 draws are expected

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 230),
    "yellow": (240, 200, 0),
    "purple": (140, 50, 190),
    "orange": (255, 130, 0),
}
KINDS = ("circle", "square", "triangle", "star", "cross")
SIZES: dict[str, float] = {"small": 7.0, "large": 11.0}  # circumradius in px at IMAGE_SIZE
# Cell names in row-major order: POSITIONS[cell] with cell = row * GRID + column.
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

# Shape proportions relative to the circumradius, chosen so that kinds of one size look
# about equally big and stay distinguishable at the small size.
SQUARE_HALF_SIDE = 0.8
STAR_POINTS = 5
STAR_INNER_RATIO = 0.45
CROSS_HALF_WIDTH = 0.33
TRIANGLE_DROP = 0.15  # move the triangle down so its bounding box is centred

QUESTION_COLOUR = "What colour is the {kind}?"
QUESTION_COLOUR_AT = "What colour is the shape in the {position}?"
QUESTION_KIND = "What shape is in the {position}?"
QUESTION_COUNT = "How many shapes are there?"
QUESTION_POSITION = "Where is the {colour} {kind}?"
QUESTION_TYPES = ("colour", "colour_at", "kind", "count", "position")
CAPTION_PROMPT = "Describe the image."
FACT_SENTENCE = "{article} {colour} {kind} is in the {position}."
COUNT_SENTENCE_ONE = "There is 1 shape."
COUNT_SENTENCE_MANY = "There are {n} shapes."


@dataclass(frozen=True)
class Shape:
    """One shape of a scene; the image is a pure function of a tuple of these."""

    cell: int  # 0..8, row-major
    kind: str  # one of KINDS
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    dx: int  # jitter in px, |dx| <= MAX_JITTER
    dy: int

    @property
    def position(self) -> str:
        """The cell's name, e.g. "top left"."""
        return POSITIONS[self.cell]

    def to_dict(self) -> dict[str, int | str]:
        """JSON-friendly form, stored in ``Sample.meta``."""
        return {"cell": self.cell, "position": self.position, "kind": self.kind,
                "colour": self.colour, "size": self.size, "dx": self.dx, "dy": self.dy}


Scene = tuple[Shape, ...]  # sorted by cell


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw 1-4 shapes in distinct cells, sorted by cell."""
    n = int(rng.integers(MIN_SHAPES, MAX_SHAPES + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=n, replace=False))
    colours, sizes = list(COLOURS), list(SIZES)
    return tuple(
        Shape(
            cell=cell,
            kind=KINDS[int(rng.integers(len(KINDS)))],
            colour=colours[int(rng.integers(len(colours)))],
            size=sizes[int(rng.integers(len(sizes)))],
            dx=int(rng.integers(-MAX_JITTER, MAX_JITTER + 1)),
            dy=int(rng.integers(-MAX_JITTER, MAX_JITTER + 1)),
        )
        for cell in cells
    )


def scene_bucket(scene: Scene, num_buckets: int) -> int:
    """A stable hash of the scene's content, modulo ``num_buckets``.

    Splits are defined on this bucket, so an image (a pure function of the scene) can only ever
    belong to one split. sha256 rather than ``hash()``: Python's hash is salted per process.
    """
    canonical = json.dumps([astuple(shape) for shape in scene]).encode()
    return int.from_bytes(hashlib.sha256(canonical).digest()[:8], "big") % num_buckets


def sample_scene_in_buckets(
    rng: np.random.Generator, buckets: Collection[int], num_buckets: int
) -> Scene:
    """Rejection-sample a scene whose ``scene_bucket`` lies in ``buckets``."""
    for _ in range(MAX_SCENE_DRAWS):
        scene = sample_scene(rng)
        if scene_bucket(scene, num_buckets) in buckets:
            return scene
    raise RuntimeError(f"no scene fell in buckets {sorted(buckets)} of {num_buckets} "
                       f"after {MAX_SCENE_DRAWS} draws")


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle kind centred at (cx, cy) with circumradius r."""
    if kind == "square":
        h = r * SQUARE_HALF_SIDE
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        cy += r * TRIANGLE_DROP
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "star":
        points = []
        for i in range(2 * STAR_POINTS):
            radius = r if i % 2 == 0 else r * STAR_INNER_RATIO
            angle = -math.pi / 2 + i * math.pi / STAR_POINTS
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if kind == "cross":
        w = r * CROSS_HALF_WIDTH
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
                (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
                (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape kind {kind!r}; known: {KINDS}")


def shape_centre(shape: Shape) -> tuple[float, float]:
    """Centre of the shape in image pixels (cell centre plus jitter)."""
    row, col = divmod(shape.cell, GRID)
    return (col + 0.5) * CELL_SIZE + shape.dx, (row + 0.5) * CELL_SIZE + shape.dy


def render_scene(scene: Scene) -> Image.Image:
    """Draw the scene as an IMAGE_SIZE x IMAGE_SIZE RGB image."""
    big = Image.new("RGB", (IMAGE_SIZE * SUPERSAMPLE,) * 2, BACKGROUND)
    draw = ImageDraw.Draw(big)
    for shape in scene:
        cx, cy = (v * SUPERSAMPLE for v in shape_centre(shape))
        r = SIZES[shape.size] * SUPERSAMPLE
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_outline(shape.kind, cx, cy, r), fill=fill)
    # BOX averages each 4x4 block, so interiors keep their exact colour.
    return big.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def article(colour: str) -> str:
    """"An" before a vowel sound ("An orange ..."), else "A"."""
    return "An" if colour[0] in "aeiou" else "A"


def fact_sentence(colour: str, kind: str, position: str) -> str:
    """One caption sentence, e.g. "A red circle is in the top left."."""
    return FACT_SENTENCE.format(article=article(colour), colour=colour, kind=kind,
                                position=position)


def count_sentence(n: int) -> str:
    """"There is 1 shape." or "There are n shapes."."""
    return COUNT_SENTENCE_ONE if n == 1 else COUNT_SENTENCE_MANY.format(n=n)


def caption(scene: Scene) -> str:
    """The reference description: a count sentence, then one fact per shape in cell order."""
    sentences = [count_sentence(len(scene))]
    sentences += [fact_sentence(s.colour, s.kind, s.position) for s in scene]
    return " ".join(sentences)


def questions(scene: Scene) -> dict[str, list[tuple[str, str]]]:
    """Every answerable (question, answer) pair of the scene, grouped by question type.

    Colour and position questions are only asked when their target is unique in the scene,
    so every question has exactly one right answer. A type may have an empty list.
    """
    kind_counts = Counter(s.kind for s in scene)
    pair_counts = Counter((s.colour, s.kind) for s in scene)
    return {
        "colour": [(QUESTION_COLOUR.format(kind=s.kind), s.colour)
                   for s in scene if kind_counts[s.kind] == 1],
        "colour_at": [(QUESTION_COLOUR_AT.format(position=s.position), s.colour) for s in scene],
        "kind": [(QUESTION_KIND.format(position=s.position), s.kind) for s in scene],
        "count": [(QUESTION_COUNT, str(len(scene)))],
        "position": [(QUESTION_POSITION.format(colour=s.colour, kind=s.kind), s.position)
                     for s in scene if pair_counts[(s.colour, s.kind)] == 1],
    }


def vocabulary_texts() -> list[str]:
    """Every string this module can produce, enumerated from the constants (not sampled)."""
    texts = [QUESTION_COUNT, CAPTION_PROMPT, COUNT_SENTENCE_ONE]
    texts += [COUNT_SENTENCE_MANY.format(n=n) for n in range(MIN_SHAPES, MAX_SHAPES + 1)]
    texts += [str(n) for n in range(MIN_SHAPES, MAX_SHAPES + 1)]
    texts += [*COLOURS, *KINDS, *POSITIONS]
    texts += [QUESTION_COLOUR.format(kind=k) for k in KINDS]
    texts += [QUESTION_KIND.format(position=p) for p in POSITIONS]
    texts += [QUESTION_COLOUR_AT.format(position=p) for p in POSITIONS]
    for colour in COLOURS:
        for kind in KINDS:
            texts.append(QUESTION_POSITION.format(colour=colour, kind=kind))
            texts += [fact_sentence(colour, kind, p) for p in POSITIONS]
    return texts
