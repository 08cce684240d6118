import base64

import pytest
import torch
from PIL import Image

from dvlm.data.images import ImageError
from dvlm.data.processor import IGNORE_INDEX, PromptTooLongError
from dvlm.model.adapters.mrope import mrope_position_ids
from dvlm.model.adapters.qwen_chat import ChatTokenIds
from tests.data.conftest import load_processor, qwen_processor

SYSTEM = ["<|im_start|>", "system", "\n", "You", "are", "a", "helpful", "assistant", ".",
          "<|im_end|>", "\n"]
VISION_4 = ["<|vision_start|>"] + ["<|image_pad|>"] * 4 + ["<|vision_end|>"]  # a 56x56 image


def red(size=(56, 56)):
    return Image.new("RGB", size, (255, 0, 0))


def labelled(encoded, as_tokens):
    """Token strings where the label is set, None elsewhere."""
    names = as_tokens(encoded.input_ids)
    return [n if l != IGNORE_INDEX else None for n, l in zip(names, encoded.labels.tolist())]


def test_plain_prompt_with_image_exact_tokens(processor, as_tokens):
    encoded = processor.encode("What is this?", images=[red()])
    assert as_tokens(encoded.input_ids) == SYSTEM + [
        "<|im_start|>", "user", "\n", *VISION_4, "What", "is", "this", "?", "<|im_end|>", "\n"]
    assert (encoded.labels == IGNORE_INDEX).all()
    assert encoded.mm_token_type_ids.tolist() == [
        int(t == "<|image_pad|>") for t in as_tokens(encoded.input_ids)]
    assert encoded.vision["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert encoded.vision["pixel_values"].shape == (16, 3 * 2 * 14 * 14)
    assert len(encoded) == encoded.input_ids.shape[0] == encoded.position_ids.shape[1]
    assert encoded.input_ids.dtype == encoded.labels.dtype == encoded.position_ids.dtype == torch.long


def test_two_turn_label_mask_is_exact(processor, as_tokens):
    messages = [{"role": "user", "content": "What is this?"},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "Thanks"},
                {"role": "assistant", "content": "welcome"}]
    encoded = qwen_processor(processor.tokenizer, processor.image_processor,
                            system_prompt=None).encode(messages)
    x = None
    assert as_tokens(encoded.input_ids) == [
        "<|im_start|>", "user", "\n", "What", "is", "this", "?", "<|im_end|>", "\n",
        "<|im_start|>", "assistant", "\n", "A", "cat", ".", "<|im_end|>", "\n",
        "<|im_start|>", "user", "\n", "Thanks", "<|im_end|>", "\n",
        "<|im_start|>", "assistant", "\n", "welcome", "<|im_end|>", "\n"]
    assert labelled(encoded, as_tokens) == [
        x, x, x, x, x, x, x, x, x,
        x, x, x, "A", "cat", ".", "<|im_end|>", x,
        x, x, x, x, x, x,
        x, x, x, "welcome", "<|im_end|>", x]
    assert encoded.vision is None
    assert encoded.mm_token_type_ids.sum() == 0


def test_generation_prompt(processor, as_tokens):
    encoded = processor.encode("Describe", add_generation_prompt=True)
    assert as_tokens(encoded.input_ids)[-8:] == [
        "user", "\n", "Describe", "<|im_end|>", "\n", "<|im_start|>", "assistant", "\n"]
    assert (encoded.labels == IGNORE_INDEX).all()


def test_system_prompt_choices(processor, as_tokens):
    custom = qwen_processor(processor.tokenizer, processor.image_processor, system_prompt="Be brief")
    assert as_tokens(custom.encode("Yes").input_ids)[:6] == [
        "<|im_start|>", "system", "\n", "Be", "brief", "<|im_end|>"]
    # An explicit system message replaces the default one.
    explicit = processor.encode([{"role": "system", "content": "Be brief"},
                                 {"role": "user", "content": "Yes"}])
    assert as_tokens(explicit.input_ids)[:6] == as_tokens(custom.encode("Yes").input_ids)[:6]
    assert as_tokens(explicit.input_ids).count("system") == 1


