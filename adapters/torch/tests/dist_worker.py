"""One rank of the gloo merge tests (run by test_distributed.py as ``python dist_worker.py ...``).

Scenarios, all on TinyMoE with the same seed, each sequence generated on its own (batch 1):

* ``replicas``: tensor-parallel-like, every rank runs every sequence (token_shard 0 everywhere).
* ``shards``: data/expert-parallel-like, rank r runs sequences r, r + N, ... (token_shard r).
* ``mixed`` (4 ranks): 2 token shards x 2 pipeline stages, each stage observing half the layers.

Each rank saves its own dump (``{scenario}-rank{r}.msgpack``) and rank 0 the dump merged at dump
time through ``merge_distributed`` (``{scenario}-merged.msgpack``).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from moe_record_torch import attach, layer_map
from moe_record_torch.tiny import TinyMoE, TinyMoEConfig

from moe_record_sdk import Recorder, Topology
from moe_record_sdk.merge import merge_distributed

CONFIG = TinyMoEConfig(num_layers=4, first_dense_layers=1, seed=11)
NUM_SEQUENCES = 8
NEW_TOKENS = 3


def sequences() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, CONFIG.vocab_size, (1, 3 + i % 6), generator=g) for i in range(NUM_SEQUENCES)]


def run(model: TinyMoE, recorder: Recorder, seqs: list[torch.Tensor], layers: list[int] | None = None):
    """Generate each sequence with ``recorder`` attached (to ``layers`` only, if given); return the dump."""
    with attach(model, recorder, layers=layers):
        recorder.start()
        for s in seqs:
            model.generate(s, max_new_tokens=NEW_TOKENS)
        return recorder.dump()


def scenario(name: str, rank: int, world: int) -> tuple[Topology, list[int] | None, list[torch.Tensor], str]:
    seqs = sequences()
    moe = list(layer_map(TinyMoE(CONFIG)).moe_layer_ids)
    if name == "replicas":
        return Topology(rank=rank, world_size=world, tp_rank=rank, tp_size=world), None, seqs, "stat"
    if name == "shards":
        topo = Topology(
            rank=rank, world_size=world, dp_rank=rank, dp_size=world, token_shard=rank, num_token_shards=world
        )
        return topo, None, seqs[rank::world], "per_pass"
    if name == "mixed":
        shard, stage = divmod(rank, 2)
        half = len(moe) // 2
        layers = moe[:half] if stage == 0 else moe[half:]
        topo = Topology(
            rank=rank,
            world_size=world,
            pp_rank=stage,
            pp_size=2,
            dp_rank=shard,
            dp_size=world // 2,
            token_shard=shard,
            num_token_shards=world // 2,
        )
        return topo, layers, seqs[shard :: world // 2], "stat"
    raise SystemExit(f"unknown scenario {name}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--init", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (one GPU per rank)")
    p.add_argument("scenarios", nargs="+")
    a = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device("cpu")
    if a.backend == "nccl":
        device = torch.device("cuda", a.rank)
        torch.cuda.set_device(device)
    dist.init_process_group(a.backend, init_method=a.init, rank=a.rank, world_size=a.world)
    try:
        model = TinyMoE(CONFIG).to(device)
        for name in a.scenarios:
            topo, layers, seqs, mode = scenario(name, a.rank, a.world)
            seqs = [s.to(device) for s in seqs]
            lm = layer_map(model, layers=layers)
            rec = Recorder(**{**lm.recorder_kwargs(), "mode": mode, "topology": topo, "device": device})
            dump = run(model, rec, seqs, layers)
            dump.save(os.path.join(a.out, f"{name}-rank{a.rank}.msgpack"))
            merged = merge_distributed(dump)
            if a.rank == 0:
                assert merged is not None
                merged.save(os.path.join(a.out, f"{name}-merged.msgpack"))
            else:
                assert merged is None
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
