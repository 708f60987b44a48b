"""The pluggy side (entry-point group ``moe_record_sdk.adapters``): ``moe-record adapters`` lists
it, and ``moe_record_attach`` puts a Recorder (the caller's, or one it builds) on a vLLM model's MoE
routers.

Targets are vLLM models: ``nn.Module`` trees holding ``MoERunner`` layers (in a worker:
``worker.model_runner.get_model()``). Nothing here imports vLLM unless it is already imported.
"""

from __future__ import annotations

import sys
from typing import Any

from moe_record_sdk.plugins import AdapterInfo, Attachment, LayerMap, hookimpl

from .version import DISTRIBUTION, ENGINE_DISTRIBUTIONS, SUPPORTED, __version__


def _is_vllm_model(target: Any) -> bool:
    if "vllm" not in sys.modules:  # a vLLM model implies vLLM is imported
        return False
    import torch

    if not isinstance(target, torch.nn.Module):
        return False
    from .layers import moe_runners

    return bool(moe_runners(target))


@hookimpl
def moe_record_adapter_info() -> AdapterInfo:
    return AdapterInfo(
        name="vllm",
        engine=" / ".join(ENGINE_DISTRIBUTIONS),
        version=__version__,
        engine_versions=SUPPORTED,
        distribution=DISTRIBUTION,
    )


@hookimpl
def moe_record_layer_map(target: Any) -> LayerMap | None:
    if not _is_vllm_model(target):
        return None
    from .layers import build_layer_map

    return build_layer_map(target)


@hookimpl
def moe_record_attach(target: Any, recorder: Any, options: dict[str, Any]) -> Attachment | None:
    """``options["num_valid"]``: a 0-dim tensor of real tokens per pass (see ``tap.attach``); with
    no ``recorder``, the others are ``Recorder`` arguments (``mode``, ``buffer_size``, ...) for
    one built here, sized by the layer map, on the model's device."""
    if not _is_vllm_model(target):
        return None
    from moe_record_sdk import Recorder
    from moe_record_sdk.errors import AdapterError
    from moe_record_sdk.recorder import RECORDER_OPTIONS

    from .layers import build_layer_map
    from .tap import attach
    from .version import check_version

    check_version()
    opts = dict(options)
    num_valid = opts.pop("num_valid", None)
    lm = build_layer_map(target)
    if recorder is None:
        unknown = sorted(set(opts) - RECORDER_OPTIONS)
        if unknown:
            raise AdapterError(f"vllm: unknown options {unknown}: give Recorder arguments or num_valid")
        device = next((p.device for p in target.parameters()), "cpu")
        recorder = Recorder(**{"device": device, **lm.recorder_kwargs(), **opts})
    else:
        if opts:
            raise AdapterError(f"vllm: options {sorted(opts)} given with a recorder: pass one or the other")
        problems = lm.fit_problems(recorder)
        if problems:
            raise AdapterError("vllm: recorder does not fit the model: " + "; ".join(problems))
    return attach(target, recorder, lm, num_valid)
