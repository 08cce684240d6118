"""Decode settings are resolved once (`dvlm.decode.settings.resolve`): the caller's value, else the
model's recipe, else DEFAULT_THRESHOLD; settings a decoder does not use are cleared; and each
GenerationOutput records the settings its row actually ran with."""

from __future__ import annotations

import dataclasses
import time

import pytest

from dvlm.config import DEFAULT_THRESHOLD, ConfigError, DecodeConfig, DiffusionConfig
from dvlm.decode.ar import generate_ar
from dvlm.decode.block import generate_block
from dvlm.decode.settings import RowSettings, joined, resolve, split
from dvlm.decode.speculative import generate_speculative
from dvlm.decode.stepper import Started, StepReport, run_to_completion

from .scripted import prompt, scripted_lm


def recipe(preset: str = "fast-dvlm", **fields) -> DiffusionConfig:
    return DiffusionConfig.from_preset(preset, mask_token_id=15, eos_token_ids=[14], pad_token_id=13, **fields)


def test_the_callers_threshold_beats_the_models():
    resolved = resolve(DecodeConfig(decoder="block", threshold=0.5), recipe(decode_threshold=0.7))
    assert (resolved.threshold, resolved.steps) == (0.5, None)


def test_the_models_threshold_and_block_size_fill_what_the_caller_left_out():
    resolved = resolve(DecodeConfig(decoder="block"), recipe(decode_threshold=0.7, block_size=8))
    assert (resolved.block_size, resolved.threshold, resolved.steps) == (8, 0.7, None)


def test_fixed_steps_of_the_model_or_the_caller_replace_the_threshold():
    by_model = resolve(DecodeConfig(decoder="block"), recipe(decode_threshold=None, decode_steps=4))
    assert (by_model.threshold, by_model.steps) == (None, 4)
    by_caller = resolve(DecodeConfig(decoder="block", steps=2), recipe(decode_threshold=0.7))
    assert (by_caller.threshold, by_caller.steps) == (None, 2)


def test_without_any_threshold_or_steps_the_default_threshold_applies():
    resolved = resolve(DecodeConfig(decoder="block"), recipe(decode_threshold=None, decode_steps=None))
    assert resolved.threshold == DEFAULT_THRESHOLD and resolved.steps is None


@pytest.mark.parametrize("decoder", ["ar", "hf"])
def test_an_ar_decoder_clears_the_block_settings(decoder):
    cfg = DecodeConfig(decoder=decoder, block_size=8, threshold=0.5, sub_block_size=2, fuse_commit=True,
                       temperature=0.7, seed=3)
    resolved = resolve(cfg, recipe())
    assert (resolved.block_size, resolved.threshold, resolved.steps, resolved.sub_block_size,
            resolved.fuse_commit) == (None, None, None, None, False)
    assert resolved.sampling == cfg.sampling  # sampling is every decoder's


def test_speculative_decoding_takes_a_block_size_and_no_threshold():
    resolved = resolve(DecodeConfig(decoder="spec", threshold=0.5), recipe(block_size=16))
    assert (resolved.block_size, resolved.threshold, resolved.steps) == (16, None, None)


@pytest.mark.parametrize("cfg, diffusion, match", [
    (DecodeConfig(decoder="block"), None, "plain AR model"),
    (DecodeConfig(decoder="spec"), recipe("diffusionvl"), "token-shift model"),
    (DecodeConfig(decoder="spec", block_size=1), recipe(), "block_size >= 2"),
])
def test_settings_the_model_cannot_serve_are_refused(cfg, diffusion, match):
    with pytest.raises(ConfigError, match=match):
        resolve(cfg, diffusion)


def test_split_and_joined_are_inverse():
    resolved = resolve(DecodeConfig(decoder="block", temperature=0.5, top_k=3, seed=1, max_new_tokens=9), recipe())
    assert joined("block", *split(resolved)) == resolved


@pytest.mark.parametrize("decoder, run", [("block", generate_block), ("spec", generate_speculative),
                                          ("ar", generate_ar)])
def test_every_output_records_the_settings_it_ran_with(decoder, run):
    lm = scripted_lm(block_size=4, decode_threshold=0.8)
    cfg = DecodeConfig(decoder=decoder, max_new_tokens=8)
    out = run(lm, [prompt(8)], cfg)[0]
    assert out.settings == dataclasses.asdict(resolve(cfg, lm.diffusion))
    expected_block = None if decoder == "ar" else 4
    expected_threshold = 0.8 if decoder == "block" else None
    assert (out.settings["block_size"], out.settings["threshold"]) == (expected_block, expected_threshold)


class _ScriptedSteps:
    """A stepper stand-in whose rows finish one per step, a few milliseconds apart."""

    compiled = None  # not the compiled path: no compiling to leave out of the rows' times
    warmup_s = 0.0

    def __init__(self, rows: int) -> None:
        self.waiting = list(range(rows))
        self.timer = type("Timer", (), {"as_dict": lambda _: {"prefill_s": 0.0, "total_s": 1e9}})()

    def start(self, prompts, settings) -> Started:
        return Started(list(range(len(prompts))), None)

    def join(self, started: Started) -> None:
        pass

    @property
    def num_active(self) -> int:
        return len(self.waiting)

    def step(self) -> StepReport:
        time.sleep(0.005)
        return StepReport([], [self.waiting.pop(0)], 1)

    def output(self, row_id: int, timings: dict[str, float]) -> dict[str, float]:
        return timings


class _CompilingSteps(_ScriptedSteps):
    """The stand-in on the compiled path: its first step compiles (for 0.05 s)."""

    compiled = object()

    def step(self) -> StepReport:
        if self.warmup_s == 0.0:
            time.sleep(0.05)
            self.warmup_s = 0.05
        return super().step()


def test_compiling_is_left_out_of_the_rows_times():
    timings = run_to_completion(_CompilingSteps(2), [prompt(4)] * 2, RowSettings(4))
    assert [t["compile_s"] for t in timings] == [0.05, 0.05]
    # Without the 0.05 s of compiling, the first row took one 5 ms step (counted in, it would be > 0.05).
    assert 0 < timings[0]["total_s"] < 0.05 and timings[0]["total_s"] < timings[1]["total_s"]
    assert "compile_s" not in run_to_completion(_ScriptedSteps(1), [prompt(4)], RowSettings(4))[0]


def test_in_a_batch_each_row_is_timed_until_it_finished():
    """A row's tokens per second divide its tokens by its own time, not by the whole batch's."""
    timings = run_to_completion(_ScriptedSteps(3), [prompt(4)] * 3, RowSettings(4))
    totals = [t["total_s"] for t in timings]
    assert totals == sorted(totals) and len(set(totals)) == 3  # the first row finished first
    assert totals[-1] < 1e9  # every row's own clock, not the batch timer's total
    assert all(t["prefill_s"] == 0.0 for t in timings)  # the batch's phases are shared


@pytest.mark.parametrize("decoder, largest", [("block", 256), ("spec", 256), ("ar", 256), ("spec-quadratic", 64)])
def test_block_sizes_are_bounded_at_validation(decoder, largest):
    """A block is one forward's query: block_size=100000 used to reach the model and try to allocate
    10 GB. The largest allowed is accepted, one more is refused before anything runs."""
    assert DecodeConfig(decoder=decoder, block_size=largest).block_size == largest
    with pytest.raises(ConfigError, match=f"^block_size must be <= {largest} with decoder '{decoder}', "
                                          f"got {largest + 1}$"):
        DecodeConfig(decoder=decoder, block_size=largest + 1)
