"""The opt-in per-rank side server (``MOE_RECORD_SGLANG_PORT``): our endpoints for a recorder
SGLang built, on real uvicorn on 127.0.0.1, driven by ``moe_record_sdk.Fleet``."""

from __future__ import annotations

import logging
import os
import socket

import pytest
import torch
from sglang_tiny import PASSES, TinyMoE, new_recorder, reference_counts, run_passes

from moe_record_sdk import Fleet, load_dump, validate_dump

KEY = "side-server-key"


def _free_ports(n: int) -> int:
    """A base port with ``n`` consecutive ports free right now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no run of free ports")


@pytest.fixture
def side_servers():
    from moe_record_sglang import side_server

    yield side_server
    side_server.stop()


def test_side_server_serves_the_recorder_sglang_built(sglang_config, model_dir, dump_dir, monkeypatch, side_servers):
    from moe_record_sglang import SGLangRecorder, install, uninstall

    base = _free_ports(1)
    monkeypatch.setenv("MOE_RECORD_SGLANG_PORT", str(base))
    monkeypatch.setenv("MOE_RECORD_API_KEY", KEY)
    install()
    try:
        # SGLang's unbounded stat buffer (-1): our stat keeps no ring; per_pass below brings one.
        with sglang_config("stat", expert_distribution_recorder_buffer_size=-1):
            rec = new_recorder(model_dir)  # SGLang's init_new: our plugin builds and serves
            assert isinstance(rec, SGLangRecorder)
            engine = f"127.0.0.1:{base}"  # base + world rank 0
            with Fleet([engine], api_key="", retries=0) as anonymous:
                denied = anonymous.status().results[0]
                assert not denied.ok and denied.status_code == 401
            with Fleet([engine], api_key=KEY, retries=0) as fleet:
                started = fleet.start(mode="per_pass").results[0]
                assert started.ok and started.flavor == "moe-record", started.describe()
                assert rec.recording and rec.recorder.mode == "per_pass"
                model = TinyMoE(seed=11)
                valid = run_passes(model, rec)  # SGLang's select_experts on its scheduler thread
                status = fleet.status().results[0]
                assert status.ok, status.describe()
                (ranks,) = status.info["ranks"]
                assert ranks["recording"] and ranks["mode"] == "per_pass" and ranks["passes"] == len(PASSES)
                assert status.info["engine"] == "sglang" and status.info["dump_dir"] == dump_dir
                assert fleet.stop().results[0].ok and not rec.recording
                result = fleet.dump(keep_files=True)
    finally:
        uninstall()
    r = result.results[0]
    assert r.ok and r.location == "response", r.describe()
    want = reference_counts(model.logits, valid)
    assert torch.equal(r.dump.total_count(), want)
    assert torch.equal(result.merged.total_count(), want)
    assert [x.forward_pass_id for x in r.dump.records] == [p[0] for p in PASSES]  # SGLang's pass ids
    assert r.dump.engine.name == "sglang" and r.dump.topology.rank == 0
    (path,) = r.files  # written as well, into SGLang's dump directory
    assert os.path.dirname(path) == dump_dir and path.endswith("_0.pt")
    on_disk = load_dump(path)
    assert validate_dump(on_disk) == []
    assert torch.equal(on_disk.total_count(), want)


def test_side_servers_of_tensor_parallel_ranks_merge_once(sglang_config, model_dir, dump_dir, side_servers):
    """Two TP ranks (same tokens), each its own side server on base + rank: the Fleet merges
    them by topology and counts the tokens once."""
    from moe_record_sglang import build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import set_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.runtime_context import get_parallel

    base = _free_ports(2)
    recs, servers = [], []
    with sglang_config("stat", tp_size=2):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        for rank in (0, 1):
            with get_parallel().override(launch_world_rank=rank, tp_rank=rank, attn_tp_rank=rank, moe_ep_rank=0):
                rec = build_recorder(meta, 0, mode="stat", top_k=2)
            server = side_servers.maybe_serve(rec, {"MOE_RECORD_SGLANG_PORT": str(base)})
            assert server is not None and server.port == base + rank
            recs.append(rec)
            servers.append(server)
    assert [r.recorder.topology.tp_rank for r in recs] == [0, 1]
    with Fleet([s.url for s in servers], api_key="", retries=0) as fleet:
        assert fleet.start().ok
        models = [TinyMoE(seed=4), TinyMoE(seed=4)]  # replicas: same weights, same tokens
        valid = []
        for m, r in zip(models, recs):  # each rank's process has its recorder as SGLang's global one
            set_global_expert_distribution_recorder(r)
            valid.append(run_passes(m, r))
        result = fleet.dump()
    assert result.ok, [r.describe() for r in result.results]
    want = reference_counts(models[0].logits, valid[0])
    assert all(torch.equal(r.dump.total_count(), want) for r in result.results)  # each rank saw it all
    assert torch.equal(result.merged.total_count(), want)  # counted once, not twice
    assert result.merged.window.num_tokens == result.results[0].dump.window.num_tokens


def test_side_servers_of_dp_replicas_merge_as_one_run(sglang_config, model_dir, dump_dir, side_servers):
    """``--dp-size 2 --tp-size 2`` without DP attention: two separate worlds whose ranks are both
    numbered 0 and 1. On ports base + replica * 2 + rank, the Fleet over all four merges them:
    each replica's TP ranks once, the replicas (different tokens) summed; one replica left out is
    refused as missing tokens, not merged as if whole."""
    from moe_record_sglang import build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import set_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.runtime_context import get_parallel

    base = _free_ports(4)
    recs, servers = [], []
    with sglang_config("stat", tp_size=2, dp_size=2):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        for replica in (0, 1):
            for rank in (0, 1):
                place = dict(launch_world_rank=rank, tp_rank=rank, attn_tp_rank=rank, moe_ep_rank=0, dp_rank=replica)
                with get_parallel().override(**place):
                    rec = build_recorder(meta, 0, mode="stat", top_k=2)
                    server = side_servers.maybe_serve(rec, {"MOE_RECORD_SGLANG_PORT": str(base)})
                assert server is not None and server.port == base + 2 * replica + rank
                recs.append(rec)
                servers.append(server)
    assert [r.recorder.topology.rank for r in recs] == [0, 1, 0, 1]  # each replica its own world
    models = [TinyMoE(seed=s) for s in (4, 4, 5, 5)]  # a replica's TP ranks route alike; replicas differ
    with Fleet([s.url for s in servers], api_key="", retries=0) as fleet:
        assert fleet.start().ok
        valid = []
        for m, r in zip(models, recs):
            set_global_expert_distribution_recorder(r)
            valid.append(run_passes(m, r))
        result = fleet.dump()
    assert result.ok, [r.describe() for r in result.results]
    want = [reference_counts(models[i].logits, valid[i]) for i in (0, 2)]
    assert not torch.equal(want[0], want[1])
    assert [r.dump.topology.rank for r in result.results] == [0, 1, 2, 3]
    assert torch.equal(result.merged.total_count(), want[0] + want[1])  # TP once, replicas summed
    with Fleet([s.url for s in servers[:2]], api_key="", retries=0) as fleet:  # replica 1 forgotten
        assert fleet.start().ok
        for m, r in zip(models[:2], recs[:2]):
            set_global_expert_distribution_recorder(r)
            run_passes(m, r)
        partial = fleet.dump()
    assert partial.merged is None and "token shards [1] are missing" in (partial.merge_error or "")


def test_dp_replicas_per_rank_files_merge_as_one_run(sglang_config, model_dir, dump_dir):
    """``--dp-size 2 --tp-size 2`` without DP attention, ``per_pass`` through SGLang's own dump
    endpoint: every replica's ranks write into the one dump directory. Their files are named and
    numbered among all the replicas' ranks, so ``moe-record merge`` of the directory's files
    gives the run: each replica's TP ranks once, the replicas summed."""
    import glob

    from moe_record_sglang import build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import set_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.runtime_context import get_parallel

    from moe_record_sdk import merge_dumps

    models = [TinyMoE(seed=s) for s in (4, 4, 5, 5)]  # a replica's TP ranks route alike; replicas differ
    valid = []
    with sglang_config("per_pass", tp_size=2, dp_size=2):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        for i, (replica, rank) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            place = dict(launch_world_rank=rank, tp_rank=rank, attn_tp_rank=rank, moe_ep_rank=0, dp_rank=replica)
            with get_parallel().override(**place):  # each rank's process has its own parallel state
                rec = build_recorder(meta, 0, mode="per_pass", top_k=2)
                set_global_expert_distribution_recorder(rec)
                rec.start_record()
                valid.append(run_passes(models[i], rec))
                rec.stop_record()
                rec.dump_record()  # what SGLang's dump endpoint calls on every rank
    files = sorted(glob.glob(os.path.join(dump_dir, "expert_distribution_recorder_*.pt")))
    assert sorted(f.rsplit("_", 1)[1] for f in files) == ["0.pt", "1.pt", "2.pt", "3.pt"]
    dumps = [load_dump(f) for f in files]
    assert all(validate_dump(d) == [] for d in dumps)
    assert sorted((d.topology.rank, d.topology.world_size, d.topology.token_shard) for d in dumps) == [
        (0, 4, 0), (1, 4, 0), (2, 4, 1), (3, 4, 1)
    ]  # fmt: skip
    want = [reference_counts(models[i].logits, valid[i]) for i in (0, 2)]
    assert torch.equal(merge_dumps(dumps).total_count(), want[0] + want[1])


