"""Merging dumps across ranks and engines, neither dropping nor double-counting a token.

SGLang's stat dump all-reduces over the whole world, which multiplies counts by the number of
tensor-parallel replicas; vLLM's naive data-parallel dispatch multiplies by dp_size. The rules
here follow the topology each dump carries instead:

* **Runs.** Dumps of one engine's ranks form a run: those with world_size > 1 and the same
  engine name and parallel sizes. A dump with world_size 1 is a run by itself (one process, or
  an already merged dump). A rank may appear once per run: per-rank files of two engines with
  the same layout must be merged engine by engine first.
* **Copies.** Two dumps with the same engine name, topology, window (with a start time) and
  counts are one recording given twice (a copied file): refused, not summed.
* **Token shards.** Within a run, dumps with the same ``token_shard`` saw the same tokens
  (tensor-parallel replicas, pipeline stages). Each layer is counted once from them: from the
  lowest rank whose ``model.moe_layer_ids`` holds it. Replicas that observed the same layer must
  agree exactly, else ``MergeError`` names the ranks and the layer. Pipeline stages observe
  disjoint layers and simply fill each other in.
* **Summing.** Different shards, and different runs, saw different tokens: they are summed.
* **Completeness.** Every token shard and every pipeline stage of a run must be present, and
  every shard must cover the same layers (a missing stage would under-count its layers);
  ``allow_partial=True`` merges what is there.
* **Physical ids.** Where physical counts are dropped (below), ``per_token`` ids are mapped to
  logical experts through each dump's own map.
* **Compatibility.** Schema, ``num_layers``, experts, ``top_k`` and model name must match, else
  ``MergeError`` names the difference.
* **Modes.** Equal modes are kept. Otherwise the dumps are reduced to what all of them hold:
  ``stat`` (totals) if any is ``stat``, else ``per_pass`` (per_token ids dropped).
  ``stat`` rows (SGLang's per-window buffer) are summed row by row when every shard holds ring
  rows over the same passes, or every shard one cumulative row; else they are reduced to one
  cumulative row (a ring's one row is its last pass, not a total).
  ``per_pass``/``per_token`` records of replicas are matched by ``forward_pass_id`` (replicas run
  the same passes; a ``per_token`` pass's ids are aligned on its last tokens, which is what a
  ring that overflowed keeps, so stages with rings of different lengths merge, -1 where one lost
  them) and the records of different shards are concatenated; in the merged dump a
  record's ``rank`` is the index of its token group (run x shard, in input order; the groups of
  an input merged before stay apart).
* **Physical counts** are kept only when every dump has them with the same
  ``physical_to_logical_map``; the logical counts are exact either way.
* **Window.** ``num_tokens``, ``discarded`` and drops per layer come from the same replica as
  the counts and are summed over shards, so ``counts + discarded == num_tokens x top_k`` still
  holds; ``num_passes`` is the sum over shards of each shard's passes; start is the earliest,
  stop the latest; ``unobserved_layers`` is the union.

The merged dump describes the whole run: ``rank 0``, ``world_size 1``, one token shard.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec
import torch

from ._version import __version__
from .errors import MergeError
from .schema.dump import Dump, EngineInfo, ModelInfo, Record, Topology, Window, row_sum
from .schema.sglang import INT64_MAX, is_sglang_file

__all__ = ["merge_distributed", "merge_dumps", "reduce_dump"]


def reduce_dump(dump: Dump, mode: str) -> Dump:
    """``dump`` with only what ``mode`` holds: ``per_token`` -> ``per_pass`` drops the ids;
    ``per_pass``/``per_token`` -> ``stat`` keeps one row of exact totals."""
    have = dump.window.mode
    if have == mode:
        return dump
    if mode == "per_pass" and have == "per_token":
        records = [
            msgspec.structs.replace(r, topk_ids_of_layer=None, input_ids=None, positions=None) for r in dump.records
        ]
        window = msgspec.structs.replace(dump.window, mode="per_pass", dropped_tokens=0)
        return msgspec.structs.replace(dump, records=records, window=window)
    if mode == "stat":
        phys = None
        if dump.physical_count is not None and dump.total_logical_count is None:
            phys = dump.physical_count.sum(0, keepdim=True)
        window = msgspec.structs.replace(dump.window, mode="stat", buffer_size=0, dropped_passes=0, dropped_tokens=0)
        return msgspec.structs.replace(
            dump,
            window=window,
            logical_count=dump.total_count().to(torch.int64).unsqueeze(0),
            total_logical_count=None,
            physical_count=phys,
            records=[],
        )
    raise MergeError(f"cannot reduce a {have} dump to {mode}")


def _strip_physical(dump: Dump) -> Dump:
    """``dump`` in logical experts only: physical counts and the map dropped, and per_token ids
    (physical slots where there is a map) mapped to their logical experts."""
    mapping = dump.physical_to_logical_map
    if mapping is None and dump.physical_count is None:
        return dump
    records = dump.records
    if mapping is not None and any(r.topk_ids_of_layer is not None for r in records):
        records = [_logical_ids(r, mapping.to(torch.int64)) for r in records]
    model = msgspec.structs.replace(dump.model, num_physical_experts=None)
    return msgspec.structs.replace(
        dump, model=model, physical_count=None, physical_to_logical_map=None, records=records
    )


def _logical_ids(record: Record, mapping: torch.Tensor) -> Record:
    """``record`` with its slot ids [L, T, k] mapped through ``mapping`` [L, P]; -1 stays -1."""
    ids = record.topk_ids_of_layer
    if ids is None:
        return record
    slots = ids.to(torch.int64)
    valid = (slots >= 0) & (slots < mapping.shape[1])
    logical = mapping.gather(1, slots.clamp(0, mapping.shape[1] - 1).reshape(mapping.shape[0], -1))
    logical = torch.where(valid, logical.reshape(slots.shape), -1)
    return msgspec.structs.replace(record, topk_ids_of_layer=logical.to(ids.dtype))


@dataclass
class _Member:
    dump: Dump
    source: str
    run: int | None = None  # set for SGLang's own files, whose topology says too little to group them

    @property
    def rank(self) -> int:
        return self.dump.topology.rank


@dataclass
class _Part:
    """What one token group (the replicas of one shard of one run) contributes."""

    name: str
    layers: set[int]
    total: torch.Tensor
    rows: torch.Tensor | None
    phys_rows: torch.Tensor | None
    phys_total: torch.Tensor | None
    records: list[Record]
    num_tokens: list[int] | None
    discarded: list[int] | None
    passes: int
    ring: int
    """The ring's rows (``window.buffer_size``) of its members; 0: one cumulative row."""
    dropped_passes: int
    dropped_tokens: int
    unobserved: set[int]
    starts: list[float] = field(default_factory=list)
    stops: list[float] = field(default_factory=list)


