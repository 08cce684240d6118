"""Streaming: text pieces as each block (or token) is committed, from any decoder.

Decoders report committed tokens to a listener; `TextStream` runs the decoder in a worker thread
and hands the text pieces to the caller's iterator. The final `GenerationOutput` is available as
`stream.output` once the iterator is exhausted.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

from dvlm.decode.output import GenerationOutput

_DONE = object()


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
        tokens: list[int] = []
        shown = ""
        while (item := self._queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            tokens.extend(item)
            # Decode everything so far and emit the new suffix: a token's text can depend on its
            # neighbours (byte-level BPE pieces of one character).
            text = self._decode(tokens)
            if text.startswith(shown) and len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        self._thread.join()

    def _work(self) -> None:
        try:
            self.output = self._run(lambda _prompt, new: self._queue.put(list(new)))
        except BaseException as err:  # handed to the consuming thread, which re-raises it
            self._queue.put(err)
        finally:
            self._queue.put(_DONE)
