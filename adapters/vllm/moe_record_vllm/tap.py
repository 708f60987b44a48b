"""The tap: our capture function on every observable MoE router, chained after any existing one.

``BaseRouter.select_experts`` calls ``router.capture_fn(topk_ids)`` with the logical ids
``[T, top_k]`` (vLLM 0.32 ``router/base_router.py``). On CPU that call is traced once by Dynamo
and on GPU it runs inside captured CUDA graphs, so the body is ``Recorder.record`` only: tensor
ops on preallocated buffers. Bind before the first forward (trace, capture); binding later is
seen by eager passes only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from moe_record_sdk import Recorder
from moe_record_sdk.errors import AdapterError
from moe_record_sdk.plugins import Attachment, LayerMap

from .layers import moe_runners, observable, sequence_parallel

ADAPTER = "vllm"
_MARK = "_moe_record_tap"  # set on our capture functions, so detach restores only what it marked


def _capture_fn(
    recorder: Recorder,
    layer_id: int,
    num_valid: torch.Tensor | None,
    previous: Callable[[torch.Tensor], None] | None,
    chunk: int = 0,
) -> Callable[[torch.Tensor], None]:
    """``chunk``: under sequence-parallel MoE, this TP rank's index: it routes rows
    [chunk * T, (chunk + 1) * T) of the pass's (padded) tokens, T its own row count, so its real
    rows are the pass's real tokens less chunk * T (none past them: padding)."""

    def capture(topk_ids: torch.Tensor) -> None:
        if previous is not None:  # e.g. vLLM's routed-experts capturer (R3): it keeps working
            previous(topk_ids)
        valid = num_valid
        if chunk and num_valid is not None:
            valid = torch.clamp(num_valid - chunk * topk_ids.shape[0], min=0)
        recorder.record(layer_id, topk_ids, valid)

    setattr(capture, _MARK, previous)
    return capture


def is_tapped(router: Any) -> bool:
    """Whether ``router``'s capture slot still holds our tap (another binder may have replaced it)."""
    return hasattr(getattr(router, "capture_fn", None), _MARK)


def attach(
    model: torch.nn.Module,
    recorder: Recorder,
    layer_map: LayerMap,
    num_valid: torch.Tensor | None = None,
    chunk: int = 0,
) -> Attachment:
    """Put ``recorder``'s tap on every observable MoE layer of ``model``.

    ``num_valid``: a 0-dim int64 tensor on the recorder's device holding the number of real
    (unpadded) tokens of the current pass; rows past it are not counted. The caller fills it
    before each forward (``None``: count every row). ``chunk``: this TP rank's index where a
    layer is sequence-parallel (``moe_config.is_sequence_parallel``: each TP rank routes its
    chunk of the tokens).
    Returns the handle; ``detach()`` restores each router's previous capture function.

    Example (in a vLLM worker)::

        lm = build_layer_map(model)
        rec = Recorder(**lm.recorder_kwargs())
        handle = attach(model, rec, lm)
    """
    runners = [r for r in moe_runners(model) if observable(r) and r.layer_id in layer_map.moe_layer_ids]
    routers = [r.router for r in runners]
    if any(is_tapped(router) for router in routers):
        raise AdapterError(f"moe-record-vllm: {type(model).__name__} already has a moe-record tap attached")
    for runner in runners:
        router, layer_id = runner.router, runner.layer_id
        bind = type(router).set_capture_fn
        mine = chunk if sequence_parallel(runner) else 0
        bind(router, _capture_fn(recorder, layer_id, num_valid, router.capture_fn, mine))

        def rebind(
            fn: Callable[[torch.Tensor], None] | None,
            router: Any = router,
            layer_id: int = layer_id,
            bind: Any = bind,
            mine: int = mine,
        ) -> None:
            # A later binder goes behind our tap, not over it: vLLM binds its routed-experts
            # capturer at KV-cache init, after load_model attached us (Model Runner V2).
            bind(router, _capture_fn(recorder, layer_id, num_valid, fn, mine))

        router.set_capture_fn = rebind

    def undo() -> None:
        for router in routers:
            del router.set_capture_fn  # the class's setter again
            if is_tapped(router):
                router.set_capture_fn(getattr(router.capture_fn, _MARK))
            # else: someone assigned over us; their function may chain ours, so it stays.

    return Attachment(adapter=ADAPTER, layer_map=layer_map, undo=undo, recorder=recorder)
