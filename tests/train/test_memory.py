"""The up-front training memory estimate: exact state bytes from meta-device parameter counts."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from dvlm.config import TrainConfig
from dvlm.model.adapters.qwen2_5_vl import Qwen25VLAdapter
from dvlm.train import memory
from dvlm.train.memory import (
    GIB,
    InsufficientMemoryError,
    ModelShape,
    check_fits,
    estimate,
    model_shape,
)

# Qwen2.5-VL-3B's published shape (its config.json), tied embeddings.
SHAPE_3B = {
    "text_config": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 2048,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "tie_word_embeddings": True,
}


def saved_config(tmp_path, **kwargs) -> str:
    config = Qwen2_5_VLConfig(**kwargs)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    config.save_pretrained(tmp_path)
    return str(tmp_path)


def test_meta_count_equals_a_real_model(tmp_path):
    small = {
        "text_config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 300,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
        },
    }
    path = saved_config(tmp_path, **small)
    real = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**small))
    shape = model_shape(path, Qwen25VLAdapter())
    assert shape.parameters == sum(p.numel() for p in real.parameters())
    assert shape.vision_parameters == sum(p.numel() for p in Qwen25VLAdapter().vision_parameters(real))
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (64, 2, 300)


def test_3b_states_are_the_known_60_and_52_gb(tmp_path):
    shape = model_shape(saved_config(tmp_path, **SHAPE_3B), Qwen25VLAdapter())
    assert shape.parameters == 3_754_622_976
    full = estimate(shape, tokens=1, labelled_tokens=1, longest_row=1)
    frozen = estimate(shape, tokens=1, labelled_tokens=1, longest_row=1, freeze_vision=True)
    assert round(full.states / 1e9) == 60  # 16 bytes per parameter: weights, gradient, two AdamW moments
    assert round(frozen.states / 1e9) == 52  # frozen vision weights keep only their 4 bytes
    assert full.states - frozen.states == 12 * shape.vision_parameters


def test_activation_terms_follow_their_formula():
    shape = ModelShape(
        parameters=1000,
        vision_parameters=100,
        hidden_size=8,
        intermediate_size=16,
        num_layers=2,
        num_heads=2,
        vocab_size=50,
    )
    plain = estimate(shape, tokens=10, labelled_tokens=4, longest_row=5, attention_weights_kept=False)
    per_token_layer = 10 * 8 + 4 * 16
    assert plain.activations == (10 * per_token_layer * 2) * 4 + 3 * 4 * 50 * 4
    kept = estimate(shape, tokens=10, labelled_tokens=4, longest_row=5)
    assert kept.activations - plain.activations == 2 * 2 * 5 * 5 * 2 * 2 * 4  # heads·L²·rows, ×2 tensors, ×layers
    half = estimate(
        shape,
        tokens=10,
        labelled_tokens=4,
        longest_row=5,
        bfloat16=True,
        attention_weights_kept=False,
    )
    assert half.activations == (10 * per_token_layer * 2) * 2 + 3 * 4 * 50 * 4  # the fp32 CE stays fp32
    checkpointed = estimate(
        shape,
        tokens=10,
        labelled_tokens=4,
        longest_row=5,
        gradient_checkpointing=True,
        attention_weights_kept=False,
    )
    assert checkpointed.activations == (10 * 8 * 2 + 10 * per_token_layer) * 4 + 3 * 4 * 50 * 4
    assert plain.states == 1000 * 4 + 1000 * 12
    assert plain.total == plain.states + plain.activations


def test_a_run_that_cannot_fit_is_refused_with_the_options_that_would(tmp_path):
    shape = model_shape(saved_config(tmp_path, **SHAPE_3B), Qwen25VLAdapter())
    cfg = TrainConfig(batch_size=1, max_length=512)
    with pytest.raises(InsufficientMemoryError) as err:
        check_fits(shape, cfg, torch.device("cpu"), available=24 * GIB)
    message = str(err.value)
    assert "--lora" in message and "vision_learning_rate=0" not in message  # 52 GB does not fit 24 either
    assert "4 GPUs with ZeRO-3" in message  # 56 GiB of states / 4 = 14 GiB each
    line = check_fits(shape, cfg, torch.device("cpu"), available=80 * GIB)
    assert line.startswith("memory: weights + optimizer state 55.9 GiB")


def test_train_refuses_before_loading_and_can_be_told_not_to(tmp_path, monkeypatch, fast_checkpoint):
    from dvlm.train import loop

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)  # a device with 1 KiB free
    loaded = []
    def refuse_to_load(*args, **kwargs):
        loaded.append(args)
        raise RuntimeError("loaded")

    monkeypatch.setattr(loop.LoadedModel, "load", refuse_to_load)
    data = tmp_path / "data.json"
    data.write_text('[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yes"}]}]')
    with pytest.raises(InsufficientMemoryError, match="1 GiB|0.0 GiB available"):
        loop.train(
            fast_checkpoint,
            data,
            tmp_path / "run",
            TrainConfig(max_steps=1),
            progress=False,
        )
    assert not loaded and not (tmp_path / "run").exists()
    with pytest.raises(RuntimeError, match="loaded"):  # memory_check=false goes on to load the weights
        loop.train(
            fast_checkpoint,
            data,
            tmp_path / "run",
            TrainConfig(max_steps=1, memory_check=False),
            progress=False,
        )


# A shape whose estimate comes out in whole GiB: 2^28 parameters (4 GiB of states), and activations
# worked out by hand from `estimate`'s formula for batch 2 x max_length 4096 with the noisy stream:
# 16,384 positions in rows of 8,192 (two streams), per token and layer 10*1024 + 4*4096 = 26,624 values,
# attention 2*8*8192^2*2 rows, 4 layers, fp32: 41,339,060,224 bytes, plus the logits of 4,096 labelled
# tokens 3*4096*32768*4 = 1,610,612,736: 42,949,672,960 bytes = 40.0 GiB.
ROUND_SHAPE = ModelShape(parameters=2**28, vision_parameters=0, hidden_size=1024, intermediate_size=4096,
                         num_layers=4, num_heads=8, vocab_size=32768)


def test_the_estimate_counts_the_noisy_stream():
    """Diffusion training runs the clean stream and a noisy one as long again: the worst case is
    rows twice max_length (10 * 2 here), not max_length."""
    tiny = ModelShape(parameters=1000, vision_parameters=100, hidden_size=8, intermediate_size=16, num_layers=2,
                      num_heads=2, vocab_size=50)
    # 20 positions x (10*8 + 4*16) values, attention 2*2*20^2 for the one row, 2 layers, fp32; 5 labelled tokens.
    assert memory.training_estimate(tiny, TrainConfig(batch_size=1, max_length=10), lora=False).activations == \
        ((20 * 144 + 2 * 2 * 20 * 20) * 2) * 4 + 3 * 5 * 50 * 4 == 38_840  # the clean stream alone: 17,720
    assert memory.training_estimate(ROUND_SHAPE, TrainConfig(batch_size=2, max_length=4096), lora=False) \
        .activations == 42_949_672_960


def test_the_memory_line_says_it_is_a_worst_case_bound():
    """Issue 24: "activations up to 125.9 GiB ... 19.6 GiB available" read as a need, for a run that
    peaked at 6.2 GB."""
    cfg = TrainConfig(batch_size=2, max_length=4096)
    assert check_fits(ROUND_SHAPE, cfg, torch.device("cpu"), available=64 * GIB) == (
        "memory: weights + optimizer state 4.0 GiB, activations at most 40.0 GiB (a worst-case bound: every row of "
        "a micro-batch of 2 at max_length, 4,096 tokens, with its noisy copy); 64.0 GiB available on cpu")
    # Measured data bounds it tighter: rows of 2,000 positions (2 x 1,000) instead of 8,192.
    assert check_fits(ROUND_SHAPE, cfg, torch.device("cpu"), available=64 * GIB, longest=1000) == (
        "memory: weights + optimizer state 4.0 GiB, activations at most 3.9 GiB (a worst-case bound: every row of "
        "a micro-batch of 2 as long as the longest sample, 1,000 tokens, with its noisy copy); 64.0 GiB available "
        "on cpu")
    ar = TrainConfig(batch_size=2, max_length=4096, objective="autoregressive")
    assert "4,096 tokens); 64.0 GiB" in check_fits(ROUND_SHAPE, ar, torch.device("cpu"), available=64 * GIB)
    # A sample longer than max_length (it will be skipped) does not raise the bound.
    assert "at max_length, 4,096 tokens" in check_fits(ROUND_SHAPE, cfg, torch.device("cpu"), available=64 * GIB,
                                                       longest=5000)


def test_training_estimate_counts_both_streams_literally():
    """A small configuration worked by hand. ModelShape: hidden 8, intermediate 16, 2 layers,
    2 heads, vocab 50, 1000 parameters; batch 2, max_length 5, fp32, no checkpointing.

    Each row is max_length clean tokens plus a noisy stream as long again: 2 * 5 = 10 positions,
    so tokens = 2 rows * 10 = 20, the longest row 10, labelled = 2 * 5 // 2 = 5.
    Per token and layer: 10 * 8 + 4 * 16 = 144 values; attention weights: 2 tensors * 2 heads *
    10 * 10 * 2 rows = 800. Layers: (20 * 144 + 800) * 2 = 7360 values * 4 bytes = 29440.
    Logits: 3 * 5 * 50 * 4 = 3000. Activations: 32440 bytes.
    (Without the noisy stream: (10 * 144 + 2*2*5*5*2) * 2 * 4 + 3000 = 16120.)
    States: weights 1000 * 4, gradients 1000 * 4, AdamW 1000 * 8 = 16000."""
    shape = ModelShape(parameters=1000, vision_parameters=100, hidden_size=8, intermediate_size=16,
                       num_layers=2, num_heads=2, vocab_size=50)
    full = memory.training_estimate(shape, TrainConfig(batch_size=2, max_length=5), lora=False)
    assert (full.weights, full.gradients, full.optimizer, full.activations) == (4000, 4000, 8000, 32440)
    lora = memory.training_estimate(shape, TrainConfig(batch_size=2, max_length=5), lora=True)
    assert (lora.weights, lora.gradients, lora.optimizer, lora.activations) == (4000, 0, 0, 32440)
    frozen = memory.training_estimate(shape, TrainConfig(batch_size=2, max_length=5, vision_learning_rate=0.0),
                                      lora=False)
    assert (frozen.gradients, frozen.optimizer) == (900 * 4, 900 * 8)  # the 100 vision parameters train not
