"""A scripted stand-in for a dVLM whose every prediction is known in advance.

The output at position p predicts `script_token(p + 1)` whatever the inputs, with a confidence
that depends only on p + 1: high (above 0.9) except at every `LOW_EVERY`-th position. So
* AR greedy decoding writes script_token(p) at position p;
* a draft pass predicts exactly what the verify pass will (speculative decoding accepts every
  draft: accept lengths are B unless a decoder drafts the wrong positions);
* the last denoising pass of a block always guesses the next seed right (a fused commit always
  saves its forward);
* thresholding unmasks every confident position in one pass and the others one per pass,
  so the per-pass counts of a block can be worked out by hand;
* optionally, drafts (outputs over a [MASK] input) get chosen positions wrong, so that a draft
  made without the seed can be rejected where a draft that saw it is not.
It ignores attention masks and the cache, so it says nothing about them: the real tiny models
are for that.
"""

from __future__ import annotations

import torch
from torch import nn

from dvlm.api import DVLM
from dvlm.config import DiffusionConfig
from dvlm.data.positions import PositionScheme
from dvlm.data.processor import IGNORE_INDEX, Encoded
from dvlm.model.adapters.base import Adapter

VOCAB = 16
MASK = 15
EOS = 14
PAD = 13
SCRIPT_TOKENS = 12  # the script uses ids 0..11
HIGH_LOGIT = 9.0  # softmax of a one-hot logit over 15 allowed ids: 0.9983
LOW_LOGIT = 2.0  # 0.345
LOW_EVERY = 4  # positions p with p % 4 == 0 are predicted with low confidence


def script_token(position: torch.Tensor) -> torch.Tensor:
    """The token the script puts at each position (never MASK, EOS or PAD)."""
    return (position * 5 + 3) % SCRIPT_TOKENS


def is_confident(position: torch.Tensor) -> torch.Tensor:
    return position % LOW_EVERY != 0


class _NoCache:
    """Everything KVContext asks of a cache, keeping nothing (the script needs no context)."""

    layers: list = []  # no layers to join or trim

    def crop(self, length: int) -> None:
        pass

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        pass


class ScriptedAdapter(Adapter):
    architectures = ()

    def __init__(self, hard_positions: tuple[int, ...] = ()) -> None:
        self.hard_positions = hard_positions  # positions a draft (an output over a [MASK]) gets wrong

    def embed(self, model, input_ids, vision=None) -> torch.Tensor:
        return nn.functional.one_hot(input_ids, VOCAB).float()  # (B, L, V)

    def hidden_states(self, model, inputs_embeds, position_ids, attention_mask, cache=None) -> torch.Tensor:
        target = position_ids[0] + 1  # (B, Q): the position each output predicts
        logit = torch.where(is_confident(target), HIGH_LOGIT, LOW_LOGIT)
        token = script_token(target)
        over_mask = inputs_embeds[..., MASK] > 0  # an output whose own input is [MASK]: a draft
        wrong = over_mask & torch.isin(target, torch.tensor(self.hard_positions, dtype=torch.long))
        token = torch.where(wrong, (token + 1) % SCRIPT_TOKENS, token)
        return nn.functional.one_hot(token, VOCAB).float() * logit[..., None]

    def logits(self, model, hidden) -> torch.Tensor:
        return hidden

    def new_cache(self, model) -> _NoCache:
        return _NoCache()


class _ThreeAxes(PositionScheme):
    """Text positions on three equal axes, like the reference family's prompts."""

    axes = 3


class _Processor:
    pad_token_id = PAD
    positions = _ThreeAxes()

    @staticmethod
    def decode(tokens: list[int]) -> str:
        return " ".join(map(str, tokens))


def scripted_lm(preset: str = "fast-dvlm", hard_positions: tuple[int, ...] = (), **recipe) -> DVLM:
    """The scripted model; `hard_positions`: positions every draft gets wrong (the verifier, whose
    inputs are real tokens, never does)."""
    diffusion = DiffusionConfig.from_preset(preset, mask_token_id=MASK, eos_token_ids=[EOS], pad_token_id=PAD,
                                            **recipe)
    model = nn.Linear(1, 1)  # only gives the decoders a device and a dtype
    return DVLM(model, ScriptedAdapter(hard_positions), _Processor(), diffusion)


def prompt(length: int) -> Encoded:
    """A text prompt of `length` tokens: the script's own tokens at positions 0..length-1."""
    positions = torch.arange(length)
    return Encoded(
        input_ids=script_token(positions), labels=torch.full((length,), IGNORE_INDEX),
        mm_token_type_ids=torch.zeros(length, dtype=torch.long), position_ids=positions[None].expand(3, -1).clone(),
        next_position=length, vision=None,
    )
