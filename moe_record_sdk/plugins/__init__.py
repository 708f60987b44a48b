"""Adapter plugins: the hookspecs, their result types and the registry over entry points."""

from .hookspecs import PROJECT, hookimpl, hookspec
from .manager import ENTRY_POINT_GROUP, AdapterRegistry, AdapterReport
from .types import AdapterInfo, Attachment, LayerMap

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROJECT",
    "AdapterInfo",
    "AdapterRegistry",
    "AdapterReport",
    "Attachment",
    "LayerMap",
    "hookimpl",
    "hookspec",
]
