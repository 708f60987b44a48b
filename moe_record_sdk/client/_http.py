"""A lean HTTP/1.1 transport for plain-``http://`` engines, behind httpx's transport seam.

Why: a fleet call is one small request per engine, all from one event loop, so the client's
CPU per request bounds the fan-out: 32 engines x ~0.7 ms through httpx's client, httpcore and
anyio (URL parsing, cookie jars, h11 events, cancel scopes) is longer than an engine's answer.
This transport writes the request in one ``write`` and parses the answer in an
``asyncio.BufferedProtocol``, which also receives a large dump straight into one buffer of the
announced length (no 64 KB chunk list joined afterwards).

Two ways in: ``handle_async_request`` (httpx's seam: one request, an ``httpx.Response``), and
``send_all``, the fleet's: requests prepared once (``prepare``), all written before any answer
is awaited, their answers returned as :class:`Answer` tuples. A fan-out through ``send_all``
costs one future and one read timer in all, not a task, a future, a timer and a response
object per engine.

A request may carry a ``"deadline"`` extension (seconds): the longest the whole exchange may
take, from the connect to the answer's last byte. httpx's read timeout bounds only each wait
for the next bytes, so an engine (or a proxy) that trickles its answer would never time out.
And a ``"max_body"`` extension (bytes): a longer answer body fails that exchange with
:class:`BodyTooLarge` before it is allocated (an announced length) or as it grows past it; an
answer that cannot be held in memory fails the same way, not the whole fan-out.

It speaks what the engines speak: HTTP/1.1 keep-alive, bodies framed by ``Content-Length``,
``chunked`` or the connection's end. Failures are httpx's exceptions (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``RemoteProtocolError``, ``ReadError``), so callers
treat them as they treat httpx's own transport. ``https://`` is not handled here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import select
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NamedTuple

import httpx

_HEAD_LIMIT = 64 << 10  # status line and headers (and a chunked body's trailers): plenty for our answers and SGLang's
_BUF = 64 << 10  # a connection's receive buffer, reused by every exchange on it
_CHUNK_LINE_LIMIT = 1 << 10  # a chunk's size line, extensions included
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")  # int(x, 16) would also take "-6", "0x10", "1_0"
# A body of announced length is received into one buffer of that length, allocated as it comes:
# at most this much before any of it arrived, then doubling (an engine announcing more than it
# sends does not get the memory it names).
_FIRST_BODY_BUF = 64 << 20


class BodyTooLarge(httpx.RemoteProtocolError):
    """An answer's body over the request's ``max_body``, or more than memory can hold."""


def check_body_size(n: int, limit: int | None, how: str, request: httpx.Request | None = None) -> None:
    """Raise ``BodyTooLarge`` for ``n`` bytes of a body (``how``: " announced", " so far") over ``limit``."""
    if limit is not None and n > limit:
        raise BodyTooLarge(f"a body of {n} bytes{how}, over the limit of {limit}", request=request)


class Answer(NamedTuple):
    """An HTTP answer as ``send_all`` returns it."""

    status: int
    headers: dict[str, str]
    """Lower-case names; a header sent more than once has its values joined by ``", "`` (as
    ``httpx.Headers.get`` gives them)."""
    body: bytes | bytearray
    received: float
    """``time.perf_counter()`` when its last byte arrived."""


class Prepared(NamedTuple):
    """A request ready to send again and again (a fleet repeats the same few)."""

    request: httpx.Request  # named by the errors raised for it
    key: tuple[str, int]  # host and port
    data: bytes  # the whole request, as written
    method: str
    connect_timeout: float | None
    read_timeout: float | None
    deadline: float | None  # seconds for the whole exchange (the "deadline" extension)
    max_body: int | None  # bytes (the "max_body" extension)


class _Body(httpx.AsyncByteStream):
    """A response body already received: one chunk."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.data:
            yield self.data  # type: ignore[misc]  # a bytearray: bytes-like, not copied


