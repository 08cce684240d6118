"""A deterministic stand-in for `dvlm.serve.engine.Engine`, with the interface of dvlm.serve.requests.

It never touches a model. Each request's answer is the digits of its prompt length, repeated:
a 37-token prompt gets "3 7 3 7 3 7 3 7" (`ANSWER_TOKENS` tokens, then an end-of-answer), cut at
max_new_tokens ("length") or before a stop string ("stop"). Like the real engine, one loop thread
admits queued requests into the running rows (at most `max_batch_size`) and advances every row by
one block (`block_tokens`, or the request's block_size) per step.

Tests steer it: `full` (submit raises QueueFullError), `block_delay_s` (slow steps), `fail_with`
(every row ends with an error), `hang` (rows never advance: only cancel, timeout or shutdown end
them; `hang_if(request)` for some rows only), `honour_timeouts` (False: a broken engine that lets
requests overrun), `broken_events` (the event stream raises: an engine bug), and read back
`submitted`, `cancelled` and the observer calls. `die()` ends its loop thread as a crashed
engine's would (every request in flight ends with an error; `alive` turns False).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator

from dvlm.decode.output import GenerationOutput
from dvlm.serve.requests import (
    Delta,
    EngineObserver,
    EngineRequest,
    EngineStoppedError,
    Finished,
    QueueFullError,
)

ANSWER_TOKENS = 8
SHUTDOWN_ERROR = "server shutting down"


def answer_text(prompt_tokens: int, tokens: int = ANSWER_TOKENS) -> str:
    """The fake's full answer (before max_new_tokens or stop strings cut it)."""
    digits = str(prompt_tokens)
    return " ".join(digits[i % len(digits)] for i in range(tokens))


class FakeHandle:
    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None) -> None:
        self.id = request_id
        self._loop = loop
        self._async_queue: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self._queue: queue.Queue = queue.Queue()
        self.cancel_requested = threading.Event()
        self.broken = False

    def push(self, event: Delta | Finished) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            pass

    async def events(self) -> AsyncIterator[Delta | Finished]:
        while True:
            event = await self._async_queue.get()
            if self.broken:
                raise RuntimeError("the fake engine's event stream broke")
            yield event
            if isinstance(event, Finished):
                return

    def ready(self) -> list[Delta | Finished]:
        ready = []
        while not self._async_queue.empty():
            if self.broken:
                raise RuntimeError("the fake engine's event stream broke")
            ready.append(self._async_queue.get_nowait())
        return ready

    def iter_events(self) -> Iterator[Delta | Finished]:
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, Finished):
                return

    def cancel(self) -> None:
        self.cancel_requested.set()


@dataclass
class _Row:
    request: EngineRequest
    handle: FakeHandle
    answer: list[int]
    submitted: float
    started: float | None = None
    first_token: float | None = None
    emitted: int = 0
    text: str = ""
    nfe: int = 0
    tokens: list[int] = field(default_factory=list)


class FakeEngine:
    def __init__(self, tokenize: Callable[[str], list[int]], decode: Callable[[list[int]], str], *,
                 max_batch_size: int = 16, max_queue: int = 64, observer: EngineObserver | None = None,
                 block_tokens: int = 3, block_delay_s: float = 0.0) -> None:
        self.tokenize, self.decode = tokenize, decode
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.observer = observer or EngineObserver()
        self.block_tokens, self.block_delay_s = block_tokens, block_delay_s
        self.full = False
        self.fail_with: str | None = None
        self.hang = False
        self.hang_if: Callable[[EngineRequest], bool] = lambda request: False
        self.honour_timeouts = True
        self.broken_events = False
        self.submitted: list[EngineRequest] = []
        self.cancelled: list[str] = []
        self.started = self.stopped = False
        self._pending: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._dying = False
        self._thread: threading.Thread | None = None

    # -- the Engine interface ---------------------------------------------------------------
    def start(self) -> None:
        self.started = True
        self._thread = threading.Thread(target=self._loop, name="fake-engine", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest) -> FakeHandle:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if self._stopping or self._dying:
                raise EngineStoppedError("the engine is shutting down")
            if self.full or len(self._pending) >= self.max_queue:
                raise QueueFullError(self.max_queue, retry_after_s=2.5)
            handle = FakeHandle(request.id, loop)
            handle.broken = self.broken_events
            answer = self.tokenize(answer_text(len(request.prompt)))
            self._pending.append(_Row(request, handle, answer, time.monotonic()))
            self.submitted.append(request)
        self._wake.set()
        return handle

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.stopped = True

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def running_rows(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def die(self) -> None:
        self._dying = True
        self._wake.set()
        self._thread.join(10)

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            self._wake.wait(0.005)
            self._wake.clear()
            with self._lock:
                if self._stopping or self._dying:
                    rows = [*self._pending, *self._running]
                    self._pending.clear()
                    self._running.clear()
                    break
                while self._pending and len(self._running) < self.max_batch_size:
                    row = self._pending.popleft()
                    row.started = time.monotonic()
                    self._running.append(row)
                rows = list(self._running)
            if rows:
                self._step(rows)
                time.sleep(self.block_delay_s)
        for row in rows:
            self._finish(row, "error", "engine failure: the loop died" if self._dying else SHUTDOWN_ERROR)

    def _step(self, rows: list[_Row]) -> None:
        for row in rows:
            timeout = row.request.timeout_s
            if row.handle.cancel_requested.is_set():
                self.cancelled.append(row.request.id)
                self._finish(row, "cancelled")
            elif self.honour_timeouts and timeout is not None and time.monotonic() - row.submitted > timeout:
                self._finish(row, "timeout", f"the request took longer than {timeout:g} s")
            elif self.fail_with is not None:
                self._finish(row, "error", self.fail_with)
            elif not (self.hang or self.hang_if(row.request)):
                self._advance(row)
        self.observer.on_step(rows[0].request.group_key, len(rows), 1)

    def _advance(self, row: _Row) -> None:
        """Commit one block: emit its text; end the row at a stop string, its length or its answer's end."""
        width = row.request.block_size or self.block_tokens
        limit = min(len(row.answer), row.request.max_new_tokens)
        row.tokens = row.answer[:min(limit, row.emitted + width)]
        row.emitted = len(row.tokens)
        row.nfe += 1
        text = self.decode(row.tokens)
        stop_at = min((text.find(s) for s in row.request.stop if s in text), default=-1)
        if stop_at >= 0:
            text = text[:stop_at]
        if len(text) > len(row.text):
            row.handle.push(Delta(text[len(row.text):], row.tokens[-width:]))
            row.first_token = row.first_token or time.monotonic()
            row.text = text
        if stop_at >= 0 or row.emitted == len(row.answer):
            self._finish(row, "stop", stop_string=stop_at >= 0)
        elif row.emitted >= row.request.max_new_tokens:
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str, error: str | None = None, stop_string: bool = False) -> None:
        with self._lock:
            if row in self._running:
                self._running.remove(row)
            if row in self._pending:
                self._pending.remove(row)
        req = row.request
        output = GenerationOutput(text=row.text, tokens=row.tokens, finish_reason=reason, decoder=req.decoder,
                                  nfe=row.nfe + 1, prompt_tokens=len(req.prompt),
                                  settings={"decoder": req.decoder, "block_size": req.block_size})
        now = time.monotonic()
        finished = Finished(output, error=error, queue_seconds=(row.started or now) - row.submitted,
                            first_token_seconds=None if row.first_token is None else row.first_token - row.submitted,
                            stop_string=stop_string)
        self.observer.on_finished(req, finished)
        row.handle.push(finished)
