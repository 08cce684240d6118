"""The lmms-eval plugin: request handling without lmms-eval (fast), and real lmms-eval run as a
user runs it on built-in task samples exported to a `datasets` folder (slow: builds its own venv).

lmms-eval requires torchvision, which must never enter the project's venv. The slow test makes a
venv of its own that sees the project's packages through a .pth file, installs lmms-eval there
without its dependencies plus the few it needs to run a local generation task, and installs dvlm
into it (editable) so that the `lmms_eval.models` entry point is registered.
"""

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from dvlm.config import ConfigError
from dvlm.decode.output import GenerationOutput
from dvlm.eval.harness import evaluate
from dvlm.eval.lmms_answers import (
    SpeedTally,
    UnsupportedRequestError,
    answer_batch,
    cut_at_stop,
    decode_options,
    plugin_settings,
)
from dvlm.zoo.registry import builtin_names
from dvlm.tasks.builtin import get_task

REPO = Path(__file__).resolve().parents[2]
LMMS_EVAL = "lmms-eval==0.7.3"
# What lmms-eval imports to run a local generate_until task (found by running it); no torchvision.
LMMS_EVAL_RUNTIME = ["loguru", "sacrebleu", "evaluate", "pytz", "tenacity", "datasets", "pytablewriter",
                     "jsonlines", "zstandard", "sqlitedict"]


def test_settings_are_typed_and_unknown_keys_refused():
    s = plugin_settings(pretrained="tiny-dvlm", decoder="spec", block_size=8, batch_size="2", max_batch_size=None)
    assert (s.decoder, s.block_size, s.batch_size) == ("spec", 8, 2)
    with pytest.raises(ConfigError, match="unknown dvlm model_args tempreature"):
        plugin_settings(pretrained="x", tempreature=0.5)
    with pytest.raises(ConfigError, match="decoder='beam'"):
        plugin_settings(pretrained="x", decoder="beam")


def test_decode_options_take_the_task_limits_and_the_plugin_knobs():
    s = plugin_settings(pretrained="x", decoder="block", threshold=0.8)
    assert decode_options(s, {"max_new_tokens": 16, "temperature": 0, "do_sample": False, "until": ["\n"]}) == {
        "decoder": "block", "threshold": 0.8, "max_new_tokens": 16}
    assert decode_options(plugin_settings(pretrained="x", max_new_tokens=128), {"max_new_tokens": 16}) == {
        "max_new_tokens": 128}  # the model arg wins
    assert decode_options(s, {"do_sample": True, "temperature": 0.7, "top_p": 0.9})["temperature"] == 0.7
    with pytest.raises(UnsupportedRequestError, match="beam search"):
        decode_options(s, {"num_beams": 4})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        decode_options(s, {"max_new_tokens": 0})


def test_cut_at_stop():
    assert cut_at_stop("red.\nblue", ["\n"]) == "red."
    assert cut_at_stop("a ASSISTANT: b USER: c", ["USER:", "ASSISTANT:"]) == "a "
    assert cut_at_stop("red", []) == "red"


class CountingModel:
    def generate(self, prompts, images, **options):
        self.seen = (prompts, images, options)
        return [GenerationOutput(f"{p} ok\nmore", [1, 2, 3], "stop", "block", 2, 5, timings={"total_s": 0.5})
                for p in prompts]


def test_answer_batch_cuts_answers_and_tallies_speed():
    lm, tally = CountingModel(), SpeedTally()
    answers = answer_batch(lm, ["q1", "q2"], [["img"], []], {"decoder": "block"}, ["\n"], tally)
    assert answers == ["q1 ok", "q2 ok"]
    assert lm.seen == (["q1", "q2"], [["img"], []], {"decoder": "block"})
    summary = tally.summary()
    assert (summary["tokens"], summary["nfe"], summary["tokens_per_forward"]) == (8, 4, 2.0)  # 3 tokens + EOS each
    assert summary["tokens_per_second"] == 16.0


# -- real lmms-eval ------------------------------------------------------------------------------
TASKS = {"shapes-qa": ("dvlm_shapes_qa", ["exact_match"]),
         "digits-read": ("dvlm_digits_read", ["exact_match", "digit_accuracy"])}
LIMIT = 6

