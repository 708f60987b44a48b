"""SGLang's on-disk formats: ``.pt`` dicts (stat, per_pass, per_token) and 0.4.5's legacy CSV.

Layouts follow sglang 0.5.23 ``srt/eplb/expert_distribution.py``:

* stat (rank 0 only): ``expert_distribution_recorder_{time}.pt`` =
  ``{rank, logical_count: int32 [B, L, E], average_utilization_rate_over_window}``
* per_pass / per_token (every rank): ``expert_distribution_recorder_{time}_{rank}.pt`` =
  ``{records: [{forward_pass_id, rank, gatherer_key, global_physical_count: int32 [L, P], ...}],
  last_physical_to_logical_map: int64 [L, P]}``
* legacy CSV (0.4.5): ``expert_distribution_rank{r}_timestamp{t}.csv``, ``layer_id,expert_id,count``

We write exactly those keys plus our metadata under the one extra key ``moe_record``; every
value is a tensor, number, string, list or dict, so SGLang's ``torch.load(weights_only=True)``
opens our files. We read SGLang's own files (CUDA tensors included) and upgrade them.
"""

from __future__ import annotations

import csv
import io
import os
import re
import time
import zipfile
from typing import Any, BinaryIO

import msgspec
import torch
from packaging.version import Version

from ..errors import DumpFormatError
from .dump import Dump, EngineInfo, ModelInfo, Record, Topology, Window
from .names import SCHEMA_VERSION
from .tensors import MAX_EMPTY_SPAN, check_shape

META_KEY = "moe_record"
INT32_MAX = torch.iinfo(torch.int32).max
INT64_MAX = torch.iinfo(torch.int64).max
#: SGLang's own files do not name their layers; lists over the L axis are refused past this.
MAX_LAYERS = 1 << 16
#: torch.save stores zip entries uncompressed; compressed ones may expand by this much in total.
ZIP_INFLATE_ALLOWANCE = 1 << 20
# torch.load(weights_only=True) is a safe boundary from torch 2.10 on: before 2.6 a file could run
# code (CVE-2025-32434), before 2.10 corrupt memory (CVE-2026-24747). pyproject asks for 2.10;
# an older torch installed past it is refused here rather than trusted.
SAFE_LOAD_TORCH = (2, 10)

_CSV_NAME = re.compile(r"expert_distribution_rank(\d+)_timestamp[\d.]+\.csv$")
#: The names SGLang gives its dumps (``.pt``: stat without a rank, per_pass/per_token with one; our
#: adapter's too), and its legacy ``.csv``: what a folder of them holds.
SGLANG_DUMP_NAME = re.compile(r"expert_distribution_recorder_[\d.]+(_\d+)?\.pt$|" + _CSV_NAME.pattern)


#: The keys a placement file holds its [L, P] map under: SGLang's ``--init-expert-location`` file
#: (``eplb --sglang-out``), and ``eplb --plan-out``'s plan. Readers of dumps name such a file.
PLACEMENT_KEYS = ("physical_to_logical_map", "phy2log")


def check_init_expert_location_name(path: str | os.PathLike[str]) -> None:
    """Refuse a torch file name SGLang's ``--init-expert-location`` would not read as one: it picks
    its reader by the suffix (``.pt``: ``torch.load``; ``.json``: a JSON file; else: the text
    itself as JSON), so such a file would only fail at the engine's start."""
    if not os.fspath(path).endswith(".pt") and not os.path.isdir(path):  # a folder: the write says so
        raise DumpFormatError(
            f"{os.fspath(path)}: SGLang's --init-expert-location reads a torch file only when its name ends "
            "in .pt (.json as JSON, any other name as inline JSON text): name it *.pt"
        )


def sglang_file_name(dump: Dump, now: float | None = None, *, per_rank: bool | None = None) -> str:
    """SGLang's file name for this dump: stat files have no rank suffix (rank 0 writes them).

    ``per_rank=True`` names a stat file by rank too, for engines where every rank writes its own.
    """
    stamp = time.time() if now is None else now
    with_rank = dump.window.mode != "stat" if per_rank is None else per_rank
    if not with_rank:
        return f"expert_distribution_recorder_{stamp}.pt"
    return f"expert_distribution_recorder_{stamp}_{dump.topology.rank}.pt"


