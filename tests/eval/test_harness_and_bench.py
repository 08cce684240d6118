"""The eval harness and the bench: prompts, scoring, speed summaries, reports."""

import json

import pytest

import dvlm
from dvlm.eval.bench import (
    Setting,
    markdown_table,
    run_bench,
    settings_grid,
    write_report,
)
from dvlm.eval.harness import evaluate, sample_prompt
from dvlm.tasks.builtin import get_task


@pytest.fixture(scope="module")
def lm(fast_checkpoint):
    return dvlm.load(fast_checkpoint)


def test_sample_prompt_keeps_history_and_drops_the_last_answer():
    sample = get_task("multi-turn").generate("test", 1)[0]
    prompt = sample_prompt(sample)
    assert [m["role"] for m in prompt] == ["user", "assistant"] * (len(sample.answers) - 1) + ["user"]
    assert prompt[0]["content"].startswith("<image>\n")
    assert [m["content"] for m in prompt if m["role"] == "assistant"] == sample.answers[:-1]


@pytest.mark.parametrize("decoder", ["ar", "block", "spec"])
def test_evaluate_scores_and_times_the_same_outputs(lm, decoder):
    result = evaluate(lm, "digits-read", limit=3, decoder=decoder, max_new_tokens=8, progress=False, batch_size=2)
    assert result.num_samples == 3 and result.decoder == decoder
    assert set(result.metrics) == {"exact_match", "digit_accuracy"}
    assert 0.0 <= result.metrics["digit_accuracy"] <= 1.0
    speed = result.speed
    assert speed["tokens"] > 0 and speed["nfe"] > 0 and speed["seconds"] > 0
    assert speed["tokens_per_nfe"] == pytest.approx(speed["tokens"] / speed["nfe"], abs=1e-3)
    if decoder == "ar":
        assert speed["tokens_per_nfe"] == 1.0
    assert len(result.examples) == 3 and "reference" in result.examples[0]


def test_evaluate_unknown_task_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="shapes-qa"):
        evaluate(lm, "no-such-task", limit=1, progress=False)


def test_settings_grid():
    grid = settings_grid(["ar", "hf", "block", "spec"], [8, 16], [0.7, 0.9], has_baseline=True)
    labels = [s.label for s in grid]
    assert labels[:3] == ["ar", "hf[baseline]", "hf"]
    assert "block(block_size=8,threshold=0.7)" in labels and "spec(block_size=16)" in labels
    assert len(grid) == 3 + 4 + 2


def test_settings_grid_with_compiled_twins():
    grid = settings_grid(["ar", "hf", "spec"], [8], [0.9], has_baseline=False, compiled=True)
    assert [s.label for s in grid] == ["ar", "ar(compile=True)", "hf", "spec(block_size=8)",
                                       "spec(block_size=8,compile=True)"]


def test_bench_rows_ratios_and_report(lm, tmp_path):
    grid = [Setting("ar"), Setting("hf"), Setting("spec", {"block_size": 4})]
    rows = run_bench({"main": lm}, ["digits-read"], grid, limit=2, max_new_tokens=6, progress=False)
    assert [r["setting"] for r in rows] == ["ar", "hf", "spec(block_size=4)"]
    ar, hf, spec = rows
    assert ar["speedup_vs_ar"] == 1.0 and hf["speedup_vs_hf"] == 1.0
    assert spec["speedup_vs_ar"] == pytest.approx(spec["tokens_per_second"] / ar["tokens_per_second"], rel=1e-2)
    assert spec["metrics"] == ar["metrics"]  # greedy spec == AR: same answers, same scores
    paths = write_report(rows, tmp_path, "test-cpu")
    data = json.loads(paths["json"].read_text())
    assert data["device"] == "test-cpu" and len(data["rows"]) == 3
    assert "| spec(block_size=4) |" in paths["markdown"].read_text()
    assert paths["plot"].stat().st_size > 1000
    assert "### digits-read" in markdown_table(rows, "x")
    without_hf = [{k: v for k, v in r.items() if k != "speedup_vs_hf"} for r in rows if r["decoder"] != "hf"]
    assert "1.00x | - |" in markdown_table(without_hf, "x")  # no HF reference in the run: no ratio


def test_plots_use_a_metric_each_task_reports():
    from dvlm.eval.plots import PRIMARY_METRIC
    from dvlm.tasks.metrics import score

    for task, metric in PRIMARY_METRIC.items():
        sample = get_task(task).generate("test", 1)[0]
        assert metric in score(task, sample.answers[-1], sample), task


def test_plot_legend_names_and_size(tmp_path):
    import matplotlib.image

    from dvlm.eval.plots import pareto_plot, setting_label

    rows = [
        {"task": "digits-read", "decoder": "ar", "model": "baseline", "metrics": {"digit_accuracy": 0.6},
         "speedup_vs_ar": 1.0},
        {"task": "digits-read", "decoder": "block", "model": "main", "block_size": 16, "threshold": 0.9,
         "metrics": {"digit_accuracy": 0.65}, "speedup_vs_ar": 2.5},
    ]
    assert [setting_label(r) for r in rows] == ["ar (AR source)", "block B=16 τ=0.9"]
    path = pareto_plot(rows, tmp_path / "p.png")
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 500 and height > 400  # readable at the size it is shown
