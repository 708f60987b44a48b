"""``moe-record merge FILES... -o OUT``: merge per-rank and per-engine dumps (rules: ``moe_record_sdk.merge``)."""

from __future__ import annotations

import argparse
import os

from ..client._models import run_file_kind
from ..convert import read_inputs
from ..errors import MoeRecordError
from ..merge import merge_dumps
from ..schema import save_dump
from . import add_command
from .convert import ALLOW_PARTIAL_HELP, check_outputs, fail, refuse_merge_beside_its_inputs
from .validate import resolve_dump_files


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(sub, "merge")
    p.add_argument("paths", nargs="+", metavar="FILE", help="dump files (ours or SGLang's), or folders holding them")
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="merged dump; format by suffix (.pt, .msgpack, .json)"
    )
    p.add_argument("--allow-partial", action="store_true", help=ALLOW_PARTIAL_HELP)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    files = resolve_dump_files("merge", args.paths)
    if files is None:
        return 2

    # A folder `record --out` wrote is merged from its engines' dumps: its merged.* is their sum.
    def folder(f: str) -> str:
        return os.path.dirname(os.path.realpath(f))

    record_folders = {os.path.realpath(p) for p in args.paths if os.path.isdir(p)}
    record_folders &= {folder(f) for f in files if run_file_kind(os.path.basename(f)) == "engine"}
    files = [f for f in files if not (run_file_kind(os.path.basename(f)) == "merged" and folder(f) in record_folders)]
    try:
        refuse_merge_beside_its_inputs(files)
        check_outputs([*args.paths, *files], [args.output])
        dumps = [dump for _, dump in read_inputs(files)]  # validated: what validate refuses, merge does not write
        merged = merge_dumps(dumps, sources=files, allow_partial=args.allow_partial)
        path = save_dump(merged, args.output)
    except (MoeRecordError, OSError) as e:  # refused inputs exit 2, as in the other offline tools
        return fail("merge", e)
    w = merged.window
    tokens = f"{max(w.num_tokens, default=0)} tokens per layer" if w.num_tokens is not None else "tokens not recorded"
    print(f"merged {len(files)} dumps -> {path} ({w.mode}, {w.num_passes} passes, {tokens})")
    return 0
