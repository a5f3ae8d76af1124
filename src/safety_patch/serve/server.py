"""Running ``serve``: the listening socket, and uvicorn stopped on SIGINT/SIGTERM with a grace period."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from ..errors import SafetyPatchError
from .app import create_app
from .protocol import ServeConfig


def bind(host: str, port: int):
    """A socket bound to host:port (before the model loads: a busy port is one line, exit code 2).

    Raises SafetyPatchError if the address cannot be bound."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise SafetyPatchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def serve(backend, host: str, port: int, config: ServeConfig, sock=None, shutdown_timeout: float = 30.0) -> None:
    """Run the server until SIGINT or SIGTERM (uvicorn); ``sock`` an already bound socket (tests).

    Either signal is the normal way to stop a service (``docker stop`` and systemd send SIGTERM): no
    new connection is accepted, answers in flight get up to ``shutdown_timeout`` seconds to finish,
    those still running then are cut and audited as 503 "server shutting down" (not as a client
    that went away), and the call returns, so the command ends with its summary line and exit 0.
    A second SIGINT stops at once."""
    sock = sock if sock is not None else bind(host, port)
    server = make_server(create_app(backend, config), host, port, shutdown_timeout)
    server.run(sockets=[sock])


def make_server(app, host: str, port: int, shutdown_timeout: float):
    """A uvicorn server for ``app`` (from ``create_app``) that stops on a signal as ``serve`` says: the
    app learns that it is stopping (answers cut then are audited as 503), and the caught signal is
    not raised again after the shutdown."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not app.state.stopping:
                # shortly before the grace period ends, answers still running are cut by the app itself,
                # as 503 in the OpenAI error shape (a stream gets an error event), not left to uvicorn's
                # bare "Internal Server Error" for the connections it cancels
                cut = getattr(app.state.backend, "cut_in_flight", None)
                if cut is not None:
                    t = threading.Timer(max(0.0, shutdown_timeout - min(1.0, shutdown_timeout / 2)), cut)
                    t.daemon = True
                    t.start()
            app.state.stopping = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                # uvicorn raises the caught signal again once it has shut down, which kills the
                # process (exit 143 for SIGTERM) or raises KeyboardInterrupt: the stop was asked for
                self._captured_signals.clear()

    logging.getLogger("uvicorn.error").addFilter(_CutAtShutdown(app))
    return Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                 timeout_graceful_shutdown=shutdown_timeout))


class _CutAtShutdown(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" traceback for an answer cut because the server
    is stopping: uvicorn has already said how many it cut, and the audit log has each one."""

    def __init__(self, app):
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (self.app.state.stopping and isinstance(exc, asyncio.CancelledError))