def _check_compatible(members: list[_Member]) -> None:
    first = members[0]
    for m in members[1:]:
        if type(m.dump) is not type(first.dump):
            raise MergeError(
                f"{m.source}: schema {type(m.dump).__name__} differs from {first.source}'s {type(first.dump).__name__}"
            )
    for name in ("num_layers", "num_logical_experts", "top_k", "name"):
        # Against the first dump that says (an SGLang file has no top_k), whatever the order.
        known = [(m, getattr(m.dump.model, name)) for m in members if getattr(m.dump.model, name) is not None]
        for m, value in known[1:]:
            if value != known[0][1]:
                raise MergeError(
                    f"{m.source}: model.{name} is {value!r}, but {known[0][0].source} has {known[0][1]!r}: "
                    "not the same model"
                )


def _refuse_copies(members: list[_Member]) -> None:
    """Two copies of one dump (a file given twice, or copied) would count its tokens twice. A
    copy has the same engine, place, window and counts; the window's start time, which every
    recorder stamps at its own start, is what tells two engines with equal counts apart (files
    without it, SGLang's own, are not compared: its ranks' stat files are equal by design)."""
    seen: dict[tuple, list[_Member]] = {}
    for m in members:
        d = m.dump
        if d.window.start_time is None:
            continue
        key = (d.engine.name, msgspec.json.encode(d.topology), msgspec.json.encode(d.window))
        for other in seen.setdefault(key, []):
            if torch.equal(other.dump.total_count(), d.total_count()):
                raise MergeError(
                    f"{m.source} is a copy of {other.source} (same engine, rank, window and counts): merging both "
                    "would count its tokens twice"
                )
        seen[key].append(m)


