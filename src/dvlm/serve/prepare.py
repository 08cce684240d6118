"""From a validated chat-completion request to an `EngineRequest`: decoding settings, images, prompt.

Cheap checks run first (settings, answer length), then images are loaded under the server's image
policy and the chat is encoded by the model's own processor: an OpenAI request encodes exactly the
prompt ids `model.generate` encodes for the same content (DESIGN.md invariant 8). Everything here
blocks (image decoding, tokenising) and runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from dvlm.config import ConfigError, DecodeConfig
from dvlm.data.processor import Encoded
from dvlm.decode.settings import resolve
from dvlm.serve.errors import bad_request, too_large
from dvlm.serve.images import ImagePolicy, load_image_url
from dvlm.serve.requests import SERVED_DECODERS, EngineRequest
from dvlm.serve.schemas import ChatCompletionRequest, Message
from dvlm.serve.settings import ServedModel, ServeSettings

# Request fields handed to DecodeConfig as they came (it checks their types and ranges).
DECODE_KNOBS = ("block_size", "threshold", "steps", "temperature", "top_p", "top_k", "seed")


@dataclass(frozen=True)
class Prepared:
    request: EngineRequest
    settings: dict[str, Any]  # the decoding settings in effect, echoed in the response's `dvlm` field


def prepare(body: ChatCompletionRequest, request_id: str, model: ServedModel, settings: ServeSettings,
            policy: ImagePolicy) -> Prepared:
    """Validate, load images, encode; raises APIError (400 / 413) for anything the client must fix."""
    cfg = decode_config(body, model, settings)
    encoded = encode(model, processor_messages(body.messages, policy, settings.max_images))
    cfg = replace(cfg, max_new_tokens=answer_budget(body.requested_max_tokens, encoded, model, settings))
    request = EngineRequest(
        id=request_id, prompt=encoded, decoder=cfg.decoder, block_size=cfg.block_size, steps=cfg.steps,
        top_k=cfg.top_k, top_p=cfg.top_p, threshold=cfg.threshold, temperature=cfg.temperature, seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens, stop=tuple(body.stop or ()), timeout_s=settings.request_timeout_s,
        cache=body.cache, stream=body.stream)
    return Prepared(request, effective_settings(cfg, model))


def decode_config(body: ChatCompletionRequest, model: ServedModel, settings: ServeSettings) -> DecodeConfig:
    """The request's decoding settings over the server's defaults, checked by DecodeConfig."""
    decoder = served_decoder(body.decoder, model, settings)
    requested = body.requested_max_tokens
    if requested is not None and requested > settings.max_tokens:
        raise bad_request(f"max_tokens={requested} is more than this server allows ({settings.max_tokens}, "
                          "its --max-tokens)", param="max_tokens")
    given = {name: getattr(body, name) for name in DECODE_KNOBS if getattr(body, name) is not None}
    defaults = settings.default_knobs
    if "threshold" in given or "steps" in given:  # the request chose its policy; the server's does not mix in
        defaults = {k: v for k, v in defaults.items() if k not in ("threshold", "steps")}
    try:
        return DecodeConfig(decoder=decoder, max_new_tokens=requested or 1, **{**defaults, **given})
    except ConfigError as err:
        raise bad_request(str(err), code="invalid_decode_settings") from err


def served_decoder(value: Any, model: ServedModel, settings: ServeSettings) -> str:
    if value is None:
        return settings.decoder or model.default_decoder
    if not isinstance(value, str) or value not in SERVED_DECODERS:
        raise bad_request(f"decoder={value!r} is not served; choose one of {', '.join(SERVED_DECODERS)}",
                          param="decoder")
    if value != "ar" and model.diffusion is None:
        raise bad_request(f"decoder={value!r} needs a block-diffusion model; this server's model is a plain "
                          "AR model: use decoder 'ar'", param="decoder")
    return value


def processor_messages(messages: list[Message], policy: ImagePolicy, max_images: int) -> list[dict[str, Any]]:
    """OpenAI messages -> the processor's chat form, each image_url loaded (and checked) as a PIL image."""
    count = sum(part.type == "image_url" for message in messages for part in message.content)
    if count > max_images:
        raise too_large(f"the request has {count} images; this server takes at most {max_images} per request",
                        param="messages")
    out = []
    for i, message in enumerate(messages):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                where = f"messages[{i}].content[{j}].image_url"
                parts.append({"type": "image", "image": load_image_url(part.image_url.url, policy, where)})
        out.append({"role": message.role, "content": parts})
    return out


def encode(model: ServedModel, messages: list[dict[str, Any]]) -> Encoded:
    try:
        return model.encode(messages)
    except ValueError as err:  # special tokens typed as text, placeholder/image mismatch, processor max_length
        raise bad_request(str(err), param="messages") from err


def answer_budget(requested: int | None, encoded: Encoded, model: ServedModel, settings: ServeSettings) -> int:
    """max_new_tokens: the request's, else the server's --max-tokens; the prompt and the answer must fit."""
    if settings.max_prompt_tokens is not None and len(encoded) > settings.max_prompt_tokens:
        raise bad_request(f"the prompt has {len(encoded)} tokens (images included); this server takes at most "
                          f"{settings.max_prompt_tokens} (its --max-prompt-tokens)",
                          code="context_length_exceeded", param="messages")
    if model.max_positions is None:
        return requested or settings.max_tokens
    next_position = encoded.next_position
    room = model.max_positions - next_position
    if room < 1:
        raise bad_request(f"the prompt takes {next_position} positions; the model has {model.max_positions} "
                          "(max_position_embeddings)", code="context_length_exceeded", param="messages")
    if requested is None:
        return min(settings.max_tokens, room)
    if requested > room:
        raise bad_request(f"the prompt takes {next_position} of the model's {model.max_positions} positions, "
                          f"leaving {room} for the answer; max_tokens={requested} does not fit",
                          code="context_length_exceeded", param="max_tokens")
    return requested


def effective_settings(cfg: DecodeConfig, model: ServedModel) -> dict[str, Any]:
    """The dvlm knobs in effect for this request, the model's defaults filled in (null: not used):
    the resolution the engine's decoders apply (`dvlm.decode.settings.resolve`)."""
    try:
        resolved = resolve(cfg, model.diffusion)
    except ConfigError as err:  # the engine refuses the request with the same reason
        raise bad_request(str(err), code="invalid_decode_settings") from err
    return {name: getattr(resolved, name) for name in ("decoder", "block_size", "threshold", "steps")}
