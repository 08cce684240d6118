"""The whole CLI path on a tiny random checkpoint of every family in FAMILIES: `dvlm convert`, a few
steps of `dvlm train`, and `dvlm generate` with every decoder on the trained model."""

from __future__ import annotations

import json

import dvlm
from dvlm.cli import main
from dvlm.model.adapters.registry import adapter_for_checkpoint
from dvlm.tasks.builtin import export_llava, get_task

MAX_NEW_TOKENS = 6


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def test_convert_train_and_generate_with_every_decoder(capsys, tmp_path, ar_checkpoint, adapter, image):
    converted, run_dir, image_file = tmp_path / "converted", tmp_path / "run", tmp_path / "probe.png"
    image.save(image_file)
    code, out = run(capsys, "convert", "--model", ar_checkpoint, "--out", converted, "--block-size", 4)
    assert code == 0 and "verified" in out

    data = export_llava(get_task("shapes-qa").generate("train", 4), tmp_path / "data")
    code, out = run(capsys, "train", "--model", converted, "--data", data, "--out", run_dir,
                    "--batch-size", 2, "--steps", 2)
    assert code == 0 and "trained 2 steps" in out
    trained = run_dir / "model"
    assert type(adapter_for_checkpoint(trained)) is type(adapter)
    assert dvlm.load(trained).diffusion.block_size == 4

    tokens = {}
    for decoder in ("ar", "block", "spec", "hf"):
        code, out = run(capsys, "generate", "--model", trained, "--image", image_file, "--prompt", "What is this?",
                        "--decoder", decoder, "--max-new-tokens", MAX_NEW_TOKENS, "--json")
        result = json.loads(out)
        assert code == 0 and result["decoder"] == decoder and 0 < len(result["tokens"]) <= MAX_NEW_TOKENS
        tokens[decoder] = result["tokens"]
    # Greedy: our AR loop, HF's generate and self-speculative decoding give one answer (invariant 5).
    assert tokens["ar"] == tokens["hf"] == tokens["spec"]
