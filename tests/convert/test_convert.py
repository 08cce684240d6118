"""`dvlm convert`: lossless conversion (invariant 1), the mask token, round trips, bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoTokenizer,
)

import dvlm
from dvlm.config import ConfigError, DiffusionConfig
from dvlm.convert import conversion as convert_module
from dvlm.convert.conversion import REPORT_FILE, ConversionError, convert_checkpoint
from dvlm.convert.verify import causal_logits, max_logit_difference, probe_input
from dvlm.data.collate import collate
from dvlm.model.adapters.registry import UnsupportedArchitectureError
from tests.convert.sources import SHAPE, build_checkpoint, quiet

PRESETS = ("fast-dvlm", "diffusionvl")
MASK_TOKEN = "<|mask|>"


def tables(model) -> tuple[torch.Tensor, torch.Tensor]:
    return model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()


def assert_nothing_written(out: Path, before: set[Path]) -> None:
    """`out` does not exist and its parent holds exactly what it held before (no temp dirs)."""
    assert not out.exists()
    assert set(out.parent.iterdir()) == before


@pytest.fixture(scope="module")
def source(ar_checkpoint):
    return dvlm.load(ar_checkpoint)


@pytest.fixture(scope="module")
def converted(dvlm_checkpoints):
    return {preset: dvlm.load(path) for preset, path in dvlm_checkpoints.items()}


@pytest.fixture(scope="module")
def probe(source):
    sample = probe_input(source.processor)
    assert int(sample.mm_token_type_ids.sum()) > 0  # the probe exercises the vision path
    return sample


def hf_forward_logits(lm, sample) -> torch.Tensor:
    """(L, V) logits of the HF model's own forward (its own masks and positions), given the inputs
    the family's HF generate takes (vision tensors, token types...)."""
    batch = collate([sample], lm.processor.pad_token_id)
    with torch.inference_mode():
        out = lm.model(input_ids=batch.input_ids, **lm.adapter.hf_generate_inputs(batch))
    return out.logits[0].float()


# -- invariant 1: conversion is lossless ----------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_converted_causal_logits_equal_source(source, converted, probe, preset):
    dvlm_model = converted[preset]
    pad = source.processor.pad_token_id
    reference = causal_logits(source.adapter, source.model, probe, pad)
    logits = causal_logits(dvlm_model.adapter, dvlm_model.model, probe, pad)
    assert logits.shape == (len(probe), reference.shape[-1] + 1)  # one new column: the mask token
    assert reference.std() > 0.1  # a random model with real, varied logits
    assert max_logit_difference(reference, logits, [dvlm_model.mask_token_id]) <= 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_converted_hf_forward_logits_equal_source(source, converted, probe, preset):
    """Independent of dvlm's seams: HF's own forward of source and converted models agree."""
    reference = hf_forward_logits(source, probe)
    logits = hf_forward_logits(converted[preset], probe)
    vocab = reference.shape[-1]
    torch.testing.assert_close(logits[:, :vocab], reference, rtol=0, atol=1e-5)


def test_verify_causal_logits_match_hf_forward(source, probe):
    """dvlm's causal forward (own masks, own M-RoPE positions) is the HF model's forward."""
    ours = causal_logits(source.adapter, source.model, probe, source.processor.pad_token_id)
    torch.testing.assert_close(ours, hf_forward_logits(source, probe), rtol=1e-4, atol=1e-4)


# -- the mask token ----------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_mask_token_is_in_saved_tokenizer_with_config_id(dvlm_checkpoints, tokenizer, preset):
    path = dvlm_checkpoints[preset]
    saved = AutoTokenizer.from_pretrained(path, local_files_only=True)
    config = json.loads((path / "config.json").read_text())
    assert MASK_TOKEN not in tokenizer.get_vocab()  # so conversion had to add it
    assert saved.get_vocab()[MASK_TOKEN] == config["dvlm"]["mask_token_id"] == len(tokenizer)
    assert saved.tokenize(f"a {MASK_TOKEN} b").count(MASK_TOKEN) == 1  # one special token, not split


