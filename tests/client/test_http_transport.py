"""The lean HTTP/1.1 transport against scripted servers: framing, keep-alive, and failures
raised as httpx's exceptions (which the fleet turns into error kinds)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import httpx
import pytest

from moe_record_sdk import AsyncFleet
from moe_record_sdk.client._http import Answer, Http11Transport
from moe_record_sdk.server.protocol import DUMP_TEXT


async def _serve(answers):
    """A server that reads one request head per answer and writes the scripted bytes; an answer
    of None closes the connection without answering, a float sleeps that long instead, a
    ``(bytes,)`` tuple writes then closes, a list is written piece by piece (a float in it
    sleeps between pieces)."""
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
                if isinstance(answer, list):
                    for piece in answer:
                        if isinstance(piece, float):
                            await asyncio.sleep(piece)
                        else:
                            writer.write(piece)
                            await writer.drain()
                    continue
                writer.write(answer[0] if isinstance(answer, tuple) else answer)
                await writer.drain()
                if isinstance(answer, tuple):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", seen


def _request(url, timeout=5.0):
    return httpx.Request("POST", url + "/x?a=1", extensions={"timeout": httpx.Timeout(timeout).as_dict()})


def _get(transport, url, timeout=5.0):
    return transport.handle_async_request(_request(url, timeout))


def _ok(body=b"ok", ctype=b"text/plain"):
    return b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s" % (ctype, len(body), body)


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
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            httpx.RemoteProtocolError,
            "Content-Length",
        ),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", httpx.RemoteProtocolError, "malformed header"),
        ((b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",), httpx.RemoteProtocolError, "after 5 of"),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", httpx.RemoteProtocolError, "chunk size"),
        # int(-6, 16) took the parse back to where it began: a loop no timeout could end
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n-6\r\n", httpx.RemoteProtocolError, "chunk size"),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0x2\r\nab\r\n",
            httpx.RemoteProtocolError,
            "chunk size",
        ),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabcd", httpx.RemoteProtocolError, "CRLF"),
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


@pytest.mark.parametrize("poll", [True, False], ids=["poll", "select"])
def test_reconnects_when_the_server_dropped_an_idle_connection_unseen(poll, monkeypatch):
    """A server's keep-alive timeout closes an idle connection while no event loop runs to see
    it (between a synchronous Fleet's calls; here a blocked loop): the next request must go out
    on a new connection, not fail on the old one. Without ``select.poll`` (Windows) the check
    falls back to ``select.select``."""
    import select
    import threading

    if not poll:
        monkeypatch.delattr(select, "poll")
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
            time.sleep(0.6)  # and the fleet's batch path checks too
            (answer,) = await t.send_all([t.prepare(_request(url))])
            assert answer.body == b"ok"
        finally:
            await t.aclose()

    try:
        asyncio.run(go())
        assert len(connections) == 3
    finally:
        server.shutdown()
        server.server_close()


def test_a_connection_idle_near_the_servers_keep_alive_is_not_reused(monkeypatch):
    """uvicorn (SGLang's, vLLM's) closes a connection idle for 5 s: a request written on it as it
    closes failed (6 of 177 calls spaced ~5 s apart, and dumps are not retried). Connections idle
    past KEEPALIVE_EXPIRY are closed by the client instead, before that can happen."""
    from moe_record_sdk.client import _http

    monkeypatch.setattr(_http, "KEEPALIVE_EXPIRY", 0.3)

    async def go():
        server, url, seen = await _serve([_ok(), _ok(), _ok(), _ok()])
        t = Http11Transport()
        try:
            for pause in (0.0, 0.05, 0.5):  # reused, reused, then idle too long: a new connection
                await asyncio.sleep(pause)
                assert await _body(await _get(t, url)) == b"ok"
            connections_after_get = seen["connections"]
            await asyncio.sleep(0.5)  # the fleet's batch path expires them too
            (answer,) = await t.send_all([t.prepare(_request(url))])
            assert answer.body == b"ok"
        finally:
            await t.aclose()
            server.close()
        return connections_after_get, seen["connections"]

    assert asyncio.run(go()) == (2, 3)


def test_repeated_headers_are_joined_and_equal_lengths_accepted():
    answer = b"HTTP/1.1 200 OK\r\nX-A: 1\r\ncontent-length: 2\r\nx-a:  2 \r\nContent-Length: 2\r\n\r\nok"

    async def go():
        server, url, _ = await _serve([answer])
        t = Http11Transport()
        try:
            (got,) = await t.send_all([t.prepare(_request(url))])
        finally:
            await t.aclose()
            server.close()
        assert got.body == b"ok" and got.headers["x-a"] == "1, 2" and got.headers["content-length"] == "2"

    asyncio.run(go())


def test_send_all_maps_each_failure_and_keeps_only_good_connections():
    """The batch path (kept-alive connections, written together, one read timer): each job's
    own outcome; a failed connection is dropped and the next call connects anew."""
    scripts = [
        [_ok(), _ok(), _ok()],  # healthy: one connection throughout
        [_ok(), None, _ok()],  # cut instead of the 2nd answer
        [_ok(), b"SSH-2.0-OpenSSH\r\n\r\n", _ok()],  # not HTTP
        [_ok(), 5.0, _ok()],  # silent past the read timeout
    ]

    async def go():
        servers = [await _serve(script) for script in scripts]
        t = Http11Transport()
        jobs = [t.prepare(_request(url, timeout=0.3)) for _, url, _ in servers]
        try:
            first = await t.send_all(jobs)  # nothing kept yet: each connects in a task
            assert [a.body for a in first] == [b"ok"] * 4
            assert all(len(conns) == 1 for conns in t._idle.values())
            t0 = time.perf_counter()
            second = await t.send_all(jobs)  # the kept connections: one batch
            took = time.perf_counter() - t0
            assert isinstance(second[0], Answer) and second[0].body == b"ok"
            assert second[0].received - t0 < 0.3  # its answer came at once, not with the batch's end
            assert isinstance(second[1], httpx.RemoteProtocolError) and "disconnected" in str(second[1])
            assert isinstance(second[2], httpx.RemoteProtocolError) and "status line" in str(second[2])
            assert isinstance(second[3], httpx.ReadTimeout)
            assert 0.3 <= took < 2.0
            assert sum(len(conns) for conns in t._idle.values()) == 1  # only the healthy one kept
            third = await t.send_all(jobs)
            assert [a.body for a in third] == [b"ok"] * 4
            assert [seen["connections"] for _, _, seen in servers] == [1, 2, 2, 2]
        finally:
            await t.aclose()
            for server, _, _ in servers:
                server.close()

    asyncio.run(go())


def test_cancelled_send_all_closes_the_connections_it_waited_on():
    async def go():
        server, url, _ = await _serve([_ok(), 5.0])
        t = Http11Transport()
        job = t.prepare(_request(url))
        try:
            await t.send_all([job])
            (conn,) = t._idle[job.key]
            task = asyncio.create_task(t.send_all([job]))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert conn.closed and not t._idle[job.key]  # its answer would come to nobody: never reused
        finally:
            await t.aclose()
            server.close()

    asyncio.run(go())


def test_fleet_retries_batch_failures_only_where_safe():
    """Failures on kept-alive connections (the fleet's batch): a cut stop and a 503 stop are
    retried and succeed; a cut dump is not re-sent."""
    ok = _ok(b'{"ok": true}', b"application/json")
    busy = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"

    async def go():
        servers = [await _serve(s) for s in ([ok, None, ok], [ok, busy, ok], [ok, ok], [ok, None])]
        (_, a, _), (_, b, _), (_, c, _), (_, d, _) = servers
        try:
            async with AsyncFleet([a, b, c], api_key="", retries=1, backoff=0.0, timeout=2.0) as fleet:
                assert (await fleet.status()).ok
                stop = await fleet.stop()
                assert [r.ok for r in stop] == [True, True, True] and [r.attempts for r in stop] == [2, 2, 1]
            async with AsyncFleet([d], api_key="", retries=1, backoff=0.0, timeout=2.0) as fleet:
                assert (await fleet.status()).ok
                (dump,) = (await fleet.dump()).results
                assert dump.error_kind == "connection" and dump.attempts == 1
        finally:
            for server, _, _ in servers:
                server.close()

    asyncio.run(go())


def test_fleet_with_a_concurrency_cap():
    async def go():
        servers = [await _serve([_ok(b'{"ok": true}', b"application/json")] * 2) for _ in range(3)]
        try:
            urls = [url for _, url, _ in servers]
            async with AsyncFleet(urls, api_key="", max_concurrency=1) as fleet:
                for _ in range(2):
                    result = await fleet.status()
                    assert result.ok and [r.engine for r in result] == urls
        finally:
            for server, _, _ in servers:
                server.close()

    asyncio.run(go())


def _trickled(body=b'{"ok": true}', ctype=b"application/json", pause=0.05):
    """An answer sent a byte at a time: every wait for the next bytes is short, the whole is long."""
    whole = _ok(body, ctype)
    return [piece for byte in whole for piece in (bytes([byte]), pause)]


def test_a_deadline_bounds_the_whole_answer_where_the_read_timeout_does_not():
    """An engine (or a proxy) that trickles its answer never trips a read timeout; a request's
    "deadline" extension bounds the whole exchange, on a new connection and on a kept one."""
    answer = _trickled(pause=0.02)  # ~90 bytes: ~1.8 s in all, 0.02 s between bytes

    async def go():
        server, url, _ = await _serve([answer, answer, answer])
        t = Http11Transport()
        try:
            t0 = time.perf_counter()
            (whole,) = await t.send_all([t.prepare(_request(url, timeout=0.5))])  # read timeout only
            assert isinstance(whole, Answer) and whole.body == b'{"ok": true}'
            assert time.perf_counter() - t0 > 1.0  # it did take that long, and was not cut
            bounded = _request(url, timeout=0.5)
            bounded.extensions["deadline"] = 0.4
            for send in (lambda: t.send_all([t.prepare(bounded)]), lambda: t.send(t.prepare(bounded))):
                t0 = time.perf_counter()
                try:
                    outcome = (await send())[0]
                except httpx.HTTPError as e:
                    outcome = e
                took = time.perf_counter() - t0
                assert isinstance(outcome, httpx.ReadTimeout), outcome
                assert 0.4 <= took < 0.9
        finally:
            await t.aclose()
            server.close()

    asyncio.run(go())


def test_fleet_control_calls_are_bounded_whole_and_dumps_per_read():
    """A trickled status answer fails at the fleet's timeout as a timeout; a dump's answer may
    take longer than the timeout in all, as long as its bytes keep coming."""

    async def go():
        slow_status = _trickled(pause=0.02)
        slow_dump = _trickled(DUMP_TEXT.encode(), b"text/plain", pause=0.02)  # as stock SGLang answers
        server, url, _ = await _serve([slow_status, slow_dump])
        try:
            async with AsyncFleet([url], api_key="", retries=0, timeout=0.5) as fleet:
                (status,) = (await fleet.status()).results
                assert status.error_kind == "timeout" and 0.5 <= status.elapsed < 1.0, status
            async with AsyncFleet([url], api_key="", retries=0, timeout=0.5) as fleet:
                (dump,) = (await fleet.dump()).results
                assert dump.ok and dump.flavor == "sglang" and dump.elapsed > 1.0, dump
        finally:
            server.close()

    asyncio.run(go())


def test_a_fast_engines_retry_does_not_wait_for_a_slow_engines_answer():
    """One fan-out: engine B answers 503 at once and engine A takes 1.5 s. B's retry goes out
    at once, so B's call ends long before A's."""
    ok = _ok(b'{"ok": true}', b"application/json")
    busy = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"

    async def go():
        servers = [await _serve(s) for s in ([ok, [1.5, ok]], [ok, busy, ok])]
        (_, a, _), (_, b, _) = servers
        try:
            async with AsyncFleet([a, b], api_key="", retries=1, backoff=0.0, timeout=5.0) as fleet:
                assert (await fleet.status()).ok  # connections kept: the stop goes out as one batch
                slow, fast = (await fleet.stop()).results
                assert slow.ok and fast.ok and fast.attempts == 2
                assert slow.elapsed >= 1.5 and fast.elapsed < 0.75, (slow.elapsed, fast.elapsed)
        finally:
            for server, _, _ in servers:
                server.close()

    asyncio.run(go())


def test_an_answer_over_its_limit_fails_alone_before_it_is_allocated():
    """A body over the request's max_body fails that exchange (announced, chunked, or to the
    connection's end) and nothing else; one that memory cannot hold fails the same way. Before,
    an absurd Content-Length raised MemoryError or OverflowError out of the whole fan-out, and
    the other engines' dumps, already taken and cleared on them, were lost."""
    big = 10**15  # a petabyte: no machine here holds it
    announced = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\nabc" % big
    absurd = b"HTTP/1.1 200 OK\r\ncontent-length: 1%s\r\n\r\nabc" % (b"0" * 30)  # past an index-sized int
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nabcdef\r\n0\r\n\r\n",)
    to_end = (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 300_000,)

    async def go():
        scripts = [[announced], [absurd], [chunked], [to_end], [_ok(b"fine")]]
        servers = [await _serve(s) for s in scripts]
        t = Http11Transport()
        try:
            jobs = []
            for (_, url, _), limit in zip(servers, (1 << 30, 1 << 30, 10, 100_000, 10)):
                request = _request(url)
                request.extensions["max_body"] = limit
                jobs.append(t.prepare(request))
            outcomes = await t.send_all(jobs)
            assert [type(o).__name__ for o in outcomes] == ["BodyTooLarge"] * 4 + ["Answer"]
            assert f"{big} bytes announced, over the limit of 1073741824" in str(outcomes[0])
            assert "bytes so far, over the limit of 10" in str(outcomes[2])
            assert outcomes[4].body == b"fine"
        finally:
            await t.aclose()
            for server, _, _ in servers:
                server.close()
        server, url, _ = await _serve([(announced,)])  # under the limit: memory for what came, not what it said
        t = Http11Transport()
        try:
            request = _request(url)
            request.extensions["max_body"] = 1 << 62
            with pytest.raises(httpx.RemoteProtocolError, match="closed the connection after 3 of"):
                await t.send(t.prepare(request))
        finally:
            await t.aclose()
            server.close()

    asyncio.run(go())


def test_memory_follows_the_bytes_that_arrive_not_the_length_announced():
    """An engine announcing 1 GB and sending 10 bytes had the client allocate (and zero) the whole
    gigabyte at once, held as long as it trickled; chunked answers grew without bound on a size
    line or trailers that never ended. Now the body buffer grows with what arrives."""
    gigabyte = (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n0123456789" % (1 << 30),)
    endless_line = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"] + [b"0" * 512, 0.01] * 8
    endless_trailers = [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n"]
    endless_trailers += [b"x-trailer: " + b"y" * 8000 + b"\r\n", 0.001] * 12

    async def go():
        t = Http11Transport()
        try:
            server, url, _ = await _serve([gigabyte])
            tracemalloc.start()
            with pytest.raises(httpx.RemoteProtocolError, match="after 10 of"):
                await t.send(t.prepare(_request(url)))
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            server.close()
            assert peak < 200 << 20, peak  # was over 1 GiB
            for script, match in ((endless_line, "size line over 1024"), (endless_trailers, "trailers over 65536")):
                server, url, _ = await _serve([script])
                with pytest.raises(httpx.RemoteProtocolError, match=match):
                    await t.send(t.prepare(_request(url)))
                server.close()
        finally:
            await t.aclose()

    asyncio.run(go())


def test_fleet_reports_a_dump_over_max_dump_bytes_and_keeps_the_others():
    ok = _ok(b'{"ok": true}', b"application/json")
    huge = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-msgpack\r\ncontent-length: %d\r\n\r\n" % 10**15

    async def go():
        servers = [await _serve(s) for s in ([ok, huge], [ok, _ok(DUMP_TEXT.encode())])]
        urls = [url for _, url, _ in servers]
        try:
            async with AsyncFleet(urls, api_key="", retries=0, timeout=5.0) as fleet:
                assert fleet.max_dump_bytes < 10**15  # this machine's memory
                assert (await fleet.status()).ok
                bad, good = (await fleet.dump()).results
                assert bad.error_kind == "too_large" and "max_dump_bytes" in bad.error, bad
                assert good.ok and good.flavor == "sglang"
        finally:
            for server, _, _ in servers:
                server.close()

    asyncio.run(go())


def test_an_answer_nothing_can_read_fails_its_engine_alone():
    """JSON nested 200000 deep raised RecursionError out of the whole fan-out (a JSON answer, a
    JSON error body, or the files header): every engine's result was lost, the good ones' windows
    included. And a dump in a format not asked for was decoded anyway: a ``.pt`` answer to a
    msgpack dump went through torch.load. Each is now that engine's protocol failure."""
    deep = b"[" * 200_000
    ok = _ok(b'{"ok": true}', b"application/json")
    head = b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
    deep_json = head % (b"200 OK", b"application/json", len(deep), b"") + deep
    deep_error = head % (b"500 Internal Server Error", b"application/json", len(deep), b"") + deep
    deep_files = head % (b"500 Internal Server Error", b"text/plain", 4, b"x-moe-record-files: %s\r\n" % deep[:10000])
    pickle_bytes = b"PK\x03\x04 not even a zip"
    unasked_pt = head % (b"200 OK", b"application/octet-stream", len(pickle_bytes), b"x-moe-record-format: pt\r\n")
    unasked_pt += pickle_bytes

    async def go():
        scripts = [[ok, deep_json], [ok, deep_error], [ok, deep_files + b"oops"], [ok, unasked_pt], [ok, ok]]
        servers = [await _serve(s) for s in scripts]
        try:
            async with AsyncFleet([url for _, url, _ in servers], api_key="", retries=0, timeout=5.0) as fleet:
                assert (await fleet.status()).ok
                results = (await fleet.dump()).results
                kinds = [r.error_kind for r in results]
                assert kinds == ["protocol", "http", "http", "protocol", None], results
                assert "RecursionError" in results[0].error or "does not parse" in results[0].error
                assert "'pt' where 'msgpack' was asked" in results[3].error
                assert results[4].ok
        finally:
            for server, _, _ in servers:
                server.close()

    asyncio.run(go())
