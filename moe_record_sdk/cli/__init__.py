"""The ``moe-record`` command: one module per subcommand, registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module under moe_record_sdk.cli; each module has ``add_parser(sub)`` returning its
# parser with ``func`` set to a callable(args) -> exit status. Imported lazily so `--help` is fast.
COMMANDS: dict[str, str] = {
    "validate": "validate",
    "merge": "merge",
    "adapters": "adapters",
    "summary": "summary",
    "plot": "plot",
    "eplb": "eplb",
    "convert": "convert",
    "bench": "bench",
    "serve": "serve",
    "start": "control",
    "stop": "control",
    "dump": "control",
    "status": "control",
    "record": "record",
    "demo": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-record", description="Record and inspect MoE expert load.")
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"moe-record-sdk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"{__name__}.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, as we want
        return int(e.code or 0)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `moe-record ... | head` closed the pipe: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except KeyboardInterrupt:  # Ctrl-C (or the demo's SIGTERM) where no command saves anything: no traceback
        print("moe-record: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
