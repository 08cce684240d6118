"""A checkpoint laid out as published, file by file: the chat template found where transformers
finds it, LLaVA-OneVision's prompt at its real tile geometry for the images users send (against
transformers' image processor and processor counting), and one-line refusals of what cannot run
(a missing processor file, an M-RoPE split that does not fit the heads, a Qwen3-VL MoE checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import dvlm
from dvlm.cli import main
from dvlm.convert.conversion import convert_checkpoint
from dvlm.data.template import ChatTemplate, TemplateError, find_chat_template
from dvlm.model.adapters.registry import (
    UnsupportedArchitectureError,
    adapter_for_architecture,
    adapter_for_checkpoint,
)
from dvlm.model.checkpoint_files import CheckpointError
from tests.model.adapters.published import (
    FAMILIES,
    llava_onevision,
    qwen2_5_vl,
    qwen3_vl,
    with_values,
    write_checkpoint,
    write_processor_files,
)
from tests.model.adapters.reference import reference_inputs

QUESTION = "Describe the image."

USER_IMAGES = {  # (width, height)
    "a 640x480 photo": (640, 480),
    "a tall document page (A4 at 150 dpi)": (1240, 1754),
    "a wide screenshot": (1920, 1080),
}


@pytest.fixture(scope="module")
def llava_files(tmp_path_factory) -> Path:
    return write_processor_files(llava_onevision(), tmp_path_factory.mktemp("llava") / "model")


@pytest.mark.parametrize("name", USER_IMAGES)
def test_llava_onevision_prompt_at_the_published_geometry(llava_files, name):
    """384 px tiles, anyres_max_9 and the 6x6 pinpoints as published: the whole prompt (image tokens
    included) == transformers' (its LlavaOnevision image processor + the processor's counting)."""
    image = Image.new("RGB", USER_IMAGES[name], (90, 120, 200))
    processor = adapter_for_checkpoint(llava_files).load_processor(llava_files)
    ours = processor.encode(QUESTION, [image], add_generation_prompt=True)
    reference = reference_inputs(llava_files, llava_onevision(), [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": QUESTION}]}], [image])["input_ids"][0].tolist()
    assert ours.input_ids.tolist() == reference
    if name == "a 640x480 photo":  # the count the issue measured with transformers' processor
        assert int(ours.mm_token_type_ids.sum()) == 2929


def test_llava_onevision_prompt_has_no_system_turn(llava_files):
    """The llava-hf template: no system turn, a space after the role, no line break between turns."""
    processor = adapter_for_checkpoint(llava_files).load_processor(llava_files)
    ids = processor.encode(QUESTION, add_generation_prompt=True).input_ids.tolist()
    assert processor.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user \nDescribe the image.<|im_end|><|im_start|>assistant\n")


def test_the_template_is_found_where_transformers_finds_it(tmp_path):
    """processor_config.json, then chat_template.json, then chat_template.jinja, then the tokenizer's."""
    published = qwen2_5_vl()
    path = write_processor_files(published, tmp_path / "m")
    tokenizer = adapter_for_checkpoint(path).load_processor(path).tokenizer
    assert find_chat_template(path, tokenizer) == ChatTemplate(published.chat_template, "chat_template.json")
    (path / "chat_template.jinja").write_text("jinja")
    assert find_chat_template(path, tokenizer).source == "chat_template.json"  # the legacy file wins, as in transformers
    (path / "chat_template.json").unlink()
    assert find_chat_template(path, tokenizer) == ChatTemplate("jinja", "chat_template.jinja")
    (path / "processor_config.json").write_text(json.dumps({"chat_template": "in processor config"}))
    assert find_chat_template(path, tokenizer).text == "in processor config"
    (path / "processor_config.json").unlink()
    (path / "chat_template.jinja").unlink()
    tokenizer.chat_template = "the tokenizer's"
    assert find_chat_template(path, tokenizer) == ChatTemplate("the tokenizer's", "tokenizer_config.json")
    tokenizer.chat_template = None
    assert find_chat_template(path, tokenizer) is None


def test_a_template_that_drops_the_answer_cannot_train(tmp_path):
    path = write_processor_files(qwen2_5_vl(), tmp_path / "m")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' %}"
        "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}")}))
    processor = adapter_for_checkpoint(path).load_processor(path)
    with pytest.raises(TemplateError, match=r"chat_template.json\) does not render an assistant answer verbatim"):
        processor.encode([{"role": "user", "content": "Yes"}, {"role": "assistant", "content": "No"}])