def _complete_sglang_topologies(members: list[_Member]) -> None:
    """SGLang's own files name only their rank, and that is the expert-parallel rank
    (``moe_ep_rank``), not the process: with plain ``--tp N`` (expert-parallel size 1) every rank
    writes "rank 0", and every one of them writes the stat file. So:

    * Files of one rank that agree (the same passes, the same counts on the layers both observed)
      are one recording's tensor-parallel replicas or pipeline stages (disjoint layers): one
      token shard, each token counted once (``_reduce_group``). SGLang's own reader refuses
      them (duplicate pass ids), or, for stat, they are copies of one all-reduce.
    * The recordings of different ranks are one run: replicas of one token shard if they agree
      (ranks without an all-to-all route every token), else each rank its own shard (an
      all-to-all's ranks route their own tokens; a missing rank is then a missing shard).
    * Files of rank 0 alone that disagree are different recordings (windows, engines): summed,
      each its own run. Other ranks' files that disagree are refused: which go together is not
      known.
    """
    own = [m for m in members if is_sglang_file(m.dump)]
    if len(own) < 2:
        return
    recordings: list[list[_Member]] = []  # per rank, the files that agree
    for m in own:
        home = next((g for g in recordings if g[0].rank == m.rank and all(_agree(o.dump, m.dump) for o in g)), None)
        if home is None:
            recordings.append([m])
        else:
            home.append(m)
    ranks = sorted({g[0].rank for g in recordings})
    if len(recordings) == len(ranks):  # one recording per rank: one run
        runs = [recordings]
    elif ranks == [0]:
        runs = [[g] for g in recordings]
    else:
        rank = next(r for r in ranks if sum(g[0].rank == r for g in recordings) > 1)
        files = [g[0].source for g in recordings if g[0].rank == rank]
        raise MergeError(
            f"{files[0]} and {files[1]} are both SGLang's rank {rank} but hold different recordings (other passes "
            "or counts): merge the files of one dump at a time"
        )
    for run_id, run in enumerate(runs):
        firsts = [g[0].dump for g in run]
        replicas = len(run) == 1 or (
            all(_agree(a, b) for a, b in itertools.combinations(firsts, 2))
            and any(bool(d.total_count().any()) for d in firsts)
        )
        shards = run[-1][0].rank + 1 if not replicas else 1
        everyone = [m for g in run for m in g]
        for i, m in enumerate(everyone):
            shard = 0 if replicas else m.rank
            topology = Topology(rank=i, world_size=len(everyone), token_shard=shard, num_token_shards=shards)
            m.dump, m.run = msgspec.structs.replace(m.dump, topology=topology), run_id


def _agree(a: Dump, b: Dump) -> bool:
    """Whether two SGLang files can be one recording's: the same forward passes (or stat rows of
    one shape) and the same counts on every layer both observed (none: pipeline stages)."""
    if [r.forward_pass_id for r in a.records] != [r.forward_pass_id for r in b.records]:
        return False
    if a.logical_count.shape != b.logical_count.shape:
        return False
    shared = sorted(set(a.model.moe_layer_ids) & set(b.model.moe_layer_ids))
    if not shared:
        return True
    rows_a = a.physical_count if a.physical_count is not None else a.logical_count
    rows_b = b.physical_count if b.physical_count is not None else b.logical_count
    return rows_a.shape == rows_b.shape and torch.equal(rows_a[:, shared], rows_b[:, shared])


def _runs(members: list[_Member]) -> list[list[_Member]]:
    runs: dict[tuple, list[_Member]] = {}
    for i, m in enumerate(members):
        t = m.dump.topology
        if t.world_size <= 1:
            key: tuple = ("single", i)
        elif m.run is not None:
            key = ("sglang", m.run)
        else:
            key = (m.dump.engine.name, t.world_size, t.tp_size, t.dp_size, t.ep_size, t.pp_size, t.num_token_shards)
        runs.setdefault(key, []).append(m)
    for run in runs.values():
        seen: dict[int, _Member] = {}
        for m in run:
            if m.rank in seen:
                raise MergeError(
                    f"{seen[m.rank].source} and {m.source} both hold rank {m.rank} of a "
                    f"{m.dump.topology.world_size}-rank {m.dump.engine.name} run: merge each engine's per-rank "
                    "files separately, then merge the results"
                )
            seen[m.rank] = m
    return list(runs.values())