TASK_UTILS = '''
"""Task functions of the exported built-in tasks: the question text, the image, dvlm's own scorer."""
from dvlm.tasks.metrics import score_answer


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return score_answer(results[0], doc["answer"], doc["kind"])
'''

EXPORT_SCRIPT = '''
import json, sys
from datasets import Dataset, DatasetDict, Features, Image, Value
records = json.load(open(sys.argv[1]))
features = Features({"id": Value("string"), "question": Value("string"), "answer": Value("string"),
                     "kind": Value("string"), "image": Image()})
DatasetDict({"test": Dataset.from_list(records, features=features)}).save_to_disk(sys.argv[2])
'''


def task_yaml(name: str, data: Path, metrics: list[str]) -> str:
    metric_list = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n" for m in metrics)
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: {data}
        dataset_kwargs:
          load_from_disk: true
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 96
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
        """) + metric_list


def export_task(task: str, folder: Path, python: Path) -> None:
    """The task's first LIMIT test samples (seed 0, what `dvlm eval` draws) as a `datasets` folder."""
    records = []
    (folder / "images").mkdir(parents=True)
    for k, sample in enumerate(get_task(task).generate("test", LIMIT)):
        image = folder / "images" / f"{k}.png"
        sample.images[0].save(image)
        question = sample.conversations[-2]["value"].removeprefix("<image>\n")
        records.append({"id": sample.id, "question": question, "answer": sample.answers[-1],
                        "kind": sample.answer_kinds[-1], "image": str(image)})
    (folder / "records.json").write_text(json.dumps(records))
    (folder / "export.py").write_text(EXPORT_SCRIPT)
    subprocess.run([python, folder / "export.py", folder / "records.json", folder / "data"], check=True)


def lmms_venv(root: Path) -> Path:
    """A venv seeing this interpreter's packages, with lmms-eval (no deps) and dvlm's entry point."""
    reuse = os.environ.get("DVLM_LMMS_VENV")  # a venv an earlier run built, to iterate quickly
    venv = Path(reuse) if reuse else root / "venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                            text=True).strip())
        (site / "_project_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "--no-deps", LMMS_EVAL], check=True)
        subprocess.run([*pip, *LMMS_EVAL_RUNTIME], check=True)
        # lmms-eval 0.7.3 imports filelock._api, gone in filelock 4; shadow the project's copy here only.
        subprocess.run([*pip, "--no-deps", "--ignore-installed", "filelock>=3.16,<4"], check=True)
        subprocess.run([*pip, "--no-deps", "-e", REPO], check=True)
    check = "import importlib.util as u; assert u.find_spec('torchvision') is None, 'torchvision must not be installed'"
    subprocess.run([python, "-c", check], check=True)
    return python


@pytest.mark.slow
@pytest.mark.skipif("tiny-dvlm" not in builtin_names(), reason="the built-in model is not installed")
def test_lmms_eval_scores_equal_dvlm_eval(tmp_path):
    python = lmms_venv(tmp_path)
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "utils.py").write_text(TASK_UTILS)
    for task, (name, metrics) in TASKS.items():
        export_task(task, tmp_path / name, python)
        (tasks_dir / f"{name}.yaml").write_text(task_yaml(name, tmp_path / name / "data", metrics))
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{tasks_dir}", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    command = [python.parent / "lmms-eval", "--model", "dvlm",
               "--model_args", "pretrained=tiny-dvlm,decoder=block,block_size=16,threshold=0.9",
               "--tasks", ",".join(name for name, _ in TASKS.values()), "--include_path", tasks_dir,
               "--batch_size", "1", "--output_path", tmp_path / "out"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    results = json.loads(results_file.read_text())

    import dvlm

    lm = dvlm.load("tiny-dvlm")
    for task, (name, metrics) in TASKS.items():
        ours = evaluate(lm, task, limit=LIMIT, decoder="block", block_size=16, threshold=0.9, progress=False)
        for metric in metrics:
            assert results["results"][name][f"{metric},none"] == pytest.approx(ours.metrics[metric]), (task, metric)
    throughput = results["throughput"]
    assert throughput["avg_tokens_per_forward"] > 1.0 and throughput["avg_speed"] > 0  # block decoding's speed
