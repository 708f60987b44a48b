"""The pluggy side (entry-point group ``moe_record_sdk.adapters``): ``moe-record adapters`` lists
it, and ``moe_record_attach`` puts a caller's Recorder behind SGLang's recorder hooks.

Targets are SGLang ``ExpertLocationMetadata`` objects (what SGLang sizes its recorder from).
Nothing here imports sglang until a target is offered.
"""

from __future__ import annotations

from typing import Any

from moe_record_sdk.errors import AdapterError
from moe_record_sdk.plugins import AdapterInfo, Attachment, LayerMap, hookimpl

from .version import SUPPORTED, __version__


def _is_metadata(target: Any) -> bool:
    cls = type(target)
    return cls.__name__ == "ExpertLocationMetadata" and cls.__module__.startswith("sglang.")


@hookimpl
def moe_record_adapter_info() -> AdapterInfo:
    return AdapterInfo(
        name="sglang", engine="sglang", version=__version__, engine_versions=SUPPORTED, distribution="moe-record-sglang"
    )


@hookimpl
def moe_record_layer_map(target: Any) -> LayerMap | None:
    if not _is_metadata(target):
        return None
    from .plugin import model_top_k

    top_k = model_top_k()
    if top_k is None:
        raise AdapterError("sglang: cannot tell top_k from the served model's config")
    mapping = target.physical_to_logical_map_cpu
    return LayerMap(
        num_layers=target.num_layers,
        moe_layer_ids=tuple(range(target.num_layers)),
        num_experts=target.num_logical_experts,
        top_k=top_k,
        physical_to_logical_map=mapping.clone(),
    )


@hookimpl
def moe_record_attach(target: Any, recorder: Any, options: dict[str, Any]) -> Attachment | None:
    if not _is_metadata(target):
        return None
    from sglang.srt.eplb.expert_distribution import (
        get_global_expert_distribution_recorder,
        set_global_expert_distribution_recorder,
    )

    from .compat import check_sglang_version
    from .recorder import SGLangRecorder

    check_sglang_version()
    previous = get_global_expert_distribution_recorder()
    if isinstance(previous, SGLangRecorder):
        raise AdapterError("sglang: a moe-record recorder is already attached; detach it first")
    ours = SGLangRecorder(recorder, rank=int(options.get("rank", recorder.topology.rank)))
    set_global_expert_distribution_recorder(ours)

    def undo() -> None:
        if get_global_expert_distribution_recorder() is ours:
            set_global_expert_distribution_recorder(previous)

    layer_map = LayerMap(
        num_layers=recorder.num_layers,
        moe_layer_ids=tuple(recorder.layer_ids),
        num_experts=recorder.num_experts,
        top_k=recorder.top_k,
        physical_to_logical_map=recorder.mapping,
    )
    return Attachment(adapter="sglang", layer_map=layer_map, undo=undo)
