"""What dvlm's lmms-eval plugin does with a request, without lmms-eval: settings, decoding, speed.

`dvlm.plugins.lmms_eval` is the thin lmms-eval class around these; keeping them here lets the main
test suite check them without lmms-eval installed (it needs torchvision, which this project does
not install next to dvlm).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from dvlm.config import DECODERS, ConfigError, DecodeConfig
from dvlm.decode.output import GenerationOutput

# lmms-eval generation kwargs that dvlm reads; the rest (e.g. `image_aspect_ratio`) belong to
# other models' processors and are ignored.
READ_GEN_KWARGS = ("until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams")


class UnsupportedRequestError(NotImplementedError):
    """A request type the plugin cannot answer (log-likelihood, multi-round)."""


@dataclass(frozen=True)
class PluginSettings:
    """The `--model_args` of `lmms-eval --model dvlm` (and its `--batch_size`)."""

    pretrained: str
    """A dvlm checkpoint directory or a built-in model name."""
    decoder: str | None = None
    """ar, block, spec, ...; default: block for converted models, else ar."""
    block_size: int | None = None
    threshold: float | None = None
    steps: int | None = None
    batch_size: int = 1
    """Requests decoded together (lmms-eval's --batch_size)."""
    max_new_tokens: int | None = None
    """Overrides every task's `generation_kwargs.max_new_tokens` when given."""
    device: str | None = None
    dtype: str | None = None
    quantize: str | None = None
    """A `dvlm quantize` scheme applied at load (int8-weight, int8-dynamic, fp8)."""

    def __post_init__(self) -> None:
        if self.decoder is not None and self.decoder not in DECODERS:
            raise ConfigError(f"decoder={self.decoder!r}; choose one of {', '.join(DECODERS)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")


def plugin_settings(**model_args: Any) -> PluginSettings:
    """Typed settings from lmms-eval's parsed model args; unknown keys are errors."""
    known = set(PluginSettings.__dataclass_fields__)
    unknown = sorted(set(model_args) - known - {"max_batch_size"})  # lmms-eval always passes max_batch_size
    if unknown:
        raise ConfigError(f"unknown dvlm model_args {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {k: v for k, v in model_args.items() if k in known and v is not None}
    if "batch_size" in values:
        values["batch_size"] = int(values["batch_size"])  # lmms-eval's --batch_size arrives as text
    return PluginSettings(**values)


def decode_options(settings: PluginSettings, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`generate` keyword arguments for one request: the plugin's knobs + the task's limits."""
    if int(gen_kwargs.get("num_beams", 1) or 1) > 1:
        raise UnsupportedRequestError("dvlm decodes greedily or by sampling; beam search (num_beams > 1) is not supported")
    options = {k: getattr(settings, k) for k in ("decoder", "block_size", "threshold", "steps")
               if getattr(settings, k) is not None}
    limit = settings.max_new_tokens or gen_kwargs.get("max_new_tokens")
    if limit is not None:
        options["max_new_tokens"] = int(limit)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") and temperature > 0:
        options["temperature"] = temperature
        if gen_kwargs.get("top_p") not in (None, 1.0):
            options["top_p"] = float(gen_kwargs["top_p"])
    DecodeConfig(**{k: v for k, v in options.items() if k != "decoder"})  # refused now, with dvlm's message
    return options


def stop_strings(gen_kwargs: dict[str, Any]) -> list[str]:
    until = gen_kwargs.get("until") or []
    return [until] if isinstance(until, str) else [u for u in until if u]


def cut_at_stop(text: str, until: list[str]) -> str:
    """The text up to the first stop string (lmms-eval's `until` contract)."""
    cut = min((text.find(s) for s in until if s in text), default=-1)
    return text[:cut] if cut >= 0 else text


@dataclass
class SpeedTally:
    """Tokens, forwards and decoding seconds over every answered request."""

    tokens: int = 0
    nfe: int = 0
    seconds: float = 0.0
    requests: int = 0
    decoders: set[str] = field(default_factory=set)

    def add(self, outputs: list[GenerationOutput], seconds: float) -> None:
        self.tokens += sum(o.num_tokens for o in outputs)
        self.nfe += sum(o.nfe for o in outputs)
        self.seconds += seconds
        self.requests += len(outputs)
        self.decoders.update(o.decoder for o in outputs)

    def summary(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "nfe": self.nfe, "requests": self.requests,
                "tokens_per_forward": round(self.tokens / self.nfe, 4) if self.nfe else 0.0,
                "tokens_per_second": round(self.tokens / self.seconds, 2) if self.seconds > 0 else 0.0,
                "seconds": round(self.seconds, 4), "decoder": ",".join(sorted(self.decoders))}


def answer_batch(lm: Any, contexts: list[str], visuals: list[list[Any]], options: dict[str, Any],
                 until: list[str], tally: SpeedTally) -> list[str]:
    """Decode one batch of requests (images before the text, dvlm's chat layout) and tally speed."""
    started = time.perf_counter()
    outputs = lm.generate(list(contexts), [list(v) for v in visuals], **options)
    tally.add(outputs, outputs[0].timings.get("total_s", time.perf_counter() - started))
    return [cut_at_stop(o.text, until) for o in outputs]
