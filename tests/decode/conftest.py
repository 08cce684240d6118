"""Decoding fixtures: the random tiny models, and confident versions of them."""

import pytest
import torch

import dvlm

SHARPEN = 6.0
"""Factor on the final norm's weight: scales every logit, so the random models become confident
(several positions above a 0.9 threshold per pass, next to passes that unmask one) while their
argmax predictions, masks and cache stay those of a real network."""


def sharpen(lm, factor: float = SHARPEN):
    with torch.no_grad():
        lm.model.model.language_model.norm.weight.mul_(factor)
    return lm


@pytest.fixture(scope="module")
def confident_models(dvlm_checkpoints):
    return {preset: sharpen(dvlm.load(path)) for preset, path in dvlm_checkpoints.items()}
