"""Every validated setting exactly at its limit (accepted) and just past it (refused).

Each row is (what to build, the value at the limit, the value just past it); the limits are the
ones the field docstrings and error messages state ("must be >= 1", "in [0, 1)", ...)."""

from __future__ import annotations

import pytest

from dvlm.config import (
    ConfigError,
    DecodeConfig,
    DiffusionConfig,
    Sampling,
    TrainConfig,
    parse_lora,
)
from dvlm.data.images import ImageLimits

def limit(name: str, build, at_limit, past_it):
    return pytest.param(build, at_limit, past_it, id=f"{name}={at_limit}")


LIMITS = [
    # DiffusionConfig
    limit("DiffusionConfig.block_size", lambda v: DiffusionConfig(block_size=v), 1, 0),
    limit("DiffusionConfig.eps_max", lambda v: DiffusionConfig(eps_max=v), 1.0, 1.0000001),
    # eps_min < eps_max, strictly
    limit("DiffusionConfig.eps_min", lambda v: DiffusionConfig(eps_min=v, eps_max=0.5), 0.4999999, 0.5),
    limit("DiffusionConfig.eps_min", lambda v: DiffusionConfig(eps_min=v), 1e-12, 0.0),
    limit("DiffusionConfig.anneal_fraction", lambda v: DiffusionConfig(anneal_fraction=v), 1.0, 1.0000001),
    limit("DiffusionConfig.anneal_fraction", lambda v: DiffusionConfig(anneal_fraction=v), 0.0, -1e-9),
    limit("DiffusionConfig.decode_threshold", lambda v: DiffusionConfig(decode_threshold=v), 1.0, 1.0000001),
    limit("DiffusionConfig.decode_threshold", lambda v: DiffusionConfig(decode_threshold=v), 0.0, -1e-9),
    limit("DiffusionConfig.decode_steps", lambda v: DiffusionConfig(decode_steps=v), 1, 0),
    limit("DiffusionConfig.diffusion_loss_weight", lambda v: DiffusionConfig(diffusion_loss_weight=v), 0.0, -1e-9),
    limit("DiffusionConfig.ar_loss_weight", lambda v: DiffusionConfig(ar_loss_weight=v), 0.0, -1e-9),
    # Sampling and DecodeConfig
    limit("Sampling.temperature", lambda v: Sampling(temperature=v), 0.0, -1e-9),
    limit("Sampling.top_k", lambda v: Sampling(top_k=v), 1, 0),
    limit("Sampling.top_p", lambda v: Sampling(top_p=v), 1.0, 1.0000001),
    limit("Sampling.top_p", lambda v: Sampling(top_p=v), 1e-9, 0.0),
    limit("Sampling.seed", lambda v: Sampling(seed=v), 2**32 - 1, 2**32),
    limit("Sampling.seed", lambda v: Sampling(seed=v), 0, -1),
    limit("DecodeConfig.max_new_tokens", lambda v: DecodeConfig(max_new_tokens=v), 1, 0),
    limit("DecodeConfig.block_size", lambda v: DecodeConfig(block_size=v), 1, 0),
    limit("DecodeConfig.threshold", lambda v: DecodeConfig(threshold=v), 1.0, 1.0000001),
    limit("DecodeConfig.threshold", lambda v: DecodeConfig(threshold=v), 0.0, -1e-9),
    limit("DecodeConfig.steps", lambda v: DecodeConfig(steps=v), 1, 0),
    limit("DecodeConfig.sub_block_size", lambda v: DecodeConfig(sub_block_size=v), 1, 0),
    # TrainConfig
    limit("TrainConfig.learning_rate", lambda v: TrainConfig(learning_rate=v), 1e-12, 0.0),
    # 0 freezes the vision encoder
    limit("TrainConfig.vision_learning_rate", lambda v: TrainConfig(vision_learning_rate=v), 0.0, -1e-9),
    limit("TrainConfig.warmup_ratio", lambda v: TrainConfig(warmup_ratio=v), 0.0, -1e-9),
    # in [0, 1): a run that is all warmup never reaches its decay
    limit("TrainConfig.warmup_ratio", lambda v: TrainConfig(warmup_ratio=v), 0.9999999, 1.0),
    *[limit(f"TrainConfig.{name}", lambda v, name=name: TrainConfig(**{name: v}), 1, 0)
      for name in ("epochs", "batch_size", "grad_accum", "max_length", "log_every", "keep_checkpoints")],
    limit("TrainConfig.max_steps", lambda v: TrainConfig(max_steps=v), 1, 0),
    limit("TrainConfig.save_every", lambda v: TrainConfig(save_every=v), 0, -1),
    limit("TrainConfig.num_workers", lambda v: TrainConfig(num_workers=v), 0, -1),
    limit("TrainConfig.seed", lambda v: TrainConfig(seed=v), 2**32 - 1, 2**32),
    # LoRA (--lora) and the image limits
    limit("lora.r", lambda v: parse_lora(f"r={v}"), 1, 0),
    limit("lora.alpha", lambda v: parse_lora(f"alpha={v}"), 1e-9, 0),
    limit("lora.dropout", lambda v: parse_lora(f"dropout={v}"), 0.0, -1e-9),
    limit("lora.dropout", lambda v: parse_lora(f"dropout={v}"), 0.9999999, 1.0),
    limit("ImageLimits.max_bytes", lambda v: ImageLimits(max_bytes=v), 1, 0),
    limit("ImageLimits.max_pixels", lambda v: ImageLimits(max_pixels=v), 1, 0),
    limit("ImageLimits.max_aspect_ratio", lambda v: ImageLimits(max_aspect_ratio=v), 1.0, 0.9999999),
]


@pytest.mark.parametrize(("build", "at_limit", "past_it"), LIMITS)
def test_each_setting_is_accepted_at_its_limit_and_refused_past_it(build, at_limit, past_it):
    build(at_limit)
    with pytest.raises(ConfigError if not isinstance(build(at_limit), ImageLimits) else ValueError):
        build(past_it)
