"""The lean HTTP/1.1 transport against scripted servers: framing, keep-alive, and failures
raised as httpx's exceptions (which the fleet turns into error kinds)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from moe_record_sdk import AsyncFleet
from moe_record_sdk.client._http import Http11Transport


async def _serve(answers):
    """A server that reads one request head per answer and writes the scripted bytes; an answer
    of None closes the connection without answering, a float sleeps that long instead, a
    ``(bytes,)`` tuple writes then closes."""
    seen = {"connections": 0, "requests": []}

    async def handle(reader, writer):
        seen["connections"] += 1
        try:
            while answers:
                head = await reader.readuntil(b"\r\n\r\n")
                seen["requests"].append(head)
                answer = answers.pop(0)
                if isinstance(answer, float):
                    await asyncio.sleep(answer)
                    continue
                if answer is None:
                    break
                writer.write(answer[0] if isinstance(answer, tuple) else answer)
                await writer.drain()
                if isinstance(answer, tuple):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


def _get(transport, url, timeout=5.0):
    request = httpx.Request("POST", url + "/x?a=1", extensions={"timeout": httpx.Timeout(timeout).as_dict()})
    return transport.handle_async_request(request)


async def _body(resp):
    return b"".join([c async for c in resp.stream])


def test_framings_and_keep_alive():
    big = bytes(range(256)) * 4096  # 1 MiB: lands in one buffer of the announced length
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-type: text/plain\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(big) + big,
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",  # framed by the close: not reused
    ]

    async def go():
        server, url, seen = await _serve(answers)
        t = Http11Transport()
        try:
            bodies = []
            for _ in range(5):
                resp = await _get(t, url)
                bodies.append((resp.status_code, await _body(resp)))
            assert bodies == [(200, b"hello"), (200, b"abcde"), (200, big), (204, b""), (200, b"until the end")]
            assert seen["connections"] == 1  # keep-alive: one connection for all five
            assert (
                seen["requests"][0].startswith(b"POST /x?a=1 HTTP/1.1\r\n")
                and b"host: 127.0.0.1:" in seen["requests"][0].lower()
            )
        finally:
            await t.aclose()
            server.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (None, httpx.RemoteProtocolError, "disconnected without sending"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", httpx.RemoteProtocolError, "status line"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n", httpx.RemoteProtocolError, "Content-Length"),
        ((b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",), httpx.RemoteProtocolError, "after 5 of"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", httpx.RemoteProtocolError, "chunk size"),
        (1.0, httpx.ReadTimeout, "timed out"),
    ],
)
def test_failures_are_httpx_errors(answer, error, match):
    async def go():
        server, url, _ = await _serve([answer, None])
        t = Http11Transport()
        try:
            with pytest.raises(error, match=match):
                resp = await _get(t, url, timeout=0.3)
                await _body(resp)
        finally:
            await t.aclose()
            server.close()

    asyncio.run(go())


def test_refused_connection_and_https():
    async def go():
        t = Http11Transport()
        with pytest.raises(httpx.ConnectError):
            await _get(t, "http://127.0.0.1:9")  # discard port: nothing listens
        with pytest.raises(httpx.UnsupportedProtocol):
            await _get(t, "https://127.0.0.1:9")

    asyncio.run(go())


def test_fleet_reports_transport_failures_by_kind():
    """Through the fleet: a cut connection is a 'connection' error, retried only where safe;
    a silent engine a 'timeout', never retried."""

    async def go():
        server, url, seen = await _serve([None, None, None, 5.0])
        try:
            async with AsyncFleet([url], api_key="", retries=1, backoff=0.0, timeout=0.3) as fleet:
                status = await fleet.status()  # idempotent: two attempts, both cut
                assert status[0].error_kind == "connection" and status[0].attempts == 2
                dump = await fleet.dump()  # a dump may have reached the engine: one attempt
                assert dump[0].error_kind == "connection" and dump[0].attempts == 1
                slow = await fleet.stop()
                assert slow[0].error_kind == "timeout" and slow[0].attempts == 1
        finally:
            server.close()

    asyncio.run(go())


def test_reconnects_when_the_server_dropped_an_idle_connection_unseen():
    """A server's keep-alive timeout closes an idle connection while no event loop runs to see
    it (between a synchronous Fleet's calls; here a blocked loop): the next request must go out
    on a new connection, not fail on the old one."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    connections = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 0.2  # the server's keep-alive: an idle connection is closed after this

        def setup(self):
            connections.append(self.client_address)
            super().setup()

        def do_POST(self):
            self.send_response(200)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    async def go():
        t = Http11Transport()
        try:
            assert await _body(await _get(t, url)) == b"ok"
            time.sleep(0.6)  # blocks the loop: the server's close is not processed before the next request
            assert await _body(await _get(t, url)) == b"ok"
        finally:
            await t.aclose()

    try:
        asyncio.run(go())
        assert len(connections) == 2
    finally:
        server.shutdown()
        server.server_close()
