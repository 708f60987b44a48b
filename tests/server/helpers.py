"""Small recorders and random traffic for the server and client tests."""

from __future__ import annotations

from typing import Any

import torch

from moe_record_sdk import Recorder, Topology

L, E, K = 3, 8, 2


def feed(rec: Recorder, seed: int, passes: int = 3, tokens: int = 5) -> torch.Tensor:
    """Record ``passes`` random passes; return the expected counts [L, E] (ids all valid)."""
    g = torch.Generator().manual_seed(seed)
    expected = torch.zeros(rec.num_layers, rec.num_experts, dtype=torch.int64)
    for _ in range(passes):
        for layer in rec.layer_ids:
            ids = torch.randint(0, rec.num_experts, (tokens, rec.top_k), generator=g)
            rec.record(layer, ids)
            expected[layer] += torch.bincount(ids.reshape(-1), minlength=rec.num_experts)
        rec.step()
    return expected


def make_recorder(rank: int = 0, world: int = 1, **kw: Any) -> Recorder:
    topo = Topology(rank=rank, world_size=world, dp_rank=rank, dp_size=world, token_shard=rank, num_token_shards=world)
    return Recorder(num_layers=L, num_experts=E, top_k=K, topology=topo, **kw)
