"""Other engines' expert statistics in, engines' inputs out.

Readers (to our :class:`~moe_record_sdk.Dump`): TensorRT-LLM's expert statistic folder
(:func:`load_trtllm_statistic`), Megatron's tokens-per-expert JSONL (:func:`load_megatron_tpe`),
and through :func:`~moe_record_sdk.load_dump` SGLang's ``.pt`` and legacy CSV and our own files.
Writers: our formats (``msgpack``, ``json``, ``pt``), SGLang's plain stat ``.pt``
(:func:`to_sglang_stat_dict`) and a bare ``[L, E]`` tensor.

>>> dumps = read_inputs(["expert_statistic/", "run.pt"])  # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import DumpFormatError
from ..schema import load_dump, save_dump, validate_dump
from ..schema.dump import Dump
from ..schema.io import save_torch
from ..schema.sglang import check_init_expert_location_name, sglang_counts
from .megatron import load_megatron_tpe
from .trtllm import is_trtllm_folder, load_trtllm_statistic

TARGETS = ("msgpack", "json", "pt", "sglang-pt", "tensor")

__all__ = [
    "TARGETS",
    "load_megatron_tpe",
    "load_trtllm_statistic",
    "read_inputs",
    "to_sglang_stat_dict",
    "write",
]


def read_inputs(
    paths: Sequence[str], *, megatron_ep_size: int = 1, num_layers: int | None = None
) -> list[tuple[str, Dump]]:
    """Read every input as ``(label, dump)``.

    A folder with ``meta_info.json`` is a TensorRT-LLM statistic (one dump); all ``.jsonl``
    files together are one Megatron run (its ranks); any other file goes through ``load_dump``.
    """
    out: list[tuple[str, Dump]] = []
    jsonl = [p for p in paths if p.endswith(".jsonl")]
    seen: dict[str, str] = {}
    for path in paths:
        if not os.path.exists(path):
            raise DumpFormatError(f"{path}: no such file or folder")
        first = seen.setdefault(os.path.realpath(path), path)
        if first is not path:  # merged, it would count twice
            raise DumpFormatError(f"{path}: given twice (also as {first})")
        if path.endswith(".jsonl"):
            if path == jsonl[0]:
                label = jsonl[0] if len(jsonl) == 1 else os.path.dirname(jsonl[0]) or "megatron"
                out.append((label, load_megatron_tpe(jsonl, ep_size=megatron_ep_size, num_layers=num_layers)))
        elif os.path.isdir(path):
            if not is_trtllm_folder(path):
                raise DumpFormatError(
                    f"{path}: a folder, but not a TensorRT-LLM expert statistic folder (no meta_info.json)"
                )
            out.append((path, load_trtllm_statistic(path, num_layers=num_layers)))
        else:
            out.append((path, load_dump(path)))
    for label, dump in out:  # what validate refuses, no analysis may read
        problems = validate_dump(dump)
        if problems:
            shown = "; ".join(f"{field}: {message}" for field, message in problems[:3])
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise DumpFormatError(f"{label}: not a valid dump: {shown}{more}")
    return out


def to_sglang_stat_dict(dump: Dump) -> dict[str, Any]:
    """SGLang's stat-mode dump, exactly its keys (sglang 0.5.23 ``_StatAccumulator.dump``):
    ``{rank, logical_count: int32 [B, L, E], average_utilization_rate_over_window}`` (int64 where a
    count exceeds int32: ``sglang_counts``).

    It is what ``--init-expert-location`` (``init_by_eplb``) and SGLang's EPLB consume. Rows are
    the dump's passes; when some passes fell out of the ring, one row of exact totals instead.
    """
    count = dump.logical_count
    if dump.total_logical_count is not None:
        count = dump.total_logical_count.unsqueeze(0)
    return {
        "rank": dump.topology.rank,
        "logical_count": sglang_counts(count).clone(),
        "average_utilization_rate_over_window": dump.average_utilization_rate_over_window,
    }


def write(dump: Dump, path: str, to: str | None = None) -> str:
    """Write ``dump`` as ``to`` (default from the suffix: ``.msgpack``, ``.json``, ``.pt``).

    ``sglang-pt``: :func:`to_sglang_stat_dict`, no metadata of ours. ``tensor``: a ``.pt`` of the
    single int64 ``[L, E]`` tensor of total counts (``torch.load(weights_only=True)`` opens it).
    """
    if to is None:
        return save_dump(dump, path)
    if to in ("msgpack", "json", "pt"):
        return save_dump(dump, path, format=to)
    if to == "sglang-pt":
        check_init_expert_location_name(path)
        return save_torch(to_sglang_stat_dict(dump), path)
    if to == "tensor":
        return save_torch(dump.total_count().to(torch.int64).clone(), path)
    raise DumpFormatError(f"to: {to!r} is not one of {', '.join(TARGETS)}")
