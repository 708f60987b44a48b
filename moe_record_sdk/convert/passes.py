"""Per-pass statistics keyed by (iteration, layer), as foreign tools store them, into a Dump."""

from __future__ import annotations

import torch

from ..errors import DumpFormatError
from ..schema.dump import Dump, EngineInfo, ModelInfo, Record, Window


def per_pass_dump(
    counts: dict[tuple[int, int], torch.Tensor],
    *,
    engine: str,
    num_experts: int,
    top_k: int | None,
    num_layers: int | None,
    source: str,
) -> Dump:
    """A ``per_pass`` dump with one row per iteration, in iteration order; ``num_layers`` widens
    the L axis past the highest layer recorded (dense last layers)."""
    iters = sorted({it for it, _ in counts})
    layers = sorted({layer for _, layer in counts})
    L = max(layers, default=-1) + 1
    if num_layers is not None:
        if num_layers < L:
            raise DumpFormatError(f"{source}: layer {L - 1} recorded, but num_layers={num_layers}")
        L = num_layers
    row_of = {it: i for i, it in enumerate(iters)}
    logical = torch.zeros(len(iters), L, num_experts, dtype=torch.int64)
    for (it, layer), value in counts.items():
        logical[row_of[it], layer] = value
    return Dump(
        engine=EngineInfo(name=engine),
        model=ModelInfo(num_layers=L, moe_layer_ids=layers, num_logical_experts=num_experts, top_k=top_k),
        window=Window(mode="per_pass", num_passes=len(iters)),
        logical_count=logical,
        records=[Record(forward_pass_id=it) for it in iters],
    )
