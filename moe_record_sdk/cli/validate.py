"""``moe-record validate PATH...``: check dumps (files or folders) against every invariant."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator

from ..errors import MoeRecordError
from ..schema import detect_format, load_dump, validate_dump
from . import add_command

DUMP_SUFFIXES = (".pt", ".pth", ".msgpack", ".mpk", ".json", ".csv")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        "validate",
        epilog="exit status: 0 every file is valid, 1 some file is INVALID (not a valid dump, or not a regular file: "
        "a FIFO, a device), 2 a path that is not there, or no dump file found in the folders given",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="dump files, or folders to search for them")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of lines")
    p.set_defaults(func=run)
    return p


def iter_dump_files(paths: list[str]) -> Iterator[str]:
    """The files named, and dump files found under the folders named (sorted)."""
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if name.endswith(DUMP_SUFFIXES):
                        yield os.path.join(root, name)
        else:
            yield path


def _decode_error(message: str) -> dict[str, str]:
    """A reader's error as ``{"field", "message"}``: msgspec's "... - at `$.engine.name`" names the
    field at the end (a tensor's part first: ".dtype: ..."); "$" where none is named."""
    m = re.fullmatch(r"(?s)(.*) - at `\$\.?(.*)`", message)
    if m is None:
        return {"field": "$", "message": message}
    message, field = m.group(1), m.group(2) or "$"
    if message.startswith("."):  # "$: .dtype: ..." reaches us as ".dtype: ..."
        part, _, message = message[1:].partition(": ")
        field = f"{field}.{part}"
    return {"field": field, "message": message}


def check_file(path: str) -> dict:
    """``{"path", "format", "ok", "errors": [{"field", "message"}]}`` for one file."""
    result: dict = {"path": path, "format": None, "ok": False, "errors": []}
    try:
        result["format"] = detect_format(path)
        dump = load_dump(path)
    except (MoeRecordError, OSError) as e:
        message = str(e)  # the readers' messages begin with the file, which the result names already
        message = message[len(path) + 2 :] if message.startswith(f"{path}: ") else message
        result["errors"].append(_decode_error(message))
        return result
    problems = validate_dump(dump)
    result["errors"] = [{"field": f, "message": m} for f, m in problems]
    result["ok"] = not problems
    return result


def resolve_dump_files(command: str, paths: list[str]) -> list[str] | None:
    """The dump files named or found under ``paths``; None (after saying why on stderr) when a
    path is missing or nothing is found, which the commands answer with exit status 2."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        print(f"moe-record {command}: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return None
    files = list(iter_dump_files(paths))
    if not files:
        print(f"moe-record {command}: no dump files found under " + ", ".join(paths), file=sys.stderr)
        return None
    seen: dict[str, str] = {}
    for f in files:  # a file named twice (or inside a folder also named) would be merged twice
        first = seen.setdefault(os.path.realpath(f), f)
        if first is not f:
            print(f"moe-record {command}: {f} is given twice (also as {first})", file=sys.stderr)
            return None
    return files


def run(args: argparse.Namespace) -> int:
    files = resolve_dump_files("validate", args.paths)
    if files is None:
        return 2
    results = [check_file(f) for f in files]
    if args.json:
        json.dump({"ok": all(r["ok"] for r in results), "files": results}, sys.stdout, indent=2)
        print()
    else:
        for r in results:
            if r["ok"]:
                print(f"OK       {r['path']} ({r['format']})")
            else:
                for e in r["errors"]:
                    print(f"INVALID  {r['path']}: {e['field']}: {e['message']}")
    return 0 if all(r["ok"] for r in results) else 1
