"""What passes between the HTTP layer and the engine: requests in, events out.

The HTTP layer validates and encodes a request (images loaded, chat laid out, in a worker thread),
then hands an `EngineRequest` to `Engine.submit`. The engine owns the model: one loop thread
prefills new requests, merges them into the running batch between blocks, advances every row one
block per step, and reports each request's progress as events on its `RequestHandle`:

    handle = engine.submit(request)          # QueueFullError when the queue is full
    async for event in handle.events():      # Delta ... Delta, then exactly one Finished (only the
        ...                                  # Finished for a request with stream=False)
        ...
    handle.cancel()                          # the row leaves the batch at the next block boundary

Nothing here touches the model; the engine (`dvlm.serve.engine`) implements the contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dvlm.data.processor import Encoded
from dvlm.decode.output import GenerationOutput

SERVED_DECODERS = ("ar", "block", "spec")
"""Decoders the engine batches continuously (their step logic joins rows between blocks)."""

FINISH_REASONS = ("stop", "length", "cancelled", "timeout", "error")


class QueueFullError(RuntimeError):
    """The engine's queue holds `max_queue` requests already (HTTP 429)."""

    def __init__(self, max_queue: int, retry_after_s: float = 1.0):
        super().__init__(f"the server's queue is full ({max_queue} requests waiting); retry shortly")
        self.retry_after_s = retry_after_s


class EngineStoppedError(RuntimeError):
    """The engine is shutting down or stopped and takes no new requests (HTTP 503)."""


@dataclass(frozen=True)
class EngineRequest:
    """One generation request, already encoded. Settings that change the shape of a forward
    (`decoder`, `block_size`, `steps`) put requests into separate groups; the others are per row
    and share forwards."""

    id: str
    prompt: Encoded
    decoder: str = "block"
    block_size: int | None = None  # None: the model's
    steps: int | None = None  # block decoding with a fixed step count instead of a threshold
    top_k: int | None = None  # per row
    top_p: float | None = None  # per row
    threshold: float | None = None  # per row; None: the model's default
    temperature: float = 0.0  # per row
    seed: int | None = None  # per row: a row's sampling is reproducible whatever joins its batch
    max_new_tokens: int = 128  # per row
    stop: tuple[str, ...] = ()  # per row: the answer ends before the first of these strings
    timeout_s: float | None = None  # per row: wall-clock limit from submission
    cache: bool = True  # per row: reuse and fill the engine's vision and prefix caches
    stream: bool = True  # Delta events wanted (False: only the Finished, which holds the whole answer)

    @property
    def group_key(self) -> tuple:
        """Requests with equal keys can share a running batch. (The engine groups by this key with
        the model's defaults filled in, so block_size=None and the model's own block size share one.)"""
        return (self.decoder, self.block_size, self.steps)


@dataclass(frozen=True)
class Delta:
    """Text (and its token ids) committed for a request since its previous Delta."""

    text: str
    tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Finished:
    """The last event of a request. `output.finish_reason` is one of FINISH_REASONS; its text is
    cut before a stop string when one ended the answer (`stop_string`; its tokens then run through
    the token that completed the stop string). `error` says why, for "error"/"timeout"."""

    output: GenerationOutput
    error: str | None = None
    queue_seconds: float = 0.0  # from submission until the request's prefill started
    first_token_seconds: float | None = None  # from submission until its first Delta
    stop_string: bool = False  # a stop string ended the answer (finish_reason "stop", no end token produced)

    @property
    def completion_tokens(self) -> int:
        """The tokens the answer cost (OpenAI's `usage.completion_tokens`): its tokens, and the
        end-of-answer token when the model produced the one that ended it. An answer cut by a stop
        string counts through the token that completed the stop string; tokens its last block
        committed after that token, and an end token the model never produced, do not count."""
        ended_by_end_token = self.output.finish_reason == "stop" and not self.stop_string
        return len(self.output.tokens) + (1 if ended_by_end_token else 0)


class EngineObserver:
    """Hooks the engine calls from its loop thread (the server's Prometheus metrics implement them).
    Both must return quickly and never raise."""

    def on_step(self, group_key: tuple, rows: int, forwards: int) -> None:
        """One engine step advanced `rows` rows of a group with `forwards` model forwards (the
        prefill of rows that joined before the step included). `group_key` has the shape of
        EngineRequest.group_key, the model's defaults filled in."""

    def on_finished(self, request: EngineRequest, finished: Finished) -> None:
        """A request ended (any finish reason)."""


# The engine's interface (implemented in dvlm.serve.engine; the HTTP layer relies on exactly this):
#
#   class Engine:
#       def __init__(self, lm: LoadedModel, *, max_batch_size: int = 16, max_queue: int = 64,
#                    observer: EngineObserver | None = None, caches: Caches | None = None): ...
#       def start(self) -> None                      # starts the loop thread
#       def submit(self, request: EngineRequest) -> RequestHandle
#                                                    # QueueFullError / EngineStoppedError; thread-safe,
#                                                    # callable from the event loop (never blocks on the model);
#                                                    # settings the model cannot serve end the request at once
#                                                    # with Finished(finish_reason "error", error = why)
#       def check(self, request: EngineRequest) -> None
#                                                    # ConfigError (ValueError) for those settings, before
#                                                    # submitting (HTTP 400); cheap, never touches the model
#       def shutdown(self, timeout_s: float = 10.0) -> None
#                                                    # refuse new requests; every in-flight one gets a
#                                                    # Finished(finish_reason "error", error "server shutting down");
#                                                    # the loop thread ends
#       queue_depth: int (property)                  # requests submitted, not yet prefilled
#       running_rows: int (property)                 # rows in running batches
#       alive: bool (property)                       # the loop is serving (False once stopping, or if
#                                                    # its thread ended: /health then answers 503)
#
#   class RequestHandle:
#       id: str
#       async def events(self) -> AsyncIterator[Delta | Finished]   # for the event loop it was submitted from
#       def ready(self) -> list[Delta | Finished]   # delivered, not read yet by events(); never waits
#       def iter_events(self) -> Iterator[Delta | Finished]          # blocking, for threads and tests
#       def cancel(self) -> None                     # idempotent; ends with Finished "cancelled"
