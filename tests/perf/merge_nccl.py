"""Dump-time merge over NCCL, 2 GPUs: exactness and cost, at a real model's shape.

Two processes (one GPU each, NCCL) record a DeepSeek-V3-like shape (61 MoE layers x 256
experts, top-8) through ``Recorder.record`` on their GPU, then merge at dump time with
``moe_record_sdk.merge.merge_distributed``:

* expert-parallel style (``ep``): disjoint tokens per rank (``token_shard`` = rank), ``per_pass``
  mode, ``--passes`` passes per rank (default 1000, the ring SGLang keeps);
* tensor-parallel style (``tp``): the same tokens on every rank (replicas), ``stat`` mode: the
  [1, 61, 256] dump.

Rank 0 checks each merged dump against one process that recorded every rank's tokens (on its
GPU, same recorder): equal totals, equal per-pass rows (as a multiset: the shards' passes are
distinct passes), no replica counted twice. It prints the merge's cost in milliseconds (median
of ``--reps``, from a barrier to the merged dump on rank 0) next to the ``dump()`` it follows,
and the bytes each rank sends.

    python tests/perf/merge_nccl.py [--passes 1000] [--reps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_record_sdk import Recorder, Topology
from moe_record_sdk.merge import merge_distributed
from moe_record_sdk.schema.io import encode

L, E, K = 61, 256, 8


def _ids(world: int, passes: int, tokens: int, seed: int) -> torch.Tensor:
    """int32 [world, passes, L, tokens, K], with -1 padding and out-of-range ids mixed in."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, E + 1, (world, passes, L, tokens, K), generator=g, dtype=torch.int32)


def _run(rec: Recorder, ids: torch.Tensor):
    """Record ``ids`` [passes, L, tokens, K], one step per pass; return the dump."""
    rec.start()
    for p in range(ids.shape[0]):
        for layer in range(L):
            rec.record(layer, ids[p, layer])
        rec.step()
    if rec.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    dump = rec.dump()
    return dump, (time.perf_counter() - t0) * 1e3


def _time_merge(dump, reps: int):
    times, merged = [], None
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        merged = merge_distributed(dump)
        times.append((time.perf_counter() - t0) * 1e3)
    return merged, statistics.median(times)


def _rows(logical: torch.Tensor) -> list:
    return sorted(map(tuple, logical.reshape(logical.shape[0], -1).tolist()))


def _worker(rank: int, world: int, port: int, a: argparse.Namespace, out: str) -> None:
    if a.cpu:  # a smoke run of the same code on gloo
        dev, backend, card = torch.device("cpu"), "gloo", "CPU (gloo)"
    else:
        dev, backend = torch.device("cuda", rank), "nccl"
        torch.cuda.set_device(dev)
        card = torch.cuda.get_device_name(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        report = {"world": world, "card": card, "torch": torch.__version__}
        # Expert-parallel style: disjoint tokens, per_pass.
        ids = _ids(world, a.passes, a.tokens, seed=1).to(dev)
        topo = Topology(
            rank=rank, world_size=world, dp_rank=rank, dp_size=world, token_shard=rank, num_token_shards=world
        )
        rec = Recorder(L, E, K, dev, "per_pass", buffer_size=a.passes, topology=topo)
        dump, dump_ms = _run(rec, ids[rank])
        merged, merge_ms = _time_merge(dump, max(1, a.reps // 3))
        report["ep"] = {"passes_per_rank": a.passes, "dump_ms": dump_ms, "merge_ms": merge_ms}
        report["ep"]["bytes_per_rank"] = len(encode(dump, "msgpack"))
        if rank == 0:
            ref_rec = Recorder(L, E, K, dev, "per_pass", buffer_size=world * a.passes)
            ref, _ = _run(ref_rec, ids.reshape(world * a.passes, *ids.shape[2:]))
            assert torch.equal(merged.total_count(), ref.total_count()), "ep: totals differ"
            assert len(merged.records) == len(ref.records) == world * a.passes, (len(merged.records), len(ref.records))
            assert _rows(merged.logical_count) == _rows(ref.logical_count), "ep: per-pass rows differ"
            report["ep"]["exact"] = True
        del rec, dump, merged
        # Tensor-parallel style: every rank sees the same tokens, stat.
        topo = Topology(rank=rank, world_size=world, tp_rank=rank, tp_size=world)
        rec = Recorder(L, E, K, dev, "stat", topology=topo)
        same = ids[0, : a.tp_passes]
        dump, dump_ms = _run(rec, same)
        merged, merge_ms = _time_merge(dump, a.reps)
        report["tp"] = {"shape": list(dump.logical_count.shape), "dump_ms": dump_ms, "merge_ms": merge_ms}
        report["tp"]["bytes_per_rank"] = len(encode(dump, "msgpack"))
        if rank == 0:
            ref, _ = _run(Recorder(L, E, K, dev, "stat"), same)
            assert torch.equal(merged.total_count(), ref.total_count()), "tp: totals differ"
            assert torch.equal(merged.logical_count, ref.logical_count), "tp: logical_count differs"
            assert merged.total_count().sum() > 0
            report["tp"]["exact"] = True
            with open(out, "w") as f:
                json.dump(report, f, indent=2)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=1000, help="per_pass passes per rank (ep)")
    p.add_argument("--tokens", type=int, default=4, help="tokens per pass per rank (ep)")
    p.add_argument("--tp-passes", type=int, default=100, help="stat passes (tp)")
    p.add_argument("--reps", type=int, default=10, help="timed merges (ep: a third)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--cpu", action="store_true", help="smoke-run on gloo and CPUs instead")
    a = p.parse_args(argv)
    if not a.cpu and torch.cuda.device_count() < 2:
        print("merge_nccl: needs 2 GPUs (or --cpu)", file=sys.stderr)
        return 2
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = a.json or os.path.join(os.environ.get("TMPDIR", "/tmp"), "merge_nccl.json")
    mp.spawn(_worker, args=(world, port, a, out), nprocs=world, join=True)
    with open(out) as f:
        r = json.load(f)
    print(f"merge over NCCL: {world} x {r['card']}, torch {r['torch']}, {L} layers x {E} experts, top-{K}")
    for name, what in (
        ("ep", "expert-parallel (disjoint tokens), per_pass"),
        ("tp", "tensor-parallel (same tokens), stat"),
    ):
        m = r[name]
        size = f"{m['passes_per_rank']} passes/rank" if name == "ep" else f"dump {m['shape']}"
        print(
            f"  {what:<46} {size:<20} exact={m['exact']}  dump {m['dump_ms']:8.2f} ms  "
            f"merge {m['merge_ms']:8.2f} ms  {m['bytes_per_rank'] / 1e6:6.2f} MB/rank"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
