"""`dvlm convert` on hostile input: one line `dvlm convert: error: ...`, exit 2, nothing written;
on success, a summary that says truthfully what was written."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from dvlm.cli import main
from tests.convert.sources import (
    build_checkpoint,
    dead_pid,
    shard_files,
    tensor_dtypes,
    tokenizer_with,
)


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # what building the source printed is not the command's
    code = main(["convert", *(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dvlm convert: error: "), err
    return lines[0]


def test_nan_source_exits_2_and_writes_nothing(capsys, tmp_path, tokenizer, adapter):
    src = build_checkpoint(tmp_path / "src", tokenizer, adapter=adapter, poison=math.nan)
    code, stdout, err = run(capsys, "--model", src, "--out", tmp_path / "out")
    assert code == 2
    assert "the source model itself produces non-finite logits (NaN/inf)" in one_line_error(err)
    assert "verified" not in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(("token", "message"), [("Ġred", "is an ordinary token"), ("<|im_end|>", "is used by the chat")])
def test_bad_mask_token_exits_2_naming_it(capsys, tmp_path, ar_checkpoint, token, message):
    code, _, err = run(capsys, "--model", ar_checkpoint, "--out", tmp_path / "out", "--set", f"mask_token={token}")
    assert code == 2
    assert f"mask_token {token!r}" in one_line_error(err) and message in err
    assert list(tmp_path.iterdir()) == []


def test_quantized_source_exits_2(capsys, tmp_path, ar_checkpoint):
    src = shutil.copytree(ar_checkpoint, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "--model", src, "--out", tmp_path / "out")
    assert code == 2 and "is quantized (quantization_config: gptq)" in one_line_error(err)


def test_summary_names_dtype_shards_and_the_special_tokens_row(capsys, tmp_path):
    tokenizer = tokenizer_with("<|box_start|>", special=True)
    src = build_checkpoint(tmp_path / "src", tokenizer, dtype=torch.bfloat16, max_shard_size="150KB")
    code, stdout, _ = run(capsys, "--model", src, "--out", tmp_path / "out", "--set", "mask_token=<|box_start|>")
    assert code == 0
    assert "weights        bfloat16, 3 files" in stdout
    mask_id = tokenizer.get_vocab()["<|box_start|>"]
    assert (f"mask token     '<|box_start|>' = id {mask_id} "
            "(an existing special token the chat does not use; its row was re-initialised)") in stdout
    assert "verified" in stdout
    assert len(shard_files(tmp_path / "out")) == 3 and tensor_dtypes(tmp_path / "out") == {"BF16"}


def test_dtype_option_and_leftover_removal_are_reported(capsys, tmp_path, ar_checkpoint):
    stale = tmp_path / f".out.tmp-{dead_pid()}"
    stale.mkdir()
    code, stdout, _ = run(capsys, "--model", ar_checkpoint, "--out", tmp_path / "out", "--dtype", "bfloat16")
    assert code == 0
    assert f"removed {stale.name}, left by an interrupted write of out" in stdout
    assert "weights        bfloat16, 1 file\n" in stdout
    assert "(the embedding table was resized to hold it)" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert tensor_dtypes(tmp_path / "out") == {"BF16"}