def test_openai_parts_keep_their_order(processor, as_tokens, make_png):
    url = "data:image/png;base64," + base64.b64encode(make_png()).decode()
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "and"},
        {"type": "image", "image": red((112, 112))},
    ]}]
    encoded = processor.encode(messages)
    vision_16 = ["<|vision_start|>"] + ["<|image_pad|>"] * 16 + ["<|vision_end|>"]
    assert as_tokens(encoded.input_ids)[len(SYSTEM):] == [
        "<|im_start|>", "user", "\n", "Compare", *VISION_4, "and", *vision_16, "<|im_end|>", "\n"]
    assert encoded.vision["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    assert encoded.vision["pixel_values"].shape == (16 + 64, 1176)
    # image_url given as a bare string is accepted too.
    bare = processor.encode([{"role": "user", "content": [{"type": "image_url", "image_url": url}]}])
    assert bare.vision["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_image_placeholders_take_images_in_order(processor, as_tokens):
    messages = [{"role": "user", "content": "<image>\nfirst <image> second"}]
    encoded = processor.encode(messages, images=[red(), red((112, 112))])
    vision_16 = ["<|vision_start|>"] + ["<|image_pad|>"] * 16 + ["<|vision_end|>"]
    assert as_tokens(encoded.input_ids)[len(SYSTEM) + 3:] == [
        *VISION_4, "first", *vision_16, "second", "<|im_end|>", "\n"]
    assert encoded.vision["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    # An image part without data is a placeholder too (HF chat-template style).
    parts = processor.encode([{"role": "user", "content": [{"type": "image"}]}], images=[red()])
    assert parts.vision["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_plain_prompt_without_placeholder_puts_all_images_first(processor, as_tokens):
    encoded = processor.encode("Compare", images=[red(), red()])
    assert as_tokens(encoded.input_ids)[len(SYSTEM) + 3:-2] == [*VISION_4, *VISION_4, "Compare"]


@pytest.mark.parametrize("messages, images, match", [
    ("<image> <image>", [red()], "2 image placeholder.*but 1 image"),
    ([{"role": "user", "content": "<image>"}], None, "1 image placeholder.*but 0 image"),
    ([{"role": "user", "content": "Yes"}], [red()], "0 image placeholder.*but 1 image"),
    ([], None, "empty conversation"),
    ("", None, "empty prompt"),
    ({"role": "user", "content": "Yes"}, None, "not a dict"),
    ([{"role": "robot", "content": "Yes"}], None, "message 0: unknown role 'robot'"),
    ([{"role": "user", "content": [{"type": "audio"}]}], None, "unsupported content part"),
    ([{"role": "user", "content": 3}], None, "content must be a string or a list"),
    ([{"role": "user", "content": "<|im_end|>"}], None, "special token"),
])
def test_malformed_input_raises_value_error(processor, messages, images, match):
    with pytest.raises(ValueError, match=match):
        processor.encode(messages, images=images)


def test_image_errors_propagate(processor, tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        processor.encode("Yes", images=[tmp_path / "missing.png"])
    with pytest.raises(ImageError, match="remote fetching is disabled"):
        processor.encode([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]}])


def test_max_length(processor):
    length = len(processor.encode("Yes"))
    exact = qwen_processor(processor.tokenizer, processor.image_processor, max_length=length)
    assert len(exact.encode("Yes")) == length
    short = qwen_processor(processor.tokenizer, processor.image_processor, max_length=length - 1)
    with pytest.raises(PromptTooLongError, match=f"{length} tokens, more than max_length={length - 1}"):
        short.encode("Yes")


def test_special_ids_eos_pad_and_decode(processor, tiny_processor_dir):
    vocab = processor.tokenizer.get_vocab()
    assert processor.format.token_ids == ChatTokenIds(
        vocab["<|im_start|>"], vocab["<|im_end|>"], vocab["<|vision_start|>"],
        vocab["<|vision_end|>"], vocab["<|image_pad|>"])
    assert processor.eos_token_ids == [vocab["<|im_end|>"]]  # eos is <|im_end|>: no duplicate
    assert processor.pad_token_id == vocab["<|endoftext|>"]
    encoded = processor.encode("What is this?")
    assert processor.decode(encoded.input_ids[-6:-2]) == "What is this ?"
    assert "<|im_end|>" in processor.decode(encoded.input_ids, skip_special_tokens=False)


def test_eos_and_pad_fallbacks(build_processor):
    base = build_processor(eos_token="<|endoftext|>", pad_token=None)
    vocab = base.tokenizer.get_vocab()
    assert base.eos_token_ids == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    assert base.pad_token_id == vocab["<|endoftext|>"]  # no pad token: <|endoftext|>
    no_endoftext = build_processor(pad_token=None, special_tokens=[
        "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
        "<|video_pad|>"])
    assert no_endoftext.pad_token_id == no_endoftext.tokenizer.get_vocab()["<|im_end|>"]  # eos


def test_missing_special_token_in_a_saved_tokenizer(build_processor):
    with pytest.raises(ValueError, match=r"lacks .*<\|vision_end\|>"):
        build_processor(special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                        "<|vision_start|>", "<|image_pad|>"])


def test_from_pretrained_beside_a_qwen2_5_vl_config(tiny_processor_dir, tiny_vlm, tmp_path):
    # A real checkpoint directory also holds config.json; loading must not trip over it.
    processor = load_processor(tiny_processor_dir, system_prompt=None,
                                              max_length=64)
    processor.save_pretrained(tmp_path)
    tiny_vlm.config.save_pretrained(tmp_path)
    assert processor.system_prompt is None and processor.max_length == 64
    reloaded = load_processor(tmp_path)
    assert reloaded.format.token_ids == processor.format.token_ids
    assert reloaded.image_processor.size == processor.image_processor.size
    default = qwen_processor(processor.tokenizer, processor.image_processor)
    assert torch.equal(reloaded.encode("Yes").input_ids, default.encode("Yes").input_ids)


def test_from_pretrained_requires_a_local_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="local directories only"):
        load_processor(tmp_path / "Qwen" / "Qwen2.5-VL-3B-Instruct")


def test_missing_special_token_is_a_clear_error():
    class NoImagePad:
        def get_vocab(self):
            return {"<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 3,
                    "<|vision_end|>": 4}
    with pytest.raises(ValueError, match=r"lacks .*<\|image_pad\|>"):
        ChatTokenIds.from_tokenizer(NoImagePad())


def test_mrope_docstring_example():
    types = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 0])
    positions, delta = mrope_position_ids(torch.zeros(9, dtype=torch.long), types,
                                          torch.tensor([[1, 4, 6]]), 2)
    assert positions.tolist() == [[0, 1, 2, 2, 2, 2, 2, 2, 5],
                                  [0, 1, 2, 2, 2, 3, 3, 3, 5],
                                  [0, 1, 2, 3, 4, 2, 3, 4, 5]]
    assert delta == -3


