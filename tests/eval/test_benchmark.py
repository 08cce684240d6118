"""`dvlm eval --benchmark`: the runner on a fake model, re-scoring a predictions file, and the
command on the built-in model with a ChartQA-layout file written from built-in task samples."""

import json

import pytest

from dvlm.cli import main
from dvlm.decode.output import GenerationOutput
from dvlm.eval.benchmark import markdown_table, run_benchmark, write_report
from dvlm.eval.plots import panel_title
from dvlm.tasks.benchmarks import get_benchmark
from dvlm.tasks.benchmarks.items import Item
from dvlm.tasks.builtin import get_task
from dvlm.zoo.registry import builtin_names


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
    said = ["Yes", "Yes\n", "No", "No"]  # TP 1, FP 1, FN 1, TN 1 (the generation is stripped first)
    lm = ScriptedModel({pope.prompt(i): a for i, a in zip(items, said)})
    runs = run_benchmark(lm, pope, items, ["ar", "block"], rule="lmms-eval", total=4, block_size=4, threshold=0.9,
                         steps=None)
    ar, block = (run.row for run in runs)
    assert ar["metrics"]["accuracy"] == 0.5 and ar["metrics"]["f1"] == 0.5 and ar["metrics"]["yes_ratio"] == 0.5
    assert ar["setting"] == "ar" and block["setting"] == "block(block_size=4,threshold=0.9)"
    assert ar["tokens_per_nfe"] == pytest.approx(6 / 6) and block["tokens_per_nfe"] == 3.0
    assert ar["speedup_vs_ar"] == 1.0 and block["speedup_vs_ar"] == 3.0
    assert ar["coverage"] == "all 4 items" and ar["rule"] == "lmms-eval" and ar["total_items"] == 4
    # Every call sends the benchmark's prompt, the item's images and POPE's lmms-eval token limit.
    prompts, images, decoder, limit, options = lm.calls[-4]  # block, first item (batch size 1)
    assert prompts[0].endswith("\nAnswer the question using a single word or phrase.")
    assert images == [["0.jpg"]] and limit == pope.max_new_tokens and options == {"block_size": 4, "threshold": 0.9}
    table = markdown_table(pope, [ar, block], "CPU")
    assert table.startswith("pope: all 4 items. Rule: lmms-eval (lmms_eval/tasks/pope/utils.py). Device: CPU.")
    assert "| ar | 0.5000 | 0.5000 | 0.5000 | 1.00 |" in table
    paths = write_report(pope, runs, tmp_path, "CPU")
    document = json.loads(paths["json"].read_text())
    assert document["rows"][1]["speedup_vs_ar"] == 3.0 and document["coverage"] == "all 4 items"
    assert paths["plot"].stat().st_size > 0
    answers = [json.loads(line) for line in (tmp_path / "pope.ar.predictions.jsonl").read_text().splitlines()]
    assert answers[1] == {"id": "random/1", "prediction": "Yes\n", "parsed": "yes", "guessed": False,
                          "reference": "no", "accuracy": 0.0, "tp": 0.0, "fp": 1.0, "fn": 0.0, "yes": 0.0,
                          "nfe": 6, "tokens": 6}  # 5 tokens and the end token


def test_a_limited_run_says_partial_in_the_table_json_and_plot(tmp_path):
    pope = get_benchmark("pope")
    items = pope_items()
    lm = ScriptedModel({pope.prompt(i): "Yes" for i in items})
    runs = run_benchmark(lm, pope, items[:3], ["ar", "block"], rule="official", total=4)
    assert runs[0].row["coverage"] == "partial: 3 of 4 items"
    assert markdown_table(pope, [r.row for r in runs], "CPU").startswith(
        "pope: partial: 3 of 4 items. Rule: official (POPE's evaluate.py).")
    paths = write_report(pope, runs, tmp_path, "CPU")
    assert json.loads(paths["json"].read_text())["coverage"] == "partial: 3 of 4 items"
    assert panel_title("pope", [r.row for r in runs]) == "pope\npartial: 3 of 4 items"
    full = run_benchmark(lm, pope, items, ["ar"], rule="official", total=4)
    assert panel_title("pope", [full[0].row]) == "pope"