# -- checkpoints missing a part, or that cannot run --------------------------------------------------


def one_line(err: BaseException) -> str:
    message = str(err)
    assert "\n" not in message and "huggingface.co" not in message, message
    return message


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(qwen2_5_vl(), tmp_path_factory.mktemp("qwen") / "model")


def copy_without(checkpoint: Path, name: str, out: Path) -> Path:
    shutil.copytree(checkpoint, out)
    (out / name).unlink()
    return out


@pytest.mark.parametrize("missing", ["preprocessor_config.json", "tokenizer_config.json"])
def test_a_missing_processor_file_is_one_line_naming_it(qwen_checkpoint, tmp_path, capsys, missing):
    src = copy_without(qwen_checkpoint, missing, tmp_path / "src")
    for action in (lambda: dvlm.load(str(src)), lambda: convert_checkpoint(src, tmp_path / "out", log=print)):
        with pytest.raises(CheckpointError) as err:
            action()
        assert one_line(err.value).startswith(f"{src} has no {missing}")
    code = main(["convert", "--model", str(src), "--out", str(tmp_path / "out2")])
    assert code == 2 and f"has no {missing}" in capsys.readouterr().err


def test_an_mrope_section_that_does_not_fit_the_heads_is_one_line(qwen_checkpoint, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(qwen_checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    config["rope_scaling"]["mrope_section"] = [2, 3, 4]  # sums to 9; the tiny heads have 16 dimensions
    (src / "config.json").write_text(json.dumps(config))
    for action in (lambda: dvlm.load(str(src)), lambda: convert_checkpoint(src, tmp_path / "out", log=print)):
        with pytest.raises(ValueError) as err:
            action()
        assert one_line(err.value) == (
            f"{src}/config.json: rope_scaling.mrope_section [2, 3, 4] sums to 9, but the attention heads have 16 "
            "dimensions, so it must sum to head_dim / 2 = 8")


def test_qwen3_vl_mrope_section_is_checked_in_its_text_config(tmp_path):
    published = qwen3_vl()
    config = with_values(published.config, {**published.shrunk, "text_config.rope_scaling.mrope_section": [6, 5, 6]})
    adapter = adapter_for_checkpoint(write_processor_files(published, tmp_path / "m"))
    with pytest.raises(ValueError, match=r"text_config.rope_scaling.mrope_section \[6, 5, 6\] sums to 17, but the "
                                         r"attention heads have 32 dimensions, so it must sum to head_dim / 2 = 16$"):
        adapter.check_config(config, "config.json")
    adapter.check_config(with_values(published.config, published.shrunk), "config.json")  # the published split fits
    adapter.check_config(published.config, "config.json")


def test_a_qwen3_vl_moe_checkpoint_is_refused_in_one_line(tmp_path, capsys):
    src = write_processor_files(qwen3_vl(), tmp_path / "moe")
    config = json.loads((src / "config.json").read_text())
    config["architectures"], config["model_type"] = ["Qwen3VLMoeForConditionalGeneration"], "qwen3_vl_moe"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as err:
        dvlm.load(str(src))
    assert one_line(err.value).startswith("architecture 'Qwen3VLMoeForConditionalGeneration' is not supported; "
                                          "supported: ")
    assert main(["convert", "--model", str(src), "--out", str(tmp_path / "out")]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "Qwen3VLMoeForConditionalGeneration" in err_lines[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_published_configs_pass_the_checks(family):
    published = FAMILIES[family]()
    adapter_for_architecture(published.architecture).check_config(published.config, "config.json")


def test_a_template_that_drops_images_is_refused(tmp_path):
    path = write_processor_files(qwen2_5_vl(), tmp_path / "m")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for p in m['content'] %}{{ p['text'] }}"
        "{% endfor %}<|im_end|>\n{% endfor %}")}))
    processor = adapter_for_checkpoint(path).load_processor(path)
    with pytest.raises(TemplateError, match=r"rendered 0 image token\(s\) for 1 image\(s\)$"):
        processor.encode(QUESTION, [Image.new("RGB", (56, 56))])


def test_an_empty_answer_is_not_trained(tmp_path):
    path = write_processor_files(qwen2_5_vl(), tmp_path / "m")
    processor = adapter_for_checkpoint(path).load_processor(path)
    with pytest.raises(TemplateError, match="empty answer"):
        processor.encode([{"role": "user", "content": "Yes"}, {"role": "assistant", "content": " "}])
