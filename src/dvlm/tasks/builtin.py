"""The built-in model's synthetic tasks: the ``Sample`` type, splits, the registry, LLaVA export.

Tasks (see ``dvlm.tasks.shapes`` and ``dvlm.tasks.digits`` for image and text formats):

* ``shapes-qa``: one short question about a shapes scene (colour of a kind or at a place / kind at a
  place / count / place of a colour+kind).
* ``shapes-caption``: "Describe the image." answered by a structured multi-sentence caption.
* ``digits-read``: "Read the digits." on a strip of 1-8 handwritten digits -> "4 0 7".
* ``multi-turn``: 2-3 turns about one image, either a shapes scene (short questions plus at most
  one caption) or a digit strip (reading, count, first and last digit), in random order. Only the
  first human turn carries ``<image>\\n``.

Splits are fixed and disjoint by content: every image source has a bucket in 0..9 (for digits
the sklearn index % 10; for shapes a sha256 hash of the scene % 10) and buckets 0-6 are
``train``, 7 ``validation``, 8-9 ``test``. So test digit strips use handwriting never seen in
training and no shapes image appears in two splits.

Determinism: sample ``i`` of ``generate(split, n, seed)`` is drawn from
``numpy.random.default_rng([task.index, split_index, seed, i])``, so it does not depend on ``n``
(``generate(s, 10)[:5] == generate(s, 5)``) and different tasks, splits and seeds do not share
streams. Sample ids are ``"{task}/{split}/{seed}/{i:06d}"``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dvlm.data.chat import GPT, HUMAN, IMAGE_PLACEHOLDER
from dvlm.tasks import digits, shapes

SPLITS = ("train", "validation", "test")
NUM_BUCKETS = 10
SPLIT_BUCKETS: dict[str, frozenset[int]] = {
    "train": frozenset(range(7)),
    "validation": frozenset({7}),
    "test": frozenset({8, 9}),
}

# How an answer is scored (dvlm.tasks.metrics): exact match, caption facts, or digit sequence.
SHORT = "short"
CAPTION = "caption"
DIGITS = "digits"
ANSWER_KINDS = (SHORT, CAPTION, DIGITS)

MIN_TURNS = 2
MAX_TURNS = 3
SHAPES_DIALOGUE_PROBABILITY = 0.5  # multi-turn: shapes scene vs digit strip

Turn = tuple[str, str, str]  # (question, reference answer, answer kind)


@dataclass
class Sample:
    """One training / evaluation example in LLaVA conversation form."""

    id: str
    """Unique id, ``"{task}/{split}/{seed}/{i:06d}"``."""
    task: str
    """Name of the task that generated it."""
    images: list[Image.Image]
    """RGB images; one ``<image>`` placeholder per image in the human turns."""
    conversations: list[dict[str, str]]
    """``[{"from": "human", "value": "<image>\\nQ1"}, {"from": "gpt", "value": "A1"}, ...]``."""
    answers: list[str]
    """The gpt values in order (reference answers)."""
    answer_kinds: list[str] = field(default_factory=list)
    """How each answer is scored (``SHORT`` / ``CAPTION`` / ``DIGITS``); one per answer."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-friendly generator spec: ``scene`` (list of shape dicts) or digit ``indices``."""

    def __post_init__(self) -> None:
        roles = [turn["from"] for turn in self.conversations]
        if not roles or roles != [HUMAN, GPT] * (len(roles) // 2):
            raise ValueError(f"{self.id}: conversations must alternate human/gpt, got {roles}")
        if self.answers != [turn["value"] for turn in self.conversations[1::2]]:
            raise ValueError(f"{self.id}: answers must equal the gpt values in order")
        if len(self.answer_kinds) != len(self.answers):
            raise ValueError(f"{self.id}: need one answer kind per answer")
        unknown = set(self.answer_kinds) - set(ANSWER_KINDS)
        if unknown:
            raise ValueError(f"{self.id}: unknown answer kinds {unknown}; known: {ANSWER_KINDS}")
        placeholders = sum(t["value"].count(IMAGE_PLACEHOLDER) for t in self.conversations)
        if placeholders != len(self.images):
            raise ValueError(f"{self.id}: {placeholders} {IMAGE_PLACEHOLDER} placeholders "
                             f"for {len(self.images)} images")


@dataclass(frozen=True)
class Draft:
    """What a task's maker returns; ``Task.generate`` turns it into a ``Sample``."""

    images: list[Image.Image]
    turns: list[Turn]
    meta: dict[str, Any]


@dataclass(frozen=True)
class Task:
    """A named generator of samples."""

    name: str
    index: int
    """Part of every sample's RNG seed: fixed per task, never reuse or renumber."""
    description: str
    make: Callable[[np.random.Generator, str], Draft]
    """Draws one sample's content for a split from the given RNG."""

    def generate(self, split: str, n: int, seed: int = 0) -> list[Sample]:
        """``n`` samples of ``split``; deterministic for (split, seed), see the module doc."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {SPLITS}")
        if n < 0 or seed < 0:
            raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}")
        split_index = SPLITS.index(split)
        samples = []
        for i in range(n):
            rng = np.random.default_rng([self.index, split_index, seed, i])
            draft = self.make(rng, split)
            samples.append(Sample(
                id=f"{self.name}/{split}/{seed}/{i:06d}",
                task=self.name,
                images=draft.images,
                conversations=_conversation(draft.turns, len(draft.images)),
                answers=[answer for _, answer, _ in draft.turns],
                answer_kinds=[kind for _, _, kind in draft.turns],
                meta=draft.meta,
            ))
        return samples


def _conversation(turns: list[Turn], n_images: int) -> list[dict[str, str]]:
    """LLaVA turns; the image placeholders go at the start of the first human turn."""
    conversation = []
    for k, (question, answer, _) in enumerate(turns):
        prefix = f"{IMAGE_PLACEHOLDER}\n" * n_images if k == 0 else ""
        conversation.append({"from": HUMAN, "value": prefix + question})
        conversation.append({"from": GPT, "value": answer})
    return conversation


def _scene(rng: np.random.Generator, split: str) -> shapes.Scene:
    return shapes.sample_scene_in_buckets(rng, SPLIT_BUCKETS[split], NUM_BUCKETS)


@lru_cache(maxsize=len(SPLITS))
def _digit_pool(split: str) -> np.ndarray:
    return digits.indices_in_buckets(SPLIT_BUCKETS[split], NUM_BUCKETS)


def _scene_meta(scene: shapes.Scene) -> dict[str, Any]:
    return {"scene": [shape.to_dict() for shape in scene]}


def _strip_meta(indices: list[int]) -> dict[str, Any]:
    return {"indices": indices, "labels": digits.labels(indices)}


def _shapes_question_turns(scene: shapes.Scene) -> list[Turn]:
    return [(q, a, SHORT) for pairs in shapes.questions(scene).values() for q, a in pairs]


def make_shapes_qa(rng: np.random.Generator, split: str) -> Draft:
    """A question type drawn uniformly among those the scene can answer, then a target."""
    scene = _scene(rng, split)
    by_type = shapes.questions(scene)
    types = [t for t in shapes.QUESTION_TYPES if by_type[t]]
    question_type = types[int(rng.integers(len(types)))]
    question, answer = by_type[question_type][int(rng.integers(len(by_type[question_type])))]
    meta = _scene_meta(scene) | {"question_type": question_type}
    return Draft([shapes.render_scene(scene)], [(question, answer, SHORT)], meta)


def make_shapes_caption(rng: np.random.Generator, split: str) -> Draft:
    """"Describe the image." answered by ``shapes.caption``."""
    scene = _scene(rng, split)
    turn = (shapes.CAPTION_PROMPT, shapes.caption(scene), CAPTION)
    return Draft([shapes.render_scene(scene)], [turn], _scene_meta(scene))


def make_digits_read(rng: np.random.Generator, split: str) -> Draft:
    """"Read the digits." answered by the labels separated by spaces."""
    indices = digits.sample_strip(rng, _digit_pool(split))
    turn = (digits.READ_PROMPT, digits.strip_text(indices), DIGITS)
    return Draft([digits.render_strip(indices)], [turn], _strip_meta(indices))


def make_multi_turn(rng: np.random.Generator, split: str) -> Draft:
    """2-3 distinct turns about one shapes scene or one digit strip, in random order."""
    if rng.random() < SHAPES_DIALOGUE_PROBABILITY:
        scene = _scene(rng, split)
        pool = _shapes_question_turns(scene)
        pool.append((shapes.CAPTION_PROMPT, shapes.caption(scene), CAPTION))
        image, meta = shapes.render_scene(scene), _scene_meta(scene) | {"source": "shapes"}
    else:
        indices = digits.sample_strip(rng, _digit_pool(split))
        pool = [(digits.READ_PROMPT, digits.strip_text(indices), DIGITS)]
        pool += [(q, a, SHORT) for q, a in digits.questions(indices)]
        image, meta = digits.render_strip(indices), _strip_meta(indices) | {"source": "digits"}
    n_turns = int(rng.integers(MIN_TURNS, MAX_TURNS + 1))
    chosen = rng.choice(len(pool), size=n_turns, replace=False)
    return Draft([image], [pool[int(k)] for k in chosen], meta)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("shapes-qa", 0, "short questions about coloured shapes on a 3x3 grid",
             make_shapes_qa),
        Task("shapes-caption", 1, "structured description of a shapes scene",
             make_shapes_caption),
        Task("digits-read", 2, "read a strip of 1-8 handwritten digits", make_digits_read),
        Task("multi-turn", 3, "2-3 turns about one shapes scene or digit strip",
             make_multi_turn),
    )
}


def get_task(name: str) -> Task:
    """The registered task called ``name``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def vocabulary_texts() -> list[str]:
    """Every string the tasks can produce (prompts, questions, answers), for the tokenizer."""
    return [f"{IMAGE_PLACEHOLDER}\n", *shapes.vocabulary_texts(), *digits.vocabulary_texts()]


def export_llava(samples: list[Sample], out_dir: str | Path) -> Path:
    """Write ``images/<id>.png`` and a LLaVA ``data.json`` under ``out_dir``; return its path.

    Each record is ``{"id", "image", "conversations"}`` with ``image`` relative to ``out_dir``
    (a string for one image, a list for several), so ``out_dir`` is the image folder.
    """
    out = Path(out_dir)
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique: their images would overwrite each other")
    records = []
    for sample in samples:
        names = [f"images/{sample.id}.png"] if len(sample.images) == 1 else [
            f"images/{sample.id}-{k}.png" for k in range(len(sample.images))
        ]
        for name, image in zip(names, sample.images, strict=True):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(out / name)
        record: dict[str, Any] = {"id": sample.id}
        if names:
            record["image"] = names[0] if len(names) == 1 else names
        record["conversations"] = sample.conversations
        records.append(record)
    path = out / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path
