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
from .recorder import Recorder, Status
from .schema import Dump, EngineInfo, ModelInfo, Record, Topology, Window, load_dump, save_dump, validate_dump

__all__ = [
    "AdapterError",
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
    "load_dump",
    "save_dump",
    "validate_dump",
]
