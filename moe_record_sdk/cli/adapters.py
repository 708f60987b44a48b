"""``moe-record adapters``: the adapters installed under ``moe_record_sdk.adapters``, with versions."""

from __future__ import annotations

import argparse
import json
import sys

from . import add_command


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(sub, "adapters")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of a table")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import logging

    from ..plugins import AdapterRegistry

    logging.getLogger("moe_record_sdk.plugins.manager").setLevel(logging.ERROR)  # the table says it
    reports = AdapterRegistry().adapters()
    if args.json:
        json.dump({"adapters": [r.to_dict() for r in reports]}, sys.stdout, indent=2)
        print()
        return 0
    if not reports:
        print("no adapters installed (entry-point group moe_record_sdk.adapters)")
        return 0
    rows = [("NAME", "STATUS", "VERSION", "ENGINE", "SUPPORTS", "FROM")]
    for r in reports:
        info = r.info
        engine = (f"{info.engine} {r.engine_version or ''}".strip()) if info else "-"
        rows.append(
            (
                r.name,
                r.status,
                info.version if info else "-",
                engine,
                (info.engine_versions if info else "") or "-",
                r.distribution or r.source,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in reports:
        if r.error:
            print(f"{r.name}: {r.error}")
    return 0
