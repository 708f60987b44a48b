"""The versioned dump schema, its codecs and its validation."""

from .dump import MODES, SCHEMA_VERSION, Dump, DumpV1, EngineInfo, ModelInfo, Record, Topology, Window
from .io import FORMATS, decode, detect_format, encode, load_dump, save_dump
from .sglang import sglang_file_name
from .validate import validate_dump

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
