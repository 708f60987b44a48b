"""A dump's expert load in numbers: per layer, per GPU, overall and over passes.

``summarize(dump)`` computes; ``print_summary`` draws rich tables; ``to_json`` / ``to_csv``
serialise. Every metric is in :mod:`.metrics`.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
from typing import Any

import msgspec
import torch

from ..schema.dump import Dump
from . import metrics as m


class Metrics(msgspec.Struct, kw_only=True):
    """The imbalance numbers of one load vector (None where undefined: no load at all)."""

    max_over_mean: float | None
    imbalance_ratio: float | None
    """TensorRT-LLM's ``(max - mean) / mean``."""
    balancedness: float | None
    """SGLang's ``(mean + 1e-5) / (max + 1e-5)``."""
    jain: float | None
    cv: float | None


class LoadStats(Metrics, kw_only=True):
    """One layer's load over its experts, or over its GPUs."""

    entries: int
    """Experts (or GPUs) the load is spread over."""
    assignments: float
    """Sum of the load: token-expert assignments (top-k slots)."""
    max: float
    mean: float
    hot: list[tuple[int, float]]
    """The most loaded entries above the mean, as ``(index, load / mean)``, hottest first."""
    dead: list[int]
    """Entries that got no load."""


class LayerSummary(msgspec.Struct, kw_only=True):
    layer: int
    tokens: int | None
    """Tokens the layer saw (padding excluded), when the dump says or top_k lets us infer it."""
    experts: LoadStats
    gpus: LoadStats | None = None


class Overall(msgspec.Struct, kw_only=True):
    """Means of the per-layer metrics over the MoE layers that got load, plus totals. (SGLang's
    logged balancedness averages over all ``num_hidden_layers``, dense and idle layers counting
    as 1.0, and then over passes: higher than this mean on a model with dense layers.)"""

    layers: int
    """MoE layers averaged (those with any load)."""
    tokens: int | None
    assignments: int
    experts: Metrics
    gpus: Metrics | None = None
    dead_experts: int
    """(layer, expert) pairs never chosen."""
    worst_layer: int | None
    """The layer with the lowest expert balancedness."""


class PassSummary(msgspec.Struct, kw_only=True):
    """One row of ``logical_count`` (a forward pass, or a ring slot)."""

    index: int
    forward_pass_id: int | None
    rank: int | None = None
    """The record's rank; in a merged dump its token group (an engine's shard): passes of
    different groups ran side by side, and their ids are each group's own."""
    assignments: int
    experts: Metrics
    """Means over the MoE layers with load in this pass."""
    gpus: Metrics | None = None


class Summary(msgspec.Struct, kw_only=True):
    """What :func:`summarize` returns."""

    source: str | None
    engine: str
    model: str | None
    mode: str
    num_layers: int
    num_experts: int
    top_k: int | None
    num_passes: int
    ep_size: int | None
    placement: str | None
    """How GPU loads were obtained: ``contiguous``, ``recorded physical counts`` (exact), or
    ``physical_to_logical_map`` (each expert's load split evenly over its slots; the dump's own
    map reads ``physical_to_logical_map, physical counts incomplete`` where the ring dropped passes)."""
    layers: list[LayerSummary]
    overall: Overall
    passes: list[PassSummary]
    """Per row of ``logical_count`` when the dump has more than one."""
    unobserved_layers: list[int] = []
    """MoE layers the recorder did not observe: in no table (their load is not known)."""
    dropped_passes: int = 0
    """Passes the ring overwrote: in the totals, not in ``passes``."""
    discarded: int = 0
    """Top-k slots with no expert (invalid ids, padding), over all layers: in no count."""


def _num(t: torch.Tensor) -> float | None:
    v = float(t)
    return None if math.isnan(v) else v


def _metrics(x: torch.Tensor) -> Metrics:
    return Metrics(**{name: _num(v) for name, v in m.all_metrics(x).items()})


def load_stats(x: torch.Tensor, hot: int = 3) -> LoadStats:
    """All metrics of one 1-D load vector."""
    x = torch.as_tensor(x).to(torch.float64)
    base = _metrics(x)
    return LoadStats(
        **msgspec.structs.asdict(base),
        entries=x.numel(),
        assignments=float(x.sum()),
        max=float(x.max()),
        mean=float(x.mean()),
        hot=m.hot_experts(x, top=hot),
        dead=m.dead_experts(x),
    )


