"""`dvlm eval --benchmark`: the runner on a fake model, and the command on the built-in model with
a ChartQA-layout file written from built-in task samples."""

import json

import pytest

from dvlm.cli import main
from dvlm.decode.output import GenerationOutput
from dvlm.eval.benchmark import markdown_table, run_benchmark, write_report
from dvlm.tasks.benchmarks import get_benchmark
from dvlm.tasks.benchmarks.items import Item
from dvlm.zoo.registry import builtin_names
from dvlm.tasks.builtin import get_task


class ScriptedModel:
    """Answers each prompt from a script; `ar` takes 1 forward per token, `block` 3 tokens per forward."""

    diffusion = True

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def generate(self, prompts, images, *, decoder, max_new_tokens, **options):
        self.calls.append((prompts, images, decoder, max_new_tokens, options))
        outs = []
        for prompt in prompts:
            tokens = [1] * 5
            nfe = 6 if decoder == "ar" else 2
            outs.append(GenerationOutput(self.answers[prompt], tokens, "stop", decoder, nfe, 10,
                                         timings={"total_s": 0.01 * nfe}))
        return outs


def pope_items():
    return [Item(f"random/{k}", f"Is there a {thing} in the image?", [f"{k}.jpg"], label, {"category": "random"})
            for k, (thing, label) in enumerate([("dog", "yes"), ("cat", "no"), ("car", "yes"), ("bus", "no")])]


def test_run_benchmark_scores_times_and_compares_with_ar(tmp_path):
    pope = get_benchmark("pope")
    items = pope_items()
    said = ["Yes", "Yes", "No", "No"]  # TP 1, FP 1, FN 1, TN 1
    lm = ScriptedModel({pope.prompt(i): a for i, a in zip(items, said)})
    runs = run_benchmark(lm, pope, items, ["ar", "block"], block_size=4, threshold=0.9, steps=None)
    ar, block = (run.row for run in runs)
    assert ar["metrics"]["accuracy"] == 0.5 and ar["metrics"]["f1"] == 0.5 and ar["metrics"]["yes_ratio"] == 0.5
    assert ar["setting"] == "ar" and block["setting"] == "block(block_size=4,threshold=0.9)"
    assert ar["tokens_per_nfe"] == pytest.approx(6 / 6) and block["tokens_per_nfe"] == 3.0
    assert ar["speedup_vs_ar"] == 1.0 and block["speedup_vs_ar"] == 3.0
    # Every call sends the benchmark's prompt, the item's images and POPE's lmms-eval token limit.
    prompts, images, decoder, limit, options = lm.calls[-4]  # block, first item (batch size 1)
    assert prompts[0].endswith("\nAnswer the question using a single word or phrase.")
    assert images == [["0.jpg"]] and limit == pope.max_new_tokens and options == {"block_size": 4, "threshold": 0.9}
    assert "| ar | 0.5000 | 0.5000 | 0.5000 | 1.00 |" in markdown_table(pope, [ar, block], "CPU")
    paths = write_report(pope, runs, tmp_path, "CPU")
    assert json.loads(paths["json"].read_text())["rows"][1]["speedup_vs_ar"] == 3.0
    assert paths["plot"].stat().st_size > 0
    answers = (tmp_path / "pope.ar.predictions.jsonl").read_text().splitlines()
    assert json.loads(answers[1])["prediction"] == "Yes" and json.loads(answers[1])["accuracy"] == 0.0


def chartqa_from_builtin(root, n):
    """shapes-qa test samples written in ChartQA's release layout (test_human.json + png/)."""
    samples = get_task("shapes-qa").generate("test", n)
    (root / "png").mkdir(parents=True)
    records = []
    for k, sample in enumerate(samples):
        sample.images[0].save(root / "png" / f"{k}.png")
        question = sample.conversations[0]["value"].split("\n", 1)[1]
        records.append({"imgname": f"{k}.png", "query": question, "label": sample.answers[0]})
    (root / "test_human.json").write_text(json.dumps(records))
    return root


@pytest.mark.skipif("tiny-dvlm" not in builtin_names(), reason="the built-in model is not installed")
def test_eval_benchmark_command_writes_table_json_plot_and_answers(tmp_path, capsys):
    data = chartqa_from_builtin(tmp_path / "test", 3)
    code = main(["eval", "--benchmark", "chartqa", "--data", str(data), "--decoders", "ar,block,spec",
                 "--limit", "2", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "| ar |" in out and "| spec |" in out and "relaxed_accuracy" in out
    rows = json.loads((tmp_path / "out" / "chartqa.json").read_text())["rows"]
    assert [r["num_items"] for r in rows] == [2, 2, 2]
    assert rows[0]["metrics"] == rows[2]["metrics"]  # spec emits AR's tokens
    assert (tmp_path / "out" / "chartqa.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "chartqa"], "--benchmark needs --data"),
    (["--benchmark", "nope", "--data", "x"], "unknown benchmark 'nope'"),
    (["--benchmark", "docvqa", "--data", "missing.json"], "missing.json: no such file"),
])
def test_eval_benchmark_errors_are_one_line(argv, message, capsys):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
