"""A small reader for the safetensors format, so converting needs no extra package.

Format (https://github.com/huggingface/safetensors, "Format"): an unsigned little-endian
64-bit header length, a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}``
(optionally ``"__metadata__"``), then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import struct

import torch

from ..errors import DumpFormatError
from ..schema.io import check_regular_file

_DTYPES = {
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, on the CPU."""
    check_regular_file(path)  # a FIFO would block the open, a device never end
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise DumpFormatError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise DumpFormatError(f"{path}: safetensors header length {n} exceeds the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError; nested too deep
        raise DumpFormatError(f"{path}: safetensors header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise DumpFormatError(f"{path}: safetensors header is not an object")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = info["shape"]
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError("shape: a list of non-negative integers")
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise DumpFormatError(f"{path}: tensor {name!r}: unsupported or malformed entry {info!r}") from None
        count = 1
        for s in shape:
            count *= s
        if not 0 <= begin <= end <= len(body) or end - begin != count * dtype.itemsize:
            raise DumpFormatError(
                f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not match its shape and dtype"
            )
        raw = bytes(body[begin:end])
        t = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(shape).clone()
    return out
