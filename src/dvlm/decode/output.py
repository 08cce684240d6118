"""`GenerationOutput`: what every decoder returns, one per prompt."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class GenerationOutput:
    """One decoded answer with the statistics needed to judge its speed.

    `nfe` counts every model forward that did work for this row, the prefill included, so AR
    decoding has exactly one token per forward (tokens_per_nfe == 1.0). `settings` are the decoding
    settings the row actually ran with: every `DecodeConfig` field, the model's defaults filled in
    and the ones its decoder does not use set to None (`dvlm.decode.settings.resolve`).
    """

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (an EOS id was produced; it is not in `tokens`) or "length"
    decoder: str
    nfe: int
    prompt_tokens: int
    # The end token that finished the answer (one of the model's end tokens, `LoadedModel.eos_token_ids`);
    # None when the answer did not stop on one ("length").
    stop_token: int | None = None
    # Seconds per phase of the batch the row ran in (`prefill_s`, `denoise_s`, ...), and `total_s`:
    # this row's own time, from the start of its prefill until it finished.
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    tokens_per_step: list[int] = field(default_factory=list)  # tokens unmasked by each denoising pass
    accept_lengths: list[int] = field(default_factory=list)  # speculative decoding: tokens accepted per block
    cached_tokens: int = 0  # prompt tokens whose keys/values were reused from the prefix cache, not recomputed

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) + (1 if self.finish_reason == "stop" else 0)

    @property
    def tokens_per_nfe(self) -> float:
        """Generated tokens (the EOS included) per model forward."""
        return self.num_tokens / self.nfe if self.nfe else 0.0

    @property
    def tokens_per_second(self) -> float:
        """This row's generated tokens over its own time (in a batch: until the row finished)."""
        total = self.timings.get("total_s", 0.0)
        return self.num_tokens / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            num_tokens=self.num_tokens,
            tokens_per_nfe=round(self.tokens_per_nfe, 4),
            tokens_per_second=round(self.tokens_per_second, 2),
        )
        return out
