"""The OpenAI chat-completions schema as the server accepts it, and the response bodies it sends.

Requests are validated strictly (`"5"` is not a number, `true` is not an integer, unknown fields are
refused), so a client learns of a typo instead of getting a silently different answer. The dvlm
knobs and the sampling settings (`decoder`, `block_size`, `threshold`, `steps`, `temperature`,
`top_p`, `top_k`, `seed`) are taken as raw JSON values here and checked by `DecodeConfig`, so the
server refuses exactly what `model.generate` refuses, with the same message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dvlm.data.chat import ROLES
from dvlm.serve.requests import Finished

MAX_STOP_STRINGS = 4  # as OpenAI's API


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted for compatibility; images are used whole


class ContentPart(_Strict):
    """`{"type": "text", "text": ...}` or `{"type": "image_url", "image_url": {"url": ...}}`."""

    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _one_payload(self) -> "ContentPart":
        if self.type == "text" and (self.text is None or self.image_url is not None):
            raise ValueError("a text part has a 'text' string and nothing else")
        if self.type == "image_url" and (self.image_url is None or self.text is not None):
            raise ValueError("an image_url part has an 'image_url' object ({\"url\": ...}) and nothing else")
        return self


class Message(_Strict):
    role: Literal[ROLES]  # type: ignore[valid-type]  # the chat roles, from their one home
    content: list[ContentPart]
    name: str | None = None  # accepted for compatibility; not part of the prompt

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, value: Any) -> Any:
        # A string and a single text part lay out the same tokens in the processor, so one form
        # is enough downstream (and a validation error names a single expected type).
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        return value


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    n: int | None = None
    user: str | None = None  # accepted for compatibility; not used
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    # Checked by DecodeConfig (same rules and messages as model.generate):
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None
    seed: Any = None
    decoder: Any = None
    block_size: Any = None
    threshold: Any = None
    steps: Any = None
    # dvlm: false keeps this request out of the server's caches (it neither reuses nor leaves there
    # the keys/values of its prompt and answer, or its images' features).
    cache: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings_not_empty(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _supported(self) -> "ChatCompletionRequest":
        if self.n not in (None, 1):
            raise ValueError(f"n={self.n} is not supported: the server returns one choice (n=1)")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError("presence_penalty and frequency_penalty are not supported (leave them 0)")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            raise ValueError("give max_tokens or max_completion_tokens, not two different values")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def validation_message(error: ValidationError) -> str:
    """The first problem of a pydantic error as one readable line: `messages[0].role: ...`."""
    first = error.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return f"the request body is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})"
    where = _location(first["loc"])
    if first["type"] == "extra_forbidden":
        parent, _, name = where.rpartition(".")
        return f"unknown field {name!r}" + (f" in {parent}" if parent else "")
    if first["type"] == "model_type" and not where:
        return "the request body must be a JSON object"
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _location(loc: tuple[Any, ...]) -> str:
    text = ""
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text


# -- responses -----------------------------------------------------------------------------------
def usage(finished: Finished) -> dict[str, int]:
    """OpenAI usage; completion tokens as `Finished.completion_tokens` counts them."""
    prompt, completion = finished.output.prompt_tokens, finished.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(request_id: str, created: int, model: str, finished: Finished,
                    dvlm: dict[str, Any]) -> dict[str, Any]:
    output = finished.output
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output.text},
                     "logprobs": None, "finish_reason": output.finish_reason}],
        "usage": usage(finished),
        "dvlm": dvlm,
    }


def chunk_body(request_id: str, created: int, model: str, delta: dict[str, str] | None,
               finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` is the usage-only chunk (no choices)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, **extra}


def dvlm_body(settings: dict[str, Any], finished: Finished) -> dict[str, Any]:
    """The `dvlm` field: the decoding settings used and what they bought (forwards, tokens per forward,
    prompt tokens whose keys/values the prefix cache gave)."""
    nfe = finished.output.nfe
    per_forward = finished.completion_tokens / nfe if nfe else 0.0
    return {**settings, "nfe": nfe, "tokens_per_forward": round(per_forward, 4),
            "cached_tokens": finished.output.cached_tokens}
