"""`RequestHandle`: what `Engine.submit` returns; the engine's loop thread delivers events to it."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator

from dvlm.serve.requests import Delta, Finished

Event = Delta | Finished


class RequestHandle:
    """A submitted request: its events (Delta ... Delta, then one Finished) and its cancellation."""

    def __init__(self, request_id: str, wake_engine: Callable[[], None]) -> None:
        self.id = request_id
        self._wake_engine = wake_engine
        self._events: queue.Queue[Event] = queue.Queue()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # submitted from a thread without an event loop
            self._loop = None
        self._async_events: asyncio.Queue[Event] | None = asyncio.Queue() if self._loop else None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._finished = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """End the request (finish_reason "cancelled"); its row leaves the batch before the next block."""
        self._cancel.set()
        self._wake_engine()

    async def events(self) -> AsyncIterator[Event]:
        """The events, on the event loop that submitted the request."""
        if self._loop is None or asyncio.get_running_loop() is not self._loop:
            raise RuntimeError("events() runs on the event loop that called submit(); use iter_events() elsewhere")
        while True:
            event = await self._async_events.get()
            yield event
            if isinstance(event, Finished):
                return

    def ready(self) -> list[Event]:
        """The events delivered and not read yet by `events()`, without waiting (on its event loop)."""
        ready = []
        while not self._async_events.empty():
            ready.append(self._async_events.get_nowait())
        return ready

    def iter_events(self) -> Iterator[Event]:
        """The events, blocking (for threads and tests)."""
        while True:
            event = self._events.get()
            yield event
            if isinstance(event, Finished):
                return

    def deliver(self, event: Event, before: Callable[[], None] | None = None) -> bool:
        """Hand an event to the consumers (engine side); nothing after the Finished. Returns
        whether it was delivered. `before` runs first when it will be (the engine counts a Finished
        in the metrics there, so that a client that has read it finds it counted)."""
        with self._lock:  # one order for both queues, and exactly one Finished
            if self._finished:
                return False
            if before is not None:
                before()
            self._finished = isinstance(event, Finished)
            self._events.put(event)
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._async_events.put_nowait, event)
                except RuntimeError:  # the event loop is closed: nobody is left to read it
                    pass
            return True
