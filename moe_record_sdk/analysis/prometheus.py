"""Prometheus metrics over a recorder's current window (prometheus-client, extra ``metrics``).

Series are per MoE layer at most (one label, ``layer``): a 61-layer model gives a few hundred
series. Per-expert series (``layer`` x ``expert``: thousands) only when asked. Values describe
the recording window so far (since ``start`` or the last dump), like ``status()``, and reading
them never ends the window.

>>> from prometheus_client import CollectorRegistry, generate_latest  # doctest: +SKIP
>>> registry = CollectorRegistry()                                     # doctest: +SKIP
>>> registry.register(make_collector(recorder, ep_size=8))            # doctest: +SKIP
>>> generate_latest(registry)                                          # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..schema.dump import Dump
from . import metrics as m
from .optional import require
from .summary import moe_layers

Source = Any  # a Recorder, or a callable returning a Dump or an int [L, E] tensor


@dataclass
class Snapshot:
    """What one scrape reads from the source."""

    logical: torch.Tensor  # [L, E]
    layers: list[int]  # the MoE layers to report
    physical: torch.Tensor | None = None  # [L, P] when experts are replicated
    mapping: torch.Tensor | None = None  # [L, P]
    status: dict[str, Any] = field(default_factory=dict)


def _is_recorder(source: Any) -> bool:
    return hasattr(source, "peek") and hasattr(source, "status")


def _snapshot(source: Source) -> Snapshot:
    if _is_recorder(source):
        unobserved = set(source.unobserved_layers)
        layers = [i for i in source.layer_ids if i not in unobserved]
        status = source.status().to_dict()
        if source.mapping is None:
            return Snapshot(source.peek(), layers, status=status)
        physical = source.peek(physical=True)  # one read: logical counts follow from it
        logical = torch.zeros(physical.shape[0], source.num_experts, dtype=torch.int64)
        logical.scatter_add_(1, source.mapping, physical)
        return Snapshot(logical, layers, physical, source.mapping, status)
    value = source()
    if isinstance(value, Dump):
        # The physical rows cover the window only where the ring dropped nothing (summary's rule);
        # else GPU loads follow from the totals and the map, not from part of the window.
        whole = value.physical_count is not None and value.total_logical_count is None
        physical = value.physical_count.sum(0) if whole else None
        return Snapshot(value.total_count(), moe_layers(value), physical, value.physical_to_logical_map)
    t = torch.as_tensor(value)
    if t.dim() != 2:
        raise ValueError(f"metrics source returned shape {list(t.shape)}; expected [layers, experts] counts or a Dump")
    return Snapshot(t, list(range(t.shape[0])))


class ExpertLoadCollector:
    """A prometheus-client collector (``registry.register(collector)``); see :func:`make_collector`."""

    def __init__(
        self, source: Source, *, per_expert: bool = False, ep_size: int | None = None, prefix: str = "moe_record"
    ) -> None:
        self.source, self.per_expert, self.ep_size, self.prefix = source, per_expert, ep_size, prefix

    def describe(self) -> list[Any]:
        return list(self._families(None))

    def collect(self) -> Iterator[Any]:
        yield from self._families(_snapshot(self.source))

    def _families(self, snap: Snapshot | None) -> Iterator[Any]:
        pc = require("prometheus_client.core", "Prometheus metrics")
        G, p = pc.GaugeMetricFamily, self.prefix

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> Any:
            return G(f"{p}_{name}", doc, labels=labels)

        status = gauge("recording", "1 while the recorder is recording")
        passes = gauge("window_passes", "forward passes in the current window")
        tokens = gauge("window_tokens", "tokens seen in the current window (the busiest layer)")
        dropped = gauge("window_dropped_passes", "passes that fell out of the per-pass ring this window")
        assign = gauge("layer_assignments", "token-expert assignments of the layer this window", ["layer"])
        bal = gauge("layer_balancedness", "SGLang's balancedness (mean+1e-5)/(max+1e-5) over experts", ["layer"])
        imb = gauge("layer_imbalance_ratio", "TensorRT-LLM's (max-mean)/mean over experts", ["layer"])
        dead = gauge("layer_dead_experts", "experts of the layer never chosen this window", ["layer"])
        overall = {
            name: gauge(f"{name}", f"{doc}, mean over MoE layers with load")
            for name, doc in (
                ("balancedness", "SGLang's balancedness over experts"),
                ("imbalance_ratio", "(max-mean)/mean over experts"),
                ("max_over_mean", "max/mean over experts"),
                ("jain", "Jain's fairness index over experts"),
                ("cv", "coefficient of variation over experts"),
            )
        }
        gpu_bal = gauge("layer_gpu_balancedness", "SGLang's balancedness over expert-parallel GPUs", ["layer"])
        gpu_overall = gauge("gpu_balancedness", "balancedness over GPUs, mean over MoE layers with load")
        expert = gauge("expert_assignments", "token-expert assignments per expert this window", ["layer", "expert"])
        families = [status, passes, tokens, dropped, assign, bal, imb, dead, *overall.values()]
        if self.ep_size:
            families += [gpu_bal, gpu_overall]
        if self.per_expert:
            families.append(expert)
        if snap is None:
            yield from families
            return

        s = snap.status
        if s:
            status.add_metric([], float(bool(s.get("recording"))))
            passes.add_metric([], float(s.get("passes", 0)))
            tokens.add_metric([], float(s.get("tokens", 0)))
            dropped.add_metric([], float(s.get("dropped_passes", 0)))
        x = snap.logical[snap.layers].to(torch.float64)  # [L', E]
        loaded = x.sum(-1) > 0
        per_layer = m.all_metrics(x)
        for i, layer in enumerate(snap.layers):
            label = [str(layer)]
            assign.add_metric(label, float(x[i].sum()))
            bal.add_metric(label, float(per_layer["balancedness"][i]))
            imb.add_metric(label, float(per_layer["imbalance_ratio"][i]))  # NaN on a layer without load
            dead.add_metric(label, float((x[i] == 0).sum()))
        for name, fam in overall.items():
            if bool(loaded.any()):
                fam.add_metric([], float(per_layer[name][loaded].mean()))
        if self.ep_size:
            g = self._gpu_loads(snap)
            gb = m.balancedness(g)
            for i, layer in enumerate(snap.layers):
                gpu_bal.add_metric([str(layer)], float(gb[i]))
            if bool(loaded.any()):
                gpu_overall.add_metric([], float(gb[loaded].mean()))
        if self.per_expert:
            for i, layer in enumerate(snap.layers):
                for e, v in enumerate(x[i].tolist()):
                    expert.add_metric([str(layer), str(e)], v)
        for fam in families:
            if fam.samples:
                yield fam

    def _gpu_loads(self, snap: Snapshot) -> torch.Tensor:
        G = self.ep_size
        assert G
        if snap.physical is not None:
            return m.physical_gpu_loads(snap.physical[snap.layers], G)
        if snap.mapping is not None:
            return m.gpu_loads(snap.logical, num_gpus=G, physical_to_logical_map=snap.mapping)[snap.layers]
        return m.gpu_loads(snap.logical[snap.layers], num_gpus=G)


def make_collector(
    source: Source | Callable[[], Dump | torch.Tensor],
    *,
    per_expert: bool = False,
    ep_size: int | None = None,
    prefix: str = "moe_record",
) -> ExpertLoadCollector:
    """A collector of per-layer balance and window totals for a prometheus-client registry.

    Parameters
    ----------
    source:
        A :class:`~moe_record_sdk.Recorder` (read with ``peek()`` and ``status()``: the window is
        not ended), or a callable returning a :class:`Dump` or int ``[L, E]`` counts.
    per_expert:
        Also export ``{prefix}_expert_assignments{layer, expert}``: layers x experts series.
    ep_size:
        Also export balancedness over this many GPUs (the recorder's physical slots when it
        replicates experts, else contiguous experts).
    prefix:
        Metric name prefix.

    >>> from prometheus_client import CollectorRegistry, generate_latest   # doctest: +SKIP
    >>> reg = CollectorRegistry(); reg.register(make_collector(recorder))  # doctest: +SKIP
    """
    require("prometheus_client", "Prometheus metrics")
    if ep_size is not None and (isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1):
        raise ValueError(f"ep_size: expected a GPU count >= 1, got {ep_size!r}")
    if ep_size is not None and _is_recorder(source):  # its slots are known now
        slots = source.num_experts if source.mapping is None else source.mapping.shape[-1]
        if slots % ep_size:
            raise ValueError(f"ep_size: {ep_size} does not divide the recorder's {slots} expert slots")
    if not re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", prefix):  # prometheus_client would rewrite it silently
        raise ValueError(f"prefix: {prefix!r} is not a Prometheus metric name (letters, digits, _ and :)")
    return ExpertLoadCollector(source, per_expert=per_expert, ep_size=ep_size, prefix=prefix)


def make_metrics_app(source: Source, **options: Any) -> Any:
    """An ASGI app serving the collector's metrics in the Prometheus text format (mount at ``/metrics``).

    ``options`` go to :func:`make_collector`.
    """
    pc = require("prometheus_client", "Prometheus metrics")
    registry = pc.CollectorRegistry(auto_describe=True)
    registry.register(make_collector(source, **options))
    return pc.make_asgi_app(registry=registry)
