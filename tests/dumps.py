"""Random dumps for tests, made by driving a real Recorder (so they satisfy every invariant)."""

from __future__ import annotations

import torch

from moe_record_sdk import Dump, Recorder, Topology


def random_dump(
    seed: int,
    mode: str = "stat",
    *,
    num_layers: int = 3,
    num_experts: int = 8,
    top_k: int = 2,
    passes: int = 4,
    tokens: int = 6,
    replicas: int = 0,
    buffer_size: int | None = None,
    layer_ids: list[int] | None = None,
    rank: int = 0,
) -> Dump:
    """A dump of ``passes`` random passes; ``replicas`` > 0 adds EPLB physical slots."""
    g = torch.Generator().manual_seed(seed)
    mapping = None
    if replicas:
        extra = torch.randint(0, num_experts, (num_layers, replicas), generator=g)
        mapping = torch.cat([torch.arange(num_experts).expand(num_layers, -1), extra], dim=1)
    rec = Recorder(
        num_layers=num_layers,
        num_experts=num_experts,
        top_k=top_k,
        mode=mode,
        layer_ids=layer_ids,
        buffer_size=buffer_size,
        physical_to_logical_map=mapping,
        topology=Topology(rank=rank, world_size=max(rank + 1, 1)),
        max_bytes=1 << 20,
    )
    slots = num_experts + replicas
    rec.start()
    for _ in range(passes):
        for layer in rec.layer_ids:
            ids = torch.randint(-1, slots + 1, (tokens, top_k), generator=g)
            valid = int(torch.randint(0, tokens + 1, (1,), generator=g))
            rec.record(layer, ids, num_valid_tokens=valid)
        rec.step()
    return rec.dump()
