"""Hostile dump files for the fuzz campaign: mutations of the golden fixtures and crafted attacks.

Every generator takes a ``random.Random`` and returns ``(kind, data, suffix)``: ``kind`` names the
mutation (for the report), ``data`` the file's bytes, ``suffix`` the name it is saved under.
"""

from __future__ import annotations

import base64
import functools
import io
import math
import os
import pickle
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import torch

FIXTURES = Path(__file__).resolve().parents[2] / "spec" / "fixtures"

Case = tuple[str, bytes, str]

# -- seeds: our golden fixtures and SGLang's own layouts ----------------------------------------


def _pt(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def sglang_objects() -> dict[str, Any]:
    """SGLang 0.5.23's own dicts (no metadata key), as its accumulators save them."""
    g = torch.Generator().manual_seed(3)
    mapping = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 3, 2]])
    records = [
        {
            "forward_pass_id": p,
            "rank": 1,
            "gatherer_key": "primary",
            "global_physical_count": torch.randint(0, 9, (2, 6), generator=g, dtype=torch.int32),
        }
        for p in range(3)
    ]
    token_records = [
        dict(
            r,
            topk_ids_of_layer=torch.randint(-1, 6, (2, 4, 8), generator=g, dtype=torch.int32),
            input_ids=[1, 2, 3, 4],
            positions=torch.arange(4),
        )
        for r in records
    ]
    return {
        "sglang-stat.pt": {
            "rank": 0,
            "logical_count": torch.randint(0, 50, (5, 4, 8), generator=g, dtype=torch.int32),
            "average_utilization_rate_over_window": 0.5,
        },
        "sglang-per_pass.pt": {"records": records, "last_physical_to_logical_map": mapping},
        "sglang-per_token.pt": {"records": token_records, "last_physical_to_logical_map": mapping},
    }


@functools.cache
def seeds() -> dict[str, bytes]:
    """Every golden file by name: ours from ``spec/fixtures``, SGLang's built here."""
    files = sorted(p for p in FIXTURES.rglob("*") if p.suffix in (".pt", ".msgpack", ".json", ".csv"))
    out = {str(p.relative_to(FIXTURES)): p.read_bytes() for p in files}
    for name, obj in sglang_objects().items():
        out[name] = _pt(obj)
    out["sglang-stat-legacy-pickle.pt"] = _pt(sglang_objects()["sglang-stat.pt"], legacy=True)
    out["expert_distribution_rank0_timestamp1700000000.csv"] = b"layer_id,expert_id,count\n0,1,5\n0,3,2\n2,7,9\n"
    return out


def suffix_of(name: str) -> str:
    return os.path.splitext(name)[1]


# -- hostile values ---------------------------------------------------------------------------

HOSTILE_INTS = [-1, 0, 1, 2**31 - 1, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, -(2**63)]


def hostile_scalar(rng: random.Random, json: bool = False) -> Any:
    choices: list[Any] = [
        *HOSTILE_INTS,
        None,
        True,
        1.5,
        -0.0,
        "",
        "x" * rng.choice([1, 100, 10_000]),
        "\udcff" if not json else "\u0000",
        b"\x00\xff" if not json else "AAAA",
        [],
        {},
        _nested(rng.choice([10, 200, 5_000])),
    ]
    if json:
        choices += [10**30, -(10**30), 1e308]
    return rng.choice(choices)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def hostile_wire_tensor(rng: random.Random, json: bool = False) -> dict[str, Any]:
    """A ``{dtype, shape, data}`` object whose parts lie in some way."""
    dtype = rng.choice(
        ["int64", "int32", "int8", "uint8", "bool", "float32", "float64", "float16", "complex64", "", "object", 7]
    )
    shape = rng.choice(
        [
            [],
            [0],
            [3, 2],
            [1, 2, 8],
            [-1, 2, 8],
            [2**40],
            [1, 2**40, 0],
            [0, 2**31, 2**31],
            [2**20, 2**20, 2**20],
            [True, 2, 8],
            [1.0, 2, 8],
            ["1", 2, 8],
            None,
            5,
        ]
    )
    itemsize = (
        {"int64": 8, "int32": 4, "float64": 8, "float32": 4, "float16": 2}.get(dtype, 1)
        if isinstance(dtype, str)
        else 1
    )
    numel = math.prod(s for s in shape if isinstance(s, int)) if isinstance(shape, list) else 1
    size = min(numel * itemsize, 4096) + rng.choice([0, 0, 0, -1, 1, 7])
    data: Any = os.urandom(max(size, 0))
    if json:
        data = base64.b64encode(data).decode() if rng.random() < 0.9 else "!!not base64!!"
    return {"dtype": dtype, "shape": shape, "data": data} if rng.random() < 0.9 else {"dtype": dtype, "shape": shape}


