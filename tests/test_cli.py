"""The `dvlm` CLI, run in-process through `main([...])` (plus one subprocess run of `dvlm --help`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dvlm
from dvlm.cli import VERBS, CLIError, build_parser, main, model_name, train_config
from dvlm.config import ConfigError


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, verb: str) -> str:
    """The stderr of an expected failure: exactly one line `dvlm <verb>: error: ...`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dvlm {verb}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, image) -> Path:
    path = tmp_path_factory.mktemp("images") / "probe.png"
    image.save(path)
    return path


# -- top level -------------------------------------------------------------------------------------
def test_version_and_verbs(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"dvlm {dvlm.__version__}"
    assert set(VERBS) == {"assemble", "convert", "train", "generate", "eval", "bench", "serve", "chat", "demo", "zoo",
                          "quantize", "ablate"}


def test_every_argument_has_help():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "verb").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"dvlm {name} {action.option_strings} has no help text"


def test_no_verb_is_a_usage_error(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "usage: dvlm" in err


def test_installed_console_script_help():
    script = shutil.which("dvlm", path=str(Path(sys.executable).parent))
    assert script is not None, "the dvlm console script is not installed next to this Python"
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for verb in VERBS:
        assert verb in done.stdout


# -- convert ---------------------------------------------------------------------------------------
def test_convert_writes_a_loadable_verified_model(capsys, tmp_path, ar_checkpoint):
    out = tmp_path / "converted"
    code, stdout, _ = run(capsys, "convert", "--model", ar_checkpoint, "--out", out, "--block-size", 8,
                          "--set", "decode_threshold=0.8")
    assert code == 0
    assert "verified" in stdout and "mask token" in stdout and "max logit diff" in stdout
    lm = dvlm.load(out)
    assert lm.diffusion.block_size == 8 and lm.diffusion.decode_threshold == 0.8
    assert str(lm.diffusion.mask_token_id) in stdout


def test_convert_missing_source(capsys, tmp_path):
    code, _, err = run(capsys, "convert", "--model", tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2 and "no such directory and no built-in model" in one_line_error(err, "convert")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_existing_output(capsys, tmp_path, ar_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "convert", "--model", ar_checkpoint, "--out", out)
    assert code == 2 and "--overwrite" in one_line_error(err, "convert")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_convert_refuses_non_safetensors(capsys, tmp_path, ar_checkpoint):
    src = tmp_path / "bin-model"
    src.mkdir()
    shutil.copy(ar_checkpoint / "config.json", src / "config.json")
    (src / "pytorch_model.bin").write_bytes(b"\0")
    code, _, err = run(capsys, "convert", "--model", src, "--out", tmp_path / "out")
    assert code == 2 and "safetensors" in one_line_error(err, "convert")
    assert not (tmp_path / "out").exists()


def test_convert_unsupported_architecture(capsys, tmp_path):
    src = tmp_path / "fake"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["FakeVLMForCausalLM"]}))
    code, _, err = run(capsys, "convert", "--model", src, "--out", tmp_path / "out")
    line = one_line_error(err, "convert")
    assert code == 2 and "FakeVLMForCausalLM" in line and "Qwen2_5_VLForConditionalGeneration" in line


def test_convert_unknown_setting(capsys, tmp_path, ar_checkpoint):
    code, _, err = run(capsys, "convert", "--model", ar_checkpoint, "--out", tmp_path / "out", "--set", "colour=red")
    assert code == 2 and "colour" in one_line_error(err, "convert")
    assert not (tmp_path / "out").exists()


# -- generate --------------------------------------------------------------------------------------
def test_generate_json_and_text(capsys, fast_checkpoint, image_file):
    args = ["generate", "--model", fast_checkpoint, "--image", image_file, "--prompt", "What is this?",
            "--max-new-tokens", 8, "--threshold", 0.5]
    code, out, _ = run(capsys, *args, "--json")
    assert code == 0
    result = json.loads(out)
    assert {"text", "tokens", "nfe", "tokens_per_nfe", "decoder", "timings"} <= set(result)
    assert result["decoder"] == "block" and result["nfe"] >= 1 and 0 < len(result["tokens"]) <= 8

    code, out, err = run(capsys, *args)
    assert code == 0 and out == result["text"] + "\n"  # stdout holds the answer only
    assert err == ""
    code, out, err = run(capsys, *args, "--verbose")
    assert code == 0 and out == result["text"] + "\n" and "tokens/nfe=" in err


