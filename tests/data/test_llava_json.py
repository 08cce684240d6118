import hashlib
import json
import tracemalloc
from functools import partial

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from dvlm.data.collate import collate
from dvlm.data.llava_json import (
    JsonlRecords,
    LlavaJsonDataset,
    SampleError,
    SkipReport,
    file_fingerprint,
    open_records,
    read_records,
)
from dvlm.data.processor import IGNORE_INDEX
from tests.data.conftest import load_processor

VISION_4 = ["<|vision_start|>"] + ["<|image_pad|>"] * 4 + ["<|vision_end|>"]  # a 56x56 image


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (56, 56), (255, 0, 0)).save(folder / "a.png")
    Image.new("RGB", (112, 112), (0, 0, 255)).save(folder / "b.png")
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def user_part(as_tokens, encoded):
    """Tokens between '<|im_start|>user\\n' and its '<|im_end|>'."""
    names = as_tokens(encoded.input_ids)
    start = names.index("user") + 2
    return names[start:names.index("<|im_end|>", start)]


def test_single_image_with_placeholder(tmp_path, image_dir, processor, as_tokens):
    records = [{"id": "s1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."}]}]
    data = LlavaJsonDataset(write_json(tmp_path / "d.json", records), processor, image_dir)
    assert len(data) == 1 and data.sample_id(0) == "s1"
    encoded = data[0]
    assert user_part(as_tokens, encoded) == [*VISION_4, "What", "is", "this", "?"]
    trained = [n for n, l in zip(as_tokens(encoded.input_ids), encoded.labels.tolist())
               if l != IGNORE_INDEX]
    assert trained == ["A", "cat", ".", "<|im_end|>"]


def test_images_without_placeholder_go_before_first_human_text(tmp_path, processor, as_tokens,
                                                               image_dir):
    # Default image_root: the data file's folder.
    records = [{"image": ["a.png", "a.png"], "conversations": [
        {"from": "system", "value": "Be brief"},
        {"from": "human", "value": "Compare"}, {"from": "gpt", "value": "Yes"}]}]
    data = LlavaJsonDataset(write_json(image_dir / "d.json", records), processor)
    encoded = data[0]
    assert user_part(as_tokens, encoded) == [*VISION_4, *VISION_4, "Compare"]
    assert as_tokens(encoded.input_ids)[:5] == ["<|im_start|>", "system", "\n", "Be", "brief"]


def test_text_only_jsonl_multi_turn(tmp_path, processor, as_tokens):
    lines = [{"id": 1, "conversations": [{"from": "human", "value": "Yes"},
                                         {"from": "gpt", "value": "No"},
                                         {"from": "human", "value": "Thanks"},
                                         {"from": "gpt", "value": "welcome"}]},
             {"id": 2, "conversations": [{"from": "human", "value": "Yes"},
                                         {"from": "gpt", "value": "No"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    data = LlavaJsonDataset(path, processor)
    assert len(data) == 2
    encoded = data[0]
    assert encoded.vision is None
    trained = [n for n, l in zip(as_tokens(encoded.input_ids), encoded.labels.tolist())
               if l != IGNORE_INDEX]
    assert trained == ["No", "<|im_end|>", "welcome", "<|im_end|>"]


def test_dataloader_with_collate(tmp_path, image_dir, processor):
    records = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>"},
                                                    {"from": "gpt", "value": "red"}]},
               {"image": "b.png", "conversations": [{"from": "human", "value": "<image>"},
                                                    {"from": "gpt", "value": "blue"}]}]
    data = LlavaJsonDataset(write_json(tmp_path / "d.json", records), processor, image_dir)
    loader = DataLoader(data, batch_size=2, collate_fn=partial(collate,
                                                               pad_token_id=processor.pad_token_id))
    batch = next(iter(loader))
    assert batch.vision["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    assert batch.vision["pixel_values"].shape == (16 + 64, 1176)


@pytest.mark.parametrize("record, match", [
    ({"id": "m", "image": "missing.png", "conversations": [{"from": "human", "value": "Yes"}]},
     r"sample 0 \(id='m'\): cannot load image .*missing\.png: file not found"),
    ({"image": "broken.png", "conversations": [{"from": "human", "value": "Yes"}]},
     r"sample 0: cannot load image .*broken\.png: unreadable or corrupt"),
    ({"image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"}]},
     "2 image placeholder.*but 1 image"),
    ({"conversations": [{"from": "bot", "value": "Yes"}]}, "unknown speaker 'bot'"),
    ({"id": 7}, "missing or empty 'conversations'"),
    ({"conversations": [{"from": "human"}]}, "turn 0 must be an object with a string 'value'"),
    ({"image": 3, "conversations": [{"from": "human", "value": "Yes"}]}, "'image' must be"),
    ({"image": "a.png", "conversations": [{"from": "gpt", "value": "Yes"}]}, "no human turn"),
])
def test_bad_records_raise_sample_error(tmp_path, image_dir, processor, record, match):
    data = LlavaJsonDataset(write_json(tmp_path / "d.json", [record]), processor, image_dir)
    with pytest.raises(SampleError, match=match) as info:
        data[0]
    assert info.value.index == 0 and info.value.sample_id == record.get("id")


def test_too_long_sample_is_a_sample_error(tmp_path, tiny_processor_dir):
    processor = load_processor(tiny_processor_dir, max_length=10)
    records = [{"id": "long", "conversations": [{"from": "human", "value": "Yes"}]}]
    data = LlavaJsonDataset(write_json(tmp_path / "d.json", records), processor)
    with pytest.raises(SampleError, match=r"id='long'.*more than max_length=10"):
        data[0]


