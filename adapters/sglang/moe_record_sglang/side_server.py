"""Our HTTP extensions for SGLang, one small server per rank (opt-in).

SGLang's HTTP server runs in its main process and reaches the recorders, which live in the
scheduler processes, only through SGLang's three endpoints (plain text, files on the server's
disk). With ``MOE_RECORD_SGLANG_PORT=<base>`` set, each scheduler process that builds our
recorder also serves our endpoints (``spec/http-api.md``: status, mode on start, the dump's
bytes in the answer) for its own rank, on a background thread:

* host ``MOE_RECORD_SGLANG_HOST`` (default ``127.0.0.1``), port ``base + rank``, the world
  rank; ``--dp-size`` replicas (separate worlds) take the next blocks of ``world_size`` ports,
  and their dumps say so (``topology.across_replicas``): a Fleet over every port merges them;
* ``MOE_RECORD_API_KEY`` required as a bearer token when set, files into the same directory as
  SGLang's endpoint (``MOE_RECORD_DUMP_DIR``, else ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``);
* each server answers for its rank alone, without collectives: point ``moe_record_sdk.Fleet``
  at every rank's port and it merges them by their ``Topology`` (tensor-parallel replicas once).

A dump through a side server takes that rank's window, as SGLang's own dump does on every rank.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from moe_record_sdk import Dump
from moe_record_sdk import env as moe_env
from moe_record_sdk.server import make_app

from .recorder import SGLangRecorder
from .topology import across_replicas, with_topology

log = logging.getLogger(__name__)

# Named with the SDK's other variables (moe_record_sdk.env); unset or empty port: no side server.
PORT_ENV = moe_env.MOE_RECORD_SGLANG_PORT
HOST_ENV = moe_env.MOE_RECORD_SGLANG_HOST

_servers: dict[int, Any] = {}  # port -> ServerThread, so a rebuilt recorder takes its port back


class RankBackend:
    """``moe_record_sdk.server.Backend`` over one rank's :class:`SGLangRecorder`.

    Calls go through the SGLang recorder (not its inner Recorder) so dumps carry SGLang's
    forward pass ids; they run on a worker thread, off the server's event loop.
    """

    def __init__(self, recorder: SGLangRecorder) -> None:
        self.recorder = recorder
        # This rank among every replica's ranks, which the Fleet sees side by side.
        self.topology = across_replicas(recorder.recorder.topology)

    async def start(self, mode: str | None) -> None:
        await asyncio.to_thread(self.recorder.start_record, mode)

    async def stop(self) -> None:
        await asyncio.to_thread(self.recorder.stop_record)

    async def dump(self) -> list[Dump]:
        return [with_topology(await asyncio.to_thread(self.recorder.dump_local), self.topology)]

    async def status(self) -> list[dict[str, Any]]:
        rec = self.recorder.recorder
        status = await asyncio.to_thread(lambda: rec.status().to_dict())
        return [{"rank": self.topology.rank, **status}]


def rank_port(base: int, recorder: SGLangRecorder) -> int:
    """``base`` + this rank's place among every ``--dp-size`` replica's ranks."""
    return base + across_replicas(recorder.recorder.topology).rank


def serve(
    recorder: SGLangRecorder,
    port: int,
    host: str = "127.0.0.1",
    *,
    api_key: str | None = None,
    dump_dir: str | None = None,
    max_body: int | None = None,
) -> Any:
    """Serve our endpoints for ``recorder`` on ``host:port`` in a background thread; returns the
    started ``moe_record_sdk.server.ServerThread`` (``.url``, ``.stop()``). A server already
    on that port from an earlier recorder of this process is stopped first.

    Example
    -------
    >>> server = serve(sglang_recorder, 31000)  # doctest: +SKIP
    >>> Fleet([server.url]).status()  # doctest: +SKIP
    """
    from moe_record_sdk.server.threaded import ServerThread

    stop(port)
    app = make_app(
        RankBackend(recorder),
        dump_dir=dump_dir or moe_env.dump_dir("sglang"),
        api_key=api_key,
        engine="sglang",
        max_body=moe_env.max_body() if max_body is None else max_body,
    )
    server = ServerThread(app, host=host, port=port).start()
    _servers[server.port] = server
    log.info("moe-record: rank %d's endpoints on %s", recorder.recorder.topology.rank, server.url)
    return server


def maybe_serve(recorder: SGLangRecorder, environ: dict[str, str] | None = None) -> Any | None:
    """:func:`serve` on this rank's port when ``MOE_RECORD_SGLANG_PORT`` is set, else None.
    Never raises: a side server that cannot start is logged, SGLang runs on."""
    e = os.environ if environ is None else environ
    raw = (e.get(PORT_ENV) or "").strip()
    if not raw:
        return None
    try:
        base = int(raw)
        if not 0 < base < 65536:
            raise ValueError
    except ValueError:
        log.error("moe-record: %s=%r is not a port number; no side server", PORT_ENV, raw)
        return None
    host = e.get(HOST_ENV) or "127.0.0.1"
    port = rank_port(base, recorder)
    if port > 65535:  # a base near the top, and this rank's port past it
        log.error("moe-record: %s=%d puts this rank on port %d, past 65535; no side server", PORT_ENV, base, port)
        return None
    try:
        max_body = moe_env.max_body(e)
    except ValueError as err:
        log.error("moe-record: no rank endpoints: %s", err)
        return None
    try:
        return serve(
            recorder, port, host, api_key=moe_env.api_key(e), dump_dir=moe_env.dump_dir("sglang", e), max_body=max_body
        )
    except (OSError, RuntimeError, TimeoutError) as err:
        log.error("moe-record: cannot serve rank endpoints on %s:%d: %s", host, port, err)
        return None


def stop(port: int | None = None) -> None:
    """Stop the side server on ``port`` (None: all of this process's)."""
    ports = list(_servers) if port is None else [port]
    for p in ports:
        server = _servers.pop(p, None)
        if server is not None:
            server.stop()
