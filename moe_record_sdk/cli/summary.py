"""``moe-record summary FILE...``: imbalance per layer, per GPU, overall and over passes."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..analysis.summary import print_summary, summarize, to_csv, to_json
from ..errors import MoeRecordError
from ..schema.io import check_regular_file
from ..schema.sglang import PLACEMENT_KEYS, torch_load
from . import add_command, rich_console
from .convert import ALLOW_PARTIAL_HELP, INPUTS_HELP, add_input_options, fail, merged, positive_int, read_args_inputs


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(sub, "summary")
    p.add_argument("paths", nargs="+", metavar="FILE", help=INPUTS_HELP)
    p.add_argument(
        "--ep-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="GPUs of the expert-parallel group (experts contiguous unless a map is known)",
    )
    p.add_argument(
        "--placement",
        metavar="PT",
        help="a placement [L, P] to evaluate: a .pt with physical_to_logical_map (eplb --sglang-out, SGLang's"
        " --init-expert-location) or phy2log (eplb --plan-out); needs --ep-size unless the dump records its EP size",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge the inputs first (per-rank dumps of one run; see `moe-record merge`)",
    )
    p.add_argument("--allow-partial", action="store_true", help=f"with --merge: {ALLOW_PARTIAL_HELP}")
    p.add_argument("--hot", type=positive_int, default=3, metavar="N", help="hot experts to name per layer (default 3)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="JSON on stdout (a list, one summary per input)")
    out.add_argument("--csv", action="store_true", help="CSV on stdout")
    add_input_options(p)
    p.set_defaults(func=run)
    return p


def _not_int(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex or dtype == torch.bool


def load_placement(path: str) -> torch.Tensor:
    """The [L, P] map of an SGLang ``--init-expert-location`` file (``.pt``, or ``.json`` as SGLang
    also takes), or of a plan ``eplb --plan-out`` wrote, or a bare tensor."""
    check_regular_file(path)  # a FIFO would block the open
    with open(path, "rb") as f:  # sizes checked before anything is allocated, as for dumps
        size = os.fstat(f.fileno()).st_size
        obj = (
            _json_placement(f.read(MAX_JSON_PLACEMENT + 1), path)
            if path.endswith(".json")
            else torch_load(f, size, path)
        )
    key, mapping = PLACEMENT_KEYS[0], obj
    if isinstance(obj, dict):
        key = next((k for k in PLACEMENT_KEYS if k in obj), None)
        if key is None:
            raise MoeRecordError(f"{path}: holds neither {' nor '.join(PLACEMENT_KEYS)}: not a placement file")
        mapping = obj[key]
    if not isinstance(mapping, torch.Tensor) or mapping.dim() != 2 or _not_int(mapping.dtype):
        got = f"{mapping.dtype} {list(mapping.shape)}" if isinstance(mapping, torch.Tensor) else type(mapping).__name__
        raise MoeRecordError(f"{path}: {key}: expected an int tensor [layers, physical experts], got {got}")
    return mapping.to(torch.int64)


MAX_JSON_PLACEMENT = 64 << 20  # bytes: [1000 layers, 4096 slots] of ints fits many times over


def _json_placement(raw: bytes, path: str) -> dict[str, torch.Tensor]:
    """SGLang's JSON form of ``--init-expert-location``: an object whose placement key holds a
    [layers, physical slots] list of lists of ints."""
    if len(raw) > MAX_JSON_PLACEMENT:
        raise MoeRecordError(f"{path}: over {MAX_JSON_PLACEMENT >> 20} MiB: not a placement file")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MoeRecordError(f"{path}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise MoeRecordError(f"{path}: expected a JSON object with {' or '.join(PLACEMENT_KEYS)}")
    out = {}
    for key in PLACEMENT_KEYS:
        rows = obj.get(key)
        if rows is None:
            continue
        ok = isinstance(rows, list) and rows and all(isinstance(r, list) and len(r) == len(rows[0]) for r in rows)
        if not ok or not all(type(v) is int for r in rows for v in r):
            raise MoeRecordError(f"{path}: {key}: expected [layers, physical slots] lists of equal length, of ints")
        try:
            out[key] = torch.tensor(rows, dtype=torch.int64)
        except RuntimeError:  # an int past int64
            raise MoeRecordError(f"{path}: {key}: an entry exceeds int64") from None
    return out


def run(args: argparse.Namespace) -> int:
    try:
        mapping = load_placement(args.placement) if args.placement else None
        dumps = read_args_inputs(args, args.paths, merges=args.merge)
        if args.merge and len(dumps) > 1:
            dumps = [merged(dumps, args.allow_partial)]
        summaries = [
            summarize(dump, ep_size=args.ep_size, physical_to_logical_map=mapping, hot=args.hot, source=label)
            for label, dump in dumps
        ]
    except (MoeRecordError, OSError, ValueError) as e:
        flags = {"ep_size: ": "--ep-size: ", "give a physical_to_logical_map": "give --placement"}
        if args.placement:  # the placement's checks name the file they are about
            flags["physical_to_logical_map: "] = f"--placement {args.placement}: "
        return fail("summary", e, flags)
    if args.json:
        sys.stdout.write(to_json(summaries) + "\n")
    elif args.csv:
        sys.stdout.write(to_csv(summaries))
    else:
        console = rich_console()
        for s in summaries:
            print_summary(s, console)
    return 0