def _mean_metrics(rows: list[Metrics]) -> Metrics:
    def avg(name: str) -> float | None:
        vals = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return sum(vals) / len(vals) if vals else None

    return Metrics(**{f: avg(f) for f in Metrics.__struct_fields__})


def moe_layers(dump: Dump) -> list[int]:
    """Layers the dump observed: ``model.moe_layer_ids`` less ``window.unobserved_layers``."""
    unobserved = set(dump.window.unobserved_layers)
    return [layer for layer in dump.model.moe_layer_ids if layer not in unobserved]


def _gpu_source(dump: Dump, ep_size: int | None, mapping: torch.Tensor | None) -> tuple[int | None, str | None, Any]:
    """(GPUs, how, fn(logical [.., L, E], physical [.., L, P] | None) -> [.., L, G])."""
    if ep_size is not None and ep_size < 1:
        raise ValueError(f"ep_size: {ep_size}; expected a GPU count >= 1")
    # A topology ep_size of 1 also stands for "not known" (SGLang's own files do not say): no GPU table.
    G = ep_size if ep_size is not None else (dump.topology.ep_size if dump.topology.ep_size > 1 else None)
    if G is None:
        if mapping is not None:
            raise ValueError("physical_to_logical_map: a placement needs the GPU count (ep_size, --ep-size)")
        return None, None, None
    if mapping is not None:
        return G, "physical_to_logical_map", lambda lg, ph: m.gpu_loads(lg, num_gpus=G, physical_to_logical_map=mapping)
    dm = dump.physical_to_logical_map
    if dm is not None:
        # The physical rows are exact only when they cover the whole window; where the ring
        # dropped passes (or a pass was running), only the logical totals are: model from those.
        if dump.physical_count is not None and dump.total_logical_count is None:
            return G, "recorded physical counts", lambda lg, ph: m.physical_gpu_loads(ph, G)
        how = "physical_to_logical_map" + (", physical counts incomplete" if dump.physical_count is not None else "")
        return G, how, lambda lg, ph: m.gpu_loads(lg, num_gpus=G, physical_to_logical_map=dm)
    E = dump.model.num_logical_experts
    if E % G:
        raise ValueError(f"ep_size: {G} does not divide the {E} experts; give a physical_to_logical_map")
    return G, "contiguous", lambda lg, ph: m.gpu_loads(lg, num_gpus=G)


