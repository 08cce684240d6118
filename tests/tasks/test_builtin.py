"""The built-in tasks: determinism, disjoint splits, answers consistent with the images."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from dvlm.tasks import digits, shapes
from dvlm.tasks.builtin import (
    CAPTION,
    DIGITS,
    IMAGE_PLACEHOLDER,
    NUM_BUCKETS,
    SHORT,
    SPLIT_BUCKETS,
    TASKS,
    Sample,
    export_llava,
    get_task,
)

TASK_NAMES = list(TASKS)
SPLIT_SAMPLE = 800  # per split; large enough that chance collisions would show


def _fingerprint(sample: Sample) -> tuple:
    return (tuple(image.tobytes() for image in sample.images),
            json.dumps(sample.conversations), json.dumps(sample.meta))


def _image_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def _scene(sample: Sample) -> shapes.Scene:
    keys = ("cell", "kind", "colour", "size", "dx", "dy")
    return tuple(shapes.Shape(**{k: d[k] for k in keys}) for d in sample.meta["scene"])


def test_registry_names_and_unknown_task_error():
    assert TASK_NAMES == ["shapes-qa", "shapes-caption", "digits-read", "multi-turn"]
    assert get_task("digits-read") is TASKS["digits-read"]
    with pytest.raises(ValueError, match="known tasks: shapes-qa, shapes-caption"):
        get_task("nope")


def test_bad_split_and_seed_are_rejected():
    with pytest.raises(ValueError, match="known splits"):
        TASKS["shapes-qa"].generate("dev", 1)
    with pytest.raises(ValueError):
        TASKS["shapes-qa"].generate("train", 1, seed=-1)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_samples_other_seed_differs(name):
    task = TASKS[name]
    first = [_fingerprint(s) for s in task.generate("train", 12, seed=3)]
    again = [_fingerprint(s) for s in task.generate("train", 12, seed=3)]
    other = [_fingerprint(s) for s in task.generate("train", 12, seed=4)]
    assert first == again
    assert first != other
    # Sample i does not depend on n.
    assert [_fingerprint(s) for s in task.generate("train", 5, seed=3)] == first[:5]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_sample_format(name):
    for sample in TASKS[name].generate("validation", 20):
        assert sample.task == name and sample.id.startswith(f"{name}/validation/0/")
        assert len(sample.images) == 1 and sample.images[0].mode == "RGB"
        human = sample.conversations[0::2]
        assert human[0]["value"].startswith(f"{IMAGE_PLACEHOLDER}\n")
        assert all(IMAGE_PLACEHOLDER not in turn["value"] for turn in human[1:])
        assert sample.answers == [turn["value"] for turn in sample.conversations[1::2]]


def test_sample_rejects_inconsistent_answers():
    with pytest.raises(ValueError, match="gpt values"):
        Sample("x", "shapes-qa", [], [{"from": "human", "value": "Q"},
                                      {"from": "gpt", "value": "A"}], ["B"], [SHORT])


def test_digit_splits_use_disjoint_source_images():
    used = {}
    for split in ("train", "validation", "test"):
        samples = TASKS["digits-read"].generate(split, 300)
        samples += [s for s in TASKS["multi-turn"].generate(split, 100)
                    if s.meta["source"] == "digits"]
        used[split] = {i for s in samples for i in s.meta["indices"]}
        assert all(i % NUM_BUCKETS in SPLIT_BUCKETS[split] for i in used[split])
    assert not used["train"] & used["test"]
    assert not used["train"] & used["validation"]
    assert not used["validation"] & used["test"]


def test_shapes_splits_share_no_image():
    hashes = {}
    for split in ("train", "test"):
        samples = TASKS["shapes-qa"].generate(split, SPLIT_SAMPLE)
        for sample in samples:
            bucket = shapes.scene_bucket(_scene(sample), NUM_BUCKETS)
            assert bucket in SPLIT_BUCKETS[split]
        hashes[split] = {_image_hash(s.images[0]) for s in samples}
    assert not hashes["train"] & hashes["test"]


def test_shapes_qa_answers_match_the_scene():
    samples = TASKS["shapes-qa"].generate("train", 200)
    assert {s.meta["question_type"] for s in samples} == set(shapes.QUESTION_TYPES)
    for sample in samples:
        scene = _scene(sample)
        question, answer = sample.conversations[0]["value"].split("\n")[1], sample.answers[0]
        qtype = sample.meta["question_type"]
        if qtype == "count":
            assert answer == str(len(scene))
        elif qtype == "colour":
            matches = [s for s in scene if question == f"What colour is the {s.kind}?"]
            assert len(matches) == 1 and matches[0].colour == answer
        elif qtype == "colour_at":
            assert [s.colour for s in scene
                    if question == f"What colour is the shape in the {s.position}?"] == [answer]
        elif qtype == "kind":
            assert [s.kind for s in scene
                    if question == f"What shape is in the {s.position}?"] == [answer]
        else:
            matches = [s for s in scene if question == f"Where is the {s.colour} {s.kind}?"]
            assert len(matches) == 1 and matches[0].position == answer


def test_scene_layout_and_pixels():
    for sample in TASKS["shapes-caption"].generate("test", 30):
        scene = _scene(sample)
        assert shapes.MIN_SHAPES <= len(scene) <= shapes.MAX_SHAPES
        assert len({s.cell for s in scene}) == len(scene)
        image = np.asarray(sample.images[0])
        assert image.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)
        for shape in scene:  # every kind covers its centre
            x, y = (int(v) for v in shapes.shape_centre(shape))
            assert tuple(image[y, x]) == shapes.COLOURS[shape.colour]
        empty = set(range(shapes.GRID**2)) - {s.cell for s in scene}
        for cell in empty:
            row, col = divmod(cell, shapes.GRID)
            x, y = int((col + 0.5) * shapes.CELL_SIZE), int((row + 0.5) * shapes.CELL_SIZE)
            assert tuple(image[y, x]) == shapes.BACKGROUND


def test_caption_lists_every_shape_in_cell_order():
    scene = (shapes.Shape(0, "circle", "red", "small", 0, 0),
             shapes.Shape(4, "star", "orange", "large", 1, -2),
             shapes.Shape(8, "triangle", "green", "small", 0, 3))
    assert shapes.caption(scene) == (
        "There are 3 shapes. A red circle is in the top left. An orange star is in the "
        "center. A green triangle is in the bottom right.")
    assert shapes.caption(scene[:1]) == "There is 1 shape. A red circle is in the top left."
    for sample in TASKS["shapes-caption"].generate("train", 50):
        assert sample.answers[0] == shapes.caption(_scene(sample))
        assert sample.answer_kinds == [CAPTION]


def test_digit_strip_pixels_and_answer():
    images, target = digits.load_source()
    for sample in TASKS["digits-read"].generate("test", 30):
        indices = sample.meta["indices"]
        assert digits.MIN_DIGITS <= len(indices) <= digits.MAX_DIGITS
        assert sample.answers == [" ".join(str(target[i]) for i in indices)]
        assert sample.answer_kinds == [DIGITS]
        strip = np.asarray(sample.images[0])
        assert strip.shape == (digits.DIGIT_SIDE, digits.DIGIT_SIDE * len(indices), 3)
        for k, i in enumerate(indices):
            grey = np.round(images[i] * 255 / 16).astype(np.uint8)
            big = Image.fromarray(grey).resize((28, 28), Image.Resampling.BILINEAR)
            expected = np.asarray(big)
            assert np.array_equal(strip[:, 28 * k: 28 * (k + 1), 0], expected)


def test_multi_turn_mixes_sources_and_kinds():
    samples = TASKS["multi-turn"].generate("train", 60)
    assert {s.meta["source"] for s in samples} == {"shapes", "digits"}
    kinds = {kind for s in samples for kind in s.answer_kinds}
    assert kinds == {SHORT, CAPTION, DIGITS}
    for sample in samples:
        assert 2 <= len(sample.answers) <= 3
        questions = [turn["value"] for turn in sample.conversations[0::2]]
        assert len(set(questions)) == len(questions)
        if sample.meta["source"] == "digits":
            labels = sample.meta["labels"]
            answers = dict(zip(questions, sample.answers))
            assert answers.get(digits.COUNT_PROMPT, str(len(labels))) == str(len(labels))
            assert answers.get(digits.LAST_PROMPT, str(labels[-1])) == str(labels[-1])


def test_export_llava_writes_images_and_json(tmp_path):
    samples = TASKS["shapes-qa"].generate("test", 3) + TASKS["digits-read"].generate("test", 2)
    path = export_llava(samples, tmp_path)
    records = json.loads(path.read_text())
    assert [r["id"] for r in records] == [s.id for s in samples]
    for record, sample in zip(records, samples):
        assert set(record) == {"id", "image", "conversations"}
        assert record["conversations"] == sample.conversations
        with Image.open(tmp_path / record["image"]) as image:
            assert image.tobytes() == sample.images[0].tobytes()
    with pytest.raises(ValueError, match="unique"):
        export_llava(samples[:1] * 2, tmp_path)