def hostile_tensor(rng: random.Random) -> Any:
    """A tensor that lies: wrong dtype, wrong rank, a huge view over a tiny storage, negative counts."""
    base = torch.randint(0, 9, (2, 4, 8), dtype=torch.int32)
    pick = rng.randrange(12)
    if pick == 0:
        return base.to(
            rng.choice([torch.float32, torch.float64, torch.bool, torch.complex64, torch.float16, torch.uint8])
        )
    if pick == 1:
        return base.reshape(rng.choice([(64,), (8, 8), (1, 2, 4, 8)]))
    if pick == 2:  # a stride-0 view: 2**31 elements over 4 bytes of storage
        return torch.zeros(1, 1, 1, dtype=torch.int32).expand(1, 2**16, 2**15)
    if pick == 3:  # overlapping strides: 2**30 elements over 2**16 of storage
        return torch.zeros(2**16, dtype=torch.int64).as_strided((1, 2**15, 2**15), (0, 1, 1))
    if pick == 4:
        return torch.zeros(0, 2**30, 2**30, dtype=torch.int32)
    if pick == 5:
        return torch.zeros(1, 2**22, 0, dtype=torch.int32)
    if pick == 6:
        return -base
    if pick == 7:
        return base.to(torch.int64) * (2**60)
    if pick == 8:
        return base.transpose(0, 2)
    if pick == 9:
        return torch.zeros(2, 10**6, 1, dtype=torch.int8)[:, ::3]  # a strided slice of a larger storage
    if pick == 10:
        return torch.tensor(2**62)
    return torch.full((2, 4, 8), 2**31 - 1, dtype=torch.int64)


# -- structure-aware mutation -------------------------------------------------------------------


def _paths(obj: Any, prefix: tuple = (), out: list | None = None, limit: int = 400) -> list[tuple]:
    """Paths to every node of a nested dict/list (tensors and wire tensors are leaves)."""
    out = [] if out is None else out
    if len(out) >= limit:
        return out
    out.append(prefix)
    if isinstance(obj, dict) and set(obj) != {"dtype", "shape", "data"}:
        for k, v in obj.items():
            _paths(v, (*prefix, k), out, limit)
    elif isinstance(obj, list) and len(obj) < 50:
        for i, v in enumerate(obj):
            _paths(v, (*prefix, i), out, limit)
    return out


