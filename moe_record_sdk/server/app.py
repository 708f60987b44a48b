"""The endpoints as a small raw ASGI app (no web framework), served by uvicorn.

The app is a literal route list: the control endpoints of :class:`ControlHandler` plus any
``extra`` routes an engine adds (the reference engine's ``/generate``). Auth, body limits and
error answers are the handler's, so every route behaves alike. An extra route's call is cancelled
when its client disconnects or the server shuts down (:meth:`ControlApp.shutdown`), so a long
``/generate`` holds neither the engine nor the shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from ..env import DEFAULT_MAX_BODY
from .control import Backend, ControlError, Controller
from .handler import ControlHandler, Response, _headers, _query
from .protocol import DUMP_PATH

log = logging.getLogger(__name__)

_SHUTTING_DOWN = ControlError(503, "shutting_down", "the server is shutting down")

#: An extra route's endpoint: ``(method, query, headers, body) -> Response``; headers and
#: query are dicts (lower-case header names).
Endpoint = Callable[[str, dict[str, str], dict[str, str], bytes], Awaitable[Response]]


class AppRoute(NamedTuple):
    """One extra route of the app."""

    path: str
    endpoint: Endpoint
    methods: tuple[str, ...] = ("POST",)
    max_body: int = 1 << 20
    public: bool = False
    """True: served without the bearer token (health checks)."""


class ControlApp:
    """ASGI callable over a :class:`ControlHandler` and extra routes; see :func:`make_app`."""

    def __init__(self, handler: ControlHandler, extra: Sequence[AppRoute] = ()) -> None:
        self.handler = handler
        self.extra = {r.path: r for r in extra}
        self._calls: set[asyncio.Task] = set()  # extra routes' calls in flight
        self._closing = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets: not ours
            return
        method, path, raw_headers = scope["method"], scope["path"], scope.get("headers", [])
        h = _headers(raw_headers)
        route = self.extra.get(path)
        if route is None:
            resp = self.handler.precheck(method, path, h)
            if resp is None:
                body = await _read_body(receive, self.handler.max_body)
                if body is None:
                    resp = self.handler.too_large(h)
                elif path == DUMP_PATH:
                    resp = await self._dump(method, path, scope, receive, h, body)
                    if resp is None:
                        return
                else:  # checked above, body size included (_read_body's limit)
                    resp = await self.handler.serve(method, path, scope.get("query_string", b""), h, body)
        else:
            resp = await self._extra(route, method, scope, receive, h)
            if resp is None:  # the client went away: nobody to answer
                return
        await _send(send, resp)

    async def _dump(
        self, method: str, path: str, scope: dict[str, Any], receive: Any, h: dict[str, str], body: bytes
    ) -> Response | None:
        """A dump's answer; None when its client went away meanwhile (a client's timeout): the
        window it took then goes back to the engine for the next dump, not into the void. The
        dump itself is never cancelled: the recorders clear their windows as they hand them over.
        A client that goes away while the answer is sent is not seen (the server cannot tell it
        from one that took it all)."""
        async with self.handler.controller.delivering():
            gone = asyncio.ensure_future(_disconnected(receive))
            try:
                resp = await self.handler.serve(method, path, scope.get("query_string", b""), h, body)
            finally:
                gone.cancel()
            if gone.done() and not gone.cancelled():
                if resp.undelivered is not None:
                    log.warning("dump: the client went away before the answer; the window is kept for the next dump")
                    resp.undelivered()
                return None
        return resp

    def shutdown(self) -> None:
        """Cancel the extra routes' calls in flight (they answer 503) and refuse new ones.

        Why: uvicorn lets the requests in flight finish before it shuts down (the ASGI lifespan
        shutdown comes after), so one long ``/generate`` would hold the shutdown for its whole
        length. Call it on the server's event loop as the shutdown begins, as
        ``threaded.Server`` does.
        """
        self._closing = True
        for call in list(self._calls):
            call.cancel()

    async def _extra(
        self, route: AppRoute, method: str, scope: dict[str, Any], receive: Any, h: dict[str, str]
    ) -> Response | None:
        """The route's answer; None when the client went away first (its call is then cancelled)."""
        denied = None if route.public else self.handler.refused(h)
        if denied:
            return self.handler.error(denied, h)
        if method.upper() not in route.methods:
            allow = ", ".join(route.methods)
            return self.handler.error(
                ControlError(405, "method_not_allowed", f"{method} {route.path}: use {allow}", {"allow": allow}), h
            )
        body = await _read_body(receive, route.max_body)
        if body is None:
            return self.handler.error(
                ControlError(413, "body_too_large", f"request body over {route.max_body} bytes"), h
            )
        if self._closing:
            return self.handler.error(_SHUTTING_DOWN, h)
        # The call races the client's disconnect (uvicorn's receive() has nothing else to give
        # once the body is read); shutdown() cancels it too.
        call = asyncio.ensure_future(self._call(route, method, scope, h, body))
        gone = asyncio.ensure_future(_disconnected(receive))
        self._calls.add(call)
        try:
            await asyncio.wait((call, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._calls.discard(call)
            gone.cancel()
            call.cancel()  # nothing when it has finished
        if call.done() and not call.cancelled():
            return call.result()
        return None if gone.done() else self.handler.error(_SHUTTING_DOWN, h)

    async def _call(
        self, route: AppRoute, method: str, scope: dict[str, Any], h: dict[str, str], body: bytes
    ) -> Response:
        try:
            return await route.endpoint(method, _query(scope.get("query_string", b"")), h, body)
        except ControlError as e:
            return self.handler.error(e, h)
        except Exception as e:  # a model failure answers in our error format, as a control call's does
            log.exception("%s %s failed", method, route.path)
            return self.handler.error(ControlError(500, "engine_error", f"{type(e).__name__}: {e}"), h)


def make_app(
    backend: Backend | Controller,
    *,
    dump_dir: str | None = None,
    api_key: str | None = None,
    enabled: bool = True,
    max_body: int = DEFAULT_MAX_BODY,
    engine: str = "torch",
    extra: Sequence[AppRoute] = (),
    local_only: bool = False,
) -> ControlApp:
    """The ASGI app serving SGLang's expert-distribution endpoints (and ours) for ``backend``.

    Parameters are :class:`ControlHandler`'s; ``extra`` adds an engine's own routes, which
    share the bearer-token check.

    Example
    -------
    >>> import uvicorn
    >>> from moe_record_sdk import Recorder
    >>> from moe_record_sdk.server import LocalBackend, make_app
    >>> app = make_app(LocalBackend(Recorder(2, 8, 2)), dump_dir="/tmp/dumps")
    >>> uvicorn.run(app, host="127.0.0.1", port=30000)  # doctest: +SKIP
    """
    handler = ControlHandler(
        backend,
        dump_dir=dump_dir,
        api_key=api_key,
        enabled=enabled,
        max_body=max_body,
        engine=engine,
        local_only=local_only,
    )
    return ControlApp(handler, extra)


async def _read_body(receive: Any, limit: int) -> bytes | None:
    """The request body, or None as soon as it grows past ``limit`` (never buffered beyond)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _disconnected(receive: Any) -> None:
    """Returns once the client has gone away (call it after the body is read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(send: Any, resp: Response) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers.items()]
    await send({"type": "http.response.start", "status": resp.status, "headers": headers})
    await send({"type": "http.response.body", "body": resp.body})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
