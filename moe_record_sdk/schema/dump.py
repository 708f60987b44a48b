"""Dump schema v1: what one recorder (one rank of one engine) saw over one window.

Evolution follows msgspec's rules: a new field gets a default, a field's type never changes,
unknown fields are skipped, so a v1 reader opens files written by a later v1. A change that
breaks those rules is a new integer tag (``schema_version``) and a new Struct in the union.
"""

from __future__ import annotations

from typing import Literal

import msgspec
import torch

from .names import SCHEMA_VERSION

Mode = Literal["stat", "per_pass", "per_token"]
_NARROW_INTS = (torch.int8, torch.int16, torch.int32, torch.uint8)
#: Per-row count fields [B, L, *]: int32 stays int32 (the device ring, SGLang's .pt and our wire
#: format store int32), so a 62 MB ring is not widened to 125 MB and narrowed back on the way
#: out. Sums promote to int64 (``total_count()``); merges add into int64.
_ROW_FIELDS = ("logical_count", "physical_count")

_INT32_MAX = torch.iinfo(torch.int32).max


def row_sum(rows: torch.Tensor) -> torch.Tensor:
    """``rows.sum(0)`` of integer rows as int64, exactly, fast for int32 rows.

    torch's promoting int32 -> int64 sum runs ~8x slower than an int32 or an int64 sum (90 ms
    against 12 ms for a [1000, 61, 256] ring on one core), so int32 rows are summed in int32 in
    runs of rows short enough that no partial sum can overflow, and the runs added in int64.
    """
    if rows.dtype != torch.int32 or rows.shape[0] < 2 or rows.numel() == 0:
        return rows.sum(0)
    lo, hi = (int(v) for v in torch.aminmax(rows))
    run = max(1, _INT32_MAX // max(abs(lo), abs(hi), 1))
    total = torch.zeros(rows.shape[1:], dtype=torch.int64)
    for part in rows.split(run):
        total += part.sum(0, dtype=torch.int32)
    return total


class Base(msgspec.Struct, kw_only=True, forbid_unknown_fields=False, omit_defaults=False):
    """Options shared by every Struct of the schema."""


class EngineInfo(Base):
    """Who produced the dump."""

    name: str
    """Engine name: ``torch``, ``vllm``, ``sglang``, or a third party's."""
    version: str | None = None
    """Engine version, e.g. vLLM's ``0.32.0``."""
    adapter: str | None = None
    """Adapter distribution that recorded, e.g. ``moe-record-vllm``."""
    sdk_version: str | None = None
    """moe-record-sdk version that wrote the dump."""


class ModelInfo(Base):
    """The routed-expert shape of the model."""

    num_layers: int
    """Decoder layers, dense ones included (SGLang's ``num_hidden_layers``): the L axis."""
    moe_layer_ids: list[int]
    """Layer ids (0-based decoder index) this recorder observed: MoE layers on this rank."""
    num_logical_experts: int
    """Routed experts of the model: the E axis of ``logical_count``."""
    top_k: int | None = None
    """Experts chosen per token per layer (None only for SGLang files that do not say)."""
    num_physical_experts: int | None = None
    """Expert slots after EPLB replication (SGLang's physical experts): the P axis."""
    name: str | None = None
    """Model name or path, informational."""


class Topology(Base):
    """Where this recorder sits, so merges neither drop nor double-count.

    Dumps with the same ``token_shard`` saw the same tokens (tensor-parallel replicas): a merge
    counts each layer once from them. Dumps with different shards saw disjoint tokens (data or
    expert parallel): a merge sums them.
    """

    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    token_shard: int = 0
    num_token_shards: int = 1


class Window(Base):
    """The recording window and what it holds."""

    mode: Mode
    start_time: float | None = None
    """Unix time of ``start()``."""
    stop_time: float | None = None
    """Unix time of ``stop()``, or of the dump when still recording."""
    num_passes: int = 0
    """Forward passes completed in the window."""
    num_tokens: list[int] | None = None
    """Per layer of the L axis: token rows seen, without the padding rows given as ``num_valid_tokens``
    (padding handed over as ``-1`` rows, SGLang's, counts here, its ids in ``discarded``). Exact totals satisfy
    ``sum(total count of layer l) + discarded[l] == num_tokens[l] * top_k``."""
    discarded: list[int] | None = None
    """Per layer: top-k slots with an invalid id (-1 padding, out of range), not counted."""
    buffer_size: int = 0
    """Rows the per-pass ring holds (0: no ring, ``logical_count`` is one cumulative row)."""
    dropped_passes: int = 0
    """Passes that fell out of the per-pass ring before the dump: their counts are only in the totals."""
    dropped_tokens: int = 0
    """per_token: valid tokens whose ids were overwritten in the ring before the dump."""
    unobserved_layers: list[int] = []
    """MoE layers the tap cannot see (e.g. fused kernels that route inside): never silently missing."""


class Record(Base):
    """One forward pass, with SGLang's record keys; its counts are the matching row of
    ``logical_count`` (and ``physical_count``)."""

    forward_pass_id: int
    rank: int = 0
    gatherer_key: str = "primary"
    topk_ids_of_layer: torch.Tensor | None = None
    """per_token: int32 [L, T, top_k] ids per layer per token of the pass, -1 where unfilled."""
    input_ids: list[int] | None = None
    positions: list[int] | None = None


class DumpV1(Base, tag_field="schema_version", tag=SCHEMA_VERSION):
    """A recorder's dump, schema v1. Tensors are on the CPU: row counts int32 or int64, the rest int64."""

    engine: EngineInfo
    model: ModelInfo
    window: Window
    logical_count: torch.Tensor
    """int32 or int64 [B, L, E]: SGLang's ``logical_count``. ``stat``: one cumulative row, or the ring's rows
    in time order; ``per_pass``/``per_token``: one row per record."""
    topology: Topology = msgspec.field(default_factory=Topology)
    total_logical_count: torch.Tensor | None = None
    """int64 [L, E]: the window's exact totals, present only where they differ from
    ``logical_count.sum(0)`` (rows dropped from the ring, or a pass still running at the dump)."""
    physical_count: torch.Tensor | None = None
    """int32 or int64 [B, L, P]: counts per physical expert slot, when the engine replicates experts."""
    physical_to_logical_map: torch.Tensor | None = None
    """int64 [L, P]: logical expert of each physical slot (SGLang's ``last_physical_to_logical_map``)."""
    records: list[Record] = []
    """per_pass/per_token: one per row of ``logical_count``, in the same order."""
    average_utilization_rate_over_window: float | None = None
    """SGLang's key, carried through when a source had it."""

    def __post_init__(self) -> None:
        # Narrower integers widen to int64 (int32 rows stay: see _ROW_FIELDS). Other dtypes
        # stay, for validation to name.
        for name in ("logical_count", "total_logical_count", "physical_count", "physical_to_logical_map"):
            t = getattr(self, name)
            narrow = isinstance(t, torch.Tensor) and t.dtype in _NARROW_INTS
            if narrow and not (t.dtype == torch.int32 and name in _ROW_FIELDS):
                setattr(self, name, t.to(torch.int64))

    # -- conveniences ---------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.window.mode

    def total_count(self) -> torch.Tensor:
        """The window's exact logical counts per layer and expert, int64 [L, E]."""
        if self.total_logical_count is not None:
            return self.total_logical_count
        return row_sum(self.logical_count)

    def save(self, path: str, *, format: str | None = None) -> str:
        """Write the dump; the format comes from the suffix (``.pt``, ``.msgpack``, ``.json``)."""
        from .io import save_dump

        return save_dump(self, path, format=format)


#: The current schema's dump. ``Dump`` is what users name; ``DumpV1`` pins the version.
Dump = DumpV1
DumpAny = DumpV1  # the tagged union of every version we read; one member for now
