"""Streaming: text pieces as each block (or token) is committed, from any decoder.

Decoders report committed tokens to a listener; `TextStream` runs the decoder in a worker thread
and hands the text pieces to the caller's iterator. The final `GenerationOutput` is available as
`stream.output` once the iterator is exhausted. `IncrementalText` turns a growing token list into
text pieces (the server's engine uses it too).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from dvlm.decode.output import GenerationOutput

_DONE = object()
INCOMPLETE = "\ufffd"  # what decoding shows for the bytes of a character whose last bytes are still to come


class IncrementalText:
    """The text of a growing token list, piece by piece, decoding only its end.

    A token's text can depend on its neighbours (byte-level BPE pieces of one character, a
    tokenizer that drops the leading space of the first token it decodes), so each `push`
    decodes the tokens from the start of the previous piece and returns what they add to that
    piece's text; a text that ends in an incomplete character waits for the next tokens. The
    pieces add up to `decode(all tokens)` for such tokenizers; `rest` returns whatever the full
    decoding has beyond the pieces (at the end of a stream).
    """

    def __init__(self, decode_text: Callable[[list[int]], str]) -> None:
        self._decode = decode_text
        self.tokens: list[int] = []
        self.text = ""  # the pieces so far
        self._window = 0  # first token decoded by the next push
        self._read = 0  # tokens whose text is in `text`

    def push(self, new_tokens: list[int]) -> str:
        """Add tokens; returns the text they complete ("" while it is not complete)."""
        self.tokens.extend(new_tokens)
        before = self._decode(self.tokens[self._window:self._read])
        after = self._decode(self.tokens[self._window:])
        if len(after) <= len(before) or after.endswith(INCOMPLETE) or not after.startswith(before):
            return ""
        self._window, self._read = self._read, len(self.tokens)
        piece = after[len(before):]
        self.text += piece
        return piece

    def rest(self) -> str:
        """The full decoding's text after the pieces (at the end: a last incomplete character)."""
        full = self._decode(self.tokens)
        return full[len(self.text):] if full.startswith(self.text) else ""


class TextStream:
    """Iterate to get the answer's text as it is committed: `for piece in stream: print(piece, end="")`."""

    def __init__(self, run: Callable[[Callable[[int, list[int]], None]], GenerationOutput],
                 decode_text: Callable[[list[int]], str]) -> None:
        self._run = run
        self._decode = decode_text
        self._queue: queue.Queue[Any] = queue.Queue()
        self.output: GenerationOutput | None = None
        self._thread: threading.Thread | None = None

    def __iter__(self) -> Iterator[str]:
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()
        text = IncrementalText(self._decode)
        while (item := self._queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            if piece := text.push(item):
                yield piece
        self._thread.join()
        if rest := text.rest():
            yield rest

    def _work(self) -> None:
        try:
            self.output = self._run(lambda _prompt, new: self._queue.put(list(new)))
        except BaseException as err:  # handed to the consuming thread, which re-raises it
            self._queue.put(err)
        finally:
            self._queue.put(_DONE)