def test_side_server_that_cannot_start_leaves_sglang_running(sglang_config, model_dir, caplog, side_servers):
    from moe_record_sglang import SGLangRecorder, build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    from moe_record_sdk import Recorder, Topology

    with sglang_config("stat"):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        rec = build_recorder(meta, 0, mode="stat", top_k=2)
    assert side_servers.maybe_serve(rec, {}) is None  # not asked for
    with caplog.at_level(logging.ERROR):
        assert side_servers.maybe_serve(rec, {"MOE_RECORD_SGLANG_PORT": "thirty"}) is None
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            assert side_servers.maybe_serve(rec, {"MOE_RECORD_SGLANG_PORT": str(port)}) is None
        # Rank 1 of a base at the top of the range: its port does not exist.
        rank1 = SGLangRecorder(Recorder(num_layers=2, num_experts=4, top_k=2, topology=Topology(rank=1, world_size=2)))
        assert side_servers.maybe_serve(rank1, {"MOE_RECORD_SGLANG_PORT": "65535"}) is None
        assert side_servers.maybe_serve(rec, {"MOE_RECORD_SGLANG_PORT": "31000", "MOE_RECORD_MAX_BODY": "1 KB"}) is None
    assert "MOE_RECORD_MAX_BODY" in caplog.text
    assert "MOE_RECORD_SGLANG_PORT='thirty' is not a port number" in caplog.text
    assert "MOE_RECORD_SGLANG_PORT=65535 puts this rank on port 65536, past 65535" in caplog.text
    assert f"cannot serve rank endpoints on 127.0.0.1:{port}" in caplog.text