def _set(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


def _delete(obj: Any, path: tuple) -> Any:
    if not path:
        return obj
    node = obj
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return obj


def mutate_tree(obj: Any, rng: random.Random, value: Callable[[random.Random], Any]) -> tuple[str, Any]:
    """Replace, delete or duplicate one random node of ``obj`` (modified in place)."""
    path = rng.choice(_paths(obj))
    op = rng.choice(["replace", "replace", "replace", "delete", "wrap"])
    if op == "delete" and path:
        return "tree-delete", _delete(obj, path)
    if op == "wrap":
        node = obj
        for key in path:
            node = node[key]
        return "tree-wrap", _set(obj, path, [node, node] if rng.random() < 0.5 else {"x": node})
    return "tree-replace", _set(obj, path, value(rng))


# -- byte-level mutation ------------------------------------------------------------------------


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    buf = bytearray(data)
    op = rng.choice(["truncate", "bitflip", "bitflip", "bytes", "insert", "delete", "duplicate"])
    n = len(buf)
    if op == "truncate":
        return op, bytes(buf[: rng.randrange(n)])
    if op == "bitflip":
        for _ in range(rng.choice([1, 1, 2, 4, 16])):
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        return op, bytes(buf)
    if op == "bytes":
        for _ in range(rng.choice([1, 2, 8])):
            buf[rng.randrange(n)] = rng.choice([0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE])
        return op, bytes(buf)
    i = rng.randrange(n)
    if op == "insert":
        return op, bytes(buf[:i] + os.urandom(rng.choice([1, 4, 64])) + buf[i:])
    j = min(n, i + rng.choice([1, 8, 64, 512]))
    if op == "delete":
        return op, bytes(buf[:i] + buf[j:])
    return op, bytes(buf[:j] + buf[i:j] * rng.choice([2, 16]) + buf[j:])


def rezip(data: bytes, mutate: Callable[[str, bytes], bytes | None]) -> bytes:
    """Rewrite a torch zip with some entries changed, with valid CRCs so torch parses the inside."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            body = mutate(info.filename, zin.read(info.filename))
            if body is not None:
                zout.writestr(info, body)
    return out.getvalue()


def mutate_zip_entry(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    target = rng.choice(names)
    op = "zip-drop-entry" if rng.random() < 0.1 else "zip-entry"
    kind = [f"{op}:{target.split('/', 1)[-1].split('/')[0]}"]

    def change(name: str, body: bytes) -> bytes | None:
        if name != target:
            return body
        if op == "zip-drop-entry":
            return None
        sub, new = mutate_bytes(body, rng) if body else ("empty", b"")
        kind.append(sub)
        return new

    return ":".join(kind), rezip(data, change)


# -- the mutators over one seed ---------------------------------------------------------------


def mutate_seed(name: str, data: bytes, rng: random.Random) -> Case:
    """One mutation of a golden file, chosen by its format."""
    suffix = suffix_of(name)
    roll = rng.random()
    if suffix == ".pt" and data[:2] == b"PK":
        if roll < 0.35:
            kind, out = mutate_zip_entry(data, rng)
            return kind, out, suffix
        if roll < 0.7:
            obj = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            kind, obj = mutate_tree(obj, rng, lambda r: hostile_tensor(r) if r.random() < 0.5 else hostile_scalar(r))
            try:
                return f"pt-{kind}", _pt(obj), suffix
            except (RecursionError, pickle.PicklingError, TypeError):
                pass  # a value torch.save cannot write: fall through to a byte mutation
    elif suffix in (".msgpack", ".json"):
        fmt = msgspec.json if suffix == ".json" else msgspec.msgpack
        if roll < 0.6:
            obj = fmt.decode(data)
            json = suffix == ".json"
            kind, obj = mutate_tree(
                obj, rng, lambda r: hostile_wire_tensor(r, json) if r.random() < 0.4 else hostile_scalar(r, json)
            )
            try:
                return f"{suffix[1:]}-{kind}", fmt.encode(obj), suffix
            except (OverflowError, TypeError, ValueError, RecursionError, msgspec.EncodeError):
                pass  # a value this format cannot carry: fall through to a byte mutation
    elif suffix == ".csv" and roll < 0.5:
        line = rng.choice(
            [
                b"0,1,5",
                b"-1,2,3",
                b"99999999999999999999999999,0,1",
                b"16777216,0,1",
                b"4095,4095,1",
                b"1,2",
                b"a,b,c",
                b"1,2,3,4",
                b"\xff\xfe,\x00,1",
                b"1e3,2,3",
                b" 1 , 2 , 3 ",
                b"0,0," + b"9" * 5000,
            ]
        )
        lines = data.splitlines()
        lines.insert(rng.randrange(1, len(lines) + 1), line)
        return "csv-line", b"\n".join(lines * rng.choice([1, 1, 200])), suffix
    kind, out = mutate_bytes(data, rng)
    return f"bytes-{kind}", out, suffix


# -- crafted attacks ----------------------------------------------------------------------------


class _Evil:
    """Pickles as a call to a global that ``weights_only`` must refuse."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return self.func, self.args


def _replace_pickle(pt: bytes, payload: bytes) -> bytes:
    return rezip(pt, lambda name, body: payload if name.endswith("data.pkl") else body)


def _deep_pickle(depth: int) -> bytes:
    # EMPTY_LIST + (MARK ... APPENDS) nesting without recursion in the writer.
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def _legacy_declaring(numel: int) -> bytes:
    """A legacy (non-zip) torch pickle whose storage and tensor declare ``numel`` elements
    while the file holds 70,000."""
    data = _pt({"logical_count": torch.zeros(70_000, dtype=torch.int32).reshape(1, 70_000, 1)}, legacy=True)
    return data.replace(b"J" + struct.pack("<i", 70_000), b"J" + struct.pack("<i", numel))


def crafted(small: bool = True) -> list[Case]:
    """Attacks aimed at each defence; each one a case."""
    import os as _os  # noqa: F401  (the globals below are named, never called)
    import subprocess

    stat = seeds()["ours/stat.pt"]
    cases: list[Case] = []
    for func, args in [
        (eval, ("__import__('os').getpid()",)),
        (_os.system, ("true",)),
        (subprocess.Popen, (["true"],)),
        (pickle.loads, (b"\x80\x04N.",)),  # a pickle nested in a pickle
        (torch.load, ("/etc/passwd",)),
        (getattr, ("text", "upper")),
        (open, ("/etc/hostname",)),
    ]:
        payload = pickle.dumps(_Evil(func, *args), protocol=2)
        cases.append((f"pickle-global:{getattr(func, '__name__', func)}", _replace_pickle(stat, payload), ".pt"))
        cases.append((f"pickle-global-legacy:{getattr(func, '__name__', func)}", payload, ".pt"))
    nested = pickle.dumps({"logical_count": pickle.dumps(_Evil(eval, "1")), "rank": 0}, protocol=2)
    cases.append(("pickle-nested-bytes", _replace_pickle(stat, nested), ".pt"))
    for depth in (1_000, 100_000):
        cases.append((f"pickle-deep:{depth}", _replace_pickle(stat, _deep_pickle(depth)), ".pt"))
    cases.append(("pickle-huge-list", _replace_pickle(stat, b"\x80\x02(" + b"K\x01" * 200_000 + b"l."), ".pt"))
    cases.append(("pt-nested-pt", _pt({"logical_count": stat, "records": [stat]}), ".pt"))
    for numel in (2**26, 2**31 - 1):
        cases.append((f"legacy-declares:{numel}", _legacy_declaring(numel), ".pt"))
    # A data entry that declares far more than its pickle says (torch checks these itself).
    cases.append(("zip-size-mismatch", rezip(stat, lambda n, b: b * 1000 if "/data/" in n else b), ".pt"))
    for shape in ([1, 2**40, 0], [0, 2**31, 2**31], [2**20, 2**20, 2**20], [1, 2**20, 1]):
        tree = msgspec.msgpack.decode(seeds()["ours/stat-ring.msgpack"])
        tree["logical_count"] = {"dtype": "int64", "shape": shape, "data": b""}
        tree["model"].update(num_layers=shape[1], num_logical_experts=shape[2], moe_layer_ids=[])
        cases.append((f"msgpack-declares:{shape}", msgspec.msgpack.encode(tree), ".msgpack"))
        cases.append((f"json-declares:{shape}", msgspec.json.encode(_b64(tree)), ".json"))
    cases += [
        ("msgpack-array32-len", b"\xdd\xff\xff\xff\xff" + b"\x00" * 16, ".msgpack"),
        ("msgpack-map32-len", b"\xdf\xff\xff\xff\xff" + b"\x00" * 16, ".msgpack"),
        ("msgpack-bin32-len", b"\x81\xa1x\xc6\xff\xff\xff\xff", ".msgpack"),
        ("msgpack-deep", b"\x82\xaeschema_version\x01\xa1x" + b"\x91" * 100_000 + b"\x90", ".msgpack"),
        ("json-deep", b'{"schema_version":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", ".json"),
        ("json-deep-unclosed", b'{"schema_version":1,"x":' + b"[" * 1_000_000, ".json"),
        ("json-bigint", b'{"schema_version":' + b"9" * 100_000 + b"}", ".json"),
        ("json-nan", b'{"schema_version":NaN}', ".json"),
        ("empty", b"", ".msgpack"),
        ("csv-huge-ids", b"layer_id,expert_id,count\n16777215,0,1\n", ".csv"),
        ("csv-square", b"layer_id,expert_id,count\n4095,4095,1\n", ".csv"),
        ("csv-not-utf8", b"layer_id,expert_id,count\n\xff\xfe\xfd,1,2\n", ".csv"),
        ("csv-nul", b"layer_id,expert_id,count\n0,\x00,1\n", ".csv"),
        ("csv-many-rows", b"layer_id,expert_id,count\n" + b"0,1,1\n" * 100_000, ".csv"),
    ]
    return cases


def _b64(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _b64(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_b64(v) for v in tree]
    if isinstance(tree, bytes):
        return base64.b64encode(tree).decode()
    return tree


def zip_bomb(nbytes: int) -> bytes:
    """A .pt whose one tensor really holds ``nbytes`` of zeros, deflated to about nbytes/1000.

    Everything is consistent (pickle, sizes, CRC): only the expansion betrays it. Build it in a
    process whose memory does not matter: this needs about ``2 * nbytes``.
    """
    count = torch.zeros(1, 1 << 10, nbytes // 4 >> 10, dtype=torch.int32)
    plain = _pt({"rank": 0, "logical_count": count})
    del count
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(plain)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            method = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            zout.writestr(info.filename, zin.read(info.filename), compress_type=method)
    return out.getvalue()


if __name__ == "__main__":  # python -m tests.reliability.hostile zip-bomb OUT NBYTES
    import sys

    assert sys.argv[1] == "zip-bomb"
    Path(sys.argv[2]).write_bytes(zip_bomb(int(sys.argv[3])))