def test_generate_compiled(capsys, fast_checkpoint, image_file, adapter):
    """--compile decodes under torch.compile (compiled once per shape; the reference family only:
    tests/decode/test_compiled.py compiles the same model's shapes) to the eager answer."""
    from dvlm.model.adapters.registry import REFERENCE_ARCHITECTURE

    if adapter.architectures[0] != REFERENCE_ARCHITECTURE:
        pytest.skip("compiled on the reference family only")
    args = ["generate", "--model", fast_checkpoint, "--image", image_file, "--prompt", "Describe the image.",
            "--max-new-tokens", 5, "--decoder", "ar", "--json"]
    eager = json.loads(run(capsys, *args)[1])
    code, out, _ = run(capsys, *args, "--compile")
    compiled = json.loads(out)
    assert code == 0 and compiled["settings"]["compile"] and not eager["settings"]["compile"]
    assert compiled["tokens"] == eager["tokens"] and compiled["timings"]["compile_s"] >= 0


def test_eval_and_serve_take_compile(capsys, monkeypatch):
    import dvlm.eval.harness as harness

    seen = {}

    def fake_evaluate(lm, task, **kw):
        seen.update(kw)
        raise CLIError("stop here")

    monkeypatch.setattr(harness, "evaluate", fake_evaluate)
    code, _, err = run(capsys, "eval", "--task", "digits-read", "--limit", 1, "--compile")
    assert code == 2 and seen["compile"] is True
    from dvlm.cli import serve_settings

    args = build_parser().parse_args(["serve", "--compile"])
    assert serve_settings(args).compile and not serve_settings(build_parser().parse_args(["serve"])).compile


def test_generate_corrupt_image(capsys, tmp_path, fast_checkpoint):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"definitely not a png")
    code, out, err = run(capsys, "generate", "--model", fast_checkpoint, "--image", bad, "--prompt", "Hi")
    line = one_line_error(err, "generate")
    assert code == 2 and out == "" and "cannot load image" in line and "broken.png" in line


def test_generate_threshold_and_steps_conflict(capsys, fast_checkpoint):
    code, out, err = run(capsys, "generate", "--model", fast_checkpoint, "--prompt", "Hi",
                         "--threshold", 0.9, "--steps", 4)
    assert code == 2 and out == "" and "not allowed with" in err


def test_generate_block_on_ar_model(capsys, ar_checkpoint):
    code, _, err = run(capsys, "generate", "--model", ar_checkpoint, "--prompt", "Hi", "--decoder", "block")
    assert code == 2 and "dvlm convert" in one_line_error(err, "generate")


def test_default_model_is_the_builtin_once_installed(monkeypatch):
    import dvlm.zoo.registry as registry

    monkeypatch.setattr(registry, "builtin_names", lambda: [])
    with pytest.raises(CLIError, match="--model"):
        model_name(None)
    monkeypatch.setattr(registry, "builtin_names", lambda: ["tiny-dvlm"])
    assert model_name(None) == "tiny-dvlm"
    assert model_name("some/dir") == "some/dir"


# -- train -----------------------------------------------------------------------------------------
def test_train_config_precedence(tmp_path):
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("learning_rate: 0.1\nbatch_size: 3\nwarmup_ratio: 0.2\n")
    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--config", str(yaml_file),
                                      "--set", "batch_size=5", "--set", "learning_rate=0.2", "--lr", "0.3", "--ar"])
    cfg = train_config(args)
    assert (cfg.learning_rate, cfg.batch_size, cfg.warmup_ratio, cfg.objective) == (0.3, 5, 0.2, "autoregressive")
    assert cfg.gradient_checkpointing is False  # an absent flag does not override
    bad = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--set", "nope=1"])
    with pytest.raises(ConfigError, match="nope"):
        train_config(bad)


def test_the_renamed_ar_loss_key_points_at_objective():
    args = build_parser().parse_args(["train", "--model", "m", "--data", "d", "--out", "o", "--set", "ar_loss=true"])
    with pytest.raises(ConfigError, match="TrainConfig.ar_loss was renamed: write objective: autoregressive"):
        train_config(args)


