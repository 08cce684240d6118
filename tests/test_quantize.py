"""`dvlm quantize` and `dvlm.load(..., quantize=...)`: which layers are quantized, invariant 5 on the
quantized models, the saved recipe (loads, serves), and the refusals (bad scheme, no torchao, fp8
without an FP8 GPU, a quantized source given to `dvlm convert`).

The tests that quantize need torchao (the `quantize` extra, part of `test`); they skip without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import signal
import sys
import threading

import pytest
import torch
from torch import nn

import dvlm
from dvlm.convert.conversion import convert_checkpoint
from dvlm.convert.verify import causal_logits
from dvlm.data.processor import IGNORE_INDEX, Encoded
from dvlm.model.quantize import RECIPE_KEY, QuantizationError, write_quantized
from dvlm.zoo.registry import builtin_path
from dvlm.tasks.builtin import get_task
from tests.test_cli import one_line_error, run

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="torchao is not installed (pip install 'dvlm[quantize]')")
INT8 = ("int8-weight", "int8-dynamic")
TEXTS = ["What colour is the circle?", "Read the digits.", "Describe the image. Where is the red square?", "Hi"]


@pytest.fixture(scope="module")
def prompts(image):
    return TEXTS, [[image], [image, image], [image], []]


@pytest.fixture(scope="module")
def captions():
    """Built-in caption questions: the built-in model answers them with whole sentences."""
    samples = get_task("shapes-caption").generate("test", 6, seed=3)
    return [s.conversations[0]["value"].replace("<image>\n", "") for s in samples], [s.images for s in samples]


def quantized_linear_names(lm) -> set[str]:
    """Linear layers whose weight torchao replaced (its tensor subclasses are not plain Parameters)."""
    return {name for name, m in lm.model.named_modules()
            if isinstance(m, nn.Linear) and type(m.weight) is not nn.Parameter}


# -- what is quantized ---------------------------------------------------------------------------
@needs_torchao
@pytest.mark.parametrize("scheme", INT8)
def test_language_layers_are_quantized_vision_encoder_and_output_layer_are_not(fast_checkpoint, scheme):
    lm = dvlm.load(fast_checkpoint, quantize=scheme)
    quantized = quantized_linear_names(lm)
    linears = {name for name, m in lm.model.named_modules() if isinstance(m, nn.Linear)}
    vision = {id(p) for p in lm.adapter.vision_parameters(lm.model)}
    kept = {name for name, m in lm.model.named_modules() if isinstance(m, nn.Linear) and id(m.weight) in vision}
    assert kept and not kept & quantized
    assert type(lm.model.get_output_embeddings().weight) is nn.Parameter
    assert quantized == linears - kept - {"lm_head"}
    assert any(".mlp." in name for name in quantized) and any(".self_attn." in name for name in quantized)


@needs_torchao
@pytest.mark.parametrize("scheme", INT8)
def test_quantized_logits_are_close_to_the_float_ones_but_not_equal(scheme, image):
    """The scheme really changed the numbers, by a quantization error (built-in model: measured 0.2%
    relative for int8-weight, 1.2% for int8-dynamic), not by a broken model."""
    full, quant = dvlm.load("tiny-dvlm"), dvlm.load("tiny-dvlm", quantize=scheme)
    ids = full.processor.encode("Describe the image.", [image], add_generation_prompt=True)
    reference = causal_logits(full.adapter, full.model, ids, full.processor.pad_token_id)  # (L, V)
    logits = causal_logits(quant.adapter, quant.model, ids, quant.processor.pad_token_id)
    relative = ((reference - logits).norm() / reference.norm()).item()
    assert 0 < relative < 0.05
    assert (reference.argmax(-1) == logits.argmax(-1)).float().mean() >= 0.9


# -- invariant 5 per model -----------------------------------------------------------------------
NEAR_TIE = 0.1  # logits: int8-dynamic moves them by up to ~0.07 between forward shapes (measured)


def continued(encoded: Encoded, tokens: list[int]) -> Encoded:
    """The prompt followed by generated `tokens`, as one sample (text positions continue the prompt's)."""
    ids = torch.tensor(tokens, dtype=encoded.input_ids.dtype)
    start = encoded.next_position
    positions = torch.arange(start, start + len(tokens))[None].expand(encoded.position_ids.shape[0], -1)
    return dataclasses.replace(
        encoded, input_ids=torch.cat([encoded.input_ids, ids]), next_position=start + len(tokens),
        labels=torch.cat([encoded.labels, torch.full_like(ids, IGNORE_INDEX)]),
        mm_token_type_ids=torch.cat([encoded.mm_token_type_ids, torch.zeros_like(ids)]),
        position_ids=torch.cat([encoded.position_ids, positions], 1))


@needs_torchao
@pytest.mark.parametrize("block_size", [2, 4, 16])
def test_int8_weight_speculative_equals_ar(fast_checkpoint, prompts, block_size):
    """Activations stay float: the forward shapes differ only by float rounding, as unquantized."""
    lm = dvlm.load(fast_checkpoint, quantize="int8-weight")
    ar = lm.generate(*prompts, decoder="ar", max_new_tokens=24)
    spec = lm.generate(*prompts, decoder="spec", block_size=block_size, max_new_tokens=24)
    assert [o.tokens for o in spec] == [o.tokens for o in ar]
    assert min(len(o.tokens) for o in ar) >= 10  # long, varied outputs: the comparison has teeth


@needs_torchao
@pytest.mark.slow
def test_int8_weight_compiled_speculative_equals_compiled_ar(fast_checkpoint, prompts, adapter):
    """int8 is fast on CPU under the compiled path (Inductor fuses torchao's int8 weight-only
    matmul); there too spec == AR, and both == eager int8 AR (reference family: compiling is slow)."""
    from dvlm.model.adapters.registry import REFERENCE_ARCHITECTURE

    if adapter.architectures[0] != REFERENCE_ARCHITECTURE:
        pytest.skip("compiled on the reference family only")
    lm = dvlm.load(fast_checkpoint, quantize="int8-weight")
    eager = lm.generate(*prompts, decoder="ar", max_new_tokens=24)
    ar = lm.generate(*prompts, decoder="ar", max_new_tokens=24, compile=True)
    spec = lm.generate(*prompts, decoder="spec", block_size=4, max_new_tokens=24, compile=True)
    assert [o.tokens for o in spec] == [o.tokens for o in ar] == [o.tokens for o in eager]


@needs_torchao
@pytest.mark.parametrize("block_size", [2, 3, 8, 16])
def test_int8_dynamic_speculative_equals_ar_except_at_near_ties(fast_checkpoint, prompts, block_size):
    """Each token's activations are quantized on their own (rows independent), but a float rounding
    difference between a 1-token and a B-token forward can move an activation across an int8
    rounding boundary: one int8 step, up to ~0.07 in the logits. So on this random model (flat
    logits) spec and AR part only where AR's next token is a near-tie, and then pick its top two."""
    lm = dvlm.load(fast_checkpoint, quantize="int8-dynamic")
    ar = lm.generate(*prompts, decoder="ar", max_new_tokens=24)
    spec = lm.generate(*prompts, decoder="spec", block_size=block_size, max_new_tokens=24)
    for text, images, a, s in zip(*prompts, ar, spec, strict=True):
        if a.tokens == s.tokens:
            continue
        at = next(i for i, (x, y) in enumerate(zip(a.tokens, s.tokens)) if x != y)
        sample = continued(lm.processor.encode(text, images, add_generation_prompt=True), a.tokens[:at])
        logits = causal_logits(lm.adapter, lm.model, sample, lm.processor.pad_token_id)[-1]  # (V,)
        top = logits.topk(2)
        assert set(top.indices.tolist()) == {a.tokens[at], s.tokens[at]}, (text, at)
        assert (top.values[0] - top.values[1]).item() < NEAR_TIE, (text, at)
    assert sum(a.tokens == s.tokens for a, s in zip(ar, spec)) >= len(ar) // 2


@needs_torchao
@pytest.mark.parametrize("scheme", INT8)
def test_builtin_model_quantized_speculative_equals_quantized_ar(captions, scheme):
    lm = dvlm.load("tiny-dvlm", quantize=scheme)
    ar = lm.generate(*captions, decoder="ar", max_new_tokens=48)
    spec = lm.generate(*captions, decoder="spec", max_new_tokens=48)
    assert [o.tokens for o in spec] == [o.tokens for o in ar]
    assert all(len(o.tokens) >= 5 for o in ar), [o.text for o in ar]


# -- the saved recipe ----------------------------------------------------------------------------
@needs_torchao
def test_cli_writes_a_model_that_loads_quantized_and_decodes_like_load_quantize(capsys, tmp_path, fast_checkpoint,
                                                                               prompts):
    out = tmp_path / "q"
    code, stdout, err = run(capsys, "quantize", "--model", fast_checkpoint, "--out", out, "--scheme", "int8-dynamic")
    assert code == 0, err
    assert f"-> {out} (int8-dynamic; vision encoder and output layer kept in torch.float32)" in stdout
    assert json.loads((out / "config.json").read_text())[RECIPE_KEY]["scheme"] == "int8-dynamic"
    saved, direct = dvlm.load(out), dvlm.load(fast_checkpoint, quantize="int8-dynamic")
    assert quantized_linear_names(saved) == quantized_linear_names(direct) != set()
    for decoder in ("ar", "block", "spec"):
        got = saved.generate(*prompts, decoder=decoder, max_new_tokens=16)
        want = direct.generate(*prompts, decoder=decoder, max_new_tokens=16)
        assert [o.tokens for o in got] == [o.tokens for o in want], decoder


@needs_torchao
def test_quantized_model_is_served(tmp_path, captions):
    """The real app and engine over the saved quantized built-in model, asked through the openai client."""
    import openai
    import uvicorn

    from dvlm.serve.server import Server, bind, build_app, url_of
    from dvlm.serve.settings import ServeSettings
    from tests.serve.test_end_to_end import openai_messages

    lm = dvlm.load(write_quantized(builtin_path("tiny-dvlm"), tmp_path / "q", "int8-weight"))
    app = build_app(lm, "tiny-q", ServeSettings())
    sock, ready = bind("127.0.0.1", 0), threading.Event()
    server = Server(uvicorn.Config(app, lifespan="on", log_level="warning"), on_ready=ready.set,
                    on_stop=app.state.dvlm.begin_shutdown)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert ready.wait(15), "the server did not start"
        client = openai.OpenAI(base_url=f"{url_of(sock)}/v1", api_key="unused", max_retries=0, timeout=60)
        question, images = captions[0][0], captions[1][0]
        answer = client.chat.completions.create(model="tiny-q", messages=openai_messages(question, images[0]),
                                                max_tokens=32, temperature=0, extra_body={"decoder": "spec"})
        assert answer.choices[0].message.content == lm.generate(question, images, decoder="spec",
                                                                 max_new_tokens=32).text
    finally:
        server.handle_exit(signal.SIGTERM, None)
        thread.join(20)


def test_saved_recipe_and_requested_scheme_must_agree(tmp_path, fast_checkpoint):
    out = write_quantized(fast_checkpoint, tmp_path / "q", "int8-weight")
    with pytest.raises(QuantizationError, match="quantized with int8-weight; load its full-precision source"):
        dvlm.load(out, quantize="int8-dynamic")
    with pytest.raises(QuantizationError, match="already quantized"):
        write_quantized(out, tmp_path / "qq", "int8-weight")


def test_cli_never_writes_over_the_source_or_a_non_empty_directory(capsys, tmp_path, fast_checkpoint):
    code, _, err = run(capsys, "quantize", "--model", fast_checkpoint, "--out", fast_checkpoint,
                       "--scheme", "int8-weight")
    assert code == 2 and "is the source checkpoint" in one_line_error(err, "quantize")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "quantize", "--model", fast_checkpoint, "--out", tmp_path / "full",
                       "--scheme", "int8-weight")
    assert code == 2 and "pass --overwrite" in one_line_error(err, "quantize")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


