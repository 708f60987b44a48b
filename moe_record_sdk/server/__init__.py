"""SGLang's expert-distribution HTTP endpoints (and our extensions), reusable by every engine.

* :mod:`.control`: the framework-free layer: :class:`Backend`, :class:`LocalBackend`,
  :class:`Controller` (identity, run ids, dump files).
* :mod:`.handler`: :class:`ControlHandler`, one ``handle(method, path, query, headers, body)``
  for any web framework.
* :mod:`.app`: :func:`make_app`, the raw ASGI app uvicorn serves.
* :mod:`.engine`: the reference engine behind ``moe-record serve``.

The contract is ``spec/http-api.md``.
"""

from .app import AppRoute, ControlApp, make_app
from .control import Backend, ControlError, Controller, DumpOutcome, LocalBackend
from .handler import (
    DUMP_PATH,
    DUMP_TEXT,
    ROUTES,
    START_PATH,
    START_TEXT,
    STATUS_PATH,
    STOP_PATH,
    STOP_TEXT,
    ControlHandler,
    Response,
    check_bearer,
)

__all__ = [
    "DUMP_PATH",
    "DUMP_TEXT",
    "ROUTES",
    "START_PATH",
    "START_TEXT",
    "STATUS_PATH",
    "STOP_PATH",
    "STOP_TEXT",
    "AppRoute",
    "Backend",
    "ControlApp",
    "ControlError",
    "ControlHandler",
    "Controller",
    "DumpOutcome",
    "LocalBackend",
    "Response",
    "ServerThread",
    "check_bearer",
    "make_app",
]


def __getattr__(name: str) -> object:
    # uvicorn is imported only by code that serves, not by every client of the protocol.
    if name == "ServerThread":
        from .threaded import ServerThread

        return ServerThread
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