def sglang_counts(t: torch.Tensor) -> torch.Tensor:
    """Counts at SGLang's width, int32, unless one exceeds it: then int64, which SGLang's readers,
    its EPLB and ``--init-expert-location`` take as well (a long window's cumulative row can pass
    2**31 on a hot expert; refusing it would lose the window)."""
    if t.dtype == torch.int32:
        return t  # already SGLang's width (a recorder's ring): no scan, no copy
    if t.numel() and int(t.max()) > INT32_MAX:
        return t.to(torch.int64)
    return t.to(torch.int32)


def _identity_map(num_layers: int, num_experts: int) -> torch.Tensor:
    return torch.arange(num_experts, dtype=torch.int64).expand(num_layers, num_experts).clone()


def to_sglang_dict(dump: Dump) -> dict[str, Any]:
    """The dict SGLang would have saved for this dump, plus our metadata under ``moe_record``."""
    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "engine": msgspec.to_builtins(dump.engine),
        "model": msgspec.to_builtins(dump.model),
        "topology": msgspec.to_builtins(dump.topology),
        "window": msgspec.to_builtins(dump.window),
        "average_utilization_rate_over_window": dump.average_utilization_rate_over_window,
        "total_logical_count": dump.total_logical_count,
        # Per-pass files hold the physical rows once, as the records' global_physical_count.
        "physical_count": dump.physical_count if dump.window.mode == "stat" else None,
        "physical_to_logical_map": dump.physical_to_logical_map,
    }
    if dump.window.mode == "stat":
        return {
            "rank": dump.topology.rank,
            "logical_count": sglang_counts(dump.logical_count),
            "average_utilization_rate_over_window": dump.average_utilization_rate_over_window,
            META_KEY: meta,
        }
    L, E = dump.logical_count.shape[1:]
    phys = dump.physical_count if dump.physical_count is not None else dump.logical_count
    mapping = dump.physical_to_logical_map
    records = []
    for row, rec in enumerate(dump.records):
        out: dict[str, Any] = {
            "forward_pass_id": rec.forward_pass_id,
            "rank": rec.rank,
            "gatherer_key": rec.gatherer_key,
            "global_physical_count": sglang_counts(phys[row]),
        }
        if rec.topk_ids_of_layer is not None:
            out["topk_ids_of_layer"] = rec.topk_ids_of_layer.to(torch.int32)
        if rec.input_ids is not None:
            out["input_ids"] = list(rec.input_ids)
        if rec.positions is not None:
            out["positions"] = list(rec.positions)
        records.append(out)
    return {
        "records": records,
        "last_physical_to_logical_map": mapping if mapping is not None else _identity_map(L, E),
        META_KEY: meta,
    }


