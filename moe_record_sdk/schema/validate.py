"""Every invariant of a dump we can state, each failure as ``(field path, message)``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .dump import Dump, Topology, row_sum
from .names import MODES
from .sglang import INT64_MAX

Problem = tuple[str, str]
_LOW = (1 << 32) - 1


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _counts(t: object, path: str, shape: list[int | None], out: list[Problem]) -> bool:
    """Check an integer, non-negative tensor of the given shape (None: any size). True when usable."""
    if not isinstance(t, torch.Tensor):
        out.append((path, f"expected a tensor, got {type(t).__name__}"))
        return False
    if not _is_int(t):
        out.append((path, f"counts must be integers, got dtype {t.dtype}"))
        return False
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = ["*" if s is None else s for s in shape]
        out.append((path, f"shape {list(t.shape)} does not match the expected {want}"))
        return False
    if t.numel() and int(t.min()) < 0:
        out.append((path, f"negative count {int(t.min())}"))
        return False
    return True


def _exact_sum(
    t: torch.Tensor, add: Callable[[torch.Tensor], torch.Tensor], terms: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``add(t)``, a sum of at most ``terms`` of the non-negative counts ``t``, as int64, and where
    the true sum passes INT64_MAX (there it is INT64_MAX): an int64 sum would wrap and compare as
    some other count.

    Past the cheap bound, the high and low 32 bits are added apart, which cannot wrap for fewer
    than 2^31 terms (rows of a tensor held in memory), and joined with the carry.
    """
    bound = INT64_MAX // max(terms, 1)
    if not t.numel() or torch.iinfo(t.dtype).max <= bound or int(t.max()) <= bound:
        total = add(t)
        return total, torch.zeros(total.shape, dtype=torch.bool)
    t = t.to(torch.int64)
    low = add(t & _LOW)
    high = add(t >> 32) + (low >> 32)
    over = high > INT64_MAX >> 32
    return torch.where(over, INT64_MAX, (high << 32) | (low & _LOW)), over


def topology_problems(topo: Topology) -> list[Problem]:
    """Each rank within its size, each size >= 1."""
    out: list[Problem] = []
    for name in ("rank", "tp_rank", "dp_rank", "ep_rank", "pp_rank", "token_shard"):
        size_name = (
            "world_size" if name == "rank" else ("num_token_shards" if name == "token_shard" else name[:-4] + "size")
        )
        rank, size = getattr(topo, name), getattr(topo, size_name)
        if size < 1:
            out.append((f"topology.{size_name}", f"must be >= 1, got {size}"))
        elif not 0 <= rank < size:
            out.append((f"topology.{name}", f"{rank} is outside [0, {size_name}={size})"))
    return out