# -- refusals ------------------------------------------------------------------------------------
def test_unknown_scheme_is_refused_before_loading(capsys, fast_checkpoint):
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int4'; choose one of int8-weight"):
        dvlm.load(fast_checkpoint, quantize="int4")
    code, _, err = run(capsys, "quantize", "--model", fast_checkpoint, "--out", "x", "--scheme", "int4")
    assert code == 2 and "invalid choice: 'int4'" in err


def test_missing_torchao_is_one_line_naming_the_extra(capsys, monkeypatch, tmp_path, fast_checkpoint):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao...` raise ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(QuantizationError, match=r"needs torchao: pip install 'dvlm\[quantize\]'"):
        dvlm.load(fast_checkpoint, quantize="int8-weight")
    code, _, err = run(capsys, "quantize", "--model", fast_checkpoint, "--out", tmp_path / "q", "--scheme", "int8-weight")
    assert code == 2 and "quantization needs torchao" in one_line_error(err, "quantize")
    assert not (tmp_path / "q").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9),
                    reason="this machine has an FP8-capable GPU")
def test_fp8_without_an_fp8_gpu_is_one_line(capsys, tmp_path, fast_checkpoint):
    code, _, err = run(capsys, "quantize", "--model", fast_checkpoint, "--out", tmp_path / "q", "--scheme", "fp8")
    assert code == 2 and "fp8 needs a CUDA GPU of compute capability >= 8.9" in one_line_error(err, "quantize")
    assert not (tmp_path / "q").exists()
    with pytest.raises(QuantizationError, match="fp8 needs a CUDA GPU"):
        dvlm.load(fast_checkpoint, quantize="fp8", device="cpu")


def test_convert_refuses_a_quantized_source(capsys, tmp_path, ar_checkpoint):
    """Its weights are float, so verification would pass: comparing against itself proves nothing."""
    source = write_quantized(ar_checkpoint, tmp_path / "ar-q", "int8-dynamic")
    with pytest.raises(ValueError, match="is a `dvlm quantize` output"):
        convert_checkpoint(source, tmp_path / "out", log=lambda _: None)
    code, _, err = run(capsys, "convert", "--model", source, "--out", tmp_path / "out")
    assert code == 2 and "convert its full-precision source, then quantize" in one_line_error(err, "convert")
    assert not (tmp_path / "out").exists()
