"""Per-pass statistics keyed by (iteration, layer), as foreign tools store them, into a Dump."""

from __future__ import annotations

import torch

from ..errors import DumpFormatError
from ..schema.dump import Dump, EngineInfo, ModelInfo, Record, Window
from ..schema.sglang import INT64_MAX, MAX_LAYERS
from ..schema.tensors import MAX_ELEMENTS


def add_count(
    counts: dict[tuple[int, int], torch.Tensor],
    key: tuple[int, int],
    value: torch.Tensor,
    *,
    num_experts: int,
    where: str,
    offset: int = 0,
) -> None:
    """Add ``value`` (int64 counts of one iteration and layer) into ``counts[key]`` at ``offset``
    of its ``num_experts``. A foreign file's keys size the dump: refuse what no dump may hold
    before allocating for it, naming ``where`` (the file and line or key)."""
    it, layer = key
    if it > INT64_MAX:
        raise DumpFormatError(f"{where}: iteration {it} exceeds int64")
    if layer >= MAX_LAYERS:
        raise DumpFormatError(f"{where}: layer {layer} is over the limit of {MAX_LAYERS} layers")
    acc = counts.get(key)
    if acc is None:
        # Each (iteration, layer) is a row of the [iterations, L, E] tensor to come, so this bounds it early.
        if (len(counts) + 1) * num_experts > MAX_ELEMENTS:
            raise DumpFormatError(
                f"{where}: {len(counts) + 1} (iteration, layer) pairs x {num_experts} experts "
                f"are over the limit of {MAX_ELEMENTS} counts"
            )
        acc = counts[key] = torch.zeros(num_experts, dtype=torch.int64)
    part = acc[offset : offset + value.shape[0]]
    part += value
    if part.numel() and int(part.min()) < 0:  # non-negative counts summed past int64 wrap around
        raise DumpFormatError(f"{where}: iteration {it}, layer {layer}: a summed count exceeds int64")


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
    if L > MAX_LAYERS:
        raise DumpFormatError(f"{source}: {L} layers are over the limit of {MAX_LAYERS}")
    if len(iters) * L * num_experts > MAX_ELEMENTS:
        raise DumpFormatError(
            f"{source}: {len(iters)} iterations x {L} layers x {num_experts} experts "
            f"are over the limit of {MAX_ELEMENTS} counts"
        )
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
