"""Relaying one submitted request's engine events to its client: as SSE chunks or as one JSON body.

The engine reports `Delta` events (text committed by a block) and one `Finished`; a `Run` turns
them into OpenAI chunks or a completion body, maps a failed `Finished` to its HTTP error, cancels
the request when the client goes away (its row is freed at the next block), and gives up on an
engine that overruns the request's timeout.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dvlm.serve.errors import CLIENT_GONE, APIError, error_body, unavailable
from dvlm.serve.prepare import Prepared
from dvlm.serve.requests import Delta, Finished
from dvlm.serve.schemas import ChatCompletionRequest, chunk_body, completion_body, dvlm_body, usage

if TYPE_CHECKING:
    from dvlm.serve.app import ServerState

# Past its own timeout the engine ends a request itself; the HTTP layer gives up this much later,
# so a stuck engine can never hold a connection forever.
TIMEOUT_GRACE_S = 5.0
ANSWERED = ("stop", "length")
log = logging.getLogger("dvlm.serve")


class Run:
    """One submitted request: relays its engine events to the client, streamed or as one body."""

    def __init__(self, state: ServerState, handle: Any, prepared: Prepared, body: ChatCompletionRequest,
                 arrived: float) -> None:
        self.state = state
        self.handle = handle
        self.prepared = prepared
        self.include_usage = body.include_usage
        self.arrived = arrived
        self.created = int(time.time())
        self.finished: Finished | None = None
        self.first_text = False  # a Delta with text has arrived
        timeout = state.settings.request_timeout_s
        self.deadline = None if timeout is None else arrived + timeout + TIMEOUT_GRACE_S

    @property
    def id(self) -> str:
        return self.prepared.request.id

    async def batches(self) -> AsyncIterator[list[Delta | Finished]]:
        """The engine's events up to Finished, each with the ones already waiting behind it (sent in
        one write); a 504 APIError if the engine overruns the deadline."""
        events = self.handle.events().__aiter__()
        while self.finished is None:
            remaining = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
            try:
                event = await asyncio.wait_for(events.__anext__(), remaining)
            except asyncio.TimeoutError as err:
                self.handle.cancel()
                raise APIError(504, "the request ran past the server's timeout", type="timeout",
                               code="timeout") from err
            except StopAsyncIteration as err:
                raise APIError(500, "the engine ended the request without a result", type="server_error",
                               code="engine_error") from err
            batch = [event] if isinstance(event, Finished) else [event, *self.handle.ready()]
            for item in batch:
                self._record(item)
            yield batch

    def _record(self, event: Delta | Finished) -> None:
        if isinstance(event, Finished):
            self._record_finished(event)
        elif event.text and not self.first_text:
            self.first_text = True
            self.state.metrics.time_to_first_token.observe(time.monotonic() - self.arrived)

    def _record_finished(self, finished: Finished) -> None:
        self.finished = finished
        if finished.output.finish_reason in ANSWERED:
            self.state.metrics.latency.observe(time.monotonic() - self.arrived)

    def error(self) -> APIError | None:
        """The error a Finished stands for, None for an answer (finish reason stop or length)."""
        reason = self.finished.output.finish_reason
        if reason in ANSWERED:
            return None
        if reason == "timeout":
            return timeout_error(self.state.settings.request_timeout_s)
        if self.state.shutting_down:
            return unavailable("the server is shutting down; retry on another instance")
        detail = self.finished.error or reason
        return APIError(500, f"generation failed: {detail}", type="server_error", code="engine_error")

    async def complete(self, request: Request) -> Response:
        """Wait for the whole answer, cancelling the request if the client disconnects first."""
        collect = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collect.done():
                collect.cancel()
                self.release()
        if collect not in done:
            return Response(status_code=CLIENT_GONE)  # nobody reads it: the client has gone
        try:
            collect.result()
        except APIError:  # the engine overran the deadline
            raise
        except Exception as err:  # an engine bug: a clean 500, and the connection stays usable
            log.error("request %s failed", self.id, exc_info=err)
            raise APIError(500, "internal server error", type="server_error", code="internal_error") from err
        error = self.error()
        if error is not None:
            raise error
        return JSONResponse(completion_body(self.id, self.created, self.state.model.name, self.finished,
                                            dvlm_body(self.prepared.settings, self.finished)))

    async def _collect(self) -> None:
        async for _ in self.batches():
            pass

    async def stream(self) -> AsyncIterator[str]:
        """SSE: a role chunk, one chunk per committed text, a final chunk (finish reason, `dvlm`), the
        usage chunk if asked for, `[DONE]`; an error event instead of the final chunk on failure.
        Chunks that are ready together go out in one write (the ending always does)."""
        ending = ""
        try:
            yield self._sse(self._chunk({"role": "assistant", "content": ""}))
            async for batch in self.batches():
                texts = "".join(self._sse(self._chunk({"content": event.text})) for event in batch
                                if isinstance(event, Delta) and event.text)
                if self.finished is None:
                    if texts:
                        yield texts
                else:
                    ending = texts + self._ending()
        except APIError as err:
            ending += self._sse(err.body())
        except Exception as err:  # an engine bug: the client still gets a proper end of stream
            log.error("streaming %s failed", self.id, exc_info=err)
            ending += self._sse(error_body("internal server error", "server_error", "internal_error"))
        finally:
            self.release()
        yield ending + "data: [DONE]\n\n"

    def _ending(self) -> str:
        """The final chunk and the usage chunk, or the error event that replaces them."""
        error = self.error()
        if error is not None:
            return self._sse(error.body())
        finished = self.finished
        settings = self.prepared.settings
        text = self._sse(self._chunk({}, finished.output.finish_reason, dvlm=dvlm_body(settings, finished)))
        if self.include_usage:
            text += self._sse(self._chunk(None, usage=usage(finished)))
        return text

    def release(self) -> None:
        """Cancel the request unless it finished: its client went away (its row is freed at the next
        block) or the engine overran. Idempotent."""
        if self.finished is None:
            self.handle.cancel()

    def streaming_response(self) -> StreamingResponse:
        return _EventStream(self)

    def _chunk(self, delta: dict[str, str] | None, finish_reason: str | None = None, **extra: Any) -> dict:
        if self.include_usage:
            extra.setdefault("usage", None)
        return chunk_body(self.id, self.created, self.state.model.name, delta, finish_reason, **extra)

    @staticmethod
    def _sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def timeout_error(limit_s: float) -> APIError:
    return APIError(504, f"the request ran past the server's timeout of {limit_s:g} s", type="timeout", code="timeout")


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """An SSE response that releases its request however the response ends: a client that leaves
    before the first event is sent never starts the body generator, whose own cleanup then never runs."""

    def __init__(self, run: Run) -> None:
        super().__init__(run.stream(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.run.release()
