"""moe-record-sdk: exact, sync-free expert-load recording for MoE inference engines.

The public names load on first use (PEP 562), so that ``import moe_record_sdk`` and the
``moe-record`` command's ``--help`` do not pay for torch and httpx until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


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
