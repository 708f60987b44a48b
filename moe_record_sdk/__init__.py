"""moe-record-sdk: exact, sync-free expert-load recording for MoE inference engines.

The public names load on first use (``moe_record_sdk._lazy``): ``import moe_record_sdk`` and
``moe-record --help`` pay for no torch or httpx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from ._version import __version__
from .errors import (
    AdapterError,
    DumpFormatError,
    DumpValidationError,
    EngineError,
    MergeError,
    MoeRecordError,
    RecorderError,
    SchemaVersionError,
)

if TYPE_CHECKING:
    from .client import AsyncFleet, Fleet
    from .merge import merge_distributed, merge_dumps
    from .plugins import AdapterRegistry, hookimpl
    from .recorder import Recorder, Status
    from .schema import Dump, EngineInfo, ModelInfo, Record, Topology, Window, load_dump, save_dump, validate_dump

# public name -> the submodule that defines it
_LAZY = {
    "AsyncFleet": "client",
    "Fleet": "client",
    "merge_distributed": "merge",
    "merge_dumps": "merge",
    "AdapterRegistry": "plugins",
    "hookimpl": "plugins",
    "Recorder": "recorder",
    "Status": "recorder",
    **dict.fromkeys(
        ["Dump", "EngineInfo", "ModelInfo", "Record", "Topology", "Window", "load_dump", "save_dump", "validate_dump"],
        "schema",
    ),
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

__all__ = [
    "AdapterError",
    "AdapterRegistry",
    "AsyncFleet",
    "Dump",
    "DumpFormatError",
    "DumpValidationError",
    "EngineError",
    "EngineInfo",
    "Fleet",
    "MergeError",
    "ModelInfo",
    "MoeRecordError",
    "Record",
    "Recorder",
    "RecorderError",
    "SchemaVersionError",
    "Status",
    "Topology",
    "Window",
    "__version__",
    "hookimpl",
    "load_dump",
    "merge_distributed",
    "merge_dumps",
    "save_dump",
    "validate_dump",
]