def test_dumps_while_sglang_runs_passes_lose_and_repeat_nothing(sglang_config, model_dir, dump_dir, side_servers):
    """The side server's thread dumps while the scheduler thread runs forward passes: across all
    the dumps every pass appears once, with SGLang's id, and the counts add up exactly."""
    import threading
    import time

    from moe_record_sglang import build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import set_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    with sglang_config("per_pass"):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        rec = build_recorder(meta, 0, mode="per_pass", top_k=2)
    set_global_expert_distribution_recorder(rec)
    server = side_servers.serve(rec, _free_ports(1))
    passes = [(1000 + i, 3 + i % 5, None) for i in range(60)]
    dumps, done = [], threading.Event()
    with Fleet([server.url], api_key="", retries=0) as fleet:
        assert fleet.start().ok

        def dump_repeatedly() -> None:
            deadline = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < deadline:
                r = fleet.dump().results[0]
                assert r.ok, r.describe()
                dumps.append(r.dump)

        model = TinyMoE(seed=8)
        with sglang_config("per_pass"):
            dumper = threading.Thread(target=dump_repeatedly)
            dumper.start()
            try:
                valid = run_passes(model, rec, passes)
            finally:
                done.set()
                dumper.join(90)
        assert not dumper.is_alive()
        last = fleet.dump().results[0]
        assert last.ok
        dumps.append(last.dump)
    assert len(dumps) > 2  # dumps did interleave with the passes
    ids = [r.forward_pass_id for d in dumps for r in d.records]
    assert sorted(ids) == [p[0] for p in passes]  # each pass once, by SGLang's id
    assert all(d.window.dropped_passes == 0 for d in dumps)
    total = sum(d.total_count() for d in dumps)
    assert torch.equal(total, reference_counts(model.logits, valid))


