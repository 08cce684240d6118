"""`dvlm chat`: an interactive terminal chat with a model, answers streamed as blocks are committed.

    > /image cat.png          adds an image to your next message
    > What colour is it?      the answer streams in
    > /reset                  forgets the conversation (and pending images)
    > /quit                   (or Ctrl-D, or Ctrl-C) leaves

The conversation is a `dvlm.decode.session.ChatSession` (what `model.chat()` returns): each turn
prefills only what the conversation added since the previous answer (its keys/values stay, and
images already shown are not encoded again), and each answer equals what `generate` returns for
the whole conversation. /reset drops the conversation and its caches.
"""

from __future__ import annotations

from typing import Any, Callable, TextIO

from dvlm.data.images import ImageError, load_image
from dvlm.decode.session import ChatSession
from dvlm.model.loaded import LoadedModel

HELP = "/image PATH adds an image to your next message, /reset starts over, /quit (or Ctrl-D) leaves"


class TerminalChat:
    """The conversation and the images waiting for the next user message."""

    def __init__(self, lm: LoadedModel, options: dict[str, Any]) -> None:
        """`options`: the ChatSession's (decoding settings, cache sizes)."""
        self.lm = lm
        self.session = ChatSession(lm, **options)
        self.pending_images: list[Any] = []

    def add_image(self, path: str) -> None:
        """Load now, so a bad file is reported at once, not at the next question."""
        self.pending_images.append(load_image(path, limits=self.lm.processor.image_limits))

    def reset(self) -> None:
        self.session.reset()
        self.pending_images.clear()

    def ask(self, text: str, write: Callable[[str], None]) -> Any:
        """Stream the answer to `text` through `write`; returns the GenerationOutput. On an error the
        question is dropped (the conversation stays as it was) and the error propagates."""
        output = self.session.send(text, self.pending_images, on_text=write)
        self.pending_images.clear()
        return output


def run_chat(session: TerminalChat, read: Callable[[str], str], out: TextIO, err: TextIO,
             verbose: bool = False) -> None:
    """The read-answer loop until /quit, end of input or Ctrl-C."""
    print(f"dvlm chat: {HELP}", file=err, flush=True)
    while True:
        try:
            line = read("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if not line:
            continue
        if line.startswith("/") and not _command(session, line, out, err):
            return
        if not line.startswith("/") and not _answer(session, line, out, err, verbose):
            return


def _command(session: TerminalChat, line: str, out: TextIO, err: TextIO) -> bool:
    """Run a /command; False to leave the chat."""
    name, _, argument = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/reset":
        session.reset()
        print("(conversation cleared)", file=err, flush=True)
    elif name == "/image" and argument.strip():
        try:
            session.add_image(argument.strip())
            print(f"(image added: {len(session.pending_images)} for your next message)", file=err, flush=True)
        except ImageError as error:
            print(f"error: {error}", file=err, flush=True)
    else:
        print(f"unknown command {line!r}; {HELP}", file=err, flush=True)
    return True


def _answer(session: TerminalChat, text: str, out: TextIO, err: TextIO, verbose: bool) -> bool:
    """Answer one message; False to leave the chat (Ctrl-C while decoding)."""
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    try:
        output = session.ask(text, write)
    except KeyboardInterrupt:  # Ctrl-C leaves, while answering as at the prompt
        print("\n(interrupted)", file=out, flush=True)
        return False
    except ValueError as error:  # a typed special token, a prompt too long, a bad setting, ...
        print(f"error: {' '.join(str(error).split())}", file=err, flush=True)
        return True
    print(file=out, flush=True)
    if verbose:
        print(f"({output.num_tokens} tokens, {output.nfe} forwards, {output.tokens_per_nfe:.2f} tokens/forward, "
              f"{output.cached_tokens} of {output.prompt_tokens} prompt tokens reused, finish: {output.finish_reason})",
              file=err, flush=True)
    return True
