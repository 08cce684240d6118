"""The facade users call: dvlm.load and DVLM.generate on hostile or unusual input."""

import json
import re
import shutil
import warnings

import pytest
import torch

import dvlm
from dvlm.api import PositionLimitWarning, PromptError
from dvlm.data.chat import IMAGE_PLACEHOLDER
from dvlm.model.checkpoint_files import CheckpointError


@pytest.fixture(scope="module")
def lm(fast_checkpoint):
    return dvlm.load(fast_checkpoint)


@pytest.fixture(scope="module")
def ar(ar_checkpoint):
    return dvlm.load(ar_checkpoint)


def test_hf_decoder_without_images_equals_ar(ar):
    """D4: decoder='hf' crashed inside transformers on every prompt without images."""
    hf = ar.generate("Read the digits.", decoder="hf", max_new_tokens=6)
    assert hf.tokens == ar.generate("Read the digits.", decoder="ar", max_new_tokens=6).tokens


def test_hf_seed_leaves_the_callers_rng_alone(ar):
    """D25: decoder='hf' with a seed reset the global torch RNG; the output stays reproducible."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = ar.generate("Read the digits.", decoder="hf", temperature=1.0, seed=3, max_new_tokens=6)
    assert torch.equal(torch.rand(3), expected)
    again = ar.generate("Read the digits.", decoder="hf", temperature=1.0, seed=3, max_new_tokens=6)
    assert again.tokens == first.tokens


def test_a_single_image_may_be_given_bare(lm, image, tmp_path):
    """D13: images="a.png" was iterated character by character ("cannot load image /")."""
    image.save(tmp_path / "a.png")
    listed = lm.generate("Read the digits.", images=[str(tmp_path / "a.png")], max_new_tokens=4)
    for bare in (str(tmp_path / "a.png"), tmp_path / "a.png", image):
        assert lm.generate("Read the digits.", images=bare, max_new_tokens=4).tokens == listed.tokens
    with pytest.raises(ValueError, match="one image list"):
        lm.generate(["a", "b"], images=image)


def test_a_dict_is_not_a_batch(lm):
    """D14: generate(dict) decoded the dict's keys as a batch of prompts."""
    with pytest.raises(ValueError, match=r"not one dict; wrap a single message in a list"):
        lm.generate({"role": "user", "content": "hi"})
    for bad in ([], None, 42):
        with pytest.raises(ValueError, match="prompts must be"):
            lm.generate(bad)


def test_batch_errors_name_the_prompt(lm, image, tmp_path):
    with pytest.raises(PromptError, match=r"^prompt 1: cannot load image .*nope\.png: file not found"):
        lm.generate(["Read the digits.", "Describe."], images=[[image], [str(tmp_path / "nope.png")]])


def special_tokens(lm) -> list[str]:
    """Every special token of the model's tokenizer but the image placeholder (which stands for an image)."""
    added = lm.processor.tokenizer.added_tokens_decoder.values()
    return sorted({t.content for t in added if t.special} - {IMAGE_PLACEHOLDER})


def test_special_tokens_in_prompt_text_are_refused(lm):
    """D15: added special tokens typed as text became control tokens. Every one of the family's."""
    tokens = special_tokens(lm)
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"} <= set(tokens)
    for token in tokens:
        with pytest.raises(ValueError, match=f"special token '{re.escape(token)}'"):
            lm.generate(f"Read {token} the digits.")
        with pytest.raises(ValueError, match="special token"):
            lm.generate([{"role": "system", "content": f"be {token}"}, {"role": "user", "content": "hi"}])


def test_positions_beyond_the_model_warn_or_fail(lm):
    """N1: prompt + max_new_tokens beyond max_position_embeddings went unnoticed."""
    limit = lm.model.config.get_text_config().max_position_embeddings
    near_the_end = " ".join(["the"] * (limit - 40))  # a few positions left: a short, cheap answer
    with pytest.warns(PositionLimitWarning, match=f"past the model's {limit}"):
        lm.generate(near_the_end, decoder="ar", max_new_tokens=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.generate("Read the digits.", decoder="ar", max_new_tokens=4)
    words = " ".join(["the"] * limit)
    with pytest.raises(ValueError, match=f"positions; the model has {limit}"):
        lm.generate(words, decoder="ar", max_new_tokens=4)


def test_load_follows_the_checkpoints_dtype(ar, tmp_path, monkeypatch):
    """4b: a bf16 checkpoint ran in float32 unless --dtype was given (on a CPU with bfloat16
    instructions; tests/test_runtime.py covers the others)."""
    monkeypatch.setattr("dvlm.runtime.cpu_has_fast_bf16", lambda: True)
    path = tmp_path / "bf16"
    ar.model.to(torch.bfloat16).save_pretrained(path)
    ar.model.to(torch.float32)
    ar.processor.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert dvlm.load(path).model.dtype == torch.bfloat16
    assert dvlm.load(path, dtype="float32").model.dtype == torch.float32
    assert ar.model.dtype == torch.float32  # an fp32 checkpoint stays fp32


@pytest.fixture
def copy_of(tmp_path):
    def copy(source):
        target = tmp_path / "copy"
        shutil.copytree(source, target)
        return target
    return copy


def test_damaged_checkpoints_give_clear_errors(copy_of, ar_checkpoint):
    """D12: these were raw tracebacks; each error names the file at fault."""
    path = copy_of(ar_checkpoint)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        dvlm.load(path)
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable"):
        dvlm.load(path)
    weights.unlink()
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"no \.safetensors weights \(found pytorch_model\.bin\)"):
        dvlm.load(path)
    weights.write_bytes(data)
    (path / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        dvlm.load(path)


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", r"config\.json must hold a JSON object, not list"),
    ("{not json", r"config\.json is not valid JSON"),
])
def test_bad_config_json(copy_of, ar_checkpoint, content, match):
    path = copy_of(ar_checkpoint)
    (path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=match):
        dvlm.load(path)


def test_bad_dvlm_section_names_the_file(copy_of, fast_checkpoint):
    path = copy_of(fast_checkpoint)
    config = json.loads((path / "config.json").read_text())
    config["dvlm"]["decode_steps"] = 2.5  # D3: accepted and saved, every later decode hung
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json, section 'dvlm': DiffusionConfig\.decode_steps=2\.5"):
        dvlm.load(path)


def test_missing_tokenizer_is_named_as_such(copy_of, ar_checkpoint):
    """D18: a checkpoint without tokenizer files was reported as 'lacks special tokens'."""
    path = copy_of(ar_checkpoint)
    (path / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        dvlm.load(path)
