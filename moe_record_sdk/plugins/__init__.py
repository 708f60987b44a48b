"""Adapter plugins: the hookspecs, their result types and the registry over entry points."""

from .hookspecs import PROJECT, hookimpl, hookspec
from .types import AdapterInfo, Attachment, LayerMap

ENTRY_POINT_GROUP = "moe_record_sdk.adapters"

__all__ = ["ENTRY_POINT_GROUP", "PROJECT", "AdapterInfo", "Attachment", "LayerMap", "hookimpl", "hookspec"]