@pytest.mark.parametrize("preset", PRESETS)
def test_mask_embedding_row_is_mean_of_source_rows(source, converted, preset):
    mask_id = converted[preset].mask_token_id
    src_in, _ = tables(source.model)
    new_in, new_out = tables(converted[preset].model)
    assert new_in.shape[0] == src_in.shape[0] + 1 == mask_id + 1
    expected = src_in.sum(dim=0, dtype=torch.float64) / src_in.shape[0]
    torch.testing.assert_close(new_in[mask_id].double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(new_out[mask_id].double(), expected, rtol=0, atol=1e-6)  # tied head
    assert torch.equal(new_in[:mask_id], src_in)  # every other row untouched


@pytest.mark.parametrize("preset", PRESETS)
def test_eos_and_pad_ids_in_config_come_from_tokenizer(dvlm_checkpoints, tokenizer, preset):
    recipe = json.loads((dvlm_checkpoints[preset] / "config.json").read_text())["dvlm"]
    im_end = tokenizer.get_vocab()["<|im_end|>"]
    assert recipe["eos_token_ids"][0] == im_end
    assert set(recipe["eos_token_ids"]) == {im_end, tokenizer.eos_token_id}
    assert recipe["pad_token_id"] == tokenizer.pad_token_id != -1


@pytest.mark.parametrize("preset", PRESETS)
def test_config_json_holds_every_diffusion_field(dvlm_checkpoints, preset):
    recipe = json.loads((dvlm_checkpoints[preset] / "config.json").read_text())["dvlm"]
    assert set(recipe) == {f.name for f in dataclasses.fields(DiffusionConfig)}
    assert recipe["preset"] == preset
    assert DiffusionConfig(**recipe).to_dict() == recipe  # valid as stored


@pytest.mark.parametrize("preset", PRESETS)
def test_report_file_describes_conversion(dvlm_checkpoints, ar_checkpoint, preset):
    path = dvlm_checkpoints[preset]
    report = json.loads((path / REPORT_FILE).read_text())
    recipe = json.loads((path / "config.json").read_text())["dvlm"]
    assert report["source"] == str(ar_checkpoint)
    assert report["preset"] == preset
    assert report["mask_token_id"] == recipe["mask_token_id"]
    assert report["block_size"] == recipe["block_size"]
    assert report["mask_row"] == "resized"
    assert (report["dtype"], report["shards"]) == ("float32", 1)
    assert report["max_logit_difference"] <= report["tolerance"]


def test_spare_embedding_row_is_used_without_resizing(tmp_path, tokenizer, adapter):
    src = build_checkpoint(tmp_path / "padded", tokenizer, adapter=adapter, extra_rows=8)
    report = convert_checkpoint(src, tmp_path / "out", log=quiet)
    assert report.mask_row == "spare"
    assert report.mask_token_id == len(tokenizer)
    src_in, _ = tables(dvlm.load(src).model)
    new_in, new_out = tables(dvlm.load(tmp_path / "out").model)
    assert new_in.shape == src_in.shape == (len(tokenizer) + 8, SHAPE.hidden_size)
    real = src_in[: len(tokenizer)]  # spare rows are not tokens: they stay out of the mean
    expected = real.sum(dim=0, dtype=torch.float64) / real.shape[0]
    torch.testing.assert_close(new_in[report.mask_token_id].double(), expected, rtol=0, atol=1e-6)
    others = torch.arange(new_in.shape[0]) != report.mask_token_id
    assert torch.equal(new_in[others], src_in[others])


def test_untied_output_row_is_mean_initialised_too(tmp_path, tokenizer, adapter):
    src = build_checkpoint(tmp_path / "untied", tokenizer, adapter=adapter, tied=False)
    report = convert_checkpoint(src, tmp_path / "out", log=quiet)
    src_in, src_out = tables(dvlm.load(src).model)
    new_in, new_out = tables(dvlm.load(tmp_path / "out").model)
    assert new_out.data_ptr() != new_in.data_ptr()
    mask_id = report.mask_token_id
    torch.testing.assert_close(new_in[mask_id].double(), src_in.double().mean(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(new_out[mask_id].double(), src_out.double().mean(0), rtol=0, atol=1e-6)
    assert torch.equal(new_out[:mask_id], src_out)


# -- round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_save_and_reload_round_trips_weights_and_recipe(tmp_path, converted, preset):
    first = converted[preset]
    first.model.save_pretrained(tmp_path / "again", safe_serialization=True)
    first.processor.save_pretrained(tmp_path / "again")
    second = dvlm.load(tmp_path / "again")
    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert second.diffusion == first.diffusion
    assert second.diffusion.mask_token_id == second.processor.tokenizer.get_vocab()[MASK_TOKEN]


def test_converted_checkpoint_loads_offline_without_remote_code(monkeypatch, fast_checkpoint, ar_checkpoint, adapter):
    def no_network(*args, **kwargs):
        raise AssertionError("loading a converted checkpoint touched the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    config = json.loads((fast_checkpoint / "config.json").read_text())
    assert "auto_map" not in config  # no custom code to trust
    source = json.loads((ar_checkpoint / "config.json").read_text())
    assert AutoConfig.from_pretrained(fast_checkpoint).model_type == source["model_type"]
    plain = AutoModelForImageTextToText.from_pretrained(fast_checkpoint)  # trust_remote_code not given
    assert type(plain).__name__ == source["architectures"][0]
    assert type(plain).__name__ in adapter.architectures
    assert plain.config.dvlm["mask_token_id"] == config["dvlm"]["mask_token_id"]
    assert dvlm.load(fast_checkpoint).diffusion.mask_token_id == config["dvlm"]["mask_token_id"]


# -- recipe settings -------------------------------------------------------------------------------


def test_block_size_argument_lands_in_config(tmp_path, ar_checkpoint):
    report = convert_checkpoint(ar_checkpoint, tmp_path / "out", block_size=4, log=quiet)
    assert report.block_size == 4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dvlm"]["block_size"] == 4
    assert dvlm.load(tmp_path / "out").diffusion.block_size == 4


def test_overrides_land_in_config(tmp_path, ar_checkpoint):
    convert_checkpoint(ar_checkpoint, tmp_path / "out", overrides={"anneal_block_size": False}, log=quiet)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dvlm"]["anneal_block_size"] is False


def test_diffusionvl_preset_sets_its_recipe(converted):
    recipe = converted["diffusionvl"].diffusion
    assert recipe.preset == "diffusionvl"
    assert recipe.block_size == 8
    assert recipe.block_layout == "absolute"
    assert recipe.clean_attention == "block_causal"
    assert recipe.noisy_stream == "all"
    assert recipe.token_shift is False
    assert recipe.t_sampling == "antithetic"
    assert recipe.complementary_mask is False
    assert recipe.loss_weighting == "inverse_t"
    assert recipe.ar_loss_weight == 0.0
    assert recipe.anneal_block_size is False
    assert recipe.decode_threshold is None and recipe.decode_steps == 8


def test_fast_dvlm_preset_sets_its_recipe(converted):
    recipe = converted["fast-dvlm"].diffusion
    assert recipe.preset == "fast-dvlm"
    assert recipe.block_size == 16
    assert recipe.block_layout == "response"
    assert recipe.clean_attention == "causal"
    assert recipe.noisy_stream == "response"
    assert recipe.token_shift is True
    assert recipe.complementary_mask is True
    assert recipe.diffusion_loss_weight == recipe.ar_loss_weight == 0.5
    assert recipe.anneal_block_size is True


# -- bad input writes nothing ----------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def missing_dir(tmp: Path, ar: Path) -> Path:
    return tmp / "nowhere"


def a_file(tmp: Path, ar: Path) -> Path:
    (tmp / "model.safetensors").write_bytes(b"not a directory")
    return tmp / "model.safetensors"


def no_config(tmp: Path, ar: Path) -> Path:
    src = copy_checkpoint(ar, tmp / "src")
    (src / "config.json").unlink()
    return src


def unsupported_architecture(tmp: Path, ar: Path) -> Path:
    src = copy_checkpoint(ar, tmp / "src")
    edit_config(src, architectures=["LlamaForCausalLM"])
    return src


def no_architectures(tmp: Path, ar: Path) -> Path:
    src = copy_checkpoint(ar, tmp / "src")
    edit_config(src, architectures=[])
    return src


def only_pytorch_bin(tmp: Path, ar: Path) -> Path:
    src = copy_checkpoint(ar, tmp / "src")
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    return src


@pytest.mark.parametrize(
    ("make_source", "error", "match"),
    [
        (missing_dir, FileNotFoundError, "does not exist"),
        (a_file, NotADirectoryError, "not a directory"),
        (no_config, FileNotFoundError, "config.json"),
        (unsupported_architecture, UnsupportedArchitectureError, "Qwen2_5_VLForConditionalGeneration"),
        (no_architectures, UnsupportedArchitectureError, "names no architectures"),
        (only_pytorch_bin, ValueError, "pytorch_model.bin"),
    ],
)
def test_bad_source_raises_and_writes_nothing(tmp_path, ar_checkpoint, make_source, error, match):
    src = make_source(tmp_path, ar_checkpoint)
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    with pytest.raises(error, match=match):
        convert_checkpoint(src, out, log=quiet)
    assert_nothing_written(out, before)


def test_already_converted_source_is_rejected(tmp_path, fast_checkpoint):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="already a converted dVLM"):
        convert_checkpoint(fast_checkpoint, out, log=quiet)
    assert_nothing_written(out, set())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"preset": "nope"}, "unknown preset"),
        ({"overrides": {"block_layout": "nope"}}, "block_layout"),
        ({"overrides": {"no_such_key": 1}}, "no_such_key"),
        ({"block_size": 0}, "block_size"),
        ({"preset": "diffusionvl", "overrides": {"token_shift": True}}, "token_shift"),
    ],
)
def test_invalid_recipe_raises_config_error_and_writes_nothing(tmp_path, ar_checkpoint, options, match):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=match):
        convert_checkpoint(ar_checkpoint, out, log=quiet, **options)
    assert_nothing_written(out, set())


