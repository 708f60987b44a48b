"""Megatron-LM's tokens-per-expert JSON Lines, read into a per_pass dump.

Megatron (``megatron/training/activation_logging.py``, ``ActivationLogger.save_tpe``) hooks each
``decoder.layers.<N>.mlp.experts.linear_fc1`` grouped linear and appends, every
``save_tokens_per_expert_interval`` iterations, to ``{save}/tokens_per_expert/rank{R}.jsonl``
one line per (iteration, layer)::

    {"iter": 100, "block": "decoder", "layer": 3, "tpe": [[128, 64], [96, 80]]}
    {"iter": 100, "block": "mtp", "mtp_idx": 0, "layer": 1, "tpe": [[50, 50]]}

``tpe`` is, per microbatch, the tokens routed to each of the rank's *local* experts. We sum the
microbatches, place rank R's experts at ``(R % ep_size) * local`` (Megatron's expert rank order
with expert-tensor-parallel size 1), and sum ranks holding the same experts (data-parallel
replicas see disjoint tokens). ``layer`` is the index within the pipeline stage, so files of
several pipeline stages cannot be combined. Multi-token-prediction (``mtp``) lines are not
decoder layers and are skipped.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import torch

from ..errors import DumpFormatError
from ..schema.dump import Dump
from ..schema.io import check_regular_file
from .passes import INT64_MAX, add_count, per_pass_dump

_RANK = re.compile(r"rank(\d+)\.jsonl$")


def _int(v: object, where: str, name: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise DumpFormatError(f"{where}: {name}: expected a non-negative integer, got {v!r}")
    return v


def _lines(path: str):
    check_regular_file(path)  # a FIFO would block the open
    try:
        with open(path) as f:
            for n, text in enumerate(f, start=1):
                if text.strip():
                    try:
                        yield n, json.loads(text)
                    except (json.JSONDecodeError, RecursionError) as e:
                        raise DumpFormatError(f"{path}: line {n}: not JSON: {e}") from None
    except UnicodeDecodeError:
        raise DumpFormatError(f"{path}: not a text file") from None


def load_megatron_tpe(paths: Sequence[str], *, ep_size: int = 1, num_layers: int | None = None) -> Dump:
    """Read Megatron ``rank{R}.jsonl`` tokens-per-expert files into one dump (one row per iteration).

    Parameters
    ----------
    paths:
        The rank files (the rank comes from ``rank{R}`` in the name, else the position).
    ep_size:
        Megatron's expert-parallel size: experts are ``ep_size`` x the local experts in a line.
    num_layers:
        The model's decoder layers, when the last ones recorded nothing.

    >>> dump = load_megatron_tpe(["tokens_per_expert/rank0.jsonl"])  # doctest: +SKIP
    """
    if ep_size < 1:
        raise DumpFormatError(f"ep_size: must be >= 1, got {ep_size}")
    local: int | None = None
    counts: dict[tuple[int, int], torch.Tensor] = {}
    ranks: dict[int, str] = {}
    for pos, path in enumerate(paths):
        m = _RANK.search(os.path.basename(path))
        rank = int(m.group(1)) if m else pos
        if rank in ranks:
            raise DumpFormatError(f"{path}: rank {rank} given twice (also {ranks[rank]})")
        ranks[rank] = path
        offset_rank = rank % ep_size
        for n, obj in _lines(path):
            where = f"{path}: line {n}"
            if not isinstance(obj, dict):
                raise DumpFormatError(f"{where}: expected a JSON object")
            if obj.get("block", "decoder") != "decoder":
                continue
            try:
                it, layer, tpe = obj["iter"], obj["layer"], obj["tpe"]
            except KeyError as e:
                raise DumpFormatError(f"{where}: missing key {e}") from None
            it, layer = _int(it, where, "iter"), _int(layer, where, "layer")
            if not isinstance(tpe, list) or not tpe or not all(isinstance(mb, list) for mb in tpe):
                raise DumpFormatError(f"{where}: tpe: expected a list of per-microbatch lists")
            widths = {len(mb) for mb in tpe}
            if len(widths) != 1 or 0 in widths:
                raise DumpFormatError(f"{where}: tpe: microbatches list different numbers of experts")
            width = widths.pop()
            if local is None:
                local = width
            elif width != local:
                raise DumpFormatError(f"{where}: tpe: {width} local experts, but earlier lines have {local}")
            values = [_int(v, where, "tpe") for mb in tpe for v in mb]
            row = [sum(values[j::width]) for j in range(width)]  # microbatches summed, in Python: no wrap
            if max(row) > INT64_MAX:
                raise DumpFormatError(f"{where}: tpe: {max(row)} tokens for one expert exceed int64")
            add_count(
                counts,
                (it, layer),
                torch.tensor(row, dtype=torch.int64),
                num_experts=width * ep_size,
                where=where,
                offset=offset_rank * width,
            )
    if local is None:
        raise DumpFormatError(f"{', '.join(paths)}: no decoder tokens-per-expert lines")
    E = local * ep_size
    dump = per_pass_dump(
        counts, engine="megatron", num_experts=E, top_k=None, num_layers=num_layers, source=", ".join(paths)
    )
    missing = sorted(set(range(ep_size)) - {r % ep_size for r in ranks})
    if missing:  # their experts would read as never used
        raise DumpFormatError(
            f"{', '.join(paths)}: no file of expert-parallel rank(s) {missing} of ep_size={ep_size}: "
            "give every rank's file (or the right --megatron-ep-size)"
        )
    if len(ranks) % ep_size:  # some expert-parallel rank has more files than another: a wrong EP size
        raise DumpFormatError(
            f"{', '.join(paths)}: {len(ranks)} rank files are not a whole number of expert-parallel groups of "
            f"ep_size={ep_size}: give every rank's file, and Megatron's --expert-model-parallel-size as "
            "--megatron-ep-size"
        )
    return dump
