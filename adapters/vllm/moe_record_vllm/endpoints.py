"""The ``vllm.endpoint_plugins`` entry point: SGLang's expert-distribution endpoints on vLLM's
OpenAI server, reaching every worker through ``collective_rpc``.

vLLM loads endpoint plugins only when ``VLLM_PLUGINS`` names them, and then loads only the
general plugins it names too: ``VLLM_PLUGINS=moe_record`` enables both halves (one name in both
groups). The routes exist only when recording is enabled (``VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR``
or ``MOE_RECORD_ENABLE=1``), as in vLLM PR 19658; requests are served by the core's
framework-free :class:`~moe_record_sdk.server.ControlHandler`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from argparse import Namespace
from typing import Any

from starlette.requests import Request  # FastAPI resolves the route's annotation from these globals
from starlette.responses import Response

from moe_record_sdk import Dump, env
from moe_record_sdk.errors import AdapterError
from moe_record_sdk.schema import decode
from moe_record_sdk.server import ControlError, ControlHandler
from moe_record_sdk.server.protocol import DUMP_PATH

from .plugin import RPC_DUMP, RPC_START, RPC_STATUS, RPC_STOP, enabled
from .rpc import raise_errors
from .version import check_version

log = logging.getLogger("vllm.moe_record")  # under vLLM's logger: its handlers print it
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")


class VllmBackend:
    """The control backend over a vLLM ``EngineClient``: one result per worker (rank).

    ``engine_client`` arrives after the app is built (``init_state``); until then, and on a
    vLLM this adapter refuses, requests answer 503 with the reason.
    """

    def __init__(self, engine_client: Any = None) -> None:
        self.engine_client = engine_client
        self.refusal: str | None = None
        try:
            check_version()
        except AdapterError as e:
            self.refusal = str(e)

    @property
    def some_ranks(self) -> bool:
        """Behind an external or hybrid load balancer this API server reaches only its own DP
        ranks' engine cores (vLLM's ``engine_ranks_managed``): it merges those alone."""
        config = getattr(self.engine_client, "vllm_config", None)
        pc = getattr(config, "parallel_config", None)
        return bool(getattr(pc, "data_parallel_external_lb", False) or getattr(pc, "data_parallel_hybrid_lb", False))

    async def _rpc(self, method: str, *args: Any) -> list[Any]:
        if self.refusal:
            raise ControlError(503, "unsupported_engine", self.refusal)
        if self.engine_client is None:
            raise ControlError(503, "no_engine", "the vLLM engine is not ready (or this server has none)")
        core = getattr(self.engine_client, "engine_core", None)
        call_all = getattr(core, "call_utility_all_async", None)
        if call_all is None:
            return raise_errors(await self.engine_client.collective_rpc(method, args=args))
        # Every engine core's workers: with data parallelism, AsyncLLM.collective_rpc answers
        # with the first engine's only, and a dump there would take and clear the others'
        # windows unseen.
        per_engine = await call_all("collective_rpc", method, None, args, None)
        return raise_errors([result for workers in per_engine for result in workers])

    async def start(self, mode: str | None) -> None:
        await self._rpc(RPC_START, mode)

    async def stop(self) -> None:
        await self._rpc(RPC_STOP)

    async def dump(self) -> list[Dump]:
        # The API process writes SGLang's files (the Controller); workers only send their bytes.
        return [
            decode(raw, "msgpack", source=f"vLLM worker {i}") for i, raw in enumerate(await self._rpc(RPC_DUMP, False))
        ]

    async def status(self) -> list[dict[str, Any]]:
        return await self._rpc(RPC_STATUS)


class MoeRecordEndpoints:
    """vLLM's ``EndpointPlugin`` (``vllm/plugins/endpoint_plugins/interface.py``, 0.26+)."""

    name = "moe_record"
    required_tasks = ("generate",)  # MoE recording needs a model that runs forward passes

    def __init__(self) -> None:
        self.backend = VllmBackend()
        self.handler = ControlHandler(
            self.backend,
            dump_dir=env.dump_dir("vllm"),
            api_key=env.api_key(),
            enabled=enabled(),
            max_body=env.max_body(),
            engine="vllm",
        )

    def attach_router(self, app: Any) -> None:
        """Add SGLang's paths (GET and POST) and our status path to vLLM's FastAPI app."""
        if not self.handler.enabled:
            log.info("moe-record-vllm: endpoints off (set %s)", env.VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR)
            return
        handler = self.handler

        def endpoint_for(path: str) -> Any:
            # The route's own path, not the request's: behind --root-path the request's has the prefix.
            async def endpoint(request: Request) -> Response:
                # Auth, method and Content-Length first: a body nobody may send is never read.
                resp = handler.precheck(request.method, path, request.headers.raw)
                if resp is None:
                    chunks, size = [], 0
                    async for chunk in request.stream():
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > handler.max_body:
                            break  # handle() answers 413; the rest is never read
                    body = b"".join(chunks)
                    # A dump's turn lasts until its answer is on its way or handed back (delivering).
                    async with handler.controller.delivering() if path == DUMP_PATH else contextlib.nullcontext():
                        resp = await handler.handle(request.method, path, request.url.query, request.headers.raw, body)
                        if resp.undelivered is not None and await request.is_disconnected():
                            # The client went away (its timeout) during the dump: the window goes
                            # back to the engine for the next dump, not into a closed socket.
                            log.warning("moe-record-vllm: dump client went away; the window is kept for the next dump")
                            resp.undelivered()
                return Response(content=resp.body, status_code=resp.status, headers=resp.headers)

            return endpoint

        for route in handler.routes:
            # Every method reaches the handler, which answers the others 405 after its auth
            # check and in its error format (FastAPI's own 405 would skip both).
            app.add_api_route(route.path, endpoint_for(route.path), methods=list(HTTP_METHODS), include_in_schema=False)
        log.info(
            "moe-record-vllm: endpoints %s, dump dir %s", [r.path for r in handler.routes], handler.controller.dump_dir
        )

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self.backend.engine_client = engine_client
        if self.handler.api_key is None:
            # vLLM's --api-key guards only its /v1 paths; these control recording and write files.
            keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
            keys = [str(k) for k in ([keys] if isinstance(keys, str) else keys) if k]
            if keys:
                self.handler.api_key = keys
                log.info("moe-record-vllm: endpoints guarded by vLLM's --api-key")
