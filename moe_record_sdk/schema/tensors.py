"""Tensors on the wire: dtype + shape + raw little-endian bytes, checked before allocating."""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
import torch

from ..errors import DumpFormatError

#: dtypes a dump may carry, by wire name. Counts and ids are integers; nothing else is needed.
WIRE_DTYPES: dict[str, torch.dtype] = {
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "bool": torch.bool,
    "float32": torch.float32,
    "float64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in WIRE_DTYPES.items()}

_INT32_MIN, _INT32_MAX = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max

#: a tensor built from a sparse source (a converter's dense counts from a few lines) may not
#: exceed this many elements (4 GiB of int64): a small file must not decide how much is allocated.
#: A decoded tensor is bounded by its own bytes instead (on the wire, or a ``.pt``'s storage).
MAX_ELEMENTS = 1 << 29
#: an empty tensor carries no data but may name huge axes, which sums and per-layer lists over
#: it would allocate: its axes (zero-length ones counted as 1) may not span more than this.
MAX_EMPTY_SPAN = 1 << 20


def check_shape(shape: list[int], path: str) -> int:
    """The element count of ``shape``; an empty tensor whose axes span too much is refused.

    No element limit here: the bytes that back a decoded tensor are already in memory (checked
    against the shape by the caller), so a large tensor is a large file, not a hostile shape. A
    limit here made merges of 36 ranks' 1000-pass rings ([36000, 61, 256]) unreadable by the same
    SDK that wrote them."""
    numel = math.prod(shape)
    if numel == 0 and math.prod(max(s, 1) for s in shape) > MAX_EMPTY_SPAN:
        raise DumpFormatError(f"{path}.shape: {shape} is empty but spans more than {MAX_EMPTY_SPAN} elements")
    return numel


def tensor_to_wire(t: torch.Tensor) -> dict[str, Any]:
    """Encode a tensor as ``{"dtype", "shape", "data"}`` with little-endian bytes."""
    name = _NAMES.get(t.dtype)
    if name is None:
        raise DumpFormatError(f"cannot encode a tensor of dtype {t.dtype}")
    t = t.detach().to("cpu")
    if t.dtype == torch.int64:
        # Counts nearly always fit int32: half the bytes to write, send and read. Readers get
        # int32 rows back and int64 for every other field (DumpV1.__post_init__); values are
        # equal, and an int32 and an int64 tensor of the same values encode alike.
        lo, hi = torch.aminmax(t) if t.numel() else (0, 0)  # one pass over the data, not two
        if int(lo) >= _INT32_MIN and int(hi) <= _INT32_MAX:
            t, name = t.to(torch.int32), "int32"
    # torch runs on little-endian hosts only, so native order is the wire order; a memoryview
    # lets msgspec copy the bytes once, straight into its output.
    data = memoryview(t.contiguous().reshape(-1).numpy()).cast("B")
    return {"dtype": name, "shape": list(t.shape), "data": data}


def tensor_from_wire(obj: Any, path: str = "$") -> torch.Tensor:
    """Decode ``{"dtype", "shape", "data"}``; ``data`` is bytes (msgpack) or base64 text (JSON).
    Other keys are ignored, as unknown fields are everywhere in v1 (a later v1 writer may add some)."""
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= set(obj):
        raise DumpFormatError(f"{path}: expected a tensor object with keys dtype, shape, data")
    dtype = WIRE_DTYPES.get(obj["dtype"]) if isinstance(obj["dtype"], str) else None
    if dtype is None:
        raise DumpFormatError(f"{path}.dtype: unknown tensor dtype {obj['dtype']!r}")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise DumpFormatError(f"{path}.shape: expected a list of non-negative integers, got {shape!r}")
    numel = check_shape(shape, path)
    data = obj["data"]
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError as e:
            raise DumpFormatError(f"{path}.data: not valid base64 ({e})") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DumpFormatError(f"{path}.data: expected bytes")
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise DumpFormatError(
            f"{path}.data: {len(data)} bytes, but dtype {obj['dtype']} and shape {shape} need {numel * itemsize}"
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # One copy, into memory the tensor owns (``data`` may be read-only): numpy's copy of a large
    # buffer runs ~3x faster here than bytearray's or torch's, whose fresh pages fault one by one.
    array = np.frombuffer(data, dtype=torch.empty((), dtype=dtype).numpy().dtype).copy()
    return torch.from_numpy(array).reshape(shape)
