"""The OpenAI-compatible HTTP app: `create_app(engine, model, settings)`.

    POST /v1/chat/completions   OpenAI chat completions (streamed as SSE or not), dvlm knobs as extra fields
    GET  /v1/models             the one served model
    GET  /health                200 while serving, 503 once shutting down or if the engine's loop has stopped
    GET  /metrics               Prometheus text

A request is read (body size capped), parsed, its images loaded and its chat encoded in a worker
thread, then submitted to the engine, which owns the model. The handler only relays the engine's
events: as SSE chunks (one per committed block) or as one JSON body. A client that goes away has
its request cancelled, which frees its row at the next block boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
import contextlib
from contextlib import asynccontextmanager, contextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from dvlm.serve.errors import CLIENT_GONE, APIError, bad_request, error_body, queue_full, too_large, unavailable
from dvlm.serve.images import ImagePolicy
from dvlm.serve.metrics import CONTENT_TYPE, ServeMetrics
from dvlm.serve.prepare import Prepared, prepare
from dvlm.serve.relay import Run, timeout_error
from dvlm.serve.requests import EngineRequest, EngineStoppedError, QueueFullError
from dvlm.serve.schemas import ChatCompletionRequest, validation_message
from dvlm.serve.settings import ServedModel, ServeSettings

log = logging.getLogger("dvlm.serve")
T = TypeVar("T")

# An oversize body is still read (and dropped, chunk by chunk) before the 413 is sent, for at most
# this long: a client that sends its whole body before reading the answer (http.client, requests,
# most simple clients) would otherwise find the connection reset, the 413 lost. nginx's lingering
# close waits as long.
DRAIN_S = 30.0
KNOWN_PATHS = ("/v1/chat/completions", "/v1/models", "/health", "/metrics")


class EngineLike(Protocol):
    """What the app uses of `dvlm.serve.engine.Engine` (see dvlm.serve.requests)."""

    def start(self) -> None: ...
    def submit(self, request: EngineRequest) -> Any: ...
    def shutdown(self, timeout_s: float = 10.0) -> None: ...
    @property
    def queue_depth(self) -> int: ...
    @property
    def running_rows(self) -> int: ...
    @property
    def alive(self) -> bool: ...


class ServerState:
    """Everything one app instance shares between requests."""

    def __init__(self, engine: EngineLike, model: ServedModel, settings: ServeSettings,
                 metrics: ServeMetrics) -> None:
        self.engine = engine
        self.model = model
        self.settings = settings
        self.metrics = metrics
        self.policy = ImagePolicy(settings.allow_local_images, settings.allow_remote_images,
                                  settings.remote_timeout_s, model.image_limits)
        self.pool = ThreadPoolExecutor(settings.encode_workers, thread_name_prefix="dvlm-encode")
        self.created = int(time.time())
        self.preparing = 0  # admitted requests not yet submitted (touched on the event loop only)
        self.shutting_down = False
        self.closing: asyncio.Event | None = None  # set on the event loop when the shutdown begins
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shutdown_lock = threading.Lock()
        self._engine_stopped = False

    def serving(self) -> None:
        """Called on the event loop once it serves (the app's lifespan)."""
        self._loop, self.closing = asyncio.get_running_loop(), asyncio.Event()

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def begin_shutdown(self) -> None:
        """Refuse new requests and stop the engine, which ends every in-flight request with an error
        (streams get an error event). Idempotent; blocking; callable from any thread."""
        self.shutting_down = True
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed: no body is being read
                self._loop.call_soon_threadsafe(self.closing.set)
        # Held while the engine stops: a second caller (the signal's thread, then the app's lifespan)
        # returns only once it has, so the process never exits with the engine inside a step.
        with self._shutdown_lock:
            if not self._engine_stopped:
                self.engine.shutdown()
                self._engine_stopped = True

    @contextmanager
    def admission(self) -> Iterator[None]:
        """Bound the work waiting to start: requests being prepared count against the queue too, so a
        burst of large images is refused with 429 instead of piling up in the encode threads."""
        waiting = self.preparing + self.engine.queue_depth
        if waiting >= self.settings.max_queue:
            raise queue_full(f"the server's queue is full ({waiting} requests waiting); retry shortly", 1.0)
        self.preparing += 1
        try:
            yield
        finally:
            self.preparing -= 1

    def check_open(self) -> None:
        if self.shutting_down:
            raise unavailable("the server is shutting down")

    def check_api_key(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        # Constant time: the comparison must not reveal how much of a guessed key is right.
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def create_app(engine: EngineLike, model: ServedModel, settings: ServeSettings,
               metrics: ServeMetrics | None = None) -> FastAPI:
    """The app over `engine` (started and stopped with the app's lifespan). Pass the `metrics` the
    engine was built with as its observer so that steps and finished requests are counted."""
    metrics = metrics or ServeMetrics()
    metrics.watch(lambda: engine.queue_depth, lambda: engine.running_rows)
    state = ServerState(engine, model, settings, metrics)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.serving()
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(state.begin_shutdown)
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="dvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.dvlm = state
    _add_error_handlers(app)
    _add_routes(app, state)
    app.add_middleware(ResponseCounter, metrics=metrics)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if state.shutting_down:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not state.engine.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        state.check_api_key(request)
        card = {"id": state.model.name, "object": "model", "created": state.created, "owned_by": "dvlm"}
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _chat_completions(request, state)


async def _chat_completions(request: Request, state: ServerState) -> Response:
    arrived = time.monotonic()
    state.check_api_key(request)
    state.check_open()
    with state.admission():
        raw = await until_closing(state, read_body(request, state.settings.max_body_bytes))
        # One hop to a worker thread for all the blocking work: parsing, images, the prompt's encoding.
        body, prepared = await state.run_blocking(parse_and_prepare, raw, state)
        state.check_open()  # a shutdown may have begun while the request was being prepared
        handle = submit(state, with_time_left(prepared.request, state.settings, arrived))
    run = Run(state, handle, prepared, body, arrived)
    if body.stream:
        return run.streaming_response()
    return await run.complete(request)


def parse_and_prepare(raw: bytes, state: ServerState) -> tuple[ChatCompletionRequest, Prepared]:
    """The request parsed, checked and encoded (blocking: runs in a worker thread)."""
    body = parse_request(raw)
    if body.model != state.model.name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {state.model.name!r} "
                       "(GET /v1/models)", code="model_not_found", param="model")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    return body, prepare(body, request_id, state.model, state.settings, state.policy)


def parse_request(raw: bytes) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as err:
        raise bad_request(validation_message(err)) from err


def with_time_left(request: EngineRequest, settings: ServeSettings, arrived: float) -> EngineRequest:
    """The request with the time it has left: --request-timeout counts from its arrival, reading
    and preparing it (images, tokenizing) included; 504 if nothing is left."""
    limit = settings.request_timeout_s
    if limit is None:
        return request
    left = limit - (time.monotonic() - arrived)
    if left <= 0:
        raise timeout_error(limit)
    return dataclasses.replace(request, timeout_s=left)


def submit(state: ServerState, request: EngineRequest) -> Any:
    try:
        return state.engine.submit(request)
    except QueueFullError as err:
        raise queue_full(str(err), err.retry_after_s) from err
    except EngineStoppedError as err:
        raise unavailable(f"the server is not taking requests ({err})") from err


async def until_closing(state: ServerState, work: Awaitable[T]) -> T:
    """`work`, unless the server begins to shut down first: a client still sending its body then gets
    a 503 and a closed connection, instead of holding the shutdown until uvicorn gives up on it."""
    task, closing = asyncio.ensure_future(work), asyncio.ensure_future(state.closing.wait())
    try:
        done, _ = await asyncio.wait({task, closing}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closing.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        error = unavailable("the server is shutting down")
        error.headers["Connection"] = "close"
        raise error
    return task.result()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 past `limit` bytes (from Content-Length, else while reading)."""
    declared = request.headers.get("content-length", "")
    stream = request.stream()
    if declared.isdigit() and int(declared) > limit:
        await _drain(stream)
        raise _body_too_large(limit)
    chunks, size = [], 0
    try:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                await _drain(stream)
                raise _body_too_large(limit)
            chunks.append(chunk)
    except ClientDisconnect as err:  # nobody is left to answer; not a server error either
        raise APIError(CLIENT_GONE, "the client closed the connection before sending its whole body",
                       code="client_closed") from err
    return b"".join(chunks)


async def _drain(stream: AsyncIterator[bytes]) -> None:
    """Read and drop the rest of an oversize body, for at most DRAIN_S seconds."""
    async def drop() -> None:
        async for _ in stream:
            pass

    try:
        await asyncio.wait_for(drop(), DRAIN_S)
    except (asyncio.TimeoutError, ClientDisconnect):
        pass  # the 413 still goes out, to a client that may no longer read it


def _body_too_large(limit: int) -> APIError:
    error = too_large(f"the request body is larger than this server's limit of {limit} bytes (--max-body-mb)")
    error.headers["Connection"] = "close"
    return error


# -- errors and response counting ----------------------------------------------------------------
def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and wrong methods, in the OpenAI error shape like every other refusal.
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(err.status_code,
                                                                                        str(err.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(error_body(message, "invalid_request_error", code), status_code=err.status_code,
                            headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        # A bug, not the client's fault: log the traceback here, never send it.
        log.error("internal error", exc_info=err)
        return JSONResponse(error_body("internal server error", "server_error", "internal_error"), status_code=500)


class ResponseCounter:
    """ASGI middleware counting responses by path and status (a pure ASGI wrapper: it does not
    buffer streamed responses or interfere with disconnect detection)."""

    def __init__(self, app: Any, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        path = path if path in KNOWN_PATHS else "other"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.on_response(path, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
