"""What the engine keeps per request (`Entry`, from submission to its Finished) and per group of
requests sharing one stepper (`Group`), a request's settings resolved against the model, and the
outputs of requests that end outside a step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dvlm.config import ConfigError, DecodeConfig
from dvlm.decode.ar import ARStepper
from dvlm.decode.block import BlockStepper
from dvlm.decode.output import GenerationOutput
from dvlm.decode.settings import GroupSettings, RowSettings
from dvlm.decode.speculative import SpecStepper
from dvlm.decode.stepper import Stepper
from dvlm.model.loaded import LoadedModel
from dvlm.serve.answer_text import AnswerText
from dvlm.serve.handle import RequestHandle
from dvlm.serve.requests import SERVED_DECODERS, EngineRequest

STEPPERS: dict[str, type[Stepper]] = {"ar": ARStepper, "block": BlockStepper, "spec": SpecStepper}
assert tuple(STEPPERS) == SERVED_DECODERS


def request_settings(lm: LoadedModel, request: EngineRequest,
                     compile: bool = False) -> tuple[tuple, GroupSettings, RowSettings]:
    """(group key, group settings, row settings) of a request, the model's defaults filled in (`compile`:
    the server's --compile); ConfigError when it cannot be served."""
    if request.decoder not in STEPPERS:
        raise ConfigError(f"decoder {request.decoder!r} is not served; choose one of {', '.join(STEPPERS)}")
    cfg = DecodeConfig(decoder=request.decoder, max_new_tokens=request.max_new_tokens,
                       block_size=request.block_size, threshold=request.threshold, steps=request.steps,
                       temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=request.seed,
                       compile=compile)
    group, row = STEPPERS[request.decoder].settings_for(lm, cfg)
    # sub_block_size and fuse_commit are not request fields: one value per decoder, no need to key on them.
    return (request.decoder, group.block_size, group.steps), group, row


@dataclass
class Entry:
    """A request from submission to its Finished."""

    request: EngineRequest
    handle: RequestHandle
    submitted: float
    key: tuple = ()  # the group key, settings resolved
    group: GroupSettings | None = None
    row: RowSettings | None = None
    invalid: str | None = None  # why the request cannot be served
    row_id: int | None = None  # once started
    started: float | None = None  # its prefill's start
    phases: dict[str, float] = field(default_factory=dict)  # its group's phase seconds when it started
    text: AnswerText | None = None
    first_delta: float | None = None

    def expired(self, now: float) -> bool:
        return self.request.timeout_s is not None and now - self.submitted > self.request.timeout_s

    def timeout_message(self) -> str:
        return f"the request ran past its timeout of {self.request.timeout_s:g} s"

    def timings(self, group_seconds: dict[str, float], now: float) -> dict[str, float]:
        """Its group's seconds per phase since it started, and its own total."""
        timings = {f"{phase}_s": seconds - self.phases.get(phase, 0.0) for phase, seconds in group_seconds.items()}
        timings["total_s"] = now - self.started
        return timings


@dataclass
class Group:
    """Requests whose settings share a forward, in one stepper."""

    key: tuple
    stepper: Stepper
    entries: dict[int, Entry] = field(default_factory=dict)  # row id -> request
    prefill_forwards: int = 0  # forwards of prefills not yet reported to the observer


def partial_output(entry: Entry, reason: str, decode: Callable[[list[int]], str], now: float) -> GenerationOutput:
    """The output of a request that ends outside its batch's step: the tokens it committed so far."""
    tokens = list(entry.text.incremental.tokens) if entry.text is not None else []
    return bare_output(entry, reason, now, tokens, decode(tokens))


def bare_output(entry: Entry, reason: str, now: float, tokens: list[int] | None = None,
                text: str = "") -> GenerationOutput:
    """An output with only what is known without decoding (a request ending before its prefill,
    or one whose partial answer cannot be decoded)."""
    total = 0.0 if entry.started is None else now - entry.started
    return GenerationOutput(text=text, tokens=tokens or [], finish_reason=reason, decoder=entry.request.decoder,
                            nfe=0, prompt_tokens=len(entry.request.prompt), timings={"total_s": total})


def describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"
