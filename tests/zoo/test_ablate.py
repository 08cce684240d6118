"""`dvlm ablate`: the plumbing end to end (--quick), the variants, the intervals and the verdicts."""

import json

import numpy as np
import pytest

from dvlm.cli import main
from dvlm.config import ConfigError, DiffusionConfig
from dvlm.zoo.ablate import (
    CONTENT_QUESTIONS,
    EVAL_TASKS,
    RESULTS_FILE,
    VARIANTS,
    AblationPlan,
    content_questions,
    training_mix,
)
from dvlm.zoo.ablate_claims import ABLATION_CLAIMS, relative_verdict
from dvlm.zoo.ablate_report import (
    Estimate,
    Unit,
    average_draws,
    relative_change,
    resample,
    write_report,
)
from dvlm.zoo.recipe import STAGE_STAMP, ZooRecipe


def test_every_variant_is_a_valid_recipe_that_differs_from_the_reference():
    base = ZooRecipe().diffusion_overrides
    reference = DiffusionConfig.from_preset("fast-dvlm", **base)
    for variant in VARIANTS.values():
        overrides = {k: v for k, v in variant.overrides.items() if k != "preset"}
        config = DiffusionConfig.from_preset(variant.overrides.get("preset", "fast-dvlm"), **{**base, **overrides})
        assert (config == reference and not variant.text_first) == (variant.name == "full"), variant.name


def test_plan_refuses_unknown_variants_and_empty_budgets():
    with pytest.raises(ConfigError, match="unknown variant.*nope.*choose from full"):
        AblationPlan(variants=["full", "nope"])
    with pytest.raises(ConfigError, match="seeds must be >= 1"):
        AblationPlan(seeds=0)


def test_content_questions_are_the_content_types_and_fixed():
    samples = content_questions(12)
    assert len(samples) == 12
    assert {s.meta["question_type"] for s in samples} <= set(CONTENT_QUESTIONS)
    assert [s.id for s in samples] == [s.id for s in content_questions(12)]
    assert all(s.id.startswith("shapes-qa/test/") for s in samples)


def test_training_mix_keeps_the_recipe_proportions():
    mix = training_mix(ZooRecipe(), 2400)
    assert mix == {"shapes-qa": 800, "shapes-caption": 400, "digits-read": 800, "multi-turn": 400}


def _unit(scores: list[list[float]], tokens: int = 2, nfe: int = 1) -> Unit:
    """The same (seeds, samples) scores on every task, each answer `tokens` long in `nfe` forwards."""
    unit = Unit()
    unit.row = {"decoder": "block", "block_size": 16, "threshold": 0.9}
    unit.tasks = {t: {"scores": scores, "tokens": [[tokens] * len(s) for s in scores],
                      "nfe": [[nfe] * len(s) for s in scores]} for t in EVAL_TASKS}
    return unit