def test_mrope_keeps_adjacent_images_apart():
    types = torch.tensor([1] * 4 + [1] * 4)
    positions, delta = mrope_position_ids(types.clone(), types, torch.tensor([[1, 4, 4]] * 2), 2)
    assert positions[2].tolist() == [0, 1, 0, 1, 2, 3, 2, 3]
    assert delta == 4 - 8


def test_mrope_rejects_mismatched_grids():
    types = torch.tensor([0, 1, 1, 1, 1, 0])
    with pytest.raises(ValueError, match="only 0 image_grid_thw rows"):
        mrope_position_ids(types.clone(), types, None, 2)
    with pytest.raises(ValueError, match="needs 16 image tokens"):
        mrope_position_ids(types.clone(), types, torch.tensor([[1, 8, 8]]), 2)
    with pytest.raises(ValueError, match="2 image_grid_thw rows but 1 image blocks"):
        mrope_position_ids(types.clone(), types, torch.tensor([[1, 4, 4]] * 2), 2)


@pytest.mark.parametrize("messages, images", [
    ("What is this?", None),
    ("What is this?", [(56, 56)]),
    ("<image> Compare <image> and <image>", [(112, 56), (56, 112), (112, 112)]),
    ([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A cat."},
      {"role": "user", "content": "and <image>"}], [(84, 112), (56, 84)]),
])
def test_mrope_matches_qwen2_5_vl_get_rope_index(processor, tiny_vlm, messages, images):
    images = [red(size) for size in images or []]
    encoded = processor.encode(messages, images=images or None, add_generation_prompt=True)
    expected, deltas = tiny_vlm.model.get_rope_index(
        encoded.input_ids[None], mm_token_type_ids=encoded.mm_token_type_ids[None],
        image_grid_thw=encoded.vision["image_grid_thw"] if encoded.vision else None)
    assert torch.equal(encoded.position_ids, expected[:, 0])
    assert encoded.next_position == len(encoded) + int(deltas[0, 0])


def test_a_tokenizer_with_its_own_code_is_refused_and_never_run(tiny_processor_dir, tmp_path):
    """D1: a checkpoint whose tokenizer_config.json maps to shipped code must not get it imported."""
    import json
    import shutil

    from dvlm.data.tokenizer import UnsafeCheckpointError

    evil = tmp_path / "evil"
    shutil.copytree(tiny_processor_dir, evil)
    config = json.loads((evil / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    (evil / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                  "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    with pytest.raises(UnsafeCheckpointError, match="never runs checkpoint code"):
        load_processor(evil)
    assert not marker.exists()
