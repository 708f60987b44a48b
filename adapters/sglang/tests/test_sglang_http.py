"""SGLang's own HTTP app, served for real: ``Fleet`` drives its three endpoints (plain-text
answers, dump files on the server's disk) and reports where each dump went.

``sglang.srt.entrypoints.http_server.app`` imports and serves on CPU; what cannot run here is
its engine (the tokenizer manager's zmq link to scheduler processes that need CUDA). The
handlers call ``_global_state.tokenizer_manager.{start,stop,dump}_expert_distribution_record()``;
the stand-in below runs SGLang's own implementations of those three methods
(``TokenizerControlMixin``) and its ``FanOutCommunicator``, whose send delivers the request to
SGLang's real ``Scheduler.expert_distribution_handle`` in this process instead of over zmq.
"""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from sglang_tiny import TinyMoE, new_recorder, reference_counts, run_passes

from moe_record_sdk import Fleet, load_dump, validate_dump


class SchedulerLink:
    """The part of SGLang's ``TokenizerManager`` these endpoints use, over an in-process scheduler."""

    def __init__(self) -> None:
        from sglang.srt.managers.communicator import FanOutCommunicator
        from sglang.srt.managers.tokenizer_control_mixin import TokenizerControlMixin

        cls = type(self)
        cls.start_expert_distribution_record = TokenizerControlMixin.start_expert_distribution_record
        cls.stop_expert_distribution_record = TokenizerControlMixin.stop_expert_distribution_record
        cls.dump_expert_distribution_record = TokenizerControlMixin.dump_expert_distribution_record
        self.expert_distribution_communicator = FanOutCommunicator(self._send, 1)  # one DP rank
        self.requests: list[str] = []

    def auto_create_handle_loop(self) -> None:
        """SGLang's starts the loop receiving scheduler answers over zmq; ``_send`` answers instead."""

    def _send(self, req) -> None:
        from sglang.srt.managers.scheduler import Scheduler

        self.requests.append(req.action.name)
        out = Scheduler.expert_distribution_handle(None, req)  # what the scheduler process runs
        # Delivered once the communicator awaits its answer, as SGLang's receive loop does.
        asyncio.get_running_loop().call_soon(self.expert_distribution_communicator.handle_recv, out)


@pytest.fixture
def sglang_http(monkeypatch):
    """SGLang's FastAPI app on uvicorn, 127.0.0.1, its tokenizer manager linked to this process."""
    from sglang.srt.entrypoints import http_server

    from moe_record_sdk.server import ServerThread

    link = SchedulerLink()
    monkeypatch.setattr(
        http_server,
        "_global_state",
        http_server._GlobalState(tokenizer_manager=link, template_manager=None, scheduler_info={}),
    )
    with ServerThread(http_server.app) as server:
        yield server, link


@pytest.mark.parametrize("recorder", ["sglang", "moe-record"])
def test_fleet_drives_sglangs_own_endpoints(
    recorder, sglang_http, sglang_config, model_dir, dump_dir, gloo_world, monkeypatch
):
    from moe_record_sglang import install, uninstall
    from sglang.srt.eplb import expert_distribution

    server, link = sglang_http
    if recorder == "sglang":  # SGLang's own recorder on CPU (see conftest.sglang_on_cpu)
        monkeypatch.setattr(expert_distribution, "get_device", lambda device_id=None: "cpu")
    else:
        install()
    try:
        with sglang_config("stat"):
            rec = new_recorder(model_dir)
            assert type(rec).__name__ == (
                "SGLangRecorder" if recorder == "moe-record" else "_ExpertDistributionRecorderReal"
            )
            with Fleet([server.url], api_key="", retries=0) as fleet:
                started = fleet.start(mode="per_pass").results[0]
                model = TinyMoE(seed=2)
                valid = run_passes(model, rec)
                stopped = fleet.stop().results[0]
                status = fleet.status().results[0]
                result = fleet.dump()
    finally:
        if recorder == "moe-record":
            uninstall()
    assert link.requests == ["START_RECORD", "STOP_RECORD", "DUMP_RECORD"]  # reached SGLang's scheduler handler
    assert started.ok and started.flavor == "sglang" and stopped.ok
    assert "ignores mode" in started.note  # the server's --expert-distribution-recorder-mode applies
    assert not status.ok and status.status_code == 404 and "stock SGLang server has none" in status.error

    r = result.results[0]
    assert r.ok and r.flavor == "sglang", r.describe()
    assert r.location == "server-disk" and r.dump is None and result.merged is None
    assert "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR" in r.note
    assert "dump left on the server's disk" in r.describe()

    (path,) = [os.path.join(dump_dir, f) for f in os.listdir(dump_dir)]  # where the result says
    assert os.path.basename(path).startswith("expert_distribution_recorder_")
    dump = load_dump(path)
    assert validate_dump(dump) == []
    assert dump.window.mode == "stat"
    assert torch.equal(dump.total_count(), reference_counts(model.logits, valid))
    assert dump.engine.adapter == ("moe-record-sglang" if recorder == "moe-record" else None)
