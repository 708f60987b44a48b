"""SGLang's expert-distribution HTTP endpoints (and our extensions), reusable by every engine.

* :mod:`.control`: the framework-free layer: :class:`Backend`, :class:`LocalBackend`,
  :class:`Controller` (identity, run ids, dump files).
* :mod:`.handler`: :class:`ControlHandler`, one ``handle(method, path, query, headers, body)``
  for any web framework.
* :mod:`.app`: :func:`make_app`, the raw ASGI app uvicorn serves.
* :mod:`.engine`: the reference engine behind ``moe-record serve``.

The contract is ``spec/http-api.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

if TYPE_CHECKING:
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
    from .threaded import ServerThread

# Loaded on first use: a client reading .protocol pays for no torch, and only code that
# serves imports uvicorn (.threaded).
__getattr__, __dir__ = lazy_names(
    __name__,
    {
        **dict.fromkeys(["AppRoute", "ControlApp", "make_app"], "app"),
        **dict.fromkeys(["Backend", "ControlError", "Controller", "DumpOutcome", "LocalBackend"], "control"),
        **dict.fromkeys(
            ["DUMP_PATH", "DUMP_TEXT", "ROUTES", "START_PATH", "START_TEXT", "STATUS_PATH", "STOP_PATH", "STOP_TEXT"],
            "handler",
        ),
        **dict.fromkeys(["ControlHandler", "Response", "check_bearer"], "handler"),
        "ServerThread": "threaded",
    },
    globals(),
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
