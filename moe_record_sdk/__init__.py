"""moe-record-sdk: exact, sync-free expert-load recording for MoE inference engines."""

from ._version import __version__
from .client import AsyncFleet, Fleet
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
from .merge import merge_distributed, merge_dumps
from .plugins import AdapterRegistry, hookimpl
from .recorder import Recorder, Status
from .schema import Dump, EngineInfo, ModelInfo, Record, Topology, Window, load_dump, save_dump, validate_dump

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