def test_non_empty_output_needs_overwrite(tmp_path, ar_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_checkpoint(ar_checkpoint, out, log=quiet)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp dir left beside it
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    convert_checkpoint(ar_checkpoint, out, overwrite=True, log=quiet)
    assert not (out / "keep.txt").exists()
    assert dvlm.load(out).diffusion is not None
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_empty_output_dir_is_used(tmp_path, ar_checkpoint):
    (tmp_path / "out").mkdir()
    convert_checkpoint(ar_checkpoint, tmp_path / "out", log=quiet)
    assert (tmp_path / "out" / REPORT_FILE).is_file()


def test_output_that_is_a_file_is_rejected(tmp_path, ar_checkpoint):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(FileExistsError, match="not a directory"):
        convert_checkpoint(ar_checkpoint, tmp_path / "out", overwrite=True, log=quiet)
    assert (tmp_path / "out").read_text() == "a file"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_verification_raises_and_writes_nothing(tmp_path, monkeypatch, ar_checkpoint):
    monkeypatch.setattr(convert_module, "max_logit_difference", lambda *args: 1.0)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match="differs from the source"):
        convert_checkpoint(ar_checkpoint, out, log=quiet)
    assert_nothing_written(out, set())


def test_failed_verification_keeps_existing_output(tmp_path, monkeypatch, ar_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    monkeypatch.setattr(convert_module, "max_logit_difference", lambda *args: 1.0)
    with pytest.raises(ConversionError):
        convert_checkpoint(ar_checkpoint, out, overwrite=True, log=quiet)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("where", ["same", "ancestor"])
def test_output_may_not_replace_source(tmp_path, ar_checkpoint, where):
    src = copy_checkpoint(ar_checkpoint, tmp_path / "models" / "ar")
    out = src if where == "same" else src.parent
    with pytest.raises((ValueError, FileExistsError), match="source"):
        convert_checkpoint(src, out, overwrite=True, log=quiet)
    assert "dvlm" not in json.loads((src / "config.json").read_text())