def test_eplb_recorder_refuses_a_mode_switch(sglang_config, model_dir, gloo_world, side_servers):
    """With ``--enable-eplb``, EPLBManager calls ``dump_record(output_mode="object")`` at every
    rebalance, which needs stat: a side server's ``?mode=per_pass`` is refused (400) and the
    recording EPLB started goes on, instead of the scheduler failing at the next rebalance."""
    from moe_record_sglang import install, uninstall

    install()
    try:
        with sglang_config("stat", enable_eplb=True):
            rec = new_recorder(model_dir)
            rec.start_record()  # as EPLBManager does
            server = side_servers.serve(rec, _free_ports(1))
            with Fleet([server.url], api_key="", retries=0) as fleet:
                refused = fleet.start(mode="per_pass").results[0]
                assert not refused.ok and refused.status_code == 400
                assert "--enable-eplb" in refused.describe()
                assert fleet.start(mode="stat").ok
            assert rec.recording and rec.recorder.mode == "stat"
            run_passes(TinyMoE(seed=2), rec)
            out = rec.dump_record(output_mode="object")  # EPLBManager's rebalance
    finally:
        uninstall()
    assert int(out["logical_count"].sum()) > 0


def test_a_captured_forward_refuses_a_mode_its_buffers_cannot_hold(sglang_config, model_dir, side_servers):
    """SGLang with torch.compile (or CUDA graphs on a GPU) captured the tap's buffers: a side
    server's ?mode=per_token on a stat recorder would record into new buffers nothing writes,
    so it is refused (400, saying how to launch); a mode the buffers hold is taken."""
    from moe_record_sglang import build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    for compiled in (True, False):
        with sglang_config("per_pass", enable_torch_compile=compiled):
            meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
            rec = build_recorder(meta, 0, mode="per_pass", top_k=2)
        counter = rec.recorder.counter
        server = side_servers.serve(rec, _free_ports(1))
        with Fleet([server.url], api_key="", retries=0) as fleet:
            switched = fleet.start(mode="per_token").results[0]
            if compiled:
                assert not switched.ok and switched.status_code == 400, switched.describe()
                assert "--expert-distribution-recorder-mode per_token" in switched.describe()
                assert rec.recorder.counter is counter  # the captured buffers stay
                assert fleet.start(mode="stat").ok and rec.recorder.counter is counter
            else:  # eager: a new counter serves the next passes
                assert switched.ok and rec.recorder.mode == "per_token"
        side_servers.stop()


def test_passes_during_a_dump_keep_the_dumped_passes_ids(sglang_config, model_dir, dump_dir, side_servers):
    """SGLang runs passes while a side server's dump copies a full ring: the dumped records keep
    SGLang's forward pass ids, and the passes run meanwhile go whole to the next dump."""
    from moe_record_sglang import build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import set_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    with sglang_config("per_pass", expert_distribution_recorder_buffer_size=3):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        rec = build_recorder(meta, 0, mode="per_pass", top_k=2)
    set_global_expert_distribution_recorder(rec)
    model = TinyMoE(seed=6)
    read_ring = rec.recorder.dump

    def dump_while_sglang_runs(*args, **kwargs):
        dump = read_ring(*args, **kwargs)
        run_passes(model, rec, [(2000 + i, 3, None) for i in range(4)])  # the scheduler thread, meanwhile
        return dump

    rec.recorder.dump = dump_while_sglang_runs
    server = side_servers.serve(rec, _free_ports(1))
    with Fleet([server.url], api_key="", retries=0) as fleet:
        assert fleet.start().ok
        run_passes(model, rec, [(1000 + i, 3, None) for i in range(3)])  # fills the 3-row ring
        first = fleet.dump().results[0]
        rec.recorder.dump = read_ring
        second = fleet.dump().results[0]
    assert first.ok and second.ok
    assert [r.forward_pass_id for r in first.dump.records] == [1000, 1001, 1002]
    assert [r.forward_pass_id for r in second.dump.records] == [2001, 2002, 2003]  # 2000 left the 3-row ring
    assert second.dump.window.dropped_passes == 1


def test_side_server_takes_the_body_limit_from_the_environment(sglang_config, model_dir, side_servers):
    """``MOE_RECORD_MAX_BODY`` bounds the side servers' bodies as it does every other server's."""
    import httpx
    from moe_record_sglang import build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    with sglang_config("stat"):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        rec = build_recorder(meta, 0, mode="stat", top_k=2)
    server = side_servers.maybe_serve(rec, {"MOE_RECORD_SGLANG_PORT": str(_free_ports(1)), "MOE_RECORD_MAX_BODY": "16"})
    assert server is not None
    body = b'{"mode": "stat", "pad": "' + b"x" * 40 + b'"}'
    r = httpx.post(server.url + "/start_expert_distribution_record", content=body)
    assert r.status_code == 413
