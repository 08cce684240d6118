"""The samples of each step: DataLoader workers change nothing; length grouping stays a pure
function of (seed, step) and every sample still comes once an epoch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dvlm.config import TrainConfig
from dvlm.data.llava_json import IMAGE_CHARACTERS, SkipReport, record_length
from dvlm.train.loop import METRICS_FILE, train
from dvlm.train.step_data import LENGTH_WINDOW_STEPS, StepData
from dvlm.tasks.builtin import export_llava, get_task


@pytest.fixture(scope="module")
def data_with_bad_images(tmp_path_factory) -> Path:
    """12 records, two of whose images are broken (skipped and reported when drawn)."""
    samples = get_task("shapes-qa").generate("train", 8, seed=0) + get_task("multi-turn").generate("train", 4, seed=0)
    path = export_llava(samples, tmp_path_factory.mktemp("data"))
    records = json.loads(path.read_text())
    (path.parent / records[1]["image"]).write_bytes(b"\x89PNG garbage, not an image")
    (path.parent / records[5]["image"]).unlink()
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]


def test_workers_prepare_the_same_batches(tmp_path, data_with_bad_images, fast_checkpoint):
    cfg = TrainConfig(max_steps=4, batch_size=2, grad_accum=2, learning_rate=1e-3, warmup_ratio=0.0)
    here = train(fast_checkpoint, data_with_bad_images, tmp_path / "here", cfg, progress=False)
    workers = train(fast_checkpoint, data_with_bad_images, tmp_path / "workers",
                    TrainConfig(**{**cfg.__dict__, "num_workers": 2}), progress=False)
    assert workers.losses == here.losses  # exactly: the same samples, batches and noise
    drop = ("seconds", "tokens_per_second")
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(workers.run_dir)] == \
        [{k: v for k, v in r.items() if k not in drop} for r in metrics(here.run_dir)]
    assert workers.skipped == here.skipped == 2


class _Records:
    """A stand-in dataset: records of given text lengths."""

    def __init__(self, lengths):
        self.records = [{"conversations": [{"from": "gpt", "value": "x" * n}]} for n in lengths]

    def __len__(self):
        return len(self.records)


def _grouped(lengths, **changes) -> StepData:
    cfg = TrainConfig(**{"batch_size": 2, "grad_accum": 2, "group_by_length": True, **changes})
    return StepData(_Records(lengths), cfg, 0, SkipReport())


def test_length_grouping_keeps_every_sample_once_an_epoch_and_cuts_padding():
    lengths = torch.randint(1, 1000, (LENGTH_WINDOW_STEPS * 4 * 2 + 7,), generator=torch.Generator().manual_seed(0))
    grouped, plain = _grouped(lengths.tolist()), _grouped(lengths.tolist(), group_by_length=False)
    epoch = range(grouped.steps_per_epoch)
    for steps in (grouped, plain):
        drawn = [i for step in epoch for i in steps.indices(step)]
        assert sorted(drawn) == list(range(len(lengths)))  # every sample once an epoch

    def padded(steps):  # tokens a step pads to: its longest sample for each of its samples
        return sum(max(lengths[i] for i in steps.indices(s)) * len(steps.indices(s)) for s in epoch)

    assert padded(grouped) < 0.7 * padded(plain)
    first_window = [i for step in range(LENGTH_WINDOW_STEPS) for i in grouped.indices(step)]
    assert int(lengths[grouped.indices(0)].max()) == int(lengths[first_window].max())  # an OOM shows at once
    assert _grouped(lengths.tolist()).indices(5) == grouped.indices(5)  # (seed, step) decide it all
    assert _grouped(lengths.tolist(), seed=1).indices(5) != grouped.indices(5)


def test_grouped_steps_are_spread_over_a_window_not_sorted():
    lengths = list(range(LENGTH_WINDOW_STEPS * 4))  # 64 steps of 4 samples, one window
    steps = _grouped(lengths)
    longest = [max(steps.indices(s)) for s in range(LENGTH_WINDOW_STEPS)]
    assert longest[0] == len(lengths) - 1
    assert longest != sorted(longest, reverse=True)  # dealt out in a seeded order


def test_record_length_counts_text_and_images():
    record = {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>\nhi"},
                                                              {"from": "gpt", "value": "hello"}]}
    assert record_length(record) == len("<image>\nhi") + len("hello") + 2 * IMAGE_CHARACTERS
    assert record_length({"conversations": "not a list"}) == 0


def test_a_resume_from_before_grouping_existed_still_matches(tmp_path):
    """data_order only names group_by_length when it is on."""
    from dvlm.train.loop import data_order

    path = tmp_path / "d.json"
    path.write_text("[{}]")
    assert "group_by_length" not in data_order(path, TrainConfig(), None)
    assert data_order(path, TrainConfig(group_by_length=True), None)["group_by_length"] is True


def test_workers_are_not_started_without_num_workers():
    steps = StepData(_Records([1, 2, 3]), TrainConfig(batch_size=1), 0, SkipReport())
    steps.prefetch(0, 3)
    assert steps._prefetched is None


def test_a_sample_of_exactly_max_length_tokens_trains(tmp_path, reference_checkpoints):
    """The README: training samples of "at most max_length tokens" are used, longer ones skipped.
    A record of L tokens encodes with max_length = L and is refused with L - 1."""
    from dvlm.data.llava_json import LlavaJsonDataset, SampleError
    from dvlm.model.loaded import LoadedModel

    data = export_llava(get_task("shapes-qa").generate("train", 1, seed=0), tmp_path)
    processor = LoadedModel.load(reference_checkpoints["fast-dvlm"], device="cpu").processor
    length = len(LlavaJsonDataset(data, processor)[0].input_ids)
    processor.max_length = length
    assert len(LlavaJsonDataset(data, processor)[0].input_ids) == length
    processor.max_length = length - 1
    with pytest.raises(SampleError, match=f"encoded sample has {length} tokens, more than max_length={length - 1}"):
        LlavaJsonDataset(data, processor)[0]