class _Conn(asyncio.BufferedProtocol):
    """One keep-alive connection; one exchange at a time, begun by ``begin``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.closed = False
        # Set while an exchange is in flight; called once, with this connection, when the
        # answer is complete or the exchange failed (then ``error`` says why).
        self.on_done: Callable[[_Conn], None] | None = None
        self.error: BaseException | None = None
        self.done_at = 0.0  # time.perf_counter() when the exchange ended
        self.last = 0.0  # loop time of the last bytes sent or received: the read timeout counts from it
        self.read_timeout: float | None = None
        self.deadline_at: float | None = None  # loop time by which the whole answer must be in
        self._raw = bytearray(_BUF)
        self._spare = bytearray(256)

    # -- asyncio callbacks ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.on_done is None:
            return
        if self._length is None and not self._chunked and self._head_done:
            self._body = self._raw[self._start : self._used]  # the body ran to the connection's end
            self._complete(None)
        elif exc is not None:
            self._complete(exc)
        elif self._head_done:
            got = "part" if self._length is None else self._got if self._direct else self._used - self._start
            self._complete(EOFError(f"server closed the connection after {got} of the body's bytes"))
        else:
            self._complete(EOFError("Server disconnected without sending a response."))

    def eof_received(self) -> bool:
        self.closed = True
        return False  # close our side too; connection_lost finishes or fails the exchange

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.on_done is None:  # idle: asyncio asks before it reads even a close
            return memoryview(self._spare)
        if self._direct:
            if self._got == len(self._body):  # filled so far: grow towards the announced length
                try:
                    self._body.extend(bytes(min(len(self._body), self._length - self._got)))
                except MemoryError:
                    self.fail(BodyTooLarge(f"a body of {self._length} bytes does not fit in this process's memory"))
                    return memoryview(self._spare)
            return memoryview(self._body)[self._got :]
        if self._used == len(self._raw):  # full: a long chunked or to-the-end body (or head)
            self._raw.extend(bytes(max(len(self._raw), _BUF)))
        return memoryview(self._raw)[self._used :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.on_done is None:  # bytes nobody asked for: the connection is unusable
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        self.last = self._loop.time()
        if self._direct:
            self._got += nbytes
            if self._got == self._length:
                self._complete(None)
            return
        self._used += nbytes
        try:
            self._parse()
        except httpx.RemoteProtocolError as e:
            self.closed = True
            self._complete(e)

    # -- one exchange --------------------------------------------------------------------------
    def begin(
        self,
        data: bytes,
        method: str,
        read_timeout: float | None,
        deadline_at: float | None,
        max_body: int | None,
        on_done: Callable[[_Conn], None],
    ) -> None:
        """Write ``data`` (a whole request); ``on_done(self)`` runs once the answer is in or failed."""
        if len(self._raw) > _BUF:  # grown by a long body: back to the usual size
            self._raw = bytearray(_BUF)
        self._used = self._start = self._got = self._status = 0
        self._head_done = self._chunked = self._direct = False
        self._no_body = method == "HEAD"
        self._max_body = max_body
        self._length: int | None = None
        self._body: Any = b""
        self._headers: dict[str, str] = {}
        self._keep = True
        self.error = None
        self.read_timeout, self.deadline_at = read_timeout, deadline_at
        self.on_done = on_done
        assert self.transport is not None
        self.transport.write(data)
        self.last = self._loop.time()

    def answer(self) -> tuple[int, dict[str, str], Any, bool]:
        """(status, headers, body, keep-alive) of the exchange just completed without error."""
        return self._status, self._headers, self._body, self._keep and not self.closed

    async def exchange(self, job: Prepared, deadline_at: float | None) -> None:
        """``begin`` and wait until the answer is in or ``error`` says why not."""
        done = self._loop.create_future()
        on_done = lambda _: done.done() or done.set_result(None)  # noqa: E731
        self.begin(job.data, job.method, job.read_timeout, deadline_at, job.max_body, on_done)
        watch = _ReadTimer(self._loop, [self])
        try:
            await done
        finally:
            watch.cancel()

    def fail(self, exc: BaseException) -> None:
        """Close the connection; an exchange in flight ends with ``exc``."""
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._complete(exc)

    def _complete(self, exc: BaseException | None) -> None:
        on_done, self.on_done = self.on_done, None
        if on_done is not None:
            self.error, self.done_at = exc, time.perf_counter()
            on_done(self)

    def _parse(self) -> None:
        if not self._head_done:
            end = self._raw.find(b"\r\n\r\n", max(0, self._start - 3), self._used)
            if end < 0:
                if self._used > _HEAD_LIMIT:
                    raise httpx.RemoteProtocolError("response head over 64 KB")
                self._start = self._used  # where to look again (a split head is rare)
                return
            self._read_head(self._raw[:end].decode("latin-1"))
            self._start = end + 4
        if self._length is not None:
            have = self._used - self._start
            if have > self._length:
                raise httpx.RemoteProtocolError("more bytes than Content-Length")
            if have == self._length:
                self._body = bytes(memoryview(self._raw)[self._start : self._used])
                self._complete(None)
            else:  # the rest goes straight into one buffer for the body (one copy, even of a dump)
                try:
                    self._body = bytearray(min(self._length, max(_FIRST_BODY_BUF, 2 * have)))
                except MemoryError:
                    raise BodyTooLarge(
                        f"a body of {self._length} bytes does not fit in this process's memory"
                    ) from None
                self._body[:have] = memoryview(self._raw)[self._start : self._used]
                self._got, self._direct = have, True
        elif self._chunked:
            self._parse_chunks()
        else:  # to the connection's end (connection_lost finishes)
            check_body_size(self._used - self._start, self._max_body, " so far")

    def _read_head(self, head: str) -> None:
        status_line, _, fields = head.partition("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdecimal():
            raise httpx.RemoteProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        self._status = int(parts[1])
        if parts[0] == "HTTP/1.0":
            self._keep = False
        headers = self._headers  # (isdecimal: ASCII digits only, in latin-1 text)
        for line in fields.split("\r\n") if fields else ():
            name, sep, value = line.partition(":")
            if not sep:
                raise httpx.RemoteProtocolError(f"malformed header line: {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        length = headers.get("content-length")
        if length is not None and not length.isdecimal():
            values = [v.strip() for v in length.split(",")]  # sent more than once: must agree
            if not all(v.isdecimal() for v in values) or len({int(v) for v in values}) > 1:
                raise httpx.RemoteProtocolError(f"bad Content-Length: {length[:40]!r}")
            headers["content-length"] = length = values[0]
        self._chunked = headers.get("transfer-encoding", "").lower().endswith("chunked")
        if "close" in headers.get("connection", "").lower():
            self._keep = False
        length = None if length is None else int(length)
        if length is not None and not self._no_body:
            check_body_size(length, self._max_body, " announced")
        if self._no_body or self._status in (204, 304) or 100 <= self._status < 200:
            length = 0
        self._length = None if self._chunked else length
        self._head_done = True
        if self._chunked:
            self._body = bytearray()
        elif self._length is None:
            self._keep = False  # framed by the connection's end

    def _parse_chunks(self) -> None:
        raw, pos = self._raw, self._start
        while True:
            eol = raw.find(b"\r\n", pos, self._used)
            if eol < 0:
                if self._used - pos > _CHUNK_LINE_LIMIT:
                    raise httpx.RemoteProtocolError(f"a chunk size line over {_CHUNK_LINE_LIMIT} bytes")
                break
            size_field = bytes(raw[pos:eol]).split(b";")[0].strip()
            if not _CHUNK_SIZE.fullmatch(size_field):
                raise httpx.RemoteProtocolError(f"bad chunk size {size_field[:20]!r}")
            size = int(size_field, 16)
            check_body_size(len(self._body) + size, self._max_body, " so far")
            if size == 0:  # last chunk; trailers (ignored) end with an empty line
                if raw.find(b"\r\n\r\n", eol, self._used) >= 0:
                    self._complete(None)
                elif self._used - eol > _HEAD_LIMIT:
                    raise httpx.RemoteProtocolError(f"a chunked body's trailers over {_HEAD_LIMIT} bytes")
                break
            end = eol + 2 + size
            if self._used < end + 2:
                break
            if raw[end : end + 2] != b"\r\n":
                raise httpx.RemoteProtocolError(f"a chunk of {size} bytes is not followed by CRLF")
            self._body += raw[eol + 2 : end]
            pos = end + 2
        if pos > _BUF:  # what is parsed is in the body: keep only the rest (bounded by one chunk)
            rest = self._used - pos
            self._raw = bytearray(max(_BUF, 2 * rest))
            self._raw[:rest] = raw[pos : self._used]
            pos, self._used = 0, rest
        self._start = pos


class _ReadTimer:
    """httpx's read timeout for exchanges in flight (the longest wait for each one's next bytes),
    and each one's deadline for the whole answer. One timer for them all: a fan-out arms one,
    not one per engine."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conns: Sequence[_Conn]) -> None:
        self._loop, self._conns = loop, conns
        self._timer: asyncio.TimerHandle | None = None
        self._check()

    def _check(self) -> None:
        now, soonest = self._loop.time(), None
        for c in self._conns:
            if c.on_done is None:
                continue
            ends = [] if c.read_timeout is None else [c.last + c.read_timeout]
            if c.deadline_at is not None:
                ends.append(c.deadline_at)
            if not ends:
                continue
            left = min(ends) - now
            if left <= 0:
                c.fail(TimeoutError())
            elif soonest is None or left < soonest:
                soonest = left
        self._timer = self._loop.call_later(soonest, self._check) if soonest is not None else None

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class Http11Transport(httpx.AsyncBaseTransport):
    """Plain HTTP/1.1 with keep-alive connections kept per host and port (see the module).

    One instance may serve many engines: connections are kept per host and port.
    """

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop the idle connections belong to

    def prepare(self, request: httpx.Request) -> Prepared:
        """``request`` (its body already read) ready for ``send_all``."""
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(f"{url.scheme}: this transport speaks plain http only", request=request)
        timeout = request.extensions.get("timeout", {})
        return Prepared(
            request,
            (url.host, url.port or 80),
            _serialize(request, request.content),
            request.method,
            timeout.get("connect"),
            timeout.get("read"),
            request.extensions.get("deadline"),
            request.extensions.get("max_body"),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        answer = await self.send(self.prepare(request))
        return httpx.Response(
            answer.status,
            headers=list(answer.headers.items()),
            stream=_Body(answer.body),
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def send_all(
        self,
        jobs: Sequence[Prepared],
        on_answer: Callable[[int, Answer | httpx.HTTPError], None] | None = None,
    ) -> list[Answer | httpx.HTTPError]:
        """Each job's answer, or the httpx error that ended it, in the jobs' order.

        Jobs with an idle connection are written at once, before any answer is awaited, and
        wait together on one future with one read timer; the others (a first call, a call after
        a failure) connect in a task of their own, so a slow connect delays no one else.
        ``on_answer(i, outcome)``, when given, runs as soon as job ``i``'s outcome is known, so a
        caller can act on it (a retry, say) while slower engines are still answering; it must
        not block.
        """
        loop = asyncio.get_running_loop()
        out: list[Answer | httpx.HTTPError | None] = [None] * len(jobs)
        conns = self._take_idle([job.key for job in jobs])
        done = loop.create_future()
        pending = 0

        def settle(i: int, outcome: Answer | httpx.HTTPError) -> None:
            out[i] = outcome
            if on_answer is not None:
                on_answer(i, outcome)

        def on_done(i: int, job: Prepared, conn: _Conn) -> None:
            nonlocal pending
            try:
                settle(i, self._settle(job, conn))
            except BaseException as e:  # a bug: raised by the await below, not lost in a callback
                if not done.done():
                    done.set_exception(e)
                return
            pending -= 1
            if pending == 0 and not done.done():
                done.set_result(None)

        async def connect_and_send(i: int, job: Prepared) -> None:
            try:
                outcome: Answer | httpx.HTTPError = await self.send(job)
            except httpx.HTTPError as e:
                outcome = e
            settle(i, outcome)

        tasks, sent = [], []
        now = loop.time()
        for i, (job, conn) in enumerate(zip(jobs, conns)):
            if conn is None:
                tasks.append(loop.create_task(connect_and_send(i, job)))
            else:
                pending += 1
                sent.append(conn)
                deadline_at = None if job.deadline is None else now + job.deadline
                on_job_done = functools.partial(on_done, i, job)
                conn.begin(job.data, job.method, job.read_timeout, deadline_at, job.max_body, on_job_done)
        watch = _ReadTimer(loop, sent)
        try:
            if pending:
                await done
            if tasks:
                await asyncio.gather(*tasks)  # raises only a bug (or a cancel): not an engine's failure
        except BaseException as e:  # cancelled: answers still due will never be read
            for conn in sent:
                if conn.on_done is not None:
                    conn.on_done = None  # nobody is left to take its outcome
                    conn.fail(e)
            for task in tasks:
                task.cancel()
            raise
        finally:
            watch.cancel()
        return out  # type: ignore[return-value]

    async def send(self, job: Prepared) -> Answer:
        """One job's answer; raises the httpx error that ended it."""
        deadline_at = None if job.deadline is None else asyncio.get_running_loop().time() + job.deadline
        conn = self._take_idle([job.key])[0] or await _connect(job)
        try:
            await conn.exchange(job, deadline_at)
        except BaseException as e:  # cancelled mid-exchange: the connection is unusable
            conn.fail(e)
            raise
        answer = self._settle(job, conn)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _settle(self, job: Prepared, conn: _Conn) -> Answer | httpx.HTTPError:
        """The ended exchange's answer (its connection kept for the next) or its error."""
        if conn.error is not None:
            conn.fail(conn.error)  # closes it, if not yet
            return _http_error(conn.error, job.request)
        status, headers, body, keep = conn.answer()
        if keep:
            self._idle.setdefault(job.key, []).append(conn)
        else:
            conn.transport.close()  # type: ignore[union-attr]
        return Answer(status, headers, body, conn.done_at)

    def _take_idle(self, keys: Sequence[tuple[str, int]]) -> list[_Conn | None]:
        """An idle, usable connection for each key (None where there is none)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Used from another loop than last time (an AsyncFleet under one asyncio.run after
            # another): the connections of the old one would never be read in this one.
            self._drop_idle()
            self._loop = loop
        out: list[_Conn | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        while todo:
            for i in todo:
                idle = self._idle.get(keys[i])
                out[i] = idle.pop() if idle else None
            stale = _stale([c for c in out if c is not None])
            for c in stale:
                c.transport.close()  # type: ignore[union-attr]
            todo = [i for i in todo if out[i] in stale]  # look again behind a stale one
        return out

    async def aclose(self) -> None:
        self._drop_idle()

    def _drop_idle(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                # A finished loop cannot run the close; the socket then closes with its transport.
                with contextlib.suppress(RuntimeError):
                    conn.transport.close()  # type: ignore[union-attr]
        self._idle.clear()


#: Idle connections older than this are not reused: uvicorn, and so SGLang and vLLM, close an idle
#: keep-alive connection after 5 s, and a request written as the server closes it fails (2-3 % of
#: calls spaced ~5 s apart did). A new loopback or LAN connection costs well under a millisecond.
KEEPALIVE_EXPIRY = 4.0


def _stale(conns: Sequence[_Conn]) -> set[_Conn]:
    """The idle connections that are unusable: closed, idle past ``KEEPALIVE_EXPIRY``, or readable
    (an EOF or stray bytes).

    The sockets are asked directly, all in one ``poll``: between the calls of a synchronous
    ``Fleet`` no event loop runs, so the callbacks that would set ``closed`` (a server's
    keep-alive timeout, a restart) have not run yet, and a request written there would fail
    though the engine is up.
    """
    old = time.perf_counter() - KEEPALIVE_EXPIRY
    stale = {c for c in conns if c.closed or c.fd < 0 or c.done_at < old or c.transport.is_closing()}  # type: ignore[union-attr]
    live = {c.fd: c for c in conns if c not in stale}
    if live and hasattr(select, "poll"):  # poll: no limit on descriptor numbers (select's is 1024)
        poller = select.poll()
        for fd in live:
            poller.register(fd, select.POLLIN)
        stale.update(live[fd] for fd, _ in poller.poll(0))
    elif live:  # Windows has no poll
        stale.update(live[fd] for fd in select.select(list(live), [], [], 0)[0])
    return stale


def _http_error(e: BaseException, request: httpx.Request) -> httpx.HTTPError:
    """httpx's exception for what ended an exchange (the ones httpx's own transport raises)."""
    if isinstance(e, httpx.HTTPError):
        return e
    if isinstance(e, TimeoutError):
        return httpx.ReadTimeout("timed out waiting for the answer", request=request)
    if isinstance(e, EOFError):
        return httpx.RemoteProtocolError(str(e), request=request)
    if isinstance(e, OSError):
        return httpx.ReadError(f"{type(e).__name__}: {e}", request=request)
    if isinstance(e, Exception):  # a fault reading this answer (a bug, even): this engine's failure alone
        return httpx.RemoteProtocolError(f"the answer could not be read: {type(e).__name__}: {e}", request=request)
    raise e  # cancelled, or Ctrl-C: not a failure of the engine


async def _connect(job: Prepared) -> _Conn:
    loop = asyncio.get_running_loop()
    (host, port), timeout = job.key, job.connect_timeout
    try:
        _, conn = await asyncio.wait_for(loop.create_connection(_Conn, host, port), timeout)
    except asyncio.TimeoutError:  # TimeoutError from 3.11 on
        raise httpx.ConnectTimeout(
            f"no connection to {host}:{port} within {timeout:g} s", request=job.request
        ) from None
    except OSError as e:
        raise httpx.ConnectError(str(e) or type(e).__name__, request=job.request) from None
    return conn


def _serialize(request: httpx.Request, body: bytes) -> bytes:
    target = request.url.raw_path  # path and query, percent-encoded
    lines = [request.method.encode() + b" " + target + b" HTTP/1.1"]
    lines += [k + b": " + v for k, v in request.headers.raw]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
