"""Real uvicorn servers on 127.0.0.1 (a thread each) over real recorders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from moe_record_sdk import Recorder
from moe_record_sdk.server import LocalBackend, ServerThread, make_app


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[..., ServerThread]]:
    """``serve(*recorders, **make_app options)`` -> a started ServerThread; all stopped at teardown."""
    servers: list[ServerThread] = []

    def start(*recorders: Recorder, **options: Any) -> ServerThread:
        options.setdefault("dump_dir", str(tmp_path / "dumps"))
        server = ServerThread(make_app(LocalBackend(*recorders), **options)).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0, trust_env=False) as client:
        yield client
