"""Conversion verification refuses what it cannot vouch for: a source that itself gives NaN/inf,
and non-finite differences (`nan > tol` is false, so a plain comparison would pass them)."""

from __future__ import annotations

import math

import pytest

from dvlm.convert import conversion as convert_module
from dvlm.convert.conversion import ConversionError, convert_checkpoint
from tests.convert.sources import build_checkpoint, quiet


@pytest.mark.parametrize("poison", [math.nan, math.inf])
def test_source_with_non_finite_weights_is_refused_and_writes_nothing(tmp_path, tokenizer, adapter, poison):
    src = build_checkpoint(tmp_path / "src", tokenizer, adapter=adapter, poison=poison)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"the source model itself produces non-finite logits \(NaN/inf\)"):
        convert_checkpoint(src, out, log=quiet)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("difference", [math.nan, math.inf])
def test_non_finite_difference_fails_verification(tmp_path, monkeypatch, ar_checkpoint, difference):
    monkeypatch.setattr(convert_module, "max_logit_difference", lambda *args: difference)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=f"differs from the source: max \\|logit diff\\| {difference}"):
        convert_checkpoint(ar_checkpoint, out, log=quiet)
    assert list(tmp_path.iterdir()) == []
