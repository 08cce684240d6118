"""Running the app under uvicorn: the listening socket, readiness, and shutdown on SIGTERM / Ctrl-C.

The socket is bound before the model loads, so a taken port fails at once with a one-line error,
and port 0 picks a free port whose URL is printed when the server is ready. On SIGTERM or Ctrl-C
the engine is stopped first (every in-flight request ends: streams with an error event, other
requests with 503), then uvicorn closes the connections, which no longer have anything to wait
for; a second Ctrl-C forces the exit.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from typing import Any, Callable, Iterator

import uvicorn

from dvlm.decode.prompts import Caches
from dvlm.serve.app import create_app
from dvlm.serve.metrics import ServeMetrics
from dvlm.serve.settings import ServedModel, ServeSettings

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACEFUL_TIMEOUT_S = 15.0  # uvicorn's last resort if a connection still does not close


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), not yet listening. Raises OSError (address in use, ...)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, telling us when it listens and letting the app stop its engine first on a signal."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None], on_stop: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready
        self._on_stop = on_stop

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and not self.should_exit:
            self._on_ready()

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.should_exit:
            # engine.shutdown blocks (it waits for its loop thread): never in the signal handler itself.
            threading.Thread(target=self._on_stop, name="dvlm-shutdown", daemon=True).start()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's own version re-raises the signal after a graceful stop, killing the process with it;
        a server that stopped cleanly exits normally instead."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def build_app(lm: Any, name: str, settings: ServeSettings) -> Any:
    """The app over a real engine driving `lm`, with the caches of `settings`; the engine reports
    to the app's metrics, which also read the caches' counts."""
    from dvlm.serve.engine import Engine

    metrics = ServeMetrics()
    caches = Caches.sized(settings.vision_cache_mb, settings.prefix_cache_mb)
    engine = Engine(lm, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue, observer=metrics,
                    compile=settings.compile, caches=caches)
    metrics.watch_caches(caches)
    return create_app(engine, ServedModel.from_lm(lm, name), settings, metrics)


def run(app: Any, sock: socket.socket, *, on_ready: Callable[[], None], on_stop: Callable[[], None],
        access_log: bool = False) -> None:
    """Serve `app` on the bound `sock` until SIGTERM / Ctrl-C (blocking)."""
    config = uvicorn.Config(app, lifespan="on", log_level="info" if access_log else "warning",
                            access_log=access_log, timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S)
    Server(config, on_ready, on_stop).run(sockets=[sock])
