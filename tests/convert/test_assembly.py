"""`dvlm assemble` (a causal LM + a vision tower -> an AR VLM) and projector-only alignment, on tiny
random parts built here; the whole LM -> dVLM route end to end through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2ForCausalLM, SiglipVisionModel

import dvlm
from dvlm.config import ConfigError, TrainConfig
from dvlm.convert.assembly import assemble_checkpoint
from dvlm.data.tokenizer import load_tokenizer
from dvlm.model.adapters.registry import adapter_for_architecture, assembling_architectures
from dvlm.model.loaded import LoadedModel
from dvlm.tasks.builtin import export_llava, get_task
from dvlm.train.loop import train
from tests.convert.assembly_parts import build_language_model, build_vision_tower
from tests.test_cli import one_line_error, run

ARCHITECTURE = "LlavaOnevisionForConditionalGeneration"
NEW_TOKENS = ["<image>", "<video>"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("parts")
    return build_language_model(root / "lm"), build_vision_tower(root / "vision")


@pytest.fixture(scope="module")
def assembled(tmp_path_factory, parts) -> Path:
    out = tmp_path_factory.mktemp("assembled") / "vlm"
    assemble_checkpoint(*parts, out, seed=0, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Four single-image samples: every step of a batch-4 run sees the same batch."""
    return export_llava(get_task("shapes-qa").generate("train", 4, seed=0), tmp_path_factory.mktemp("data"))


def test_only_the_llava_family_assembles():
    assert assembling_architectures() == [ARCHITECTURE]


# -- the assembled checkpoint -------------------------------------------------------------------------
def test_the_parts_weights_are_copied_bit_for_bit(parts, assembled):
    lm_dir, vision_dir = parts
    source_lm = Qwen2ForCausalLM.from_pretrained(lm_dir).state_dict()
    source_tower = SiglipVisionModel.from_pretrained(vision_dir).state_dict()
    model = dvlm.load(assembled, dtype="float32").model
    old_rows = len(load_tokenizer(lm_dir))
    language = model.model.language_model.state_dict()
    for name, tensor in source_lm.items():
        copy = model.lm_head.weight if name == "lm_head.weight" else language[name.removeprefix("model.")]
        rows = slice(None, old_rows) if "embed_tokens" in name or "lm_head" in name else slice(None)
        assert torch.equal(copy[rows], tensor[rows]), name
    tower = model.model.vision_tower.state_dict()
    copied = {name: t for name, t in source_tower.items() if not name.startswith("head.")}  # the head is left out
    assert set(tower) == set(copied)
    assert all(torch.equal(tower[name], t) for name, t in copied.items())


def test_the_tokenizer_gains_the_chat_tokens_with_mean_rows(parts, assembled):
    old = load_tokenizer(parts[0])
    lm = dvlm.load(assembled, dtype="float32")
    vocab = lm.processor.tokenizer.get_vocab()
    assert all(vocab[token] == i for token, i in old.get_vocab().items())  # old ids unchanged
    new_ids = [vocab[t] for t in NEW_TOKENS]
    assert sorted(new_ids) == [len(old), len(old) + 1]
    table = lm.model.get_input_embeddings().weight
    assert table.shape[0] == len(old) + 2  # the table grew to hold them
    assert torch.allclose(table[new_ids], table[: len(old)].mean(0).expand(2, -1))
    config = json.loads((assembled / "config.json").read_text())
    assert config["image_token_index"] == vocab["<image>"] and config["video_token_index"] == vocab["<video>"]
    assert "<|im_start|>" in lm.processor.tokenizer.chat_template


def test_text_only_logits_equal_the_language_models(parts, assembled):
    """The assembled model on text is the language model it was made of (the old vocabulary's logits)."""
    tokenizer = load_tokenizer(parts[0])
    ids = torch.tensor([tokenizer("what colour is the circle ?")["input_ids"]])
    source = Qwen2ForCausalLM.from_pretrained(parts[0]).eval()
    model = dvlm.load(assembled, dtype="float32").model
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        got = model(input_ids=ids).logits[..., : expected.shape[-1]]
    assert torch.equal(got, expected)


def test_the_assembled_model_round_trips_through_load_and_generates(assembled, image):
    lm = dvlm.load(assembled)
    assert lm.diffusion is None  # an AR VLM until `dvlm convert`
    out = lm.generate("What is in the picture?", [image], max_new_tokens=4)
    assert out.decoder == "ar" and out.num_tokens == 4 and out.prompt_tokens > 20  # the image's tokens are there


def test_the_projector_is_seeded(parts, tmp_path):
    adapter = adapter_for_architecture(ARCHITECTURE)

    def projector(seed: int) -> torch.Tensor:
        model = adapter.assemble(*parts, seed, None, lambda _: None).model
        return torch.cat([p.detach().flatten() for p in adapter.projector_parameters(model)])

    assert torch.equal(projector(3), projector(3))
    assert not torch.equal(projector(3), projector(4))


def test_an_untied_language_model_keeps_its_own_output_rows(tmp_path, parts):
    lm_dir = build_language_model(tmp_path / "untied", tied=False)
    adapter = adapter_for_architecture(ARCHITECTURE)
    model = adapter.assemble(lm_dir, parts[1], 0, None, lambda _: None).model
    source = Qwen2ForCausalLM.from_pretrained(lm_dir)
    old = source.lm_head.weight.shape[0]
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight[:old], source.lm_head.weight)
    assert torch.allclose(model.lm_head.weight[old:], source.lm_head.weight.mean(0).expand(2, -1))


