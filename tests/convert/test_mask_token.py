"""Which token may become [MASK] (D6), and a report that says truthfully where its row came from.

Rule: the mask token is either new (added, in a spare embedding row if the table has one, else
the table grows) or an existing *added special* token the chat never uses. An ordinary token, a
non-special added token, or one the chat uses (eos, pad, chat and vision tokens, the image
placeholder) would have its embedding and lm_head rows overwritten: refused, naming the token.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import dvlm
from dvlm.config import ConfigError
from dvlm.convert.conversion import MASK_ROWS, REPORT_FILE, convert_checkpoint
from tests.convert.sources import SHAPE, build_checkpoint, quiet, tokenizer_with

UNUSED_SPECIAL = "<|box_start|>"  # one of the Qwen2.5 tokenizer's special tokens no chat uses


def convert_with_mask(src, out, token):
    return convert_checkpoint(src, out, overrides={"mask_token": token}, log=quiet)


QWEN_VL_USED_TOKENS = [("<|im_end|>", "eos"), ("<|endoftext|>", "pad"), ("<|im_start|>", "chat"),
                       ("<|vision_start|>", "chat"), ("<|vision_end|>", "chat"), ("<|image_pad|>", "chat"),
                       ("<|video_pad|>", "chat"), ("<image>", "image placeholder"), ("<unk>", "unk")]
USED_TOKENS = {
    "Qwen2.5-VL": QWEN_VL_USED_TOKENS, "Qwen2-VL": QWEN_VL_USED_TOKENS, "Qwen3-VL": QWEN_VL_USED_TOKENS,
    "LLaVA-OneVision": [("<|im_end|>", "eos"), ("<|endoftext|>", "pad"), ("<|im_start|>", "chat"),
                        ("<image>", "chat"), ("<video>", "config.json video_token_index"), ("<unk>", "unk")],
}
"""Per family (its display name): the tokens its chat or model uses, and the reason each is refused."""


def test_token_the_chat_uses_is_refused(tmp_path, ar_checkpoint, adapter):
    out = tmp_path / "out"
    for token, why in USED_TOKENS[adapter.family]:
        with pytest.raises(ConfigError, match=f"mask_token {re.escape(repr(token))} .*is used by the chat.*{why}"):
            convert_with_mask(ar_checkpoint, out, token)
        assert list(tmp_path.iterdir()) == []


def test_ordinary_vocabulary_token_is_refused(tmp_path, ar_checkpoint, tokenizer):
    word = "Ġred"
    assert word in tokenizer.get_vocab()
    with pytest.raises(ConfigError, match=f"mask_token '{word}' is an ordinary token of the vocabulary"):
        convert_with_mask(ar_checkpoint, tmp_path / "out", word)
    assert list(tmp_path.iterdir()) == []


def test_added_token_that_is_not_special_is_refused(tmp_path):
    src = build_checkpoint(tmp_path / "src", tokenizer_with("<tool_call>", special=False))
    with pytest.raises(ConfigError, match="mask_token '<tool_call>' is an added token but not a special one"):
        convert_with_mask(src, tmp_path / "out", "<tool_call>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_unused_special_token_becomes_the_mask_in_its_own_row(tmp_path):
    tokenizer = tokenizer_with(UNUSED_SPECIAL, special=True)
    special_id = tokenizer.get_vocab()[UNUSED_SPECIAL]
    src = build_checkpoint(tmp_path / "src", tokenizer)
    report = convert_with_mask(src, tmp_path / "out", UNUSED_SPECIAL)
    assert (report.mask_token_id, report.mask_row) == (special_id, "special")
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["mask_row"] == "special"
    src_in = dvlm.load(src).model.get_input_embeddings().weight.detach()
    converted = dvlm.load(tmp_path / "out")
    new_in = converted.model.get_input_embeddings().weight.detach()
    assert new_in.shape == src_in.shape == (len(tokenizer), SHAPE.hidden_size)  # no row added
    others = torch.arange(len(tokenizer)) != special_id
    expected = src_in[others].double().mean(dim=0)  # re-initialised like a new token's row
    torch.testing.assert_close(new_in[special_id].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(new_in[others], src_in[others])
    assert converted.processor.tokenizer.get_vocab()[UNUSED_SPECIAL] == converted.mask_token_id == special_id


def test_new_token_in_a_spare_row_is_reported_as_such(tmp_path, tokenizer, adapter):
    src = build_checkpoint(tmp_path / "padded", tokenizer, adapter=adapter, extra_rows=8)
    report = convert_checkpoint(src, tmp_path / "out", log=quiet)
    assert (report.mask_token_id, report.mask_row) == (len(tokenizer), "spare")


def test_new_token_without_spare_row_is_reported_as_resized(tmp_path, ar_checkpoint, tokenizer):
    report = convert_checkpoint(ar_checkpoint, tmp_path / "out", log=quiet)
    assert (report.mask_token_id, report.mask_row) == (len(tokenizer), "resized")


def test_every_mask_row_kind_has_a_description():
    assert set(MASK_ROWS) == {"spare", "resized", "special"}
    assert all(isinstance(text, str) and text for text in MASK_ROWS.values())