def _logical_from_physical(physical: torch.Tensor, mapping: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Sum per-pass physical slots [B, L, P] into logical experts [B, L, E] through ``mapping``
    [L, P], in int64; int32 rows stay int32 (a pass's count is bounded by its tokens x top_k)."""
    index = mapping.to(torch.int64).expand_as(physical)
    out = torch.zeros(*physical.shape[:-1], num_experts, dtype=torch.int64)
    return out.scatter_add_(-1, index, physical.to(torch.int64)).to(physical.dtype)


def _check_tensor(value: Any, field: str, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise DumpFormatError(f"{field}: expected a tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise DumpFormatError(f"{field}: expected {ndim} dimensions, got shape {list(value.shape)}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise DumpFormatError(f"{field}: counts must be integers, got dtype {value.dtype}")
    return value.to("cpu")


def _meta_structs(meta: Any) -> dict[str, Any]:
    """Our metadata back into Structs; the version is checked by the caller."""
    try:
        return {
            "engine": msgspec.convert(meta["engine"], EngineInfo),
            "model": msgspec.convert(meta["model"], ModelInfo),
            "topology": msgspec.convert(meta["topology"], Topology),
            "window": msgspec.convert(meta["window"], Window),
        }
    except (KeyError, TypeError, msgspec.ValidationError, UnicodeEncodeError) as e:  # the last: a str no UTF-8 holds
        raise DumpFormatError(f"{META_KEY}: metadata is not schema v{SCHEMA_VERSION}: {e}") from None


def from_sglang_dict(obj: Any, source: str = "<dict>") -> Dump:
    """Read a dict loaded from an SGLang ``.pt`` (theirs or ours) into a Dump."""
    try:
        return _from_sglang_dict(obj, source)
    except DumpFormatError as e:
        if str(e).startswith(f"{source}: "):
            raise
        raise type(e)(f"{source}: {e}") from None  # the field checks below do not know the file


def _from_sglang_dict(obj: Any, source: str) -> Dump:
    from .io import check_version

    if not isinstance(obj, dict):
        what = f"{type(obj).__name__}"
        if isinstance(obj, torch.Tensor):  # eplb --weight-out, convert --to tensor
            what += f" {list(obj.shape)}: a bare count tensor has no metadata to be a dump"
        raise DumpFormatError(f"{source}: expected a dict at the top of the .pt, got {what}")
    meta = obj.get(META_KEY)
    if meta is not None:
        if not isinstance(meta, dict):
            raise DumpFormatError(f"{source}: {META_KEY}: expected a dict")
        check_version(meta.get("schema_version"), source)
    if "logical_count" in obj:
        count = _counts(obj["logical_count"], "logical_count", 3)
        util = _util(obj.get("average_utilization_rate_over_window"))
        if meta is not None:
            parts = _meta_structs(meta)
            return Dump(
                **parts,
                logical_count=count,
                total_logical_count=_opt(meta, "total_logical_count", 2),
                physical_count=_opt(meta, "physical_count", 3),
                physical_to_logical_map=_opt(meta, "physical_to_logical_map", 2),
                average_utilization_rate_over_window=util,
            )
        B, L, E = count.shape
        return Dump(
            engine=EngineInfo(name="sglang"),
            model=ModelInfo(num_layers=L, moe_layer_ids=_observed_layers(count), num_logical_experts=E, top_k=None),
            topology=_sglang_topology(_rank(obj.get("rank", 0), "rank", source)),
            window=Window(mode="stat", buffer_size=B),
            logical_count=count,
            average_utilization_rate_over_window=util,
        )
    if "records" in obj:
        return _from_records(obj, meta, source)
    if any(key in obj for key in PLACEMENT_KEYS):
        raise DumpFormatError(
            f"{source}: an expert placement, not a dump (no 'logical_count' nor 'records'): summary takes it as "
            "--placement, SGLang as --init-expert-location"
        )
    raise DumpFormatError(f"{source}: neither 'logical_count' nor 'records': not an SGLang expert-distribution dump")


def _counts(value: Any, field: str, ndim: int) -> torch.Tensor:
    """An integer tensor on the CPU: int32 and int64 as stored (``Dump`` decides which fields
    keep int32: the per-pass rows), any other integer width as int64."""
    t = _check_tensor(value, field, ndim)
    return t if t.dtype in (torch.int32, torch.int64) else t.to(torch.int64)


def _opt(meta: dict[str, Any], key: str, ndim: int) -> torch.Tensor | None:
    value = meta.get(key)
    return None if value is None else _counts(value, f"{META_KEY}.{key}", ndim)


def _rank(value: object, field: str, source: str) -> int:
    """A rank as SGLang writes it (an int, or a 0-d integer tensor); anything else is refused by
    name rather than read as rank 0."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        got = repr(value) if isinstance(value, (int, float, str)) and len(repr(value)) < 40 else type(value).__name__
        raise DumpFormatError(f"{source}: {field}: expected a rank (an integer >= 0), got {got}")
    return value


def _sglang_topology(rank: object) -> Topology:
    """SGLang's files name only their rank; each rank counted its own tokens (their reader sums
    ranks), so each is its own token shard. Sizes are lower bounds (``merge_dumps`` completes
    them over the files given together); the expert-parallel layout is unknown (size 1)."""
    r = rank if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0 else 0
    return Topology(rank=r, world_size=r + 1, token_shard=r, num_token_shards=r + 1)


def is_sglang_file(dump: Dump) -> bool:
    """Whether ``dump`` was read from SGLang's own files (whose topology is only a lower bound):
    every dump our recorders make names the SDK version that made it."""
    return dump.engine.name == "sglang" and dump.engine.sdk_version is None


def _observed_layers(count: torch.Tensor) -> list[int]:
    """For SGLang's own files, which do not say: layers with any count (all, if none has)."""
    if count.shape[1] > MAX_LAYERS:
        raise DumpFormatError(f"logical_count: {count.shape[1]} layers, over the limit of {MAX_LAYERS}")
    seen = (count.sum(dim=(0, 2)) > 0).nonzero().flatten().tolist()
    return seen or list(range(count.shape[1]))


def _from_records(obj: dict[str, Any], meta: Any, source: str) -> Dump:
    records_in = obj["records"]
    if not isinstance(records_in, list):
        raise DumpFormatError(f"{source}: records: expected a list")
    mapping = _check_tensor(obj.get("last_physical_to_logical_map"), "last_physical_to_logical_map", 2).to(torch.int64)
    L, P = mapping.shape
    rows, records = [], []
    per_token = False
    for i, rec in enumerate(records_in):
        if not isinstance(rec, dict):
            raise DumpFormatError(f"{source}: records[{i}]: expected a dict")
        try:
            pass_id = rec["forward_pass_id"]
            count = _check_tensor(rec["global_physical_count"], f"records[{i}].global_physical_count", 2)
        except KeyError as e:
            raise DumpFormatError(f"{source}: records[{i}]: missing key {e}") from None
        if isinstance(pass_id, bool) or not isinstance(pass_id, int):
            raise DumpFormatError(f"{source}: records[{i}].forward_pass_id: expected an integer")
        if list(count.shape) != [L, P]:
            raise DumpFormatError(
                f"{source}: records[{i}].global_physical_count: shape {list(count.shape)} differs from "
                f"last_physical_to_logical_map's {[L, P]}"
            )
        ids = rec.get("topk_ids_of_layer")
        if ids is not None:
            per_token = True
            ids = _check_tensor(ids, f"records[{i}].topk_ids_of_layer", 3).to(torch.int32)
        rows.append(count)
        records.append(
            Record(
                forward_pass_id=pass_id,
                rank=_rank(rec.get("rank", 0), f"records[{i}].rank", source),
                gatherer_key=_text(rec.get("gatherer_key", "primary"), f"records[{i}].gatherer_key", source),
                topk_ids_of_layer=ids,
                input_ids=_int_list(rec.get("input_ids"), f"records[{i}].input_ids", source),
                positions=_int_list(rec.get("positions"), f"records[{i}].positions", source),
            )
        )
    # Per-pass rows keep int32 when every record has it (a 1000-pass ring is 62 MB, not 125).
    width = torch.int32 if rows and all(r.dtype == torch.int32 for r in rows) else torch.int64
    physical = torch.stack([r.to(width) for r in rows]) if rows else torch.zeros(0, L, P, dtype=torch.int64)
    if mapping.numel() and int(mapping.min()) < 0:
        raise DumpFormatError(f"{source}: last_physical_to_logical_map: negative expert id")
    if meta is not None:
        parts = _meta_structs(meta)
        E = parts["model"].num_logical_experts
        has_map = meta.get("physical_to_logical_map") is not None
        # Checked before summing slots into E experts: an E or an id out of range would allocate or fail there.
        if has_map and not (1 <= E <= P and (mapping.numel() == 0 or int(mapping.max()) < E)):
            raise DumpFormatError(
                f"{source}: last_physical_to_logical_map: ids must lie in [0, num_logical_experts={E}) "
                f"with num_logical_experts <= {P} physical slots"
            )
        logical = _logical_from_physical(physical, mapping, E) if has_map else physical
        return Dump(
            **parts,
            logical_count=logical,
            total_logical_count=_opt(meta, "total_logical_count", 2),
            physical_count=physical if has_map else None,
            physical_to_logical_map=mapping if has_map else None,
            records=records,
            average_utilization_rate_over_window=_util(meta.get("average_utilization_rate_over_window")),
        )
    E = int(mapping.max()) + 1 if mapping.numel() else P
    if E > P:  # SGLang gives every logical expert at least one physical slot
        raise DumpFormatError(f"{source}: last_physical_to_logical_map: maps to expert {E - 1}, but has only {P} slots")
    if L > MAX_LAYERS:
        raise DumpFormatError(f"{source}: last_physical_to_logical_map: {L} layers, over the limit of {MAX_LAYERS}")
    identity = E == P and torch.equal(mapping, _identity_map(L, P))
    logical = physical if identity else _logical_from_physical(physical, mapping, E)
    rank = records[0].rank if records else 0
    return Dump(
        engine=EngineInfo(name="sglang"),
        model=ModelInfo(
            num_layers=L,
            moe_layer_ids=_observed_layers(logical) if len(records) else list(range(L)),
            num_logical_experts=E,
            num_physical_experts=None if identity else P,
            top_k=None,  # SGLang pads per-token ids to 8 columns whatever top_k is; files do not say
        ),
        topology=_sglang_topology(rank),
        window=Window(mode="per_token" if per_token else "per_pass", num_passes=len(records)),
        logical_count=logical,
        physical_count=None if identity else physical,
        physical_to_logical_map=None if identity else mapping,
        records=records,
    )


def _util(value: Any) -> float | None:
    """SGLang's utilization rate, a number or None (anything else is dropped, as for SGLang's own files)."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any, field: str, source: str) -> str:
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DumpFormatError(f"{source}: {field}: not valid UTF-8 text") from None
    return text


def _int_list(value: Any, field: str, source: str) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
        raise DumpFormatError(f"{source}: {field}: expected a list of integers")
    return value


def load_sglang_pt(path: str) -> Dump:
    """Load a ``.pt`` with ``weights_only=True`` (never runs code), CUDA tensors onto the CPU."""
    return from_sglang_dict(torch_load(path, os.path.getsize(path), path), source=path)


def torch_load(f: str | BinaryIO, size: int, source: str) -> Any:
    """``torch.load(weights_only=True)`` of a ``size``-byte file whose sizes are checked first.

    A hostile file may not make us allocate more than it holds: zip entries that inflate
    (torch.save stores them uncompressed) and tensors that view more elements than their
    storage (stride 0) or storages larger than the file are refused.
    """
    if Version(torch.__version__).release[:2] < SAFE_LOAD_TORCH:
        raise DumpFormatError(
            f"{source}: not loaded: torch {torch.__version__} cannot load a .pt safely (weights_only=True can run code "
            "or corrupt memory before torch 2.10: CVE-2025-32434, CVE-2026-24747); upgrade torch, or use the "
            "dump as .msgpack or .json"
        )
    _check_zip(f, size, source)
    try:
        obj = torch.load(f, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many types for corrupt or hostile pickles
        raise DumpFormatError(f"{source}: not a loadable .pt under weights_only=True: {_reason(e)}") from None
    _check_tensors(obj, size, source)
    return obj


def _reason(e: Exception) -> str:
    """One line of torch's (long, multi-line) error: the unpickler's own reason when it gives one."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines()]
    lines = [line for line in lines if line]
    # torch 2.13 wraps the cause ("Unsupported global: GLOBAL posix.system ...") in advice lines.
    why = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else type(e).__name__)
    return why.split(". Please use")[0][:300]


def _check_zip(f: str | BinaryIO, size: int, source: str) -> None:
    if isinstance(f, str):
        with open(f, "rb") as opened:
            return _check_zip(opened, size, source)
    try:
        if f.read(4) != b"PK\x03\x04":
            return  # a legacy pickle: its storages are checked after loading
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as z:
                declared = sum(info.file_size for info in z.infolist())
                if declared > size + ZIP_INFLATE_ALLOWANCE:
                    raise DumpFormatError(
                        f"{source}: zip entries inflate to {declared} bytes from a {size}-byte file "
                        "(torch.save stores them uncompressed): refused as a possible zip bomb"
                    )
                # torch.load does not check the entries' CRC-32: a flipped byte in a count
                # would load as a plausible, wrong count.
                bad = z.testzip()
        except DumpFormatError:
            raise
        except Exception as e:  # zipfile raises several types on a damaged archive
            raise DumpFormatError(f"{source}: not a readable zip archive: {e}") from None
    finally:
        f.seek(0)
    if bad is not None:
        raise DumpFormatError(f"{source}: corrupt: zip entry {bad} fails its CRC-32 check")


def _not_dense(t: torch.Tensor) -> str | None:
    """What a tensor is instead of a dense CPU one (``torch.load(weights_only=True)`` rebuilds sparse,
    meta and quantized tensors too), or None."""
    if t.layout != torch.strided:
        return "sparse"
    if t.is_meta:
        return "meta"
    if t.is_quantized:
        return "quantized"
    return None


def _check_tensors(obj: Any, size: int, source: str) -> None:
    """Every tensor of a loaded ``.pt``, before anything copies it: shape, view and storage."""
    stack: list[tuple[Any, str]] = [(obj, "$")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if isinstance(k, str) else f"{path}[{k!r:.20}]") for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
        elif isinstance(node, torch.Tensor):
            where = f"{source}: {path.removeprefix('$.')}"
            kind = _not_dense(node)
            if kind:  # no storage to measure, no copy, no integer view: refused before any is tried
                raise DumpFormatError(f"{where}: a {kind} tensor; dumps hold dense tensors")
            check_shape(list(node.shape), where)
            storage = node.untyped_storage().nbytes()
            if node.numel() * node.element_size() > storage:
                raise DumpFormatError(
                    f"{where}: views {node.numel()} elements over a {storage}-byte storage (stride 0 or overlapping)"
                )
            if storage > size:
                raise DumpFormatError(f"{where}: its storage declares {storage} bytes, more than the file's {size}")


def load_legacy_csv(path: str) -> Dump:
    """SGLang 0.4.5's ``layer_id,expert_id,count`` CSV (seen pairs only) as a stat dump."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DumpFormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != ["layer_id", "expert_id", "count"]:
        raise DumpFormatError(f"{path}: line 1: expected the header layer_id,expert_id,count, got {header!r}")
    triples = []
    rows = enumerate(reader, start=2)
    while True:
        try:
            n, row = next(rows)
        except StopIteration:
            break
        except csv.Error as e:  # e.g. a bare carriage return inside a field
            raise DumpFormatError(f"{path}: line {reader.line_num}: {e}") from None
        if not row:
            continue
        if len(row) != 3:
            raise DumpFormatError(f"{path}: line {n}: expected 3 columns, got {len(row)}")
        if row[0].strip() == "UNKNOWN":
            # sglang 0.4.5 writes this for models that never set the layer: such rows cannot be
            # placed on the layer axis, and silently dropping them would lose counts.
            raise DumpFormatError(
                f"{path}: line {n}: layer_id is UNKNOWN (sglang 0.4.5 did not know the layer of this "
                "model's routing); the file cannot be mapped to layers"
            )
        try:
            layer, expert, count = (int(v) for v in row)
        except ValueError:
            raise DumpFormatError(
                f"{path}: line {n}: layer_id, expert_id and count must be integers: {row!r:.80}"
            ) from None
        for name, v in (("layer_id", layer), ("expert_id", expert), ("count", count)):
            if v < 0:
                raise DumpFormatError(f"{path}: line {n}: {name} is negative ({v})")
        triples.append((layer, expert, count))
    L = max((t[0] for t in triples), default=-1) + 1
    E = max((t[1] for t in triples), default=-1) + 1
    # The file lists (layer, expert) pairs; a dense [L, E] from a few bytes is bounded like an empty tensor.
    if L * E > MAX_EMPTY_SPAN or L > MAX_LAYERS:
        raise DumpFormatError(f"{path}: ids declare {L} layers x {E} experts, too many for a CSV dump")
    sums: dict[tuple[int, int], int] = {}
    for layer, expert, c in triples:  # Python ints: a sum past int64 is refused, not wrapped
        sums[layer, expert] = sums.get((layer, expert), 0) + c
    too_big = next(((k, v) for k, v in sums.items() if v > INT64_MAX), None)
    if too_big:
        (layer, expert), v = too_big
        raise DumpFormatError(f"{path}: layer {layer}, expert {expert}: count {v} exceeds int64")
    count = torch.zeros(1, L, E, dtype=torch.int64)
    for (layer, expert), c in sums.items():
        count[0, layer, expert] = c
    m = _CSV_NAME.search(os.path.basename(path))
    return Dump(
        engine=EngineInfo(name="sglang", version="0.4.5"),
        model=ModelInfo(num_layers=L, moe_layer_ids=_observed_layers(count), num_logical_experts=E, top_k=None),
        topology=_sglang_topology(int(m.group(1)) if m else 0),
        window=Window(mode="stat"),
        logical_count=count,
    )
