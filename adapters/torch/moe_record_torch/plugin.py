"""The adapter's hooks for moe-record-sdk's registry (entry point ``moe_record_sdk.adapters: torch``).

It serves any ``torch.nn.Module`` whose routers it finds on its own; it is tried last, so an
adapter for a more specific engine claims its objects first.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from moe_record_sdk.errors import AdapterError
from moe_record_sdk.plugins import AdapterInfo, Attachment, LayerMap, hookimpl

from . import tap
from .version import SUPPORTED, __version__


@hookimpl
def moe_record_adapter_info() -> AdapterInfo:
    return AdapterInfo(
        name=tap.ADAPTER, engine="torch", version=__version__, engine_versions=SUPPORTED, distribution=tap.DISTRIBUTION
    )


def _ours(target: Any) -> LayerMap | None:
    if not isinstance(target, nn.Module):
        return None
    try:
        return tap.layer_map(target)
    except AdapterError:
        return None  # no router we know: not ours


@hookimpl(trylast=True)
def moe_record_layer_map(target: Any) -> LayerMap | None:
    return _ours(target)


@hookimpl(trylast=True)
def moe_record_attach(target: Any, recorder: Any, options: dict[str, Any]) -> Attachment | None:
    if _ours(target) is None and "routers" not in options:
        return None
    return tap.attach(target, recorder, **options)