def summarize(
    dump: Dump,
    *,
    ep_size: int | None = None,
    physical_to_logical_map: torch.Tensor | None = None,
    hot: int = 3,
    source: str | None = None,
) -> Summary:
    """Imbalance per MoE layer (over experts, and over GPUs given a placement), overall, and per pass.

    Parameters
    ----------
    dump:
        Any dump (``load_dump`` reads ours and SGLang's files; ``moe_record_sdk.convert`` the others').
    ep_size:
        GPUs of the expert-parallel group (>= 1); default the dump's ``topology.ep_size`` when
        above 1 (1 may mean unknown: no GPU loads then). Without a map, experts sit contiguously
        (``E / ep_size`` per GPU).
    physical_to_logical_map:
        int ``[L, P]``: a placement to evaluate instead of the dump's own (e.g. an EPLB plan);
        needs a GPU count, and a slot for every expert with load. With the dump's own map and
        physical counts of the whole window, GPU loads are exact.
    hot:
        How many hot experts to name per layer.
    source:
        A label (file name) carried into the output.

    >>> from moe_record_sdk import Recorder
    >>> rec = Recorder(num_layers=1, num_experts=4, top_k=1); rec.start()
    >>> rec.record(0, torch.tensor([[0], [0], [1], [2]])); rec.step()
    >>> summarize(rec.dump()).layers[0].experts.dead
    [3]
    """
    L, E = dump.model.num_layers, dump.model.num_logical_experts
    total = dump.total_count().to(torch.int64)
    phys_total = dump.physical_count.sum(0) if dump.physical_count is not None else None
    G, placement, to_gpus = _gpu_source(dump, ep_size, physical_to_logical_map)
    gpu_total = to_gpus(total, phys_total) if to_gpus else None
    layers = moe_layers(dump)
    num_tokens = dump.window.num_tokens
    top_k = dump.model.top_k

    def tokens_of(layer: int) -> int | None:
        if num_tokens is not None and len(num_tokens) == L:
            return num_tokens[layer]
        return int(total[layer].sum()) // top_k if top_k else None

    rows = [
        LayerSummary(
            layer=layer,
            tokens=tokens_of(layer),
            experts=load_stats(total[layer], hot),
            gpus=load_stats(gpu_total[layer], hot) if gpu_total is not None else None,
        )
        for layer in layers
    ]
    loaded = [r for r in rows if r.experts.assignments > 0]
    worst = min(loaded, key=lambda r: r.experts.balancedness or 0.0, default=None)
    tokens = [r.tokens for r in rows if r.tokens is not None]
    overall = Overall(
        layers=len(loaded),
        tokens=max(tokens) if tokens else None,
        assignments=int(total[layers].sum()) if layers else 0,
        experts=_mean_metrics([r.experts for r in loaded]),
        gpus=_mean_metrics([r.gpus for r in loaded if r.gpus is not None]) if gpu_total is not None else None,
        dead_experts=sum(len(r.experts.dead) for r in rows),
        worst_layer=worst.layer if worst else None,
    )
    return Summary(
        # A file name that is not UTF-8 (surrogate escapes) as text any writer takes: JSON refuses surrogates.
        source=None if source is None else source.encode("utf-8", "backslashreplace").decode("utf-8"),
        engine=dump.engine.name + (f" {dump.engine.version}" if dump.engine.version else ""),
        model=dump.model.name,
        mode=dump.window.mode,
        num_layers=L,
        num_experts=E,
        top_k=top_k,
        num_passes=dump.window.num_passes,
        ep_size=G,
        placement=placement,
        layers=rows,
        overall=overall,
        passes=_passes(dump, layers, to_gpus) if dump.logical_count.shape[0] > 1 else [],
        unobserved_layers=list(dump.window.unobserved_layers),
        dropped_passes=dump.window.dropped_passes,
        discarded=sum(dump.window.discarded or ()),
    )


def _layer_means(x: torch.Tensor, has: torch.Tensor) -> list[Metrics]:
    """Per row of ``x`` [B, L', n]: each metric averaged over the layers where ``has`` [B, L']."""
    cols = {}
    for name, v in m.all_metrics(x).items():
        v = torch.where(has, v, torch.nan)  # [B, L']
        cols[name] = [_num(t) for t in v.nanmean(-1)] if v.shape[-1] else [None] * v.shape[0]
    return [Metrics(**{k: cols[k][i] for k in cols}) for i in range(x.shape[0])]


_PASS_CHUNK = 256  # passes whose float64 rows are held at once (the per-pass output is a few numbers each)


def _passes(dump: Dump, layers: list[int], to_gpus: Any) -> list[PassSummary]:
    # Chunk by chunk: one float64 copy of [B, L', E] (and its metrics' temporaries) took 1.9 GB
    # for 8000 passes of 61 x 256 experts, 5x the file.
    experts: list[Metrics] = []
    gpus: list[Metrics] | None = [] if to_gpus else None
    assignments: list[float] = []
    B = dump.logical_count.shape[0]
    for a in range(0, B, _PASS_CHUNK):
        rows = slice(a, min(a + _PASS_CHUNK, B))
        count = dump.logical_count[rows][:, layers].to(torch.float64)  # [b, L', E]
        has = count.sum(-1) > 0  # layers with load in each pass
        experts += _layer_means(count, has)
        if gpus is not None:
            physical = dump.physical_count[rows] if dump.physical_count is not None else None
            gpus += _layer_means(to_gpus(dump.logical_count[rows], physical)[:, layers], has)
        assignments += count.sum((1, 2)).tolist()
    records = dump.records if len(dump.records) == B else []
    return [
        PassSummary(
            index=i,
            forward_pass_id=records[i].forward_pass_id if records else None,
            rank=records[i].rank if records else None,
            assignments=int(assignments[i]),
            experts=experts[i],
            gpus=gpus[i] if gpus is not None else None,
        )
        for i in range(B)
    ]