def _missing(n: int, present: set[int], shown: int = 8) -> str:
    """Which of 0 .. n-1 are not in ``present`` ("" when none), the first few listed: n comes from
    a file, so the range is never built (a few bytes must not decide how much memory is taken)."""
    count = n - len({i for i in present if 0 <= i < n})
    if count <= 0:
        return ""
    first: list[int] = []
    i = 0
    while len(first) < min(count, shown):
        if i not in present:
            first.append(i)
        i += 1
    listed = ", ".join(map(str, first))
    return f"[{listed}]" if count == len(first) else f"[{listed}, ...] ({count} in all)"


def _groups(run: list[_Member], allow_partial: bool, run_name: str) -> list[tuple[str, list[_Member]]]:
    shards = {m.dump.topology.num_token_shards for m in run}
    if len(shards) > 1:
        raise MergeError(f"{run_name}ranks disagree on topology.num_token_shards ({sorted(shards)})")
    groups: dict[int, list[_Member]] = {}
    for m in run:
        groups.setdefault(m.dump.topology.token_shard, []).append(m)
    missing = _missing(shards.pop(), set(groups))
    if missing and not allow_partial:
        raise MergeError(
            f"{run_name}token shards {missing} are missing (present: {sorted(groups)}); their tokens would not be "
            "counted. Pass allow_partial=True (--allow-partial) to merge what is there"
        )
    stages = run[0].dump.topology.pp_size
    missing = _missing(stages, {m.dump.topology.pp_rank for m in run}) if run[0].dump.topology.world_size > 1 else ""
    if missing and not allow_partial:  # missing from every shard: the shards' layers still agree
        raise MergeError(
            f"{run_name}pipeline stages {missing} of {stages} are missing; their layers would read as never used. "
            "Pass allow_partial=True (--allow-partial) to merge what is there"
        )
    out = []
    for shard in sorted(groups):
        members = sorted(groups[shard], key=lambda m: m.rank)
        ranks = ", ".join(str(m.rank) for m in members)
        out.append((f"{run_name}token shard {shard} (rank{'s' if len(members) > 1 else ''} {ranks})", members))
    return out


def _per_layer(values: list[int] | None, owner_of: dict[int, _Member], attr: str, L: int) -> list[int] | None:
    if values is None:
        return None
    out = [0] * L
    for layer, m in owner_of.items():
        v = getattr(m.dump.window, attr)
        if v is None:
            return None
        out[layer] = v[layer]
    return out


def _row_dtype(tensors: Iterable[torch.Tensor | None]) -> torch.dtype:
    """int32 when every input is int32 (rows that are copied, not added, cannot overflow)."""
    return torch.int32 if all(t is not None and t.dtype == torch.int32 for t in tensors) else torch.int64