# -- refusals: one line, exit 2, nothing written ------------------------------------------------------
def refused(capsys, tmp_path, *argv) -> str:
    out = tmp_path / "never"
    capsys.readouterr()  # what the test printed while preparing
    code, _, err = run(capsys, "assemble", *argv, "--out", out)
    assert code == 2 and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".never")] == []
    return one_line_error(err, "assemble")


def test_missing_part_is_refused(capsys, tmp_path, parts):
    assert "--lm" in refused(capsys, tmp_path, "--lm", tmp_path / "nope", "--vision", parts[1])


def test_parts_of_other_architectures_are_refused(capsys, tmp_path, parts):
    line = refused(capsys, tmp_path, "--lm", parts[1], "--vision", parts[1])
    assert "SiglipVisionModel" in line and "Qwen2ForCausalLM" in line
    assert "--vision" in refused(capsys, tmp_path, "--lm", parts[0], "--vision", parts[0])


def test_weights_that_are_not_safetensors_are_refused(capsys, tmp_path, parts):
    pickled = tmp_path / "pickled"
    model = SiglipVisionModel.from_pretrained(parts[1])
    model.config.save_pretrained(pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert "safetensors" in refused(capsys, tmp_path, "--lm", parts[0], "--vision", pickled)


def test_an_unknown_architecture_is_refused(capsys, tmp_path, parts):
    line = refused(capsys, tmp_path, "--lm", parts[0], "--vision", parts[1], "--architecture", "Nope")
    assert ARCHITECTURE in line


def test_a_non_empty_output_is_refused_without_overwrite(capsys, tmp_path, parts):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "assemble", "--lm", parts[0], "--vision", parts[1], "--out", out)
    assert code == 2 and "--overwrite" in one_line_error(err, "assemble")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# -- projector-only training ----------------------------------------------------------------------------
def test_projector_parameters_are_neither_vision_nor_language(adapter, ar_checkpoint):
    """Every family: the generic default finds the projector (and nothing of the tower or the LM)."""
    model = LoadedModel.load(ar_checkpoint).model
    projector = {id(p) for p in adapter.projector_parameters(model)}
    names = [name for name, p in model.named_parameters() if id(p) in projector]
    assert names and all("vision_tower.encoder" not in n and "language_model" not in n and "lm_head" not in n
                         for n in names)
    assert projector.isdisjoint(id(p) for p in adapter.vision_parameters(model))


def test_trainable_projector_refuses_a_vision_learning_rate():
    with pytest.raises(ConfigError, match="vision_learning_rate"):
        TrainConfig(trainable="projector", vision_learning_rate=1e-5)
    with pytest.raises(ConfigError, match="trainable"):
        TrainConfig(trainable="lm")


def test_projector_training_changes_only_the_projector(assembled, data, tmp_path):
    cfg = TrainConfig(max_steps=6, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, objective="autoregressive",
                      trainable="projector")
    result = train(assembled, data, tmp_path / "run", cfg, progress=False, device="cpu")
    before = dvlm.load(assembled, dtype="float32").model.state_dict()
    after = dvlm.load(result.model_dir, dtype="float32").model.state_dict()
    changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
    assert changed and all(name.startswith(("model.multi_modal_projector.", "model.image_newline")) for name in changed)
    assert result.losses[-1] < result.losses[0]


# -- the whole route ------------------------------------------------------------------------------------
def test_language_model_to_dvlm_end_to_end(capsys, tmp_path, parts, data):
    """assemble -> align the projector (AR) -> convert -> diffusion training -> block decoding."""
    vlm, aligned, dvlm_dir, tuned = (tmp_path / name for name in ("vlm", "aligned", "dvlm", "tuned"))
    code, out, _ = run(capsys, "assemble", "--lm", parts[0], "--vision", parts[1], "--out", vlm)
    assert code == 0 and "verified" in out and "<image>, <video>" in out
    code, out, _ = run(capsys, "train", "--model", vlm, "--data", data, "--out", aligned, "--ar",
                       "--trainable", "projector", "--steps", 6, "--batch-size", 4, "--lr", 1e-2, "--set",
                       "warmup_ratio=0", "--device", "cpu")
    assert code == 0
    losses = [json.loads(line)["loss"] for line in (aligned / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    code, out, _ = run(capsys, "convert", "--model", aligned / "model", "--out", dvlm_dir, "--block-size", 4)
    assert code == 0 and "verified" in out
    code, out, _ = run(capsys, "train", "--model", dvlm_dir, "--data", data, "--out", tuned, "--steps", 2,
                       "--batch-size", 2, "--device", "cpu")
    assert code == 0
    image_file = data.parent / json.loads(data.read_text())[0]["image"]
    code, out, _ = run(capsys, "generate", "--model", tuned / "model", "--image", image_file, "--prompt",
                       "What colour is the shape?", "--decoder", "block", "--max-new-tokens", 8, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["decoder"] == "block" and result["num_tokens"] > 0 and result["nfe"] > 0