def test_paired_bootstrap_of_equal_units_is_exactly_zero():
    scores = [[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    change = relative_change(_unit(scores), _unit(scores))
    assert (change.value, change.low, change.high) == (0.0, 0.0, 0.0)


def test_halved_scores_are_minus_fifty_percent_and_tokens_per_forward_is_a_ratio_of_sums():
    change = relative_change(_unit([[0.5, 0.5], [0.5, 0.5]]), _unit([[1.0, 1.0], [1.0, 1.0]]))
    assert change.value == pytest.approx(-0.5) and change.low == pytest.approx(-0.5)
    _, speed = average_draws(_unit([[1.0, 0.0]], tokens=6, nfe=4))
    assert np.allclose(speed, 1.5)


def test_resampling_draws_seeds_then_samples_within_them():
    values = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # seed 0 all wrong, seed 1 all right
    draws = resample(values, draws=200)
    assert draws.shape == (200, 2, 3)
    assert set(np.unique(draws.mean(axis=2))) <= {0.0, 1.0}  # a picked seed keeps its own samples
    assert set(np.unique(draws.mean(axis=(1, 2)))) == {0.0, 0.5, 1.0}


@pytest.mark.parametrize(("estimate", "paper", "verdict"), [
    (Estimate(-0.20, -0.30, -0.10), -0.225, "sign: yes; size: consistent (paper's figure inside our interval)"),
    (Estimate(-0.02, -0.03, -0.01), -0.225, "sign: yes; size: smaller than the paper's"),
    (Estimate(0.05, 0.01, 0.09), -0.044, "sign: no (opposite); size: not comparable"),
    (Estimate(-0.40, -0.50, -0.30), -0.225, "sign: yes; size: larger than the paper's"),
    (Estimate(-0.01, -0.05, 0.03), -0.037,
     "sign: not resolved (interval spans 0); size: consistent (paper's figure inside our interval)"),
])
def test_relative_verdicts(estimate, paper, verdict):
    assert relative_verdict(estimate, paper) == verdict


def _ablate(capsys, *argv):
    code = main(["ablate", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_variant_names_are_refused_in_one_line_before_any_work(capsys, tmp_path):
    code, _, err = _ablate(capsys, "--quick", "--only", "full,no-such-thing", "--out", tmp_path / "out")
    assert code == 2
    assert err.strip().count("\n") == 0 and "no-such-thing" in err and "choose from full" in err
    assert not (tmp_path / "out").exists()


def test_quick_ablation_end_to_end_and_rerun_skips_finished_runs(capsys, tmp_path):
    out = tmp_path / "ablate"
    only = ["full", "no-anneal", "two-stage", "diffusionvl"]
    code, stdout, err = _ablate(capsys, "--quick", "--only", ",".join(only), "--out", out)
    assert code == 0, err
    results = json.loads((out / RESULTS_FILE).read_text())
    assert [(r["variant"], r["seed"]) for r in results["runs"]] == [(v, 0) for v in only]
    for name in only:
        assert (out / "runs" / f"{name}-seed0" / "model" / STAGE_STAMP).is_file()
    # two-stage: a first fine-tune on the records without their images, then one on the records
    text = json.loads((out / "data-text" / "data.json").read_text())
    assert text and not any("image" in r or "<image>" in json.dumps(r["conversations"]) for r in text)
    first = json.loads((out / "runs" / "two-stage-seed0" / "train-stage1" / "model" / "config.json").read_text())
    assert first["dvlm"]["fill_last_block"] and (out / "runs" / "two-stage-seed0" / "train").is_dir()
    decoders = {(r["variant"], row["decoder"]) for r in results["runs"] for row in r["rows"]}
    assert ("full", "spec") in decoders and ("diffusionvl", "spec") not in decoders  # no token shift: no spec
    summary = json.loads((out / "ablate.json").read_text())
    claims = [c["claim"] for c in summary["claims"]]
    assert len(claims) == len(ABLATION_CLAIMS) + 3
    report = (out / "ablate.md").read_text()
    for claim in claims:
        assert claim in report
    assert "not run" in report  # the variants left out by --only are said to be missing
    assert f"{out / 'ablate-threshold.png'}" in stdout
    assert (out / "ablate-threshold.png").stat().st_size > 0 and (out / "ablate-block-size.png").stat().st_size > 0

    without_reference = {**results, "runs": [r for r in results["runs"] if r["variant"] != "full"]}
    paths = write_report(without_reference, tmp_path / "no-reference", "CPU")  # --only without full
    assert "not measured" in paths["markdown"].read_text()
    assert "threshold" not in paths and not (tmp_path / "no-reference" / "ablate-threshold.png").exists()

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/" + STAGE_STAMP)}
    code, stdout, err = _ablate(capsys, "--quick", "--only", ",".join(only), "--out", out)
    assert code == 0, err
    # runs + evals, data (with and without images), conversion, tiny-ar's eval
    assert stdout.count("already done") == 2 * len(only) + 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