def test_skip_report(tmp_path, processor, image_dir):
    records = [{"id": f"r{i}", "image": "missing.png",
                "conversations": [{"from": "human", "value": "Yes"}]} for i in range(7)]
    records.append({"conversations": [{"from": "human", "value": "Yes"}, {"from": "gpt", "value": "No"}]})
    data = LlavaJsonDataset(write_json(tmp_path / "d.json", records), processor, image_dir)
    report = SkipReport(max_examples=3)
    assert report.summary() == "skipped 0 samples"
    kept = []
    for i in range(len(data)):
        try:
            kept.append(data[i])
        except SampleError as err:
            report.record(err)
    assert len(kept) == 1 and report.count == 7
    assert [key for key, _ in report.examples] == ["r0", "r1", "r2"]
    summary = report.summary()
    assert summary.startswith("skipped 7 sample(s); first 3:")
    assert "'r0': cannot load image" in summary and "file not found" in summary


def test_missing_and_invalid_data_files(tmp_path, processor):
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.json"):
        LlavaJsonDataset(tmp_path / "nope.json", processor)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"conversations": ]')
    with pytest.raises(ValueError, match=r"invalid JSON in .*bad\.json"):
        read_records(bad)
    bad_lines = tmp_path / "bad.jsonl"
    bad_lines.write_text('{"conversations": []}\n{oops\n')
    with pytest.raises(ValueError, match=r"invalid JSON in .*bad\.jsonl line 2"):
        read_records(bad_lines)
    not_list = write_json(tmp_path / "obj.json", {"data": [1]})
    with pytest.raises(ValueError, match=r"obj\.json: expected a JSON list of objects"):
        read_records(not_list)
    jsonl_named_json = tmp_path / "lines.json"
    jsonl_named_json.write_text('{"id": 1}\n{"id": 2}\n')
    assert read_records(jsonl_named_json) == [{"id": 1}, {"id": 2}]
    numbers = write_json(tmp_path / "numbers.json", [1, 2])
    with pytest.raises(ValueError, match=r"numbers\.json: expected a JSON list of objects"):
        read_records(numbers)


@pytest.mark.parametrize("turns", [
    [{"from": "human", "value": "Yes"}],
    [{"from": "system", "value": "Be brief"}, {"from": "human", "value": "Yes"}],
])
def test_record_without_an_answer_is_a_sample_error(tmp_path, processor, turns):
    # Only answers are trained: a record without one would add nothing but a NaN to the loss.
    data = LlavaJsonDataset(write_json(tmp_path / "d.json", [{"id": "q", "conversations": turns}]), processor)
    with pytest.raises(SampleError, match=r"^sample 0 \(id='q'\): nothing to train on: no assistant answer$"):
        data[0]


@pytest.mark.parametrize("name, text", [("empty.json", "[]"), ("blank.json", " \n"), ("empty.jsonl", "\n\n")])
def test_data_file_without_records_is_an_error(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{path}: no records \(the file holds no training sample\)$"):
        read_records(path)


def test_file_fingerprint_is_size_and_sha256(tmp_path):
    path = write_json(tmp_path / "d.json", [{"id": 1}])
    assert file_fingerprint(path) == {"size": 11, "sha256": hashlib.sha256(b'[{"id": 1}]').hexdigest()}


# -- large JSONL files: read lazily ------------------------------------------------------------------


def test_jsonl_records_are_read_one_at_a_time(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": 1}\n\n{"id": 2, "x": "\\u00e9"}\n[3]\n{oops\n')
    records = open_records(path)
    assert isinstance(records, JsonlRecords) and len(records) == 4  # blank lines are not records
    assert records[0] == {"id": 1} and records[1] == {"id": 2, "x": "é"} and records[-4] == {"id": 1}
    with pytest.raises(ValueError, match=r"d\.jsonl line 4: expected a JSON object, got list"):
        records[2]
    with pytest.raises(ValueError, match=r"invalid JSON in .*d\.jsonl line 5"):
        records[3]
    with pytest.raises(IndexError):
        records[4]


def test_a_bad_jsonl_line_is_a_sample_error(tmp_path, processor):
    path = tmp_path / "d.jsonl"
    path.write_text('{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}\n{oops\n')
    data = LlavaJsonDataset(path, processor)
    assert len(data) == 2 and data[0].labels.numel() > 0
    with pytest.raises(SampleError, match=r"^sample 1: invalid JSON in .*d\.jsonl line 2"):
        data[1]


def test_a_large_jsonl_file_is_indexed_not_loaded(tmp_path):
    """200k records (a 30 MB file): the index holds two 8-byte numbers a record, 3.2 MB, where the
    parsed records would take hundreds of MB as Python objects; a 1M-record file costs 16 MB.
    Memory is measured, not time."""
    path, count = tmp_path / "big.jsonl", 200_000
    line = ('{"id": %d, "image": "images/%07d.png", "conversations": [{"from": "human", "value": '
            '"<image>\\nWhat is it?"}, {"from": "gpt", "value": "A thing."}]}\n')
    with path.open("w") as f:
        for i in range(0, count, 10_000):
            f.write("".join(line % (k, k) for k in range(i, i + 10_000)))
    tracemalloc.start()
    try:
        records = open_records(path)
        last = records[count - 1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) == count and last["id"] == count - 1 and last["image"] == f"images/{count - 1:07d}.png"
    assert path.stat().st_size > 140 * count  # a 28+ MB file ...
    assert peak < 6 * 2**20  # ... indexed in under 6 MB
