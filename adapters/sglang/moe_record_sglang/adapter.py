"""The pluggy side (entry-point group ``moe_record_sdk.adapters``): ``moe-record adapters`` lists
it, and ``moe_record_attach`` puts a caller's Recorder behind SGLang's recorder hooks.

Targets are SGLang ``ExpertLocationMetadata`` objects (what SGLang sizes its recorder from).
Nothing here imports sglang until a target is offered.
"""

from __future__ import annotations

from typing import Any

from moe_record_sdk.errors import AdapterError, MoeRecordError
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
    from sglang.srt.runtime_context import get_exec

    from .compat import check_sglang_version
    from .plugin import build_recorder, forward_captured, model_top_k
    from .recorder import SGLangRecorder

    check_sglang_version()
    previous = get_global_expert_distribution_recorder()
    if isinstance(previous, SGLangRecorder):
        raise AdapterError("sglang: a moe-record recorder is already attached; detach it first")
    opts = dict(options)
    rank = opts.pop("rank", None)
    try:
        if recorder is None:  # ours, sized by SGLang's metadata; options are Recorder arguments
            top_k = opts.pop("top_k", None) or model_top_k()
            if top_k is None:
                raise AdapterError("sglang: cannot tell top_k from the served model's config; pass top_k=")
            ours = build_recorder(target, int(rank or 0), mode=opts.pop("mode", None) or "stat", top_k=top_k, **opts)
        else:
            if opts:
                raise AdapterError(f"sglang: options {sorted(opts)} given with a recorder: pass one or the other")
            eplb = bool(get_exec().moe.enable_eplb)
            _check_fits(recorder, target, model_top_k(), eplb)
            live = target.physical_to_logical_map_cpu if recorder.mapping is not None else None
            rank = recorder.topology.rank if rank is None else rank
            # The guards build_recorder sets too: EPLB's rebalances need stat, captured graphs their buffers.
            ours = SGLangRecorder(recorder, rank=int(rank), live_map=live, eplb=eplb, frozen=forward_captured(recorder))
    except AdapterError:
        raise
    except (MoeRecordError, TypeError, ValueError) as e:  # a caller's mistake: not a broken adapter
        raise AdapterError(f"sglang: cannot attach: {e}") from None
    set_global_expert_distribution_recorder(ours)

    def undo() -> None:
        if get_global_expert_distribution_recorder() is ours:
            set_global_expert_distribution_recorder(previous)

    rec = ours.recorder
    layer_map = LayerMap(
        num_layers=rec.num_layers,
        moe_layer_ids=tuple(rec.layer_ids),
        num_experts=rec.num_experts,
        top_k=rec.top_k,
        physical_to_logical_map=rec.mapping,
    )
    return Attachment(adapter="sglang", layer_map=layer_map, undo=undo, recorder=rec)


def _check_fits(recorder: Any, target: Any, top_k: int | None, eplb: bool) -> None:
    """Refuse a recorder that cannot count what SGLang hands its recorder: physical slot ids of
    every layer (``ExpertLocationMetadata``), which EPLB (``eplb``) moves between experts."""
    from .plugin import is_identity

    slots = target.physical_to_logical_map_cpu.shape[1]
    problems = []
    if recorder.num_layers != target.num_layers:
        problems.append(f"num_layers {recorder.num_layers} != {target.num_layers}")
    if recorder.num_experts != target.num_logical_experts:
        problems.append(f"num_experts {recorder.num_experts} != {target.num_logical_experts}")
    if top_k is not None and recorder.top_k != top_k:
        problems.append(f"top_k {recorder.top_k} != {top_k}")
    if recorder.num_slots != slots:
        problems.append(f"{recorder.num_slots} expert slots != SGLang's {slots} physical experts")
    elif recorder.mapping is None and not is_identity(target):
        problems.append("no physical_to_logical_map, but SGLang's physical experts are not its logical ones")
    elif recorder.mapping is None and eplb:
        # Identity now, but each rebalance rewrites SGLang's map: slots would then count as experts.
        problems.append("no physical_to_logical_map, but SGLang's EPLB (--enable-eplb) moves experts between slots")
    if problems:
        raise AdapterError(
            "sglang: recorder does not fit SGLang's expert layout: "
            + "; ".join(problems)
            + " (size it with moe-record's layer map: Recorder(**registry.layer_map(metadata).recorder_kwargs()))"
        )
