"""The shipped built-in models: present, loadable by name, and actually trained.

Thresholds sit below the levels measured on 200 test samples per task (the model cards), so they
catch a broken or untrained model without flaking: digits and captions are read reliably,
shapes questions that find a shape by its content only partly (see the model cards)."""

import pytest

import dvlm
from dvlm.eval.harness import evaluate, sample_prompt
from dvlm.tasks.builtin import get_task
from dvlm.tasks.metrics import score
from dvlm.zoo.registry import builtin_names

pytestmark = pytest.mark.skipif(
    not {"tiny-ar", "tiny-dvlm"} <= set(builtin_names()), reason="built-in weights not installed"
)


@pytest.fixture(scope="module")
def models():
    return {name: dvlm.load(name) for name in ("tiny-ar", "tiny-dvlm")}


def _first(task, question_type=None):
    samples = get_task(task).generate("test", 20, seed=0)
    return next(s for s in samples if question_type in (None, s.meta.get("question_type")))


@pytest.mark.parametrize("name,decoder", [("tiny-ar", "ar"), ("tiny-dvlm", "ar"), ("tiny-dvlm", "spec"),
                                          ("tiny-dvlm", "block")])
def test_builtin_models_answer_a_fixed_count_question(models, name, decoder):
    sample = _first("shapes-qa", "count")
    out = models[name].generate(sample_prompt(sample), sample.images, decoder=decoder, max_new_tokens=8)
    assert out.text == sample.answers[-1]


@pytest.mark.parametrize("name,decoder", [("tiny-ar", "ar"), ("tiny-dvlm", "spec")])
def test_builtin_models_read_a_fixed_digit_strip(models, name, decoder):
    sample = _first("digits-read")
    out = models[name].generate(sample_prompt(sample), sample.images, decoder=decoder, max_new_tokens=24)
    assert out.text == sample.answers[-1]


@pytest.mark.parametrize("name,decoder,floor", [("tiny-ar", "ar", 0.9), ("tiny-dvlm", "spec", 0.9),
                                                ("tiny-dvlm", "block", 0.6)])
def test_builtin_models_are_trained(models, name, decoder, floor):
    result = evaluate(models[name], "digits-read", limit=24, decoder=decoder, batch_size=8, progress=False)
    assert result.metrics["digit_accuracy"] >= floor  # a random model reads ~10% of digits


@pytest.mark.parametrize("name,decoder", [("tiny-ar", "ar"), ("tiny-dvlm", "block")])
def test_builtin_models_describe_scenes(models, name, decoder):
    result = evaluate(models[name], "shapes-caption", limit=16, decoder=decoder, batch_size=8, progress=False)
    assert result.metrics["fact_f1"] >= 0.8  # colour, kind and place of every shape; random: ~0


@pytest.mark.parametrize("decoder", ["spec", "spec-quadratic"])
def test_builtin_speculative_decoding_equals_its_ar_decoding(models, decoder):
    """Invariant 5 on the built-in model, across block sizes."""
    samples = get_task("shapes-caption").generate("test", 4, seed=0)
    prompts, images = [sample_prompt(s) for s in samples], [s.images for s in samples]
    ar = models["tiny-dvlm"].generate(prompts, images, decoder="ar", max_new_tokens=64)
    for block_size in (4, 16):
        spec = models["tiny-dvlm"].generate(prompts, images, decoder=decoder, block_size=block_size,
                                            max_new_tokens=64)
        assert [o.tokens for o in spec] == [o.tokens for o in ar]


def test_builtin_dvlm_decodes_several_tokens_per_forward_on_captions(models):
    result = evaluate(models["tiny-dvlm"], "shapes-caption", limit=8, decoder="block", batch_size=8,
                      block_size=16, threshold=0.9, progress=False)
    assert result.speed["tokens_per_nfe"] > 2.0


def test_builtin_names_resolve_everywhere(models):
    assert models["tiny-dvlm"].diffusion is not None and models["tiny-ar"].diffusion is None
    with pytest.raises(FileNotFoundError, match="built-in"):
        dvlm.load("tiny-nothing")


def test_builtin_names_are_names_not_paths(tmp_path, monkeypatch):
    """D24: "../weights/tiny-ar" must not resolve inside the package."""
    monkeypatch.chdir(tmp_path)
    for name in ("../weights/tiny-ar", "./tiny-ar/../tiny-ar", "tiny-ar/"):
        with pytest.raises(FileNotFoundError, match="no such directory and no built-in model"):
            dvlm.load(name)


def test_the_plain_call_is_the_harness_chat(models):
    """Issue 8 §1: `generate("Read the digits.", images=[img])` is the chat the models trained on, so it
    answers exactly as the harness does, at the card's accuracy."""
    samples = get_task("digits-read").generate("test", 16, seed=3)
    images = [s.images for s in samples]
    for name, decoder in (("tiny-ar", "ar"), ("tiny-dvlm", "block")):
        plain = models[name].generate(["Read the digits."] * len(samples), images, decoder=decoder, max_new_tokens=24)
        harness = models[name].generate([sample_prompt(s) for s in samples], images, decoder=decoder,
                                         max_new_tokens=24)
        assert [o.tokens for o in plain] == [o.tokens for o in harness]
        digits = [score("digits-read", o.text, s)["digit_accuracy"] for o, s in zip(plain, samples)]
        assert sum(digits) / len(digits) >= 0.9, name


@pytest.mark.parametrize("name,decoder,task,question", [
    ("tiny-ar", "ar", "digits-read", "Read the digits."),
    ("tiny-dvlm", "block", "shapes-caption", "Describe the image."),
])
def test_dvlm_generate_on_a_saved_image(capsys, tmp_path, name, decoder, task, question):
    """What a newcomer types after the demo: `dvlm generate --image example.png --prompt ...`."""
    from dvlm.cli import main

    sample = _first(task)
    sample.images[0].save(tmp_path / "x.png")
    code = main(["generate", "--model", name, "--decoder", decoder, "--image", str(tmp_path / "x.png"),
                 "--prompt", question])
    out = capsys.readouterr()
    assert code == 0 and out.err == ""
    assert out.out.strip() == sample.answers[-1]
