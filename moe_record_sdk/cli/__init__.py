"""The ``moe-record`` command: one module per subcommand, registered in ``COMMANDS``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from typing import Any

# name -> (module under moe_record_sdk.cli, one-line help). Each module has ``add_parser(sub)``
# adding its commands with ``add_command``, ``func`` set to a callable(args) -> exit status. Only
# the module of the command being run is imported: the others, and `--help`, need no torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "validate": ("validate", "check dump files (ours or SGLang's) against the schema's invariants"),
    "merge": ("merge", "merge dumps of several ranks / engines: replicas (same token_shard) once, other shards summed"),
    "adapters": ("adapters", "list installed engine adapters, their versions and whether they load"),
    "summary": (
        "summary",
        "per-layer and overall expert-load imbalance (SGLang, TensorRT-LLM, Jain, CV), per GPU given a placement",
    ),
    "plot": (
        "plot",
        "draw a layers x experts heatmap, per-layer imbalance and load over passes (needs moe-record-sdk[plot])",
    ),
    "eplb": (
        "eplb",
        "plan expert replication and placement (DeepSeek EPLB's inputs/outputs); export SGLang's --init-expert-location",
    ),
    "convert": (
        "convert",
        "convert TensorRT-LLM / Megatron / SGLang statistics to our dump, or ours to SGLang's .pt or a [L, E] tensor",
    ),
    "bench": (
        "bench",
        "time the recording tap per MoE layer (eager and in a CUDA graph) against scatter_add_ and a copy",
    ),
    "serve": ("serve", "run a reference engine: a PyTorch MoE model with /generate and the recording endpoints"),
    "start": ("control", "clear and start recording on every engine"),
    "stop": ("control", "stop recording on every engine"),
    "dump": ("control", "dump every engine's recording (kept on their disks, or collected with --out)"),
    "status": ("control", "show every engine's recording status"),
    "record": ("record", "record expert load on many engines at once and collect the merged dump"),
    "demo": ("demo", "run two local reference engines, record across both, write and check the dumps"),
}


def add_command(sub: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add command ``name`` to ``sub`` with its help from ``COMMANDS`` (also its description, unless given)."""
    short = COMMANDS[name][1]
    kwargs.setdefault("description", short[:1].upper() + short[1:] + ".")
    return sub.add_parser(name, help=short, **kwargs)


def rich_console(stderr: bool = False) -> Any:
    """The ``rich.console.Console`` commands print their tables on (``stderr``: when stdout carries
    a JSON document). Written to a pipe or a file (a log), rich would fold them at 80 columns: 160
    there, unless ``COLUMNS`` says otherwise."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(stderr=stderr, width=160)
    return console


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser: ``command``'s module fully, every other command as its name and help line."""
    parser = argparse.ArgumentParser(prog="moe-record", description="Record and inspect MoE expert load.")
    from .._version import __version__

    parser.add_argument("--version", action="version", version=f"moe-record-sdk {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = COMMANDS[command][0] if command in COMMANDS else None
    for name, (module, _) in COMMANDS.items():
        if name in sub.choices:  # added with its module's other commands
            continue
        if module == wanted:
            importlib.import_module(f"{__name__}.{module}").add_parser(sub)
        else:
            add_command(sub, name)
    return parser


class _BestEffort:
    """A console stream whose failures end its output, not the command.

    Why: the terminal hung up (ssh dropped: EIO) or the reader of a pipe went away (EPIPE, e.g.
    ``| head``) while ``record`` or ``dump`` still had engines to stop, dump and save. The first
    print after that raised, and the windows the engines had handed over were never saved.
    After its first failure the stream writes to /dev/null (its descriptor too, so the
    interpreter's flush at exit raises nothing either)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.failed = False

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # ValueError: a closed file
                self._give_up()
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._give_up()

    def _give_up(self) -> None:
        self.failed = True
        with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the stream's
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _BestEffort(sys.stdout), _BestEffort(sys.stderr)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C (or the demo's SIGTERM) where no command saves anything: no traceback
        print("moe-record: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdout, sys.stderr = streams


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the command is the first word: the only options before it are --help and --version
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad arguments, as we want
        return int(e.code or 0)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
