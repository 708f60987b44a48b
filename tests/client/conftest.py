"""Engines for the fleet tests: ours, a stock-SGLang-like one, a dead one, a slow one, a flaky one,
one whose answers are cut on the way."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from moe_record_sdk import Recorder
from moe_record_sdk.server import LocalBackend, ServerThread, make_app
from moe_record_sdk.server.threaded import bind

from ..server.helpers import make_recorder
from .sglang_like import SGLangLike


class SlowBackend(LocalBackend):
    """Fault injection: a dump (or a status, or a stop) that takes ``delay`` seconds (an engine
    stuck behind a long batch)."""

    def __init__(self, recorder: Recorder, delay: float, slow_status: bool = False, slow_stop: bool = False) -> None:
        super().__init__(recorder)
        self.delay, self.slow_status, self.slow_stop = delay, slow_status, slow_stop

    async def dump(self) -> Any:
        await asyncio.sleep(self.delay)
        return await super().dump()

    async def stop(self) -> None:
        if self.slow_stop:
            await asyncio.sleep(self.delay)
        await super().stop()

    async def status(self) -> Any:
        if self.slow_status:
            await asyncio.sleep(self.delay)
        return await super().status()


class Flaky:
    """Fault injection: answers 503 to the first ``n`` requests on ``path``, then passes through."""

    def __init__(self, app: Any, path: str, n: int) -> None:
        self.app, self.path, self.left, self.seen = app, path, n, 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            self.seen += 1
            if self.left > 0:
                self.left -= 1
                await send({"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"4")]})
                await send({"type": "http.response.body", "body": b"busy"})
                return
        await self.app(scope, receive, send)


class CutAnswer:
    """Fault injection: the first ``n`` answers on ``path`` stop after their headers and a few
    bytes of body, as a connection dropped on the way does; the app below sees its answer sent."""

    def __init__(self, app: Any, path: str, n: int) -> None:
        self.app, self.path, self.left = app, path, n

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or self.left <= 0:
            await self.app(scope, receive, send)
            return
        self.left -= 1
        started = False

        async def cut(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.body":
                if not started:  # the rest never leaves: the server closes the connection
                    await send({"type": "http.response.body", "body": message["body"][:64], "more_body": True})
                    started = True
                return
            await send(message)

        await self.app(scope, receive, cut)


class Engines:
    def __init__(self, tmp_path: Any) -> None:
        self.tmp_path = tmp_path
        self.servers: list[ServerThread] = []
        self.count = 0

    def _serve(self, app: Any, port: int = 0) -> ServerThread:
        server = ServerThread(app, port=port).start()
        self.servers.append(server)
        return server

    def dir(self) -> str:
        self.count += 1
        return str(self.tmp_path / f"engine-{self.count}")

    def ours(self, recorder: Recorder | None = None, port: int = 0, **options: Any) -> tuple[Recorder, ServerThread]:
        rec = recorder or make_recorder()
        options.setdefault("dump_dir", self.dir())
        return rec, self._serve(make_app(LocalBackend(rec), **options), port)

    def sglang(self) -> tuple[Recorder, ServerThread, str]:
        rec, d = make_recorder(), self.dir()
        return rec, self._serve(SGLangLike(rec, d)), d

    def slow(
        self, delay: float, slow_status: bool = False, recorder: Recorder | None = None, slow_stop: bool = False
    ) -> tuple[Recorder, ServerThread]:
        rec = recorder or make_recorder()
        return rec, self._serve(make_app(SlowBackend(rec, delay, slow_status, slow_stop), dump_dir=self.dir()))

    def flaky(self, path: str, n: int) -> tuple[Recorder, ServerThread, Flaky]:
        rec = make_recorder()
        app = Flaky(make_app(LocalBackend(rec), dump_dir=self.dir()), path, n)
        return rec, self._serve(app), app

    def cut(self, path: str, n: int, recorder: Recorder | None = None) -> tuple[Recorder, ServerThread, CutAnswer]:
        rec = recorder or make_recorder()
        app = CutAnswer(make_app(LocalBackend(rec), dump_dir=self.dir()), path, n)
        return rec, self._serve(app), app

    @staticmethod
    def down() -> str:
        """A URL where nothing listens (a port that was free a moment ago)."""
        sock = bind()
        port = sock.getsockname()[1]
        sock.close()
        return f"http://127.0.0.1:{port}"

    def stop_all(self) -> None:
        for s in self.servers:
            s.stop()


@pytest.fixture
def engines(tmp_path) -> Iterator[Engines]:
    e = Engines(tmp_path)
    yield e
    e.stop_all()