def validate_dump(dump: Dump) -> list[Problem]:
    """All broken invariants of ``dump``; an empty list means it is valid."""
    out: list[Problem] = []
    m, w, topo = dump.model, dump.window, dump.topology
    L, E = m.num_layers, m.num_logical_experts

    if L < 0:
        out.append(("model.num_layers", f"must be >= 0, got {L}"))
    if E < 1:
        out.append(("model.num_logical_experts", f"must be >= 1, got {E}"))
    if m.top_k is not None and not 1 <= m.top_k <= max(E, 1):
        out.append(("model.top_k", f"must be in [1, num_logical_experts={E}], got {m.top_k}"))
    if len(set(m.moe_layer_ids)) != len(m.moe_layer_ids):
        out.append(("model.moe_layer_ids", "layer ids repeat"))
    for i, layer in enumerate(m.moe_layer_ids):
        if not 0 <= layer < L:
            out.append((f"model.moe_layer_ids[{i}]", f"layer {layer} is outside [0, num_layers={L})"))
    for i, layer in enumerate(w.unobserved_layers):
        if not 0 <= layer < L:
            out.append((f"window.unobserved_layers[{i}]", f"layer {layer} is outside [0, num_layers={L})"))
    P = m.num_physical_experts
    if P is not None and P < E:
        out.append(("model.num_physical_experts", f"{P} is fewer than num_logical_experts={E}"))

    out += topology_problems(topo)

    if w.mode not in MODES:
        out.append(("window.mode", f"unknown mode {w.mode!r}"))
    for name in ("num_passes", "buffer_size", "dropped_passes", "dropped_tokens"):
        if getattr(w, name) < 0:
            out.append((f"window.{name}", f"must be >= 0, got {getattr(w, name)}"))
    times = {name: getattr(w, name) for name in ("start_time", "stop_time") if getattr(w, name) is not None}
    for name, t in times.items():
        if not math.isfinite(t):
            out.append((f"window.{name}", f"must be a finite time, got {t}"))
    if len(times) == 2 and all(map(math.isfinite, times.values())) and w.stop_time < w.start_time:
        out.append(("window.stop_time", "is before window.start_time"))
    for name in ("num_tokens", "discarded"):
        values = getattr(w, name)
        if values is not None:
            if len(values) != L:
                out.append((f"window.{name}", f"has {len(values)} entries, expected num_layers={L}"))
            elif any(v < 0 for v in values):
                out.append((f"window.{name}", "has a negative entry"))

    if not _counts(dump.logical_count, "logical_count", [None, L, E], out):
        return out
    B = dump.logical_count.shape[0]
    if w.mode == "stat" and max(w.buffer_size, 1) < B:
        out.append(("logical_count", f"{B} rows, but window.buffer_size is {w.buffer_size} (0: one cumulative row)"))
    total, over = _exact_sum(dump.logical_count, row_sum, B)
    if bool(over.any()):
        _past_int64("logical_count[:, {0}, {1}]", "the rows sum past int64", over, out)
    else:
        _check_totals(dump, total, out)
    _check_physical(dump, B, out)
    _check_records(dump, B, out)
    return out


def _past_int64(field: str, message: str, over: torch.Tensor, out: list[Problem]) -> None:
    """One problem for the first place ``over`` is set (its index formats ``field`` and ``message``)."""
    where = over.nonzero()
    more = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
    out.append((field.format(*where[0].tolist()), message.format(*where[0].tolist()) + more))


def _check_totals(dump: Dump, total: torch.Tensor, out: list[Problem]) -> None:
    """The window's totals ``[L, E]`` (logical_count's rows summed) against the rest of the dump."""
    m, w = dump.model, dump.window
    L, E = m.num_layers, m.num_logical_experts
    if dump.total_logical_count is not None and _counts(dump.total_logical_count, "total_logical_count", [L, E], out):
        if bool((dump.total_logical_count < total).any()):
            out.append(("total_logical_count", "is below the sum of logical_count's rows"))
        total = dump.total_logical_count.to(torch.int64)

    observed = set(m.moe_layer_ids)
    for layer in total.any(1).nonzero().flatten().tolist():  # layers with counts: work bounded by the data
        if layer not in observed:
            out.append((f"logical_count[:, {layer}, :]", f"layer {layer} has counts but is not in model.moe_layer_ids"))

    per_layer, over = _exact_sum(total, lambda t: t.sum(1), E)
    for layer in over.nonzero().flatten().tolist():
        out.append((f"logical_count[:, {layer}, :]", "the layer's counts sum past int64"))
    if (
        w.num_tokens is not None
        and w.discarded is not None
        and m.top_k is not None
        and len(w.num_tokens) == L == len(w.discarded)
    ):
        for layer, (count, past) in enumerate(zip(per_layer.tolist(), over.tolist())):
            got = count + w.discarded[layer]
            want = w.num_tokens[layer] * m.top_k
            if got != want and not past:
                out.append(
                    (f"logical_count[:, {layer}, :]", f"counts + discarded = {got}, but num_tokens x top_k = {want}")
                )