def _reduce_group(name: str, members: list[_Member], mode: str) -> _Part:
    first = members[0].dump
    L = first.model.num_layers
    owner_of: dict[int, _Member] = {}
    for m in members:
        for layer in m.dump.model.moe_layer_ids:
            owner_of.setdefault(layer, m)
    use_rows = mode != "stat" or len({m.dump.logical_count.shape[0] for m in members}) == 1
    if mode != "stat":
        passes = [[r.forward_pass_id for r in m.dump.records] for m in members]
        for m, p in zip(members[1:], passes[1:]):
            if p != passes[0]:
                raise MergeError(
                    f"{name}: ranks {members[0].rank} ({members[0].source}) and {m.rank} ({m.source}) hold different "
                    f"forward passes; replicas must record the same passes"
                )
    totals = {id(m): m.dump.total_count() for m in members}  # each a sum over all rows: once per dump
    # Replicas that observed the same layer must have counted the same routing.
    for m in members:
        for layer in m.dump.model.moe_layer_ids:
            o = owner_of[layer]
            if o is m:
                continue
            same = torch.equal(totals[id(o)][layer], totals[id(m)][layer])
            if same and use_rows:
                same = torch.equal(o.dump.logical_count[:, layer], m.dump.logical_count[:, layer])
            if not same:
                raise MergeError(
                    f"{name}: ranks {o.rank} ({o.source}) and {m.rank} ({m.source}) disagree on layer {layer}; "
                    "dumps with the same token_shard must have seen the same tokens (set Topology.token_shard "
                    "per data-parallel group)"
                )
    owned = _owned_layers(owner_of)
    if len(members) == 1 and _only_owned(first, totals[id(members[0])], owner_of):
        # One member (a data-parallel shard, an engine): its own tensors, read-only from here on.
        # Zeros and a copy per input took 2.3 GB and 10 s of merging 32 stat dumps of [1000, 61, 256].
        total, rows, phys_rows = totals[id(members[0])], first.logical_count, first.physical_count
        phys_total = phys_rows.sum(0) if phys_rows is not None else None
    else:
        total, rows, phys_total, phys_rows = _copy_owned(members, owned, totals, use_rows)
    records = [_merge_record(i, members, owned, name) for i in range(len(first.records))] if mode != "stat" else []
    windows = [m.dump.window for m in members]
    return _Part(
        name=name,
        layers=set(owner_of),
        total=total,
        rows=rows,
        phys_rows=phys_rows,
        phys_total=phys_total,
        records=records,
        num_tokens=_per_layer(first.window.num_tokens, owner_of, "num_tokens", L),
        discarded=_per_layer(first.window.discarded, owner_of, "discarded", L),
        passes=max(w.num_passes for w in windows),
        ring=max(w.buffer_size for w in windows),
        dropped_passes=max(w.dropped_passes for w in windows),
        dropped_tokens=max(w.dropped_tokens for w in windows),
        unobserved={layer for w in windows for layer in w.unobserved_layers} - set(owner_of),
        starts=[w.start_time for w in windows if w.start_time is not None],
        stops=[w.stop_time for w in windows if w.stop_time is not None],
    )