# -- output ---------------------------------------------------------------------------------

_json = msgspec.json.Encoder()


def to_json(summaries: Summary | list[Summary]) -> str:
    """The summary (or a list of them) as JSON; undefined metrics are ``null``."""
    return _json.encode(summaries).decode()


CSV_COLUMNS = [
    "source", "scope", "layer", "pass", "over", "tokens", "assignments", "max", "mean",
    "max_over_mean", "imbalance_ratio", "balancedness", "jain", "cv", "hot", "dead", "forward_pass_id", "rank",
]  # fmt: skip


def to_csv(summaries: Summary | list[Summary]) -> str:
    """One row per (layer, experts|gpus), the overall means and each pass, for spreadsheets."""
    out = io.StringIO()
    w = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for s in summaries if isinstance(summaries, list) else [summaries]:
        base = {"source": s.source or ""}
        for r in s.layers:
            for over, st in (("experts", r.experts), ("gpus", r.gpus)):
                if st is not None:
                    row = {**base, "scope": "layer", "layer": r.layer, "over": over, "tokens": r.tokens}
                    row.update({k: getattr(st, k) for k in CSV_COLUMNS if k in st.__struct_fields__})
                    row["hot"] = " ".join(f"{i}:{x:.2f}" for i, x in st.hot)
                    row["dead"] = " ".join(map(str, st.dead))
                    w.writerow(row)
        o = s.overall
        for over, mt in (("experts", o.experts), ("gpus", o.gpus)):
            if mt is not None:
                w.writerow(
                    {
                        **base,
                        "scope": "overall",
                        "over": over,
                        "tokens": o.tokens,
                        "assignments": o.assignments,
                        **msgspec.structs.asdict(mt),
                    }
                )
        for p in s.passes:
            for over, mt in (("experts", p.experts), ("gpus", p.gpus)):
                if mt is not None:
                    w.writerow(
                        {
                            **base,
                            "scope": "pass",
                            "pass": p.index,
                            "forward_pass_id": p.forward_pass_id,
                            "rank": p.rank,
                            "over": over,
                            "assignments": p.assignments,
                            **msgspec.structs.asdict(mt),
                        }
                    )
    return out.getvalue()