def test_train_and_resume(capsys, tmp_path, fast_checkpoint):
    from dvlm.tasks.builtin import export_llava, get_task

    data = export_llava(get_task("shapes-qa").generate("train", 8), tmp_path / "data")
    run_dir = tmp_path / "run"
    base = ["train", "--model", fast_checkpoint, "--data", data, "--out", run_dir, "--batch-size", 4]

    code, _, err = run(capsys, *base, "--resume", "--steps", 2)
    assert code == 2 and "no checkpoint" in one_line_error(err, "train")

    code, out, _ = run(capsys, *base, "--steps", 2, "--diffusion", "block_size=4")
    assert code == 0
    assert str(run_dir / "model") in out and str(run_dir / "metrics.jsonl") in out and "skipped  0" in out
    assert dvlm.load(run_dir / "model").diffusion.block_size == 4
    capsys.readouterr()  # drop the loading messages of the line above

    code, _, err = run(capsys, *base, "--steps", 2)
    assert code == 2 and "--resume" in one_line_error(err, "train")

    code, out, _ = run(capsys, *base, "--steps", 3, "--resume")
    assert code == 0 and "trained 3 steps" in out
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


# -- demo ------------------------------------------------------------------------------------------
def test_demo_random(capsys):
    code, out, _ = run(capsys, "demo", "--random", "--max-new-tokens", 8)
    assert code == 0
    assert "verified" in out and "tokens/nfe" in out and "random" in out
    for decoder in ("ar", "hf", "block"):
        assert f"\n{decoder:<8}" in out


@pytest.mark.skipif(not {"tiny-ar", "tiny-dvlm"} <= set(__import__("dvlm.zoo.registry").zoo.registry.builtin_names()),
                    reason="built-in weights not installed")
def test_demo_on_the_builtin_models(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--out", tmp_path, "--limit", 2, "--max-new-tokens", 64)
    assert code == 0, out
    for task in ("shapes-qa", "shapes-caption", "digits-read"):
        assert f"== {task} ==" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["decoder"] for r in results["rows"]} == {"ar", "block", "spec"}
    assert all("speedup_vs_ar" in r for r in results["rows"])
    assert (tmp_path / "results.png").stat().st_size > 0 and (tmp_path / "example.png").stat().st_size > 0


def test_demo_rejects_a_bad_limit(capsys):
    code, _, err = run(capsys, "demo", "--limit", 0)
    assert code == 2 and "--limit" in one_line_error(err, "demo")


