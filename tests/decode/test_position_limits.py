"""The model's position limit, exactly at the limit: a prompt may take every position but the last
(the answer's first token takes that one), and an answer that ends on the last position warns not.

Positions run 0 .. max_position_embeddings - 1. With a limit of 100, a prompt whose answer starts
at position 99 fits one answer token; at 100 nothing fits. An answer of n tokens from position p
takes p .. p + n - 1: p + n <= 100 stays inside the model."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest

from dvlm.data.processor import PromptTooLongError
from dvlm.decode.generate import PositionLimitWarning, check_positions

LIMIT = 100


class _Model:
    def max_positions(self) -> int:
        return LIMIT


def _check(next_position: int, max_new_tokens: int) -> None:
    check_positions(_Model(), SimpleNamespace(next_position=next_position), max_new_tokens)


def test_a_prompt_may_take_every_position_but_the_last():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(LIMIT - 1, 1)
    with pytest.raises(PromptTooLongError, match=f"the prompt takes {LIMIT} positions; the model has {LIMIT}"):
        _check(LIMIT, 1)


def test_an_answer_that_ends_on_the_last_position_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(90, 10)  # positions 90 .. 99
    with pytest.warns(PositionLimitWarning, match="the prompt uses 90 positions and max_new_tokens=11"):
        _check(90, 11)  # 90 .. 100: one past
