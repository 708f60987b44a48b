"""2- and 4-process gloo runs of TinyMoE: after merge (at dump time through torch.distributed, and
offline with ``moe-record merge``) the counts are exactly those of one process seeing every token."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from moe_record_torch import layer_map

from moe_record_sdk import Recorder, load_dump, validate_dump
from moe_record_sdk.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

WORKER = Path(__file__).with_name("dist_worker.py")


def launch(world: int, scenarios: list[str], out: Path, backend: str = "gloo") -> None:
    """Run ``world`` dist_worker processes and wait for them (3 minutes at most)."""
    args = ["--world", str(world), "--init", f"file://{out / 'store'}", "--out", str(out), "--backend", backend]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "--rank", str(r), *args, *scenarios],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        for r in range(world)
    ]
    deadline = time.monotonic() + 180
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0].decode())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [(r, p.returncode, log) for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]
    assert not bad, "\n".join(f"rank {r} exited {rc}:\n{log[-3000:]}" for r, rc, log in bad)


def single_process(mode: str, device: str = "cpu"):
    """One process, every sequence, every layer: what the merged dumps must equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting, so every matmul is the same
    try:
        model = dist_worker.TinyMoE(dist_worker.CONFIG).to(device)
        rec = Recorder(**{**layer_map(model).recorder_kwargs(), "mode": mode, "device": device})
        return dist_worker.run(model, rec, [s.to(device) for s in dist_worker.sequences()])
    finally:
        torch.set_num_threads(threads)


def assert_same_counts(merged, single) -> None:
    assert validate_dump(merged) == []
    assert torch.equal(merged.total_count(), single.total_count())
    assert merged.window.num_tokens == single.window.num_tokens
    assert merged.window.discarded == single.window.discarded
    assert merged.window.num_passes == single.window.num_passes
    assert merged.model.moe_layer_ids == single.model.moe_layer_ids
    assert (merged.topology.rank, merged.topology.world_size, merged.topology.num_token_shards) == (0, 1, 1)


def check_merges(world: int, scenarios: list[str], out: Path, device: str = "cpu") -> None:
    """Each scenario's dumps, merged at dump time and offline, give one process's counts."""
    for name in scenarios:
        mode = "per_pass" if name == "shards" else "stat"
        single = single_process(mode, device)
        ranks = [str(out / f"{name}-rank{r}.msgpack") for r in range(world)]
        per_rank = [load_dump(p) for p in ranks]
        # A plain sum would count tensor-parallel replicas world times over.
        summed = torch.stack([d.total_count() for d in per_rank]).sum(0)
        if name == "replicas":
            assert torch.equal(summed, world * single.total_count())

        at_dump_time = load_dump(out / f"{name}-merged.msgpack")
        assert_same_counts(at_dump_time, single)

        merged_file = out / f"{name}-offline.pt"
        assert cli_main(["merge", *ranks, "-o", str(merged_file)]) == 0
        offline = load_dump(merged_file)
        assert_same_counts(offline, single)
        assert torch.equal(offline.logical_count, at_dump_time.logical_count)
        if mode == "per_pass":  # one record per pass of every shard, rows equal to one process's rows
            assert len(offline.records) == len(single.records) == single.window.num_passes
            key = lambda rows: sorted(map(tuple, rows.reshape(rows.shape[0], -1).tolist()))  # noqa: E731
            assert key(offline.logical_count) == key(single.logical_count)


@pytest.mark.parametrize(("world", "scenarios"), [(2, ["replicas", "shards"]), (4, ["replicas", "shards", "mixed"])])
def test_gloo_merge_equals_single_process(world: int, scenarios: list[str], tmp_path: Path) -> None:
    launch(world, scenarios, tmp_path)
    check_merges(world, scenarios, tmp_path)
