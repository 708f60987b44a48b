"""Serve an ASGI app with uvicorn on a thread of this process: for tests, benchmarks and demos.

The socket is bound before the thread starts (port 0 picks a free port), so there is no race
for the port and ``url`` is known at once. :class:`Server` (uvicorn's, telling a ``ControlApp``
when its shutdown begins) serves here and in ``moe-record serve``.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import uvicorn

from .app import ControlApp


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (0: any free port)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: uvicorn writes a response's head and body separately,
    # and with Nagle on the body waits for the client's delayed ACK (~40 ms a call on Linux).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server, calling ``ControlApp.shutdown`` as its shutdown begins.

    Why: uvicorn waits for the requests in flight before it tells the app anything, so a long
    ``/generate`` would hold a SIGTERM, a Ctrl-C or :meth:`ServerThread.stop` for its whole length.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if isinstance(self.config.app, ControlApp):
            self.config.app.shutdown()
        await super().shutdown(sockets)


class ServerThread:
    """uvicorn serving ``app`` on a daemon thread; a context manager.

    >>> with ServerThread(app) as server:  # doctest: +SKIP
    ...     httpx.get(server.url + "/expert_distribution_record_status")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        config.setdefault("log_level", "warning")
        config.setdefault("lifespan", "off")
        config.setdefault("access_log", False)
        self.config = uvicorn.Config(app, host=host, port=port, **config)
        self.server = Server(self.config)
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as e:  # reported by start()
            self._error = e

    def start(self, timeout: float = 10.0) -> ServerThread:
        """Start serving; returns once uvicorn accepts connections."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn on {self.url} failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"uvicorn on {self.url} did not start within {timeout} s")
            time.sleep(0.005)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and wait for the thread (open connections are closed)."""
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