def _copy_owned(
    members: list[_Member], owned: list[tuple[_Member, torch.Tensor]], totals: dict[int, torch.Tensor], use_rows: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """A group's (total, rows, physical total, physical rows), each layer copied from its owner."""
    first = members[0].dump
    L, E = first.model.num_layers, first.model.num_logical_experts
    total = torch.zeros(L, E, dtype=torch.int64)
    rows = None
    if use_rows:  # a group's rows are copied from each layer's owner, never added: int32 rows stay int32
        rows = torch.zeros(first.logical_count.shape[0], L, E, dtype=_row_dtype(m.dump.logical_count for m in members))
    phys_rows = phys_total = None
    if first.physical_count is not None:  # only kept when every dump has it, with one map
        P = first.physical_count.shape[2]
        phys_total = torch.zeros(L, P, dtype=torch.int64)
        if use_rows:
            phys_dtype = _row_dtype(m.dump.physical_count for m in members)
            phys_rows = torch.zeros(first.physical_count.shape[0], L, P, dtype=phys_dtype)
    for m, layers in owned:  # each member's layers in one indexed copy (61 layer-by-layer copies cost 0.4 ms)
        total[layers] = totals[id(m)][layers]
        if rows is not None:
            rows[:, layers] = m.dump.logical_count[:, layers]
        if phys_total is not None and m.dump.physical_count is not None:
            phys_total[layers] = m.dump.physical_count[:, layers].sum(0)
            if phys_rows is not None:
                phys_rows[:, layers] = m.dump.physical_count[:, layers]
    return total, rows, phys_total, phys_rows


def _only_owned(dump: Dump, total: torch.Tensor, owner_of: dict[int, _Member]) -> bool:
    """Whether ``dump`` counts nothing outside the layers it owns (the copy would zero those)."""
    others = [layer for layer in range(dump.model.num_layers) if layer not in owner_of]
    rows = [dump.logical_count] + ([dump.physical_count] if dump.physical_count is not None else [])
    return not others or not (bool(total[others].any()) or any(bool(t[:, others].any()) for t in rows))


def _owned_layers(owner_of: dict[int, _Member]) -> list[tuple[_Member, torch.Tensor]]:
    """Each owning member with the layers it owns, as one index tensor."""
    by_member: dict[int, tuple[_Member, list[int]]] = {}
    for layer, m in owner_of.items():
        by_member.setdefault(id(m), (m, []))[1].append(layer)
    return [(m, torch.tensor(layers, dtype=torch.int64)) for m, layers in by_member.values()]


def _merge_record(i: int, members: list[_Member], owned: list[tuple[_Member, torch.Tensor]], name: str) -> Record:
    base = members[0].dump.records[i]
    if base.topk_ids_of_layer is None:
        return base
    held = [(m, layers, m.dump.records[i].topk_ids_of_layer) for m, layers in owned]
    for m, _, theirs in held:
        if theirs is None or theirs.dim() != 3 or theirs.shape[::2] != base.topk_ids_of_layer.shape[::2]:
            raise MergeError(
                f"{name}: pass {base.forward_pass_id} holds different tokens on rank {m.rank} ({m.source})"
            )
    T = max(theirs.shape[1] for _, _, theirs in held)
    ids = torch.full((base.topk_ids_of_layer.shape[0], T, base.topk_ids_of_layer.shape[2]), -1, dtype=torch.int32)
    for m, layers, theirs in held:
        n = theirs.shape[1]
        # A ring that overflowed keeps each pass's last tokens: a rank whose ring is shorter (a
        # pipeline stage with more layers, for the same bytes) holds the tail of the same pass.
        if n < T and not m.dump.window.dropped_tokens:
            raise MergeError(
                f"{name}: pass {base.forward_pass_id} holds {n} tokens on rank {m.rank} ({m.source}) and {T} on "
                "another rank of its token shard, and its ring dropped none: they routed different tokens"
            )
        ids[layers, T - n :] = theirs[layers].to(torch.int32)
    return msgspec.structs.replace(base, topk_ids_of_layer=ids)


def _sum_lists(values: list[list[int] | None]) -> list[int] | None:
    if any(v is None for v in values):
        return None
    return [sum(col) for col in zip(*values)]  # type: ignore[misc]


def merge_dumps(dumps: Sequence[Dump], *, sources: Sequence[str] | None = None, allow_partial: bool = False) -> Dump:
    """Merge the dumps of several ranks and/or engines into one (rules in the module docstring).

    Parameters
    ----------
    dumps:
        Dumps of one window: per-rank dumps of one or more runs, or whole-run dumps.
    sources:
        A name per dump (its file) for error messages; default ``dump[i]``.
    allow_partial:
        Merge even when token shards or pipeline stages are missing (counts then cover less).

    Example
    -------
    >>> merged = merge_dumps([load_dump(p) for p in ("rank0.pt", "rank1.pt")])  # doctest: +SKIP
    >>> merged.total_count().shape  # doctest: +SKIP
    torch.Size([48, 128])
    """
    if not dumps:
        raise MergeError("nothing to merge: no dumps given")
    names = list(sources) if sources is not None else [f"dump[{i}]" for i in range(len(dumps))]
    if len(names) != len(dumps):
        raise MergeError(f"sources: {len(names)} names for {len(dumps)} dumps")
    members = [_Member(d, s) for d, s in zip(dumps, names)]
    _check_compatible(members)
    _refuse_copies(members)

    modes = {d.window.mode for d in dumps}
    mode = modes.pop() if len(modes) == 1 else ("stat" if "stat" in modes else "per_pass")
    first_map = dumps[0].physical_to_logical_map
    keep_phys = first_map is not None and all(
        d.physical_count is not None
        and d.total_logical_count is None
        and d.physical_to_logical_map is not None
        and torch.equal(d.physical_to_logical_map, first_map)
        for d in dumps
    )
    for m in members:
        m.dump = reduce_dump(m.dump, mode)
        if not keep_phys:
            m.dump = _strip_physical(m.dump)

    _complete_sglang_topologies(members)
    runs = _runs(members)
    parts: list[_Part] = []
    for r, run in enumerate(runs):
        run_name = f"run {r} ({run[0].dump.engine.name}): " if len(runs) > 1 else ""
        parts += [_reduce_group(name, group, mode) for name, group in _groups(run, allow_partial, run_name)]

    # A group that counted nothing (an idle engine or DP rank) tells nothing of its layers: SGLang's
    # files do not list them, and for an all-zero file the reader can only guess every layer.
    busy = [p for p in parts if bool(p.total.any())] or parts
    if not allow_partial:
        for p in busy[1:]:
            if p.layers != busy[0].layers:
                raise MergeError(
                    f"{p.name} observed layers {sorted(p.layers)}, but {busy[0].name} observed {sorted(busy[0].layers)}: "
                    "a pipeline stage's dump is missing? Pass allow_partial=True (--allow-partial) to merge anyway"
                )
    return _combine(parts, members, mode, keep_phys, sorted(set().union(*(p.layers for p in busy))))


def _sum(counts: list[torch.Tensor], what: str) -> torch.Tensor:
    """The int64 sum of non-negative counts, refused where it would wrap past int64 (SGLang's
    int32 rows of two engines may not fit int32 together: they are added into int64).

    Overflow is ruled out from each input's largest count, one reduction, not an element-wise
    test: that test made full-size temporaries and took 7 of the 25 s of merging 32 stat dumps of
    [1000, 61, 256]. Only where the bound cannot rule it out is each element checked."""
    out = counts[0].to(torch.int64, copy=True)
    peak = int(out.max()) if out.numel() else 0
    for c in counts[1:]:
        top = int(c.max()) if c.numel() else 0
        if peak > INT64_MAX - top and bool((out > INT64_MAX - c.to(torch.int64)).any()):
            raise MergeError(f"{what}: the sum of the inputs exceeds int64")
        out += c  # int32 rows are widened as they are added, with no int64 copy of them
        peak = int(out.max()) if peak > INT64_MAX - top else peak + top
    return out


def _combine(parts: list[_Part], members: list[_Member], mode: str, keep_phys: bool, layers: list[int]) -> Dump:
    first = members[0].dump
    total = _sum([p.total for p in parts], "total counts")
    phys = None
    if mode == "stat":
        # Rows add up only when they mean the same: cumulative rows (no ring), or ring rows over
        # the same passes. A ring's one row is its last pass, not a total.
        kinds = {None if p.rows is None else (p.rows.shape[0], p.passes) if p.ring else "cumulative" for p in parts}
        aligned = len(kinds) == 1 and None not in kinds
        if aligned:
            rows = _sum([p.rows for p in parts], "logical_count")  # type: ignore[misc]
            if keep_phys:
                phys = _sum([p.phys_rows for p in parts], "physical_count")  # type: ignore[misc]
        else:
            rows = total.unsqueeze(0)
            if keep_phys:
                phys = _sum([p.phys_total for p in parts], "physical_count").unsqueeze(0)  # type: ignore[misc]
        records: list[Record] = []
        buffer_size = max(p.ring for p in parts) if aligned else 0
    else:
        rows = torch.cat([p.rows for p in parts])  # type: ignore[misc]
        if keep_phys:
            phys = torch.cat([p.phys_rows for p in parts])  # type: ignore[misc]
        # One rank per (token group, the record's own rank): an input merged before keeps its groups apart.
        index: dict[tuple[int, int], int] = {}
        records = [
            msgspec.structs.replace(r, rank=index.setdefault((g, r.rank), len(index)))
            for g, p in enumerate(parts)
            for r in p.records
        ]
        buffer_size = max(m.dump.window.buffer_size for m in members)

    # The merge is ours: its sdk_version says so (and that its topology is complete, see is_sglang_file).
    engine = msgspec.structs.replace(first.engine, sdk_version=first.engine.sdk_version or __version__)
    if any(m.dump.engine != first.engine for m in members):
        engine = EngineInfo(name="+".join(sorted({m.dump.engine.name for m in members})), sdk_version=__version__)
    topos = {
        (m.dump.topology.tp_size, m.dump.topology.dp_size, m.dump.topology.ep_size, m.dump.topology.pp_size)
        for m in members
    }
    tp, dp, ep, pp = topos.pop() if len(topos) == 1 else (1, 1, 1, 1)
    starts = [t for p in parts for t in p.starts]
    stops = [t for p in parts for t in p.stops]
    return Dump(
        engine=engine,
        model=ModelInfo(
            num_layers=first.model.num_layers,
            moe_layer_ids=layers,
            num_logical_experts=first.model.num_logical_experts,
            top_k=next((m.dump.model.top_k for m in members if m.dump.model.top_k is not None), None),
            num_physical_experts=first.model.num_physical_experts if keep_phys else None,
            name=first.model.name,
        ),
        topology=Topology(tp_size=tp, dp_size=dp, ep_size=ep, pp_size=pp),
        window=Window(
            mode=mode,  # type: ignore[arg-type]
            start_time=min(starts) if starts else None,
            stop_time=max(stops) if stops else None,
            num_passes=sum(p.passes for p in parts),
            num_tokens=_sum_lists([p.num_tokens for p in parts]),
            discarded=_sum_lists([p.discarded for p in parts]),
            buffer_size=buffer_size,
            dropped_passes=sum(p.dropped_passes for p in parts),
            dropped_tokens=sum(p.dropped_tokens for p in parts),
            unobserved_layers=sorted(set().union(*(p.unobserved for p in parts))),
        ),
        logical_count=rows,
        total_logical_count=None if torch.equal(row_sum(rows), total) else total,
        physical_count=phys,
        physical_to_logical_map=first.physical_to_logical_map.clone()
        if keep_phys and first.physical_to_logical_map is not None
        else None,
        records=records,
    )


def merge_distributed(
    dump: Dump, group: object = None, *, dst: int | None = 0, allow_partial: bool = False
) -> Dump | None:
    """Gather every rank's dump through ``torch.distributed`` and merge them (``merge_dumps``' rules).

    Call it on every rank of ``group`` at the same point (a collective), right after
    ``recorder.dump()``. Works on gloo (CPU) and NCCL (set ``torch.cuda.set_device`` first, as
    NCCL's object collectives require). Each rank's dump must carry its ``Topology`` (rank,
    ``token_shard``, ...), set on its Recorder.

    Parameters
    ----------
    dump:
        This rank's dump.
    group:
        The process group (default: the world).
    dst:
        Global rank that receives the merged dump (others get None); None: every rank gets it.

    Example
    -------
    >>> dump = rec.dump()  # doctest: +SKIP
    >>> merged = merge_distributed(dump)  # doctest: +SKIP
    >>> if merged is not None: merged.save("merged.pt")  # doctest: +SKIP
    """
    import torch.distributed as dist

    from .schema.io import decode, encode

    if not (dist.is_available() and dist.is_initialized()):
        raise MergeError("merge_distributed: torch.distributed is not initialized (call init_process_group first)")
    # Our own msgpack bytes travel, not pickled Structs: the same codec as files.
    gathered = _all_gather_bytes(encode(dump, "msgpack"), group)
    if dst is not None and dist.get_rank() != dst:
        return None
    dumps = [decode(b, "msgpack", f"rank {i}") for i, b in enumerate(gathered)]
    return merge_dumps(dumps, sources=[f"rank {d.topology.rank}" for d in dumps], allow_partial=allow_partial)


def _all_gather_bytes(blob: bytes, group: object) -> list[memoryview]:
    """Every rank's ``blob``, as byte tensors (what ``all_gather_object`` does, without pickling
    62 MB per rank twice): on the current GPU for NCCL, on the CPU otherwise."""
    import torch.distributed as dist

    nccl = dist.get_backend(group) == "nccl"  # type: ignore[arg-type]
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    world = dist.get_world_size(group)  # type: ignore[arg-type]
    size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)  # type: ignore[arg-type]
    longest = max(int(s) for s in sizes)
    mine = torch.zeros(longest, dtype=torch.uint8, device=device)
    mine[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else 0
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)  # type: ignore[arg-type]
    return [memoryview(t.cpu().numpy())[: int(n)] for t, n in zip(out, sizes)]
