"""A conversation that keeps its keys/values between turns: `model.chat()` and `dvlm chat`.

    chat = model.chat(max_new_tokens=64)
    out = chat.send("What is in the picture?", images=["cat.png"])
    out = chat.send("And what colour is it?")   # starts from the keys/values of the turn before
    chat.reset()                                 # forgets the conversation

Each turn encodes the whole conversation (the system prompt, earlier turns with their images,
the answers as the model gave them) exactly as `generate` encodes it, and decodes it with the
conversation's caches (`dvlm.decode.prompts`): a prefix store of one private entry, the previous
turn's prompt and committed answer, so only the tokens after them are prefilled; and a vision
cache, so an image shown again is not re-encoded. The answer is the one `generate` gives the
same conversation (DESIGN.md invariant 12). Decoders without a step function (`hf`) decode the
whole conversation each turn.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dvlm.config import DecodeConfig
from dvlm.data.images import load_image
from dvlm.data.processor import Encoded
from dvlm.decode.ar import ARStepper
from dvlm.decode.block import BlockStepper
from dvlm.decode.generate import decoder_function, encode_prompts, images_per_prompt
from dvlm.decode.output import GenerationOutput
from dvlm.decode.prompts import PREFIX_CACHE_MB, VISION_CACHE_MB, Caches
from dvlm.decode.settings import resolve
from dvlm.decode.speculative import QuadraticStepper, SpecStepper
from dvlm.decode.stepper import Stepper, run_to_completion
from dvlm.decode.stream import IncrementalText
from dvlm.model.loaded import LoadedModel

STEPPERS: dict[str, type[Stepper]] = {"ar": ARStepper, "block": BlockStepper, "spec": SpecStepper,
                                      "spec-quadratic": QuadraticStepper}


class ChatSession:
    """The conversation so far, its settings and its caches (module docstring)."""

    def __init__(self, lm: LoadedModel, *, decoder: str | None = None, vision_cache_mb: float = VISION_CACHE_MB,
                 prefix_cache_mb: float = PREFIX_CACHE_MB, **decode_options: Any) -> None:
        """`decode_options`: DecodeConfig fields, as `generate` takes them; the cache sizes in MiB
        (0: that cache is off). Raises ConfigError for settings the model cannot serve."""
        self.lm = lm
        self.cfg = resolve(DecodeConfig(decoder=decoder or lm.default_decoder, **decode_options), lm.diffusion, lm.path)
        self.caches = Caches.sized(vision_cache_mb, prefix_cache_mb, max_prefixes=1)
        self.messages: list[dict[str, Any]] = []

    def send(self, text: str, images: Any = None, *,
             on_text: Callable[[str], None] | None = None) -> GenerationOutput:
        """Answer the next user message: `text` after `images` (a path, bytes, a data: URL or a PIL
        image, or a list of them). `on_text` receives the answer's text piece by piece as blocks
        are committed. On an error the conversation stays as it was."""
        pictures = [self._load(image) for image in images_per_prompt(images, True, 1)[0] or []]
        parts = [{"type": "image", "image": picture} for picture in pictures]
        messages = [*self.messages, {"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
        encoded = encode_prompts(self.lm, [messages], [None], self.cfg.max_new_tokens)[0]
        output = self._decode(encoded, on_text)
        self.messages = [*messages, {"role": "assistant", "content": output.text}]
        return output

    def reset(self) -> None:
        """Forget the conversation and what its caches hold."""
        self.messages = []
        self.caches.clear()

    def _load(self, image: Any) -> Any:
        """Loaded once, when sent: later turns re-encode the picture, never the file."""
        processor = self.lm.processor
        return load_image(image, allow_remote=processor.allow_remote_images, limits=processor.image_limits)

    def _decode(self, encoded: Encoded, on_text: Callable[[str], None] | None) -> GenerationOutput:
        text = IncrementalText(self.lm.processor.decode)

        def listener(_index: int, tokens: list[int]) -> None:
            if (piece := text.push(tokens)) and on_text is not None:
                on_text(piece)

        stepper_cls = STEPPERS.get(self.cfg.decoder)
        if stepper_cls is None:
            output = decoder_function(self.cfg.decoder)(self.lm, [encoded], self.cfg, listener=listener)[0]
        else:
            group, row = stepper_cls.settings_for(self.lm, self.cfg)
            output = run_to_completion(stepper_cls(self.lm, group, caches=self.caches), [encoded], row, listener)[0]
        if (rest := text.rest()) and on_text is not None:
            on_text(rest)
        return output
