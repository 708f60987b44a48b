"""The SGLang plugin: where our recorder enters SGLang.

The seam is SGLang's recorder object, not ``select_experts``. sglang 0.5.23 builds its recorder
with ``ExpertDistributionRecorder.init_new(metadata, rank)`` (always called through the class:
``model_runner.py``, at start-up and after elastic-EP changes) and every hook site looks it up
with ``get_global_expert_distribution_recorder()`` at call time. Wrapping ``init_new`` so it
returns our :class:`SGLangRecorder` therefore:

* counts at every router that SGLang's recorder counts at (``select_experts``, the precomputed,
  hash and mega gates, NPU top-k), with the physical, padding-masked ids SGLang hands it;
* is immune to ``from ...topk import select_experts`` bindings made before the plugin ran:
  nothing of the router is patched;
* keeps SGLang's flags (``--expert-distribution-recorder-mode``, ``--…-buffer-size``), its
  endpoints and ``Engine`` methods (scheduler -> ``start_record``/``stop_record``/``dump_record``),
  ``EPLBManager`` (``dump_record(output_mode="object")``), layer context and pass boundaries.

``ModelRunner.forward`` is wrapped too, only to mark a speculative-decoding draft runner's
passes (``is_draft_worker``): they share the global recorder and repeat the served model's pass
ids, so they make no pass and count nothing (``recorder.IN_DRAFT_RUNNER``).

The wraps go through SGLang's own ``HookRegistry`` (applied by ``load_plugins()``, which also
rebinds stale ``from X import Y`` copies). Where SGLang counts elsewhere than ``on_select_experts``
(DeepEP low-latency / mori dispatch, ``stat_approx``) or needs its balancedness metrics, SGLang's
own recorder stays in charge and the reason is logged.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch

from moe_record_sdk import EngineInfo, Recorder

from .compat import check_sglang_version, sglang_version
from .recorder import IN_DRAFT_RUNNER, SGLangRecorder
from .topology import sglang_topology, stage_layers
from .version import __version__

log = logging.getLogger(__name__)

TARGET = "sglang.srt.eplb.expert_distribution.ExpertDistributionRecorder.init_new"
# Wrapped to tell a speculative-decoding draft model's passes from the served model's.
RUNNER_TARGET = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
_TOP_K_NAMES = ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "experts_per_token")

_state: dict[str, Any] = {"original": None, "original_forward": None, "top_k": None, "registered": False}


def register() -> None:
    """Entry point of group ``sglang.srt.plugins`` (name ``moe_record``), run by SGLang's
    ``load_plugins()`` in every SGLang process. Refuses unverified SGLang versions (the error is
    logged by ``load_plugins`` and SGLang's own recorder stays); then registers the wrap of
    ``init_new`` with SGLang's ``HookRegistry``, which ``load_plugins()`` applies next."""
    check_sglang_version()
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, _around_init_new, HookType.AROUND)
    HookRegistry.register(RUNNER_TARGET, _around_runner_forward, HookType.AROUND)
    _state["registered"] = True


def install(top_k: int | None = None) -> None:
    """Wrap ``init_new`` and ``ModelRunner.forward`` directly, without ``load_plugins()``
    (scripts, tests); idempotent. Where ``load_plugins()`` already registered the plugin, its
    hooks serve and only ``top_k`` is taken (wrapped twice, each call would run, and log, twice).

    ``top_k``: routed experts per token, when the model config cannot say (default: read from
    the served model's config).
    """
    check_sglang_version()
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder

    _state["top_k"] = top_k
    if _state["registered"]:
        return
    if _state["original"] is None:
        original = ExpertDistributionRecorder.__dict__["init_new"].__func__
        _state["original"] = original
        ExpertDistributionRecorder.init_new = staticmethod(lambda *a, **kw: _around_init_new(original, *a, **kw))
    if _state["original_forward"] is None:
        from sglang.srt.model_executor.model_runner import ModelRunner

        forward = ModelRunner.__dict__["forward"]
        _state["original_forward"] = forward
        ModelRunner.forward = functools.wraps(forward)(lambda *a, **kw: _around_runner_forward(forward, *a, **kw))


def uninstall() -> None:
    """Undo :func:`install` (exactly what it changed)."""
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder

    if _state["original"] is not None:
        ExpertDistributionRecorder.init_new = staticmethod(_state["original"])
        _state["original"] = None
    if _state["original_forward"] is not None:
        from sglang.srt.model_executor.model_runner import ModelRunner

        ModelRunner.forward = _state["original_forward"]
        _state["original_forward"] = None
    _state["top_k"] = None


def _around_init_new(original: Any, expert_location_metadata: Any, rank: int, *args: Any, **kwargs: Any) -> Any:
    from sglang.srt.runtime_context import get_exec

    mode = get_exec().moe.expert_distribution_recorder_mode
    if mode is None or expert_location_metadata is None:
        return original(expert_location_metadata, rank, *args, **kwargs)
    reason = unsupported_reason()
    top_k = _state["top_k"] or model_top_k()
    if reason is None and top_k is None:
        reason = f"the model config names none of {', '.join(_TOP_K_NAMES)}"
    if reason is not None:
        log.warning("moe-record: %s; SGLang's own expert distribution recorder stays in charge", reason)
        return original(expert_location_metadata, rank, *args, **kwargs)
    rec = build_recorder(expert_location_metadata, rank, mode=mode, top_k=top_k)
    from .side_server import maybe_serve

    maybe_serve(rec)  # MOE_RECORD_SGLANG_PORT: our endpoints for this rank, opt-in
    log.info(
        "moe-record: recording expert distribution (mode %s, rank %d) with moe-record-sglang %s",
        mode,
        rank,
        __version__,
    )
    return rec


