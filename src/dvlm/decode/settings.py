"""Decoding settings, resolved once.

A decode's settings come from three places, in this order: what the caller gave (a `generate`
keyword, a CLI flag, an HTTP request field: the fields of `DecodeConfig`), then the model's recipe
(its DiffusionConfig: block size, threshold or fixed steps, what its layout allows), then
DecodeConfig's own defaults. `resolve` applies them in one place and refuses what the model cannot
serve; what it returns is what the decoders run with, what the server's engine groups requests
by, what the server echoes, and what `GenerationOutput.settings` records.

A resolved config splits in two: `GroupSettings` shape a forward and are shared by every row of a
batch (block size, fixed step count, sub-blocks, the fused commit and prefill, compiling);
`RowSettings` are each row's
own (its answer budget, its sampling, its threshold).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dvlm.config import (
    DEFAULT_THRESHOLD,
    ConfigError,
    DecodeConfig,
    DiffusionConfig,
    Sampling,
)
from dvlm.model.loaded import require_recipe

SPECULATIVE = ("spec", "spec-quadratic")


@dataclass(frozen=True)
class GroupSettings:
    """What shapes a forward: rows that differ here cannot share a batch."""

    block_size: int | None = None  # None for ar
    steps: int | None = None  # block decoding with a fixed step count (None: each row's threshold)
    sub_block_size: int | None = None
    fuse_commit: bool = False
    fuse_prefill: bool = False  # the first block's first pass (or first draft) rides along the prefill
    compile: bool = False  # step forwards under torch.compile (dvlm.decode.compiled)


@dataclass(frozen=True)
class RowSettings:
    """What a row decides for itself inside a shared batch."""

    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)  # its own stream: samples do not depend on the batch
    threshold: float | None = None  # block decoding by threshold (None with fixed steps or other decoders)


def resolve(cfg: DecodeConfig, diffusion: DiffusionConfig | None, path: str | None = None) -> DecodeConfig:
    """`cfg` with every setting the decode will use filled in and the ones it will not use cleared.

    Raises ConfigError when the model cannot serve the decoder (a plain AR model for a diffusion
    decoder, a recipe speculative decoding cannot verify, a block too small)."""
    unused = dict(block_size=None, threshold=None, steps=None, sub_block_size=None, fuse_commit=False,
                  fuse_prefill=False)
    if cfg.decoder == "hf":  # transformers' own loop: nothing of ours to compile
        return dataclasses.replace(cfg, **unused, compile=False)
    if cfg.decoder not in ("block", *SPECULATIVE):
        return dataclasses.replace(cfg, **unused)
    recipe = require_recipe(diffusion, cfg.decoder, path)
    block_size = cfg.block_size or recipe.block_size
    if cfg.decoder in SPECULATIVE:
        check_speculative(recipe, block_size, cfg.decoder)
        return dataclasses.replace(cfg, **{**unused, "block_size": block_size, "fuse_prefill": cfg.fuse_prefill})
    threshold, steps = unmasking_policy(cfg, recipe)
    # The fused commit needs the seed to come from the commit's causal pass (token shift, causal clean stream).
    fuse = cfg.fuse_commit and recipe.token_shift and recipe.clean_attention == "causal"
    # With token shift the first block opens with the seed the prefill predicts: its first pass
    # cannot run in the forward that computes that seed.
    fuse_prefill = cfg.fuse_prefill and not recipe.token_shift
    return dataclasses.replace(cfg, block_size=block_size, threshold=threshold, steps=steps, fuse_commit=fuse,
                               fuse_prefill=fuse_prefill)


def unmasking_policy(cfg: DecodeConfig, recipe: DiffusionConfig) -> tuple[float | None, int | None]:
    """(threshold, steps) of block decoding: the request's, else the model's, else DEFAULT_THRESHOLD."""
    if cfg.threshold is not None or cfg.steps is not None:
        return cfg.threshold, cfg.steps
    if recipe.decode_threshold is None and recipe.decode_steps is None:
        return DEFAULT_THRESHOLD, None
    return recipe.decode_threshold, recipe.decode_steps


def check_speculative(recipe: DiffusionConfig, block_size: int, decoder: str) -> None:
    """Refuse models and settings speculative decoding cannot serve."""
    if not recipe.token_shift or recipe.clean_attention != "causal":
        raise ConfigError(f"decoder={decoder!r} needs a token-shift model with a causal clean stream "
                          "(the fast-dvlm recipe)")
    if block_size < 2:
        raise ConfigError(f"decoder={decoder!r} needs block_size >= 2")


def split(resolved: DecodeConfig) -> tuple[GroupSettings, RowSettings]:
    """A resolved config's group and row settings."""
    group = GroupSettings(resolved.block_size, resolved.steps, resolved.sub_block_size, resolved.fuse_commit,
                          resolved.fuse_prefill, resolved.compile)
    return group, RowSettings(resolved.max_new_tokens, resolved.sampling, resolved.threshold)


def joined(decoder: str, group: GroupSettings, row: RowSettings) -> DecodeConfig:
    """The resolved config a row ran with (the inverse of `split`)."""
    s = row.sampling
    return DecodeConfig(decoder=decoder, max_new_tokens=row.max_new_tokens, block_size=group.block_size,
                        threshold=row.threshold, steps=group.steps, temperature=s.temperature, top_k=s.top_k,
                        top_p=s.top_p, seed=s.seed, sub_block_size=group.sub_block_size,
                        fuse_commit=group.fuse_commit, fuse_prefill=group.fuse_prefill, compile=group.compile)
