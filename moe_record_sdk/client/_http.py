"""A lean HTTP/1.1 transport for plain-``http://`` engines, behind httpx's transport seam.

Why: a fleet call is one small request per engine, all from one event loop, so the client's
CPU per request bounds the fan-out: 32 engines x ~0.7 ms through httpx's client, httpcore and
anyio (URL parsing, cookie jars, h11 events, cancel scopes) is longer than an engine's answer.
This transport writes the request in one ``write`` and parses the answer in an
``asyncio.BufferedProtocol``, which also receives a large dump straight into one buffer of the
announced length (no 64 KB chunk list joined afterwards).

It speaks what the engines speak: HTTP/1.1 keep-alive, bodies framed by ``Content-Length``,
``chunked`` or the connection's end. Failures raise httpx's exceptions (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``RemoteProtocolError``, ``ReadError``), so callers
treat them as they treat httpx's own transport. ``https://`` is not handled here.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import AsyncIterator
from typing import Any

import httpx

_HEAD_LIMIT = 64 << 10  # status line and headers: plenty for our answers and SGLang's


class _Body(httpx.AsyncByteStream):
    """A response body already received: one chunk."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.data:
            yield self.data  # type: ignore[misc]  # a bytearray: bytes-like, not copied


class _Conn(asyncio.BufferedProtocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._done: asyncio.Future[None] | None = None
        self._last = 0.0
        self._spare = bytearray(256)

    # -- asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            if self._length is None and not self._chunked and self._head_done:
                self._body = self._raw[self._start : self._used]  # the body ran to the connection's end
                self._finish()
            elif exc is not None:
                self._done.set_exception(exc)
            elif self._head_done:
                got = self._got if self._length is not None else "part"
                self._done.set_exception(EOFError(f"server closed the connection after {got} of the body's bytes"))
            else:
                self._done.set_exception(EOFError("Server disconnected without sending a response."))

    def eof_received(self) -> bool:
        self.closed = True
        return False  # close our side too; connection_lost finishes or fails the exchange

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._done is None or self._done.done():  # idle: asyncio asks before it reads even a close
            return memoryview(self._spare)
        if self._head_done and self._length is not None:
            return memoryview(self._body)[self._got :]
        if len(self._raw) - self._used < 65536:
            self._raw.extend(bytes(65536))
        return memoryview(self._raw)[self._used :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._done is None or self._done.done():  # bytes nobody asked for: the connection is unusable
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        self._last = self._loop.time()
        if self._head_done and self._length is not None:
            self._got += nbytes
            if self._got == self._length:
                self._finish()
            return
        self._used += nbytes
        try:
            self._parse()
        except httpx.RemoteProtocolError as e:
            self.closed = True
            if self._done is not None and not self._done.done():
                self._done.set_exception(e)

    # -- one exchange --------------------------------------------------------------------------
    async def exchange(self, data: bytes, method: str, read_timeout: float | None) -> tuple[int, list[Any], Any, bool]:
        """Send ``data`` (a whole request); (status, headers, body, keep-alive) of the answer."""
        loop = self._loop = asyncio.get_running_loop()
        self._raw = bytearray()
        self._used = self._start = 0
        self._head_done = self._chunked = False
        self._no_body = method == "HEAD"
        self._length: int | None = None
        self._body: Any = bytearray()
        self._got = 0
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._keep = True
        self._done = loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        self._last = loop.time()
        timer = None
        if read_timeout is not None:
            # httpx's read timeout: the longest wait for the next bytes, not for the whole body.
            def check() -> None:
                nonlocal timer
                if self._done is None or self._done.done():
                    return
                idle = loop.time() - self._last
                if idle >= read_timeout:
                    self._done.set_exception(TimeoutError())
                else:
                    timer = loop.call_later(read_timeout - idle, check)

            timer = loop.call_later(read_timeout, check)
        try:
            await self._done
        finally:
            if timer is not None:
                timer.cancel()
            self._done = None
        return self._status, self._headers, self._body, self._keep and not self.closed

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def _parse(self) -> None:
        if not self._head_done:
            end = self._raw.find(b"\r\n\r\n", 0, self._used)
            if end < 0:
                if self._used > _HEAD_LIMIT:
                    raise httpx.RemoteProtocolError("response head over 64 KB")
                return
            self._read_head(bytes(self._raw[:end]))
            self._start = end + 4
            if self._length is not None:  # the rest goes straight into a buffer of that size
                extra = self._raw[self._start : self._used]
                if len(extra) > self._length:
                    raise httpx.RemoteProtocolError("more bytes than Content-Length")
                self._body = bytearray(self._length)
                self._body[: len(extra)] = extra
                self._got = len(extra)
                self._raw = bytearray()
                if self._got == self._length:
                    self._finish()
                return
        if self._chunked:
            self._parse_chunks()
        # else: to the connection's end (connection_lost finishes)

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        self._status = int(parts[1])
        if parts[0] == b"HTTP/1.0":
            self._keep = False
        length = None
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError(f"malformed header line: {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            self._headers.append((name, value))
            if name == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    raise httpx.RemoteProtocolError(f"bad Content-Length: {value[:40]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                self._chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                self._keep = self._keep and b"close" not in value.lower()
        if self._no_body or self._status in (204, 304) or 100 <= self._status < 200:
            length = 0
        self._length = None if self._chunked else length
        self._head_done = True
        if self._length is None and not self._chunked:
            self._keep = False  # framed by the connection's end

    def _parse_chunks(self) -> None:
        raw, pos = self._raw, self._start
        while True:
            eol = raw.find(b"\r\n", pos, self._used)
            if eol < 0:
                break
            size_field = bytes(raw[pos:eol]).split(b";")[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise httpx.RemoteProtocolError(f"bad chunk size {size_field[:20]!r}") from None
            if size == 0:  # last chunk; trailers (ignored) end with an empty line
                if raw.find(b"\r\n\r\n", eol, self._used) >= 0:
                    self._finish()
                break
            if self._used < eol + 2 + size + 2:
                break
            self._body += raw[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
        self._start = pos


class Http11Transport(httpx.AsyncBaseTransport):
    """Plain HTTP/1.1 with keep-alive connections kept per host and port (see the module)."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{url.scheme}: this transport speaks plain http only", request=request)
        timeout = request.extensions.get("timeout", {})
        key = (url.host, url.port or 80)
        data = _serialize(request, await request.aread())
        idle = self._idle.setdefault(key, [])
        conn = None
        while idle and conn is None:
            conn = idle.pop()
            if _stale(conn):  # the server closed it while idle (keep-alive timeout, restart)
                conn.transport.close()  # type: ignore[union-attr]
                conn = None
        if conn is None:
            conn = await _connect(key, timeout.get("connect"), request)
        try:
            status, headers, body, keep = await conn.exchange(data, request.method, timeout.get("read"))
        except BaseException as e:
            conn.closed = True
            conn.transport.close()  # type: ignore[union-attr]
            if isinstance(e, TimeoutError):
                raise httpx.ReadTimeout("timed out waiting for the answer", request=request) from None
            if isinstance(e, EOFError):
                raise httpx.RemoteProtocolError(str(e), request=request) from None
            if isinstance(e, OSError):
                raise httpx.ReadError(f"{type(e).__name__}: {e}", request=request) from None
            raise
        if keep:
            idle.append(conn)
        else:
            conn.transport.close()  # type: ignore[union-attr]
        return httpx.Response(status, headers=headers, stream=_Body(body), extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.transport.close()  # type: ignore[union-attr]
        self._idle.clear()


def _stale(conn: _Conn) -> bool:
    """Whether an idle connection is unusable: closed, or readable (an EOF or stray bytes).

    The socket is asked directly: between the calls of a synchronous ``Fleet`` no event loop
    runs, so the callbacks that would set ``closed`` (a server's keep-alive timeout, a restart)
    have not run yet, and a request written there would fail though the engine is up.
    """
    if conn.closed:
        return True
    sock = conn.transport.get_extra_info("socket") if conn.transport is not None else None
    return sock is not None and bool(select.select([sock], [], [], 0)[0])


async def _connect(key: tuple[str, int], timeout: float | None, request: httpx.Request) -> _Conn:
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(loop.create_connection(_Conn, key[0], key[1]), timeout)
    except asyncio.TimeoutError:  # TimeoutError from 3.11 on
        raise httpx.ConnectTimeout(
            f"no connection to {key[0]}:{key[1]} within {timeout:g} s", request=request
        ) from None
    except OSError as e:
        raise httpx.ConnectError(str(e) or type(e).__name__, request=request) from None
    return conn


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    target = request.url.raw_path  # path and query, percent-encoded
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    lines += [k + b": " + v for k, v in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