def _around_runner_forward(original: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """``ModelRunner.forward``, marked as a draft model's pass where it is one: SGLang's draft
    runner (EAGLE, MTP) brackets its passes with the same global recorder, under its own pass ids,
    which repeat the served model's; its routing is not the served model's either."""
    token = IN_DRAFT_RUNNER.set(bool(getattr(runner, "is_draft_worker", False)))
    try:
        return original(runner, *args, **kwargs)
    finally:
        IN_DRAFT_RUNNER.reset(token)


def unsupported_reason() -> str | None:
    """Why SGLang's own recorder must stay for the published config, or None (read from
    ``_SinglePassGatherer.init_new`` and the accumulators of sglang 0.5.23)."""
    from sglang.srt.runtime_context import get_exec, reports_expert_balancedness

    moe = get_exec().moe
    if moe.expert_distribution_recorder_mode == "stat_approx":
        return "mode stat_approx counts DeepEP dispatch, not routing"
    if moe.moe_a2a_backend == "mori" or (moe.moe_a2a_backend == "deepep" and moe.deepep_mode != "normal"):
        return f"a2a backend {moe.moe_a2a_backend} (deepep_mode {moe.deepep_mode}) counts at dispatch"
    if reports_expert_balancedness():
        return "expert balancedness reporting needs SGLang's per-pass metrics"
    from sglang.srt.eplb.expert_distribution import megamoe_prefill_only_recorder_enabled

    if megamoe_prefill_only_recorder_enabled():  # ROCm MegaMoE: SGLang skips decode passes there
        return "ROCm MegaMoE prefill-only recording (SGLANG_AITER_MEGA_EPLB_PREFILL_ONLY) records prefill passes only"
    return None


def model_top_k() -> int | None:
    """Routed experts per token of the served model, from its config (what ``on_select_experts``
    receives per row: SGLang cuts fused shared-expert columns before the hook)."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.runtime_context import get_server_args

    try:
        cfg = ModelConfig.from_server_args(get_server_args()).hf_text_config
    except Exception as e:  # a config SGLang itself will report on; we only decline
        log.warning("moe-record: cannot read the model config: %s", e)
        return None
    for name in _TOP_K_NAMES:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_recorder(metadata: Any, rank: int, *, mode: str, top_k: int, **recorder_kwargs: Any) -> SGLangRecorder:
    """Our recorder sized from SGLang's ``ExpertLocationMetadata`` and published flags, with this
    rank's ``Topology`` and pipeline stage read from SGLang's parallel state
    (:mod:`moe_record_sglang.topology`). ``recorder_kwargs`` override ``Recorder`` arguments
    (``device``, ``buffer_size``, …)."""
    from sglang.srt.runtime_context import get_exec

    buffer_size = get_exec().moe.expert_distribution_recorder_buffer_size
    if buffer_size is not None and buffer_size <= 0:
        # SGLang's unbounded buffer (-1): ours stays bounded. None: stat keeps one exact
        # cumulative row, per_pass/per_token our default ring (also after a switch of mode).
        buffer_size = None
    live = metadata.physical_to_logical_map_cpu
    # EPLB rebalances by rewriting this map in place (ExpertLocationMetadata.update), and SGLang
    # converts counts with the map of dump time: follow it, even from an identity start.
    follow = get_exec().moe.enable_eplb
    kwargs: dict[str, Any] = {
        "num_layers": metadata.num_layers,
        "num_experts": metadata.num_logical_experts,
        "top_k": top_k,
        "layer_ids": stage_layers(metadata.num_layers),
        "device": metadata.physical_to_logical_map.device,
        "mode": mode,
        "buffer_size": buffer_size,
        "physical_to_logical_map": None if is_identity(metadata) and not follow else live.to("cpu", torch.int64),
        "engine": EngineInfo(name="sglang", version=sglang_version(), adapter="moe-record-sglang"),
        "topology": sglang_topology(rank, metadata.ep_size),
        **recorder_kwargs,
    }
    recorder = Recorder(**kwargs)
    return SGLangRecorder(
        recorder,
        rank=rank,
        live_map=live if recorder.mapping is not None else None,
        eplb=follow,
        frozen=forward_captured(recorder),
    )


def forward_captured(recorder: Recorder) -> bool:
    """Whether SGLang captures the forward (CUDA graphs on a GPU, or torch.compile): the tap's
    buffers are then fixed in what it captured, and a mode needing others must be refused."""
    from sglang.srt.model_executor.cuda_graph_config import cuda_graph_fully_disabled
    from sglang.srt.runtime_context import get_flags

    graphs = recorder.device.type == "cuda" and not cuda_graph_fully_disabled()
    return graphs or bool(get_flags().capture.enable_torch_compile)


def is_identity(metadata: Any) -> bool:
    """Whether SGLang's physical slots are its logical experts (no replicas, none moved)."""
    mapping = metadata.physical_to_logical_map_cpu
    return mapping.shape[1] == metadata.num_logical_experts and torch.equal(
        mapping.to("cpu", torch.int64), torch.arange(mapping.shape[1]).expand_as(mapping)
    )
