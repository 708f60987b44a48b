"""The versioned dump schema, its codecs and its validation.

The constants load at once; the rest (torch) on first use, see ``moe_record_sdk._lazy``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names
from .names import FORMATS, MODES, SCHEMA_VERSION

if TYPE_CHECKING:
    from .dump import Dump, DumpV1, EngineInfo, ModelInfo, Record, Topology, Window
    from .io import decode, detect_format, encode, load_dump, save_dump
    from .sglang import sglang_file_name
    from .validate import validate_dump

__getattr__, __dir__ = lazy_names(
    __name__,
    {
        **dict.fromkeys(["Dump", "DumpV1", "EngineInfo", "ModelInfo", "Record", "Topology", "Window"], "dump"),
        **dict.fromkeys(["decode", "detect_format", "encode", "load_dump", "save_dump"], "io"),
        "sglang_file_name": "sglang",
        "validate_dump": "validate",
    },
    globals(),
)

__all__ = [
    "FORMATS",
    "MODES",
    "SCHEMA_VERSION",
    "Dump",
    "DumpV1",
    "EngineInfo",
    "ModelInfo",
    "Record",
    "Topology",
    "Window",
    "decode",
    "detect_format",
    "encode",
    "load_dump",
    "save_dump",
    "sglang_file_name",
    "validate_dump",
]
