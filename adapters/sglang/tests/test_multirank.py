"""Several SGLang ranks (2 and 4 gloo processes on CPU): each rank's ``Topology`` comes from
SGLang's parallel state, a stat dump counts tensor-parallel replicas once (rank 0's file and
EPLBManager's object equal the single-process reference exactly, where SGLang's all-reduce
multiplies them), and per-rank per_pass files merge to the same counts with ``moe-record merge``.

The ranks are forked from a ``forkserver`` that imported SGLang once (a fresh interpreter per
rank costs ~15 s of CPU on import alone; forking this test process itself is unsafe, its
threads may hold locks)."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import time

import pytest
import torch
from multirank_worker import PASSES, PRELOAD, SCENARIOS, TOP_K, ids_for, main, reference

from moe_record_sdk import load_dump, validate_dump
from moe_record_sdk.merge import merge_dumps


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def world_run(request, model_dir, tmp_path_factory):
    """Run every scenario of a ``world``-rank world once; (world, output dir, rank reports)."""
    world = request.param
    out = tmp_path_factory.mktemp(f"world{world}")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # SGLang imported once, in the forkserver
    procs = [ctx.Process(target=main, args=(r, world, str(out / "store"), model_dir, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 150
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} rank(s) hung"
    reports = []
    for r in range(world):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} exited with {procs[r].exitcode} and no report"
        rep = json.loads(path.read_text())
        assert "error" not in rep, f"rank {r}:\n{rep['error']}"
        reports.append(rep)
    return world, out, reports


def _sound(world):
    return [sc for sc in SCENARIOS[world] if not sc.misrouted and sc.switch_rank is None]


def test_topology_follows_sglangs_parallel_state(world_run):
    world, _, reports = world_run
    for sc in _sound(world):
        topos = [rep[sc.name]["topology_stat"] for rep in reports]
        assert [t["rank"] for t in topos] == list(range(world))
        assert all(t["world_size"] == world for t in topos)
        assert {t["num_token_shards"] for t in topos} == {sc.expect_shards}, sc.name
        # The adapter groups ranks exactly as the scenario routes tokens.
        ours = [t["token_shard"] for t in topos]
        truth = sc.shard_of_rank
        assert all((ours[a] == ours[b]) == (truth[a] == truth[b]) for a in range(world) for b in range(world)), (
            sc.name,
            ours,
        )
        tp = sc.server_args.get("tp_size", 1)
        assert [t["tp_rank"] for t in topos] == [r % tp for r in range(world)]
        assert [t["pp_rank"] for t in topos] == [r // tp for r in range(world)]


def test_stat_file_on_rank_0_is_the_true_count(world_run):
    world, out, reports = world_run
    for sc in _sound(world):
        assert all(rep[sc.name]["errors"] == [] for rep in reports)
        want = reference(set(sc.shard_of_rank))
        files = sorted((out / sc.name / "stat").glob("*.pt"))
        assert len(files) == 1, (sc.name, files)  # world rank 0 alone writes a stat file
        assert "_" not in files[0].stem.removeprefix("expert_distribution_recorder_")  # SGLang's stat name
        dump = load_dump(files[0])
        assert validate_dump(dump) == []
        assert torch.equal(dump.total_count(), want), sc.name
        raw = torch.load(files[0], weights_only=True, map_location="cpu")  # SGLang's own layout
        assert torch.equal(raw["logical_count"].sum(0).long(), want)
        rows = sum(ids_for(s, p, 1).shape[0] for s in set(sc.shard_of_rank) for p in PASSES)
        assert dump.window.num_tokens[1] == rows  # each shard's token rows once
        assert dump.window.num_tokens[1] * TOP_K == int(want[1].sum()) + dump.window.discarded[1]
        # EPLBManager's dump_record(output_mode="object"): the same counts on every rank.
        for rep in reports:
            assert rep[sc.name]["object_total"] == want.tolist(), sc.name


def test_per_rank_files_merge_to_the_true_count(world_run):
    world, out, _ = world_run
    replicas_seen = False
    for sc in _sound(world):
        want = reference(set(sc.shard_of_rank))
        files = sorted((out / sc.name / "per_pass").glob("*.pt"))
        assert sorted(int(f.stem.rsplit("_", 1)[1]) for f in files) == list(range(world))  # one per rank
        dumps = [load_dump(f) for f in files]
        assert all(validate_dump(d) == [] for d in dumps)
        assert all([r.forward_pass_id for r in d.records] == [100 + p for p in PASSES] for d in dumps)
        merged = merge_dumps(dumps, sources=[str(f) for f in files])
        assert torch.equal(merged.total_count(), want), sc.name
        assert merged.window.mode == "per_pass" and len(merged.records) == len(PASSES) * len(set(sc.shard_of_rank))
        # Summing the ranks, as SGLang's all-reduce does, counts every replica.
        naive = sum(d.total_count() for d in dumps)
        replicas_seen |= not torch.equal(naive, want)
    assert replicas_seen  # some scenario of this world has replicas: the merge rules mattered
    sc = SCENARIOS[world][0]
    files = [str(f) for f in sorted((out / sc.name / "per_pass").glob("*.pt"))]
    merged_path = out / f"{sc.name}-merged.msgpack"
    run = subprocess.run(
        [sys.executable, "-m", "moe_record_sdk", "merge", *files, "-o", str(merged_path)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert torch.equal(load_dump(merged_path).total_count(), reference(set(sc.shard_of_rank)))


def test_replicas_that_routed_different_tokens_are_refused_not_summed(world_run):
    """A fault produced for real: ranks that SGLang's config makes replicas route different
    tokens. No stat file is written (rather than a wrong one), EPLB falls back to SGLang's world
    sum on every rank alike, the engine keeps running, and the per-rank files do not merge."""
    from moe_record_sdk.errors import MergeError

    world, out, reports = world_run
    (sc,) = [sc for sc in SCENARIOS[world] if sc.misrouted]
    assert not (out / sc.name / "stat").exists() or not list((out / sc.name / "stat").glob("*.pt"))
    assert any(
        "cannot merge the ranks' stat dumps" in e and "disagree on layer" in e for e in reports[0][sc.name]["errors"]
    )
    world_sum = sum(reference({s}) for s in sc.shard_of_rank)
    assert all(rep[sc.name]["object_total"] == world_sum.tolist() for rep in reports)
    dumps = [load_dump(f) for f in sorted((out / sc.name / "per_pass").glob("*.pt"))]
    assert len(dumps) == world
    with pytest.raises(MergeError, match="disagree on layer"):
        merge_dumps(dumps)


def test_ranks_in_different_modes_dump_alone_instead_of_hanging(world_run):
    """A side server's ``?mode=`` that reached some ranks only, then SGLang's dump on all: the
    stat ranks' merge would wait forever for the switched rank. Every rank writes its own
    file instead (named by rank, its own counts) and logs why."""
    world, out, reports = world_run
    for sc in [sc for sc in SCENARIOS[world] if sc.switch_rank is not None]:
        files = {int(f.stem.rsplit("_", 1)[1]): f for f in (out / sc.name / "stat").glob("*.pt")}
        assert sorted(files) == list(range(world)), sc.name
        for rank, path in files.items():
            dump = load_dump(path)
            assert dump.window.mode == ("per_pass" if rank == sc.switch_rank else "stat")
            assert dump.topology.rank == rank and validate_dump(dump) == []
            assert torch.equal(dump.total_count(), reference({sc.shard_of_rank[rank]}))
        assert all(any("dump in different modes" in e for e in rep[sc.name]["errors"]) for rep in reports)
