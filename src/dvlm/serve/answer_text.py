"""A request's answer as streamed text: pieces as tokens arrive, and stop strings.

A stop string ends the answer before it: its text is never sent, even in part, so the end of the
text that could begin a stop string is held back until the next tokens show whether it does.
"""

from __future__ import annotations

from collections.abc import Callable

from dvlm.decode.stream import IncrementalText


class AnswerText:
    """A request's answer as text: the pieces to send as its tokens arrive, held back where a stop
    string may be starting, and the answer cut before the first stop string."""

    def __init__(self, decode_text: Callable[[list[int]], str], stop: tuple[str, ...]) -> None:
        self._decode = decode_text
        self.stop = tuple(s for s in stop if s)
        self.incremental = IncrementalText(decode_text)
        self.sent = 0  # characters of incremental.text sent
        self.sent_tokens = 0  # tokens sent with Deltas
        self.stopped = False  # a stop string appeared

    def add(self, tokens: list[int]) -> str:
        """Take newly committed tokens; returns the text that may be sent now."""
        start = len(self.incremental.text)
        self.incremental.push(tokens)
        text = self.incremental.text
        if not self.stop:
            return self._take(len(text))
        hit = first_stop(text, self.stop, max(0, start - max(map(len, self.stop)) + 1))
        if hit is not None:
            self.stopped = True
            return self._take(hit)
        return self._take(len(text) - held_back(text, self.stop))

    def _take(self, end: int) -> str:
        piece = self.incremental.text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece

    def final(self, tokens: list[int], text: str) -> tuple[str, list[int], bool]:
        """(text, tokens, whether a stop string ended it) of the whole answer, from its full decoding
        `text`: cut before the first stop string, keeping the tokens up to the one that completed it."""
        hit = first_stop(text, self.stop)
        if hit is None:
            return text, tokens, False
        return text[:hit], tokens_through_stop(tokens, self._decode, self.stop), True

    def unsent(self, final_text: str) -> str:
        sent = self.incremental.text[:self.sent]
        return final_text[len(sent):] if final_text.startswith(sent) else ""


def first_stop(text: str, stop: tuple[str, ...], start: int = 0) -> int | None:
    """Index of the earliest stop string in text[start:] (None: none)."""
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins a stop string (it may yet become one)."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def tokens_through_stop(tokens: list[int], decode_text: Callable[[list[int]], str], stop: tuple[str, ...]) -> list[int]:
    """The shortest prefix of `tokens` whose text contains a stop string (binary search)."""
    low, high = 1, len(tokens)
    while low < high:
        middle = (low + high) // 2
        if first_stop(decode_text(tokens[:middle]), stop) is not None:
            high = middle
        else:
            low = middle + 1
    return tokens[:low]