# -- eval / bench / zoo ------------------------------------------------------------------------------
def test_eval_json(capsys, fast_checkpoint):
    code, out, _ = run(capsys, "eval", "--task", "digits-read", "--model", fast_checkpoint, "--limit", 2,
                       "--max-new-tokens", 6, "--decoder", "spec", "--block-size", 4, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["task"] == "digits-read" and result["decoder"] == "spec" and result["num_samples"] == 2
    assert set(result["metrics"]) == {"exact_match", "digit_accuracy"} and result["speed"]["nfe"] > 0


def test_eval_unknown_task(capsys, fast_checkpoint):
    code, _, err = run(capsys, "eval", "--task", "nope", "--model", fast_checkpoint, "--limit", 1)
    assert code == 2 and "shapes-qa" in one_line_error(err, "eval")


def test_bench_writes_json_markdown_and_plot(capsys, tmp_path, fast_checkpoint):
    code, out, _ = run(capsys, "bench", "--model", fast_checkpoint, "--task", "digits-read", "--decoders", "ar,spec",
                       "--block-sizes", 4, "--limit", 1, "--max-new-tokens", 6, "--out", tmp_path)
    assert code == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["ar", "spec(block_size=4)"]
    assert "| spec(block_size=4) |" in out and (tmp_path / "bench.png").is_file()


def test_bench_refuses_an_unknown_decoder_before_running(capsys, tmp_path, fast_checkpoint):
    code, out, err = run(capsys, "bench", "--model", fast_checkpoint, "--decoders", "ar,bogus", "--limit", 1,
                         "--out", tmp_path)
    assert code == 2 and "bogus" in one_line_error(err, "bench") and "spec-quadratic" in err
    assert out == "" and not (tmp_path / "bench.json").exists()


def test_zoo_list(capsys, monkeypatch, tmp_path):
    import dvlm.zoo.registry as registry

    (tmp_path / "tiny-x").mkdir()
    (tmp_path / "tiny-x" / "config.json").write_text("{}")
    monkeypatch.setattr(registry, "WEIGHTS_DIR", tmp_path)
    code, out, _ = run(capsys, "zoo", "list")
    assert code == 0 and out.startswith("tiny-x\t")


# -- user-fixable failures: one line, exit 2, nothing left behind (issue 8, D11/D12/D18) ------------
@pytest.mark.parametrize("argv, match", [
    (["--set", "seed=x"], "TrainConfig.seed='x' is not valid"),
    (["--set", "save_every=0.5"], "save_every=0.5 is not valid: expected an integer"),
    (["--set", "seed=[1"], "override 'seed=[1': the value is not a YAML scalar"),
    (["--lora", "r=0"], "LoRA needs r >= 1"),
    (["--lora", "rank=4"], "unknown LoRA setting 'rank'"),
])
def test_train_bad_settings(capsys, tmp_path, fast_checkpoint, argv, match):
    code, _, err = run(capsys, "train", "--model", fast_checkpoint, "--data", tmp_path / "d.json",
                       "--out", tmp_path / "run", *argv)
    assert code == 2 and match in one_line_error(err, "train")
    assert not (tmp_path / "run").exists()


def test_train_invalid_yaml_config(capsys, tmp_path, fast_checkpoint):
    (tmp_path / "c.yaml").write_text("learning_rate: [1,\n")
    code, _, err = run(capsys, "train", "--model", fast_checkpoint, "--data", tmp_path / "d.json",
                       "--out", tmp_path / "run", "--config", tmp_path / "c.yaml")
    assert code == 2 and "c.yaml is not valid YAML" in one_line_error(err, "train")


@pytest.mark.parametrize("argv, match", [
    (["--temperature", "nan"], "argument --temperature: must be a finite number, got 'nan'"),
    (["--seed", str(2**64)], "seed must be in [0, 2**32)"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
])
def test_generate_bad_settings(capsys, fast_checkpoint, argv, match):
    code, _, err = run(capsys, "generate", "--model", fast_checkpoint, "--prompt", "hi", *argv)
    assert code == 2 and match in one_line_error(err, "generate")


def test_generate_damaged_checkpoint(capsys, tmp_path, fast_checkpoint):
    damaged = tmp_path / "damaged"
    shutil.copytree(fast_checkpoint, damaged)
    (damaged / "model.safetensors").write_bytes(b"")
    code, _, err = run(capsys, "generate", "--model", damaged, "--prompt", "hi")
    assert code == 2 and "model.safetensors is not a readable safetensors file" in one_line_error(err, "generate")


class FullStream:
    """A stdout on a full device: every write fails with ENOSPC (this sandbox's /dev/full does not)."""

    def write(self, text):
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        pass

    def fileno(self):
        return sys.__stdout__.fileno()


def test_generate_to_a_full_device(capsys, monkeypatch, fast_checkpoint):
    """Writing the answer to a full stdout is one line on stderr and exit 2, not a traceback."""
    monkeypatch.setattr(sys, "stdout", FullStream())
    code = main(["generate", "--model", str(fast_checkpoint), "--prompt", "hi", "--max-new-tokens", "2",
                 "--decoder", "ar"])
    assert code == 2
    assert "cannot write stdout: No space left on device" in one_line_error(capsys.readouterr().err, "generate")


@pytest.mark.parametrize("argv, match", [
    (["--decoders", ""], "--decoders is empty"),
    (["--decoders", " , "], "--decoders is empty"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--block-sizes", "8,x"], "--block-sizes: 'x' is not an integer"),
])
def test_bench_refuses_bad_lists_before_loading(capsys, tmp_path, argv, match):
    code, _, err = run(capsys, "bench", "--model", tmp_path / "absent", "--out", tmp_path / "b", *argv)
    assert code == 2 and match in one_line_error(err, "bench")


def test_bench_and_demo_check_their_output_folder_first(capsys, tmp_path):
    """D11: an unwritable --out was discovered only after the whole benchmark had run."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for verb in ("bench", "demo"):
        code, _, err = run(capsys, verb, "--out", blocker / "out")
        assert code == 2 and f"cannot write to {blocker / 'out'}" in one_line_error(err, verb)


def test_bench_writes_rows_as_they_are_measured(capsys, tmp_path, fast_checkpoint, monkeypatch):
    """D11: a failure late in a bench run keeps the rows measured before it."""
    from dvlm.eval import bench

    real = bench.evaluate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 4:  # two settings (each a warm-up and a run), then a failure
            raise ValueError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "evaluate", flaky)
    code, _, err = run(capsys, "bench", "--model", fast_checkpoint, "--decoders", "ar,block,spec",
                       "--limit", "2", "--max-new-tokens", "4", "--task", "digits-read", "--out", tmp_path / "b")
    assert code == 2 and "simulated failure" in err
    rows = [json.loads(line) for line in (tmp_path / "b" / bench.ROWS_FILE).read_text().splitlines()]
    assert [r["decoder"] for r in rows] == ["ar", "block"]


def test_train_that_fails_leaves_no_run_folder(capsys, tmp_path, fast_checkpoint):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}]))  # no answer
    code, _, err = run(capsys, "train", "--model", fast_checkpoint, "--data", data, "--out", tmp_path / "run",
                       "--steps", "1")
    assert code == 2 and "nothing to train on" in one_line_error(err.splitlines()[-1], "train")
    assert not (tmp_path / "run").exists()


# -- a model name is a model name (issue 19): every verb takes a directory or a built-in name -----
class Reached(Exception):
    """Raised where a verb hands its model on: the test has seen which directory it resolved."""


def reach(*args, **kwargs):
    raise Reached(args, kwargs)


VERB_ARGV = {  # each verb's arguments besides --model; {tmp} is a fresh folder
    "convert": ["--out", "{tmp}/out"],
    "train": ["--data", "{tmp}/data.json", "--out", "{tmp}/run"],
    "generate": ["--prompt", "hi"],
    "chat": [],
    "serve": ["--port", "0"],
    "eval": ["--task", "digits-read"],
    "bench": ["--out", "{tmp}/bench"],
    "quantize": ["--out", "{tmp}/q", "--scheme", "int8-weight"],
    "ablate": ["--quick", "--out", "{tmp}/ablate"],
}
HANDED_ON = {  # where each verb hands the resolved model on
    "convert": ("dvlm.cli.convert_checkpoint", 0), "train": ("dvlm.train.loop.train", 0),
    "quantize": ("dvlm.model.quantize.write_quantized", 0), "ablate": ("dvlm.zoo.ablate.run_ablation", "source"),
}


@pytest.fixture
def builtin(tmp_path, monkeypatch) -> Path:
    """A built-in model named `tiny-test` (the verbs' next steps are stopped, so its folder needs only
    what makes it a built-in: a config.json)."""
    import dvlm.zoo.registry as registry

    weights = tmp_path / "weights"
    (weights / "tiny-test").mkdir(parents=True)
    (weights / "tiny-test" / "config.json").write_text("{}")
    monkeypatch.setattr(registry, "WEIGHTS_DIR", weights)
    return weights / "tiny-test"


@pytest.mark.parametrize("verb", VERB_ARGV)
def test_every_verb_takes_a_builtin_name(capsys, tmp_path, monkeypatch, builtin, verb):
    target, where = HANDED_ON.get(verb, ("dvlm.load", 0))
    monkeypatch.setattr(target, reach)
    argv = [a.format(tmp=tmp_path) for a in VERB_ARGV[verb]]
    with pytest.raises(Reached) as reached:
        main([verb, "--model", "tiny-test", *argv])
    args, kwargs = reached.value.args
    assert Path(kwargs[where] if isinstance(where, str) else args[where]) == builtin


@pytest.mark.parametrize("verb", VERB_ARGV)
def test_a_name_that_is_neither_is_one_line_naming_both_readings(capsys, tmp_path, monkeypatch, builtin, verb):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, verb, "--model", "tiny-tset", *[a.format(tmp=tmp_path) for a in VERB_ARGV[verb]])
    assert code == 2
    assert one_line_error(err, verb) == (f"dvlm {verb}: error: model 'tiny-tset': no such directory and no built-in "
                                         "model of that name (built-in models: tiny-test)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # refused before anything was written


def test_bench_resolves_its_baseline_too(capsys, tmp_path, builtin):
    code, _, err = run(capsys, "bench", "--model", "tiny-test", "--baseline", "tiny-ra", "--out", tmp_path / "b")
    assert code == 2 and "model 'tiny-ra': no such directory and no built-in model" in one_line_error(err, "bench")


# -- dtype help (issue 24): the help says the rule the code follows ------------------------------------
@pytest.mark.parametrize("verb", ["generate", "chat", "serve"])
def test_dtype_help_states_the_cpu_rule(capsys, verb):
    code, out, _ = run(capsys, verb, "--help")
    text = " ".join(out.split())
    assert code == 0 and "float32 on CPU" not in text
    assert ("auto = the checkpoint's own dtype on CUDA; on a CPU, bfloat16 only where the CPU has AVX512-BF16 or "
            "AMX, float32 otherwise and for float16 checkpoints") in text