def test_mmmu_predictions_record_the_parsed_answer_and_the_guess(tmp_path):
    mmmu = get_benchmark("mmmu")
    items = [Item("validation_Art_1", "Which?", [], "B", {"question_type": "multiple-choice",
                                                          "options": ["cat", "dog"], "answer_text": "B"}),
             Item("validation_Art_2", "How many?", [], ["3.5"], {"question_type": "open", "options": [],
                                                                  "answer_text": "3.5"})]
    lm = ScriptedModel({mmmu.prompt(items[0]): "a dog", mmmu.prompt(items[1]): "The speed is 3.5"})
    (run,) = run_benchmark(lm, mmmu, items, ["ar"], rule="official", total=2)
    first, second = run.predictions
    assert first["guessed"] is True and first["parsed"] in ("A", "B")
    assert second["guessed"] is False and second["parsed"] == [3.5] and second["accuracy"] == 1.0


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
    return root, [s.answers[0] for s in samples]


@pytest.mark.skipif("tiny-dvlm" not in builtin_names(), reason="the built-in model is not installed")
def test_eval_benchmark_command_scores_every_item_by_default(tmp_path, capsys):
    data, _ = chartqa_from_builtin(tmp_path / "test", 3)
    code = main(["eval", "--benchmark", "chartqa", "--data", str(data), "--decoders", "ar,spec",
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("chartqa: all 3 items. Rule: lmms-eval") and "| ar |" in out and "| spec |" in out
    rows = json.loads((tmp_path / "out" / "chartqa.json").read_text())["rows"]
    assert [r["num_items"] for r in rows] == [3, 3]
    assert rows[0]["metrics"] == rows[1]["metrics"]  # spec emits AR's tokens
    assert (tmp_path / "out" / "chartqa.png").is_file()
    # The answers it wrote re-score to the same numbers, without a model.
    code = main(["eval", "--benchmark", "chartqa", "--data", str(data), "--predictions",
                 str(tmp_path / "out" / "chartqa.ar.predictions.jsonl"), "--out", str(tmp_path / "again")])
    assert code == 0
    again = json.loads((tmp_path / "again" / "chartqa.json").read_text())["rows"][0]
    assert again["metrics"] == rows[0]["metrics"] and again["setting"] == "rescored"


def write_predictions(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_rescoring_a_predictions_file_needs_no_model(tmp_path, capsys):
    data, labels = chartqa_from_builtin(tmp_path / "test", 3)
    answers = [labels[0], "no idea", f" {labels[2]}\n"]
    source = write_predictions(tmp_path / "theirs.jsonl", [{"id": f"human/{k}", "prediction": a}
                                                           for k, a in enumerate(answers)])
    code = main(["eval", "--benchmark", "chartqa", "--data", str(data), "--predictions", str(source),
                 "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("chartqa: all 3 items. Rule: lmms-eval (lmms_eval/tasks/chartqa/utils.py). "
                          "Device: none, answers re-scored from theirs.jsonl.\n")
    assert "| rescored | 0.6667 | - | - | - |" in out
    lines = [json.loads(x) for x in (tmp_path / "out" / "chartqa.rescored.predictions.jsonl").read_text().splitlines()]
    assert [line["relaxed_accuracy"] for line in lines] == [1.0, 0.0, 1.0]
    assert lines[2]["prediction"] == f" {labels[2]}\n" and lines[2]["parsed"] == labels[2]
    assert not (tmp_path / "out" / "chartqa.png").exists()  # no speed, no speed-up plot
    # --limit 2 scores the first two items; the third prediction is simply not used.
    code = main(["eval", "--benchmark", "chartqa", "--data", str(data), "--predictions", str(source), "--limit", "2"])
    assert code == 0 and capsys.readouterr().out.startswith("chartqa: partial: 2 of 3 items.")


@pytest.mark.parametrize("lines, message", [
    ([{"id": "human/0", "prediction": "1"}, {"id": "human/1", "prediction": "2"}],
     "no prediction for 1 item(s): 'human/2'"),
    ([{"id": f"human/{k}", "prediction": "1"} for k in range(3)] + [{"id": "human/9", "prediction": "1"},
                                                                    {"id": 7, "prediction": "1"}],
     "ids the benchmark does not have 2 item(s): 'human/9', '7'"),
    ([{"id": "human/0", "prediction": "1"}, {"id": "human/0", "prediction": "2"}],
     "line 2: id 'human/0' appears twice"),
    ([{"id": "human/0", "prediction": None}], "line 1: id must be text (or an integer) and prediction text"),
    ([{"id": "human/0"}], 'line 1: expected {"id": ..., "prediction": "..."}'),
])
def test_rescoring_refuses_a_file_that_does_not_fit(tmp_path, capsys, lines, message):
    data, _ = chartqa_from_builtin(tmp_path / "test", 3)
    source = write_predictions(tmp_path / "p.jsonl", lines)
    assert main(["eval", "--benchmark", "chartqa", "--data", str(data), "--predictions", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(source) in err and message in err


@pytest.mark.parametrize("argv, message", [
    (["--benchmark", "chartqa"], "--benchmark needs --data"),
    (["--benchmark", "nope", "--data", "x"], "unknown benchmark 'nope'"),
    (["--benchmark", "docvqa", "--data", "missing.json"], "missing.json: no such file"),
    (["--benchmark", "ai2d", "--data", "x", "--rule", "official"], "ai2d has no 'official' rule; its rules: lmms-eval"),
    (["--task", "shapes-qa", "--rule", "official"], "--rule goes with --benchmark, not --task"),
])
def test_eval_benchmark_errors_are_one_line(argv, message, capsys):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_rescoring_refuses_model_options(tmp_path, capsys):
    data, _ = chartqa_from_builtin(tmp_path / "test", 1)
    source = write_predictions(tmp_path / "p.jsonl", [{"id": "human/0", "prediction": "1"}])
    code = main(["eval", "--benchmark", "chartqa", "--data", str(data), "--predictions", str(source),
                 "--decoders", "ar"])
    assert code == 2 and "--predictions re-scores a file: --decoders would not be used" in capsys.readouterr().err


def test_odd_benchmark_files_are_one_line_errors_from_the_command(tmp_path, capsys):
    """The hostile-input probe: DocVQA answers stored as an integer, an MMMU question that is null."""
    (tmp_path / "documents").mkdir()
    get_task("shapes-qa").generate("test", 1)[0].images[0].save(tmp_path / "documents" / "a.png")
    (tmp_path / "val_v1.0.json").write_text(json.dumps({"data": [
        {"questionId": 1, "question": "What?", "image": "documents/a.png", "answers": 5}]}))
    (tmp_path / "mmmu.json").write_text(json.dumps([
        {"id": "validation_Art_1", "question": None, "options": "[]", "answer": "3", "question_type": "open"}]))
    for name, data, message in (("docvqa", "val_v1.0.json", "record 0: answers must be a non-empty list of strings"),
                                ("mmmu", "mmmu.json", "record 0: question must be text, got null")):
        assert main(["eval", "--benchmark", name, "--data", str(tmp_path / data), "--predictions", "x.jsonl"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"dvlm eval: error: {tmp_path / data}, {message}" in err


def test_a_folder_given_for_a_file_is_a_one_line_error(tmp_path, capsys):
    data, _ = chartqa_from_builtin(tmp_path / "test", 1)
    assert main(["eval", "--benchmark", "chartqa", "--data", str(data), "--predictions", str(tmp_path)]) == 2
    assert f"{tmp_path}: a folder, where a file was expected" in capsys.readouterr().err
    assert main(["eval", "--benchmark", "docvqa", "--data", str(tmp_path / "test" / "png")]) == 2
    assert "png: a folder, where a file was expected" in capsys.readouterr().err


def rescoring_cases(name, root):
    """(data, [(id, prediction, expected score)], metric) for each of the benchmarks added for
    Fast-dVLM's table, on files in their published layouts."""
    from tests.tasks.benchmarks import test_gqa, test_mmbench, test_mmmu_pro, test_realworldqa, test_seedbench_2_plus
    from tests.tasks.benchmarks.test_readers import hf_image, write_parquet

    if name == "gqa":
        test_gqa.gqa_download(root)
        return root, [("201307251", "No.", 1.0), ("20968379", "blue", 0.0)], "exact_match"
    if name == "mmbench":
        write_parquet(root / "en" / "dev-00000-of-00001.parquet", [{**test_mmbench.ROW, "image": hf_image()},
                                                                   {**test_mmbench.ROTATED, "image": hf_image()}])
        return root, [("7", "B", 1.0), ("1000007", "B", 0.0)], "accuracy"
    if name == "realworldqa":
        write_parquet(root / "test-00000-of-00001.parquet", [
            {"image": hf_image(), "question": test_realworldqa.QUESTION, "answer": "C"},
            {"image": hf_image(), "question": "How many cones are there?", "answer": "3"}])
        return root, [("realworldqa/0", "C.", 1.0), ("realworldqa/1", "three", 0.0)], "exact_match"
    if name == "seedbench_2_plus":
        record = test_seedbench_2_plus.RECORD
        write_parquet(root / "test-00000-of-00001.parquet", [{**record, "image": hf_image()},
                                                             {**record, "question_id": "1", "answer": "A",
                                                              "image": hf_image()}])
        return root, [("0", "B", 1.0), ("1", "The answer is A", 0.0)], "accuracy"
    test_mmmu_pro.mmmu_pro_download(root)
    if name == "mmmu_pro_standard":
        return root, [("test_History_134", "J", 1.0), ("test_Art_5", "(A)", 1.0)], "accuracy"
    return root, [("test_History_134", "Answer: J", 0.0)], "accuracy"


@pytest.mark.parametrize("name", ["gqa", "mmbench", "realworldqa", "seedbench_2_plus", "mmmu_pro_standard",
                                  "mmmu_pro_vision"])
def test_rescoring_the_benchmarks_of_fast_dvlms_table(tmp_path, capsys, name):
    data, cases, metric = rescoring_cases(name, tmp_path / "data")
    source = write_predictions(tmp_path / "p.jsonl", [{"id": i, "prediction": p} for i, p, _ in cases])
    assert main(["eval", "--benchmark", name, "--data", str(data), "--predictions", str(source),
                 "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith(f"{name}: all {len(cases)} items. Rule: lmms-eval")
    lines = [json.loads(x) for x in (tmp_path / "out" / f"{name}.rescored.predictions.jsonl").read_text().splitlines()]
    assert [(line["id"], line[metric]) for line in lines] == [(i, expected) for i, _, expected in cases]


def test_rescoring_mmmu_pro_vision_by_its_own_scorer(tmp_path, capsys):
    # "Answer: J" is wrong by lmms-eval's rule (no parsing) and right by MMMU-Pro's evaluate.py.
    data, cases, _ = rescoring_cases("mmmu_pro_vision", tmp_path / "data")
    source = write_predictions(tmp_path / "p.jsonl", [{"id": i, "prediction": p} for i, p, _ in cases])
    assert main(["eval", "--benchmark", "mmmu_pro_vision", "--data", str(data), "--predictions", str(source),
                 "--rule", "official", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["rule"] == "official" and row["metrics"]["accuracy"] == 1.0
