"""The shipped built-in models: present, loadable by name, and actually trained."""

import pytest

import dvlm
from dvlm.eval.harness import sample_prompt
from dvlm.zoo.registry import builtin_names
from dvlm.zoo.tasks import get_task

pytestmark = pytest.mark.skipif(
    not {"tiny-ar", "tiny-dvlm"} <= set(builtin_names()), reason="built-in weights not installed"
)


@pytest.fixture(scope="module")
def models():
    return {name: dvlm.load(name) for name in ("tiny-ar", "tiny-dvlm")}


def _first(task):
    return get_task(task).generate("test", 1, seed=0)[0]


@pytest.mark.parametrize("task", ["shapes-qa", "shapes-caption", "digits-read"])
@pytest.mark.parametrize("name,decoder", [("tiny-ar", "ar"), ("tiny-dvlm", "block"), ("tiny-dvlm", "spec")])
def test_builtin_models_answer_a_fixed_test_example(models, task, name, decoder):
    sample = _first(task)
    out = models[name].generate(sample_prompt(sample), sample.images, decoder=decoder, max_new_tokens=96)
    assert out.text == sample.answers[-1]


def test_builtin_dvlm_decodes_several_tokens_per_forward_on_captions(models):
    sample = _first("shapes-caption")
    out = models["tiny-dvlm"].generate(sample_prompt(sample), sample.images, decoder="block", block_size=16,
                                       threshold=0.9)
    assert out.tokens_per_nfe > 1.5


def test_builtin_names_resolve_everywhere(models):
    assert models["tiny-dvlm"].diffusion is not None and models["tiny-ar"].diffusion is None
    with pytest.raises(FileNotFoundError, match="built-in"):
        dvlm.load("tiny-nothing")
