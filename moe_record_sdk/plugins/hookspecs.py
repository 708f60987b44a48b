"""The adapter contract: documented empty functions, all prefixed ``moe_record_``.

An adapter is a module (or object) registered under the entry-point group
``moe_record_sdk.adapters`` that implements some of these with ``@hookimpl``. Hooks are called
with keywords, and an implementation may take fewer arguments than the spec, so hooks can grow.
The core never imports an engine: only adapters do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from ..recorder import Recorder
    from .types import AdapterInfo, Attachment, LayerMap

PROJECT = "moe_record_sdk"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def moe_record_adapter_info() -> AdapterInfo:
    """Describe the adapter: its name, the engine it serves, its own version and the engine
    versions it supports (checked from package metadata, without importing the engine)."""


@hookspec(firstresult=True)
def moe_record_layer_map(target: Any) -> LayerMap | None:
    """If this adapter serves ``target`` (an engine, model or module), return what it would
    record: MoE layer ids, number of layers, experts, top_k, physical-to-logical map. Return
    None when ``target`` is not yours. Must not modify ``target``."""


@hookspec(firstresult=True)
def moe_record_attach(target: Any, recorder: Recorder | None, options: dict[str, Any]) -> Attachment | None:
    """Attach ``recorder``'s tap to every MoE layer of ``target`` and return the handle, or None
    when ``target`` is not yours. Refuse a second attach, and unsupported engine versions,
    with an ``AdapterError`` naming them. ``recorder`` may be None: the adapter then builds one
    sized by its layer map (``options`` may carry ``mode``, ``device`` and other ``Recorder``
    arguments) and returns it as ``Attachment.recorder``."""