def _fmt(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _hot(st: LoadStats, prefix: str, top: int | None = None) -> str:
    """The hot entries summarize kept (``hot=``), or the first ``top``."""
    return " ".join(f"{prefix}{i}:{x:.1f}" for i, x in st.hot[:top]) or "–"


def _dead(st: LoadStats) -> str:
    if not st.dead:
        return "0"
    shown = ",".join(map(str, st.dead[:6]))
    return f"{len(st.dead)} ({shown}{',…' if len(st.dead) > 6 else ''})"


def _pass_chunks(passes: list[PassSummary], limit: int) -> list[tuple[str, list[PassSummary]]]:
    """About ``limit`` groups of consecutive passes of one rank each, labelled by their range of
    forward pass ids (row indices where the dump has no records)."""
    size = max(1, math.ceil(len(passes) / limit))
    out = []
    for _, of_rank in itertools.groupby(passes, key=lambda p: p.rank):
        run = list(of_rank)
        for lo in range(0, len(run), size):
            group = run[lo : lo + size]
            first, last = (p.index if p.forward_pass_id is None else p.forward_pass_id for p in (group[0], group[-1]))
            out.append((str(first) if len(group) == 1 else f"{first}–{last}", group))
    return out


def print_summary(summary: Summary, console: Any = None, *, max_pass_rows: int = 20) -> None:
    """Draw the summary as rich tables: layers over experts, layers over GPUs, and passes.

    ``console``: a ``rich.console.Console`` (default: a new one on stdout).
    """
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s, o = summary, summary.overall
    head = f"[bold]{s.source or 'dump'}[/bold]: {s.engine}" + (f", model {s.model}" if s.model else "")
    head += f", mode {s.mode}, {s.num_layers} layers × {s.num_experts} experts"
    head += f", top-k {s.top_k}" if s.top_k else ""
    head += f", {s.num_passes} passes" if s.num_passes else ""
    head += f", {o.tokens} tokens" if o.tokens is not None else f", {o.assignments} assignments"
    console.print(head)
    left_out = [f"MoE layers {s.unobserved_layers} not observed (in no table)"] if s.unobserved_layers else []
    if s.dropped_passes:
        left_out.append(f"{s.dropped_passes} passes dropped from the ring (in the totals, not the pass rows)")
    if s.discarded:
        left_out.append(f"{s.discarded} top-k slots discarded (invalid ids: in no count)")
    if left_out:
        console.print("; ".join(left_out), markup=False)

    # max/mean is imbalance + 1: in the JSON and CSV, not on screen.
    cols = ["imbalance", "balance", "Jain", "CV"]
    caption = (
        "imbalance: (max−mean)/mean (TensorRT-LLM); balance: mean/max (SGLang); hot: load/mean; all: the "
        "metrics' mean over the MoE layers with load (SGLang's logged balancedness averages dense layers in "
        "too, as 1.0), the run's tokens, the dead experts of every layer"
    )

    def metric_cells(mt: Metrics) -> list[str]:
        return [_fmt(mt.imbalance_ratio), _fmt(mt.balancedness), _fmt(mt.jain), _fmt(mt.cv)]

    def table(title: str, columns: list[str], cap: str) -> Table:
        t = Table(title=title, title_justify="left", caption=cap or None, caption_justify="left", box=box.SIMPLE_HEAD)
        for c in columns:
            left = c.startswith(("hot", "dead"))
            t.add_column(c, justify="left" if left else "right", no_wrap=not left)
        return t

    t = table("Load over experts, per MoE layer", ["layer", "tokens", *cols, "hot", "dead"], caption)
    for r in s.layers:
        t.add_row(
            str(r.layer),
            "–" if r.tokens is None else str(r.tokens),
            *metric_cells(r.experts),
            _hot(r.experts, "e"),
            _dead(r.experts),
        )
    t.add_section()
    worst = f"worst layer {o.worst_layer}" if o.worst_layer is not None else ""
    t.add_row(
        "all",
        "–" if o.tokens is None else str(o.tokens),
        *metric_cells(o.experts),
        worst,
        str(o.dead_experts),
        style="bold",
    )
    console.print(t)

    if o.gpus is not None:
        t = table(
            f"Load over {s.ep_size} GPUs ({s.placement}), per MoE layer", ["layer", "max", "mean", *cols, "hot"], ""
        )
        for r in s.layers:
            assert r.gpus is not None
            t.add_row(
                str(r.layer), f"{r.gpus.max:.0f}", f"{r.gpus.mean:.1f}", *metric_cells(r.gpus), _hot(r.gpus, "gpu", 1)
            )
        t.add_section()
        t.add_row("mean", "", "", *metric_cells(o.gpus), "", style="bold")
        console.print(t)

    if s.passes:
        extra = ["GPU imbalance", "GPU balance"] if s.passes[0].gpus is not None else []
        # The records' ranks: token groups (DP ranks, or the engines a fleet's dump merged) whose
        # passes ran side by side.
        ranks = len({p.rank for p in s.passes})
        t = table(
            f"Over {len(s.passes)} passes" + (f" of {ranks} token groups (DP ranks or engines)" if ranks > 1 else "")
            + " (per-pass values, mean over layers)",
            ["group"] * (ranks > 1) + ["passes", "assignments", "imbalance", "balance", *extra],
            "",
        )  # fmt: skip
        for label, group in _pass_chunks(s.passes, max_pass_rows):
            e = _mean_metrics([p.experts for p in group])
            cells = [str(group[0].rank)] * (ranks > 1) + [label, str(sum(p.assignments for p in group))]
            cells += [_fmt(e.imbalance_ratio), _fmt(e.balancedness)]
            if extra:
                g = _mean_metrics([p.gpus for p in group if p.gpus is not None])
                cells += [_fmt(g.imbalance_ratio), _fmt(g.balancedness)]
            t.add_row(*cells)
        console.print(t)