def _check_physical(dump: Dump, B: int, out: list[Problem]) -> None:
    m = dump.model
    L, E, P = m.num_layers, m.num_logical_experts, m.num_physical_experts
    mapping, phys = dump.physical_to_logical_map, dump.physical_count
    if mapping is None:
        if phys is not None:
            out.append(("physical_count", "present without physical_to_logical_map"))
        return
    if P is None:
        out.append(("model.num_physical_experts", "missing while physical_to_logical_map is present"))
        return
    if not _counts(mapping, "physical_to_logical_map", [L, P], out):
        return
    if mapping.numel() and int(mapping.max()) >= E:
        out.append(("physical_to_logical_map", f"maps to expert {int(mapping.max())}, outside [0, {E})"))
        return
    if phys is not None and _counts(phys, "physical_count", [B, L, P], out):
        index = mapping.to(torch.int64).expand(B, L, P)
        logical, over = _exact_sum(
            phys, lambda t: torch.zeros(B, L, E, dtype=torch.int64).scatter_add_(-1, index, t.to(torch.int64)), P
        )
        if bool(over.any()):
            _past_int64("physical_count[{0}, {1}, :]", "the slots of expert {2} sum past int64", over, out)
        elif not torch.equal(logical, dump.logical_count.to(torch.int64)):
            out.append(("physical_count", "does not sum to logical_count through physical_to_logical_map"))


def _check_records(dump: Dump, B: int, out: list[Problem]) -> None:
    m, w = dump.model, dump.window
    if w.mode == "stat":
        if dump.records:
            out.append(("records", "a stat dump carries no records"))
        return
    if len(dump.records) != B:
        out.append(("records", f"{len(dump.records)} records, but logical_count has {B} rows"))
        return
    if w.num_passes != B + w.dropped_passes:  # every pass of the window is a row, or was dropped from the ring
        out.append(
            ("window.num_passes", f"{w.num_passes}, but the dump holds {B} passes and dropped {w.dropped_passes}")
        )
    seen: set[tuple[int, int]] = set()
    width = m.num_physical_experts or m.num_logical_experts
    rows = dump.physical_count if dump.physical_count is not None else dump.logical_count
    # Rows of another shape cannot match the ids (and the declared width may be huge): no sum needed.
    rows_fit = isinstance(rows, torch.Tensor) and list(rows.shape) == [B, m.num_layers, width]
    for i, rec in enumerate(dump.records):
        key = (rec.rank, rec.forward_pass_id)
        if rec.forward_pass_id < 0:
            out.append((f"records[{i}].forward_pass_id", f"must be >= 0, got {rec.forward_pass_id}"))
        if key in seen:
            out.append((f"records[{i}].forward_pass_id", f"pass {rec.forward_pass_id} repeats for rank {rec.rank}"))
        seen.add(key)
        ids = rec.topk_ids_of_layer
        if ids is None:
            if w.mode == "per_token":
                out.append((f"records[{i}].topk_ids_of_layer", "missing in a per_token dump"))
            continue
        path = f"records[{i}].topk_ids_of_layer"
        if not _is_int(ids):
            out.append((path, f"ids must be integers, got dtype {ids.dtype}"))
            continue
        if ids.dim() != 3 or ids.shape[0] != m.num_layers:
            out.append((path, f"shape {list(ids.shape)} is not [num_layers={m.num_layers}, tokens, top_k]"))
            continue
        if m.top_k is not None and ids.shape[2] < m.top_k:
            out.append((path, f"{ids.shape[2]} ids per token, fewer than top_k={m.top_k}"))
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= width):
            out.append((path, f"ids outside [-1, {width})"))
            continue
        if w.dropped_tokens == 0 and rows is not None and not rows_fit:
            out.append((path, "ids do not add up to the pass's counts"))
        elif w.dropped_tokens == 0 and rows is not None:
            # Without drops, the ids of a pass are exactly what its count row counted.
            flat = ids.to(torch.int64)
            valid = flat >= 0
            from_ids = torch.zeros(m.num_layers, width + 1, dtype=torch.int64)
            from_ids.scatter_add_(
                1,
                torch.where(valid, flat, width).reshape(m.num_layers, -1),
                valid.reshape(m.num_layers, -1).to(torch.int64),
            )
            if not torch.equal(from_ids[:, :width], rows[i].to(torch.int64)):
                out.append((path, "ids do not add up to the pass's counts"))
