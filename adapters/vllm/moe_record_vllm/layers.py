"""Finding a vLLM model's MoE layers and what the tap can record from them.

vLLM 0.27+ builds every MoE layer with ``FusedMoEFactory``, which returns a ``MoERunner``
(``vllm/model_executor/layers/fused_moe/runner/moe_runner.py``). Its router (a ``BaseRouter``)
computes the top-k ids in ``select_experts`` and hands the logical ids, before any EPLB
mapping, to ``router.capture_fn``: that is where the tap goes. Monolithic quant methods route
inside the expert kernel and never call ``select_experts``: those layers are unobserved.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_record_sdk.errors import AdapterError
from moe_record_sdk.plugins import LayerMap


def moe_runners(model: torch.nn.Module) -> list[Any]:
    """Every ``MoERunner`` of ``model``, in module order."""
    from vllm.model_executor.layers.fused_moe import MoERunner

    return [m for m in model.modules() if isinstance(m, MoERunner)]


def observable(runner: Any) -> bool:
    """Whether the tap sees this layer's routing: a modular kernel and a router with a capture slot."""
    from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

    return not runner.is_monolithic and isinstance(runner.router, BaseRouter)


def sequence_parallel(runner: Any) -> bool:
    """Whether this layer's TP ranks each route a chunk of the tokens (sequence-parallel MoE: DP > 1
    with expert parallelism and an all-to-all, ``ParallelConfig.use_sequence_parallel_moe``)."""
    return bool(getattr(getattr(runner, "moe_config", None), "is_sequence_parallel", False))


def build_layer_map(model: torch.nn.Module, num_layers: int | None = None, model_name: str | None = None) -> LayerMap:
    """What the tap would record from ``model``.

    ``num_layers``: decoder layers of the whole model (dense and other pipeline stages'
    included); default ``model.config.num_hidden_layers``, else the last MoE layer id + 1.
    Raises ``AdapterError`` when the model has no MoE layer or its layers disagree on the
    number of experts or top_k.
    """
    runners = moe_runners(model)
    if not runners:
        raise AdapterError(f"moe-record-vllm: {type(model).__name__} has no MoE layer (no MoERunner module)")
    experts = {r.moe_config.num_logical_experts for r in runners}
    top_ks = {r.router.top_k for r in runners}
    if len(experts) != 1 or len(top_ks) != 1:
        raise AdapterError(
            f"moe-record-vllm: MoE layers of {type(model).__name__} disagree: experts {sorted(experts)}, "
            f"top_k {sorted(top_ks)}; one recorder needs one shape"
        )
    ids = [r.layer_id for r in runners]
    if len(set(ids)) != len(ids):
        raise AdapterError(f"moe-record-vllm: MoE layer ids repeat in {type(model).__name__}: {ids}")
    if num_layers is None:
        config = getattr(model, "config", None)
        num_layers = getattr(config, "num_hidden_layers", None) or max(ids) + 1
    observed = tuple(r.layer_id for r in runners if observable(r))
    unobserved = tuple(r.layer_id for r in runners if not observable(r))
    if not observed:
        raise AdapterError(
            f"moe-record-vllm: no MoE layer of {type(model).__name__} is observable: layers {list(unobserved)} route "
            "inside a monolithic kernel (try another MoE backend, e.g. --moe-backend triton)"
        )
    return LayerMap(
        num_layers=num_layers,
        moe_layer_ids=observed,
        num_experts=experts.pop(),
        top_k=top_ks.pop(),
        unobserved_layer_ids=unobserved,
        model_name=model_name,
    )
