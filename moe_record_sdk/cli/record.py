"""``moe-record record --engine URL ... (--duration S | until Ctrl-C) --out DIR``.

Start everywhere, show progress while recording, stop, dump, save each engine's dump and the
merged one, validate them, print a per-layer summary. Exit 0 when every engine succeeded, 1
when some failed (their errors listed, the others' dumps saved).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from ..client._models import printable
from ..schema.names import FORMATS, MODES
from . import add_command, rich_console
from .control import (
    OnCtrlC,
    add_engine_options,
    check_out,
    finishing_dump,
    fleet_of,
    missing_folders,
    positive,
    print_result,
    rank_totals,
    recording_state,
    remove_if_empty,
    result_json,
    save_dumps,
)

if TYPE_CHECKING:
    from ..schema import Dump


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        "record",
        description="Start recording on every engine, wait (--duration, or until Ctrl-C), stop, dump, save each "
        "engine's dump and the merged one into --out, validate them and print a per-layer summary.",
    )
    add_engine_options(p)
    p.add_argument("--duration", type=positive, default=None, help="seconds to record (default: until Ctrl-C)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the dumps")
    p.add_argument("--mode", choices=MODES, default=None, help="recording mode (default: the engines')")
    p.add_argument("--format", choices=FORMATS, default="pt", help="file format (default pt, SGLang's)")
    p.add_argument("--interval", type=positive, default=1.0, help="seconds between progress updates (default 1)")
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON document on stdout at the end (each step's per-engine results, the files, the problems); "
        "the progress and the summary go to stderr",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    console = rich_console(stderr=args.json)
    try:
        fleet = fleet_of(args)
    except ValueError as e:
        console.print(f"moe-record record: {e}", style="red", markup=False)
        if args.json:  # a script reads stdout whatever happened
            json.dump({"action": "record", "out": args.out, "problems": [str(e)], "exit_status": 2}, sys.stdout)
            print(flush=True)
        return 2
    report: dict[str, Any] | None = {} if args.json else None
    interrupted = threading.Event()
    # Stop signals, from here to the exit, never kill nor cut the report: before record handles
    # them they set the flag it reads (it then starts no engine), and once it has saved and
    # reported they are ignored (Python's own handlers go back to the kill as it exits), so a
    # late Ctrl-C of a burst or a supervisor's repeated SIGTERM cannot turn the exit status into
    # a traceback or a kill. record puts this handler back as it returns: no moment without.
    with OnCtrlC(interrupted.set, after=signal.SIG_IGN):
        try:
            with fleet:
                status = record(
                    fleet,
                    out=args.out,
                    duration=args.duration,
                    mode=args.mode,
                    fmt=args.format,
                    interval=args.interval,
                    console=console,
                    interrupted=interrupted,
                    report=report,
                )
                if report is not None:
                    report["exit_status"] = status
                return status
        finally:
            if report:  # also after an interrupted start or a failure: what happened, as far as it went
                json.dump(report, sys.stdout, indent=2)
                print(flush=True)


def record(
    fleet: Any,
    *,
    out: str,
    duration: float | None,
    mode: str | None = None,
    fmt: str = "pt",
    interval: float = 1.0,
    console: Console | None = None,
    during: Callable[[threading.Event], None] | None = None,
    interrupted: threading.Event | None = None,
    report: dict[str, Any] | None = None,
) -> int:
    """The whole record session over a sync ``Fleet``; returns the exit status.

    ``during(stop_event)`` runs on a thread while recording (the demo drives traffic with it);
    it should return soon after ``stop_event`` is set. ``interrupted``: set by stop signals
    (given, it may be set already: nothing is started then, and the status is 130). ``report``:
    a dict to fill with what ``--json`` prints: each step's results, the files, the problems.
    """
    console = console or rich_console()
    report = {} if report is None else report
    report |= {"action": "record", "out": out, "client_id": fleet.client_id, "start": None, "stop": None}
    report |= {"dump": None, "invalid": {}, "problems": []}
    made = missing_folders(out)
    problem = check_out(out)
    if problem:
        console.print(f"moe-record record: {problem}", style="red", markup=False)
        report["problems"].append(problem)
        return 2
    echo = lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    # From here a stop signal (Ctrl-C, SIGTERM, SIGHUP), once or many times, only ends the
    # recording: the engines are always stopped and dumped and the dumps saved. One handler to
    # the end: between two, a signal would find the process's own (a kill, a traceback).
    interrupted = interrupted or threading.Event()
    with OnCtrlC(interrupted.set) as stop_signals:
        if interrupted.is_set():  # a signal before this handler: no engine touched yet
            console.print("moe-record record: interrupted before any engine started", style="red", markup=False)
            report["problems"].append("interrupted before any engine started")
            remove_if_empty(made)
            return 130

        def while_starting() -> None:  # a signal during the start: it ends once every engine answered
            if not interrupted.is_set():
                echo("stopping: the start ends once every engine has answered (or timed out), then stop and dump")
            interrupted.set()

        stop_signals.handler = while_starting
        started = fleet.start(mode)
        report["start"] = result_json(started)
        stop_signals.handler = interrupted.set
        for r in started.failed:
            console.print(f"start failed: {r.describe()}", style="red", markup=False)
        for r in started.succeeded:
            if r.note:  # e.g. a stock SGLang server records in its own mode, whatever --mode says
                console.print(printable(f"{r.engine}: {r.note}"), style="yellow", markup=False)
        if not started.succeeded:
            console.print("no engine started recording; nothing to record", style="red")
            report["problems"].append("no engine started recording")
            remove_if_empty(made)
            return 1
        if started.failed:  # the others record on: a fleet with one engine down is still worth it
            console.print(
                f"recording on {len(started.succeeded)} of {len(started.results)} engines: the merge will cover "
                "only those (exit status 1)",
                style="yellow",
                markup=False,
            )
        stop_event = threading.Event()
        worker = threading.Thread(target=during, args=(stop_event,), daemon=True) if during else None
        if worker:
            worker.start()
        stops: list[Any] = []

        def stop_engines() -> None:
            # The recording has ended: a later signal only says to wait (a late one of a burst, a
            # repeated SIGTERM would otherwise cut the stop, the dump, the saving or the report short).
            stop_signals.handler = finishing_dump(echo)
            if interrupted.is_set():  # said now, not after the engines' stop answers (their timeout)
                console.print("stopping (Ctrl-C or SIGTERM)")
            stops.append(fleet.stop())

        try:
            _progress(fleet, duration, interval, console, interrupted, stop_engines)
        finally:
            stop_event.set()
            if worker:
                worker.join(timeout=30)
        stop_signals.handler = finishing_dump(echo)  # also where _progress could not stop them
        stopped = stops[0] if stops else fleet.stop()
        report["stop"] = result_json(stopped)
        for r in stopped.failed:
            if r.error_kind != "not_started":  # its failed start is on screen already
                console.print(f"stop failed: {r.describe()}", style="red", markup=False)
                console.print(
                    f"  {r.engine} may still be recording: `moe-record stop -e {r.engine}` ends it",
                    style="red",
                    markup=False,
                )
        result = fleet.dump()
        saved, in_place = save_dumps(result, out, fmt, echo, fleet.client_id)
        report["dump"] = result_json(result, saved)
        print_result(result, saved, echo=echo)
        invalid = report["invalid"] = _validate(result, saved, console)
        report["merged_engines"] = len(result.dumps) if result.merged is not None else 0
        if result.merged is not None:
            print_summary(result.merged, console, title=f"merged over {len(result.dumps)} engine(s)")
            elsewhere = [r.engine for r in result if r.ok and r.dump is None]
            if elsewhere:  # stock SGLang: its dump is a file on its own disk, not in the merge
                console.print(
                    f"the merge covers {len(result.dumps)} of {len(result.results)} engines: "
                    f"{', '.join(elsewhere)} left their dumps on their own disks (listed above); "
                    "copy them here and run `moe-record merge` for the whole fleet",
                    style="yellow",
                    markup=False,
                )
            if not bool(result.merged.total_count().any()):
                console.print("no token was routed while recording: was there traffic in the window?", style="yellow")
        failed = [what for what, bad in (
            ("some engines FAILED", started.failed or stopped.failed or not all(r.ok for r in result)),
            (f"the merge FAILED: {result.merge_error}", result.merge_error),
            ("some files are INVALID", invalid),
            (f"the dumps could not all be saved into {out}", not in_place),
        ) if bad]  # fmt: skip
        if saved:
            where = f"dumps in {os.path.dirname(next(iter(saved.values())))}"  # maybe a rescue folder
        else:  # a stock SGLang server writes its dump on its own disk; nothing came back to save
            from ..client import ON_SERVER

            remove_if_empty(made)
            on_disk = sum(r.ok and r.location == ON_SERVER for r in result)
            where = "no dump saved" + (
                f": {on_disk} engine(s) left theirs on their own disk (listed above)" if on_disk else ""
            )
        console.print(where + "".join(f"; {w}" for w in failed) + (" (details above)" if failed else ""), markup=False)
        report["problems"] += failed
    return 1 if failed else 0


def _progress(
    fleet: Any,
    duration: float | None,
    interval: float,
    console: Console,
    interrupted: threading.Event,
    stop: Callable[[], None],
) -> None:
    """Poll status every ``interval`` s until ``duration`` or Ctrl-C, showing passes and tokens,
    then ``stop()`` the engines and show their last status. A poll waits at most the interval (or
    what is left of the duration, at least 0.2 s), and the engines are stopped before the last
    poll: an engine that does not answer its status must not stretch the recording. An engine
    that restarted, or whose run another client stopped, restarted or dumped, is named at once,
    once (``fleet.cut_into``)."""
    warned: set[str] = set()
    t0 = time.monotonic()
    until = "until Ctrl-C" if duration is None else f"for {duration:g} s"
    table = _status_table(None, 0.0, until)

    def left() -> float:  # till the next poll, or the end of the duration if sooner
        return interval if duration is None else min(interval, duration - (time.monotonic() - t0))

    def poll() -> Any:
        status = fleet.status(timeout=max(0.2, left()))
        for r in status:
            why = fleet.cut_into(r)
            if why and r.engine not in warned:
                warned.add(r.engine)
                console.print(f"{r.engine}: {why}", style="yellow", markup=False)
        return status

    try:
        with Live(table, console=console, refresh_per_second=4, transient=False) as live:
            next_poll = 0.0
            while (duration is None or time.monotonic() - t0 < duration) and not interrupted.is_set():
                now = time.monotonic() - t0
                if now >= next_poll:
                    live.update(_status_table(poll(), now, until, fleet.cut_into))
                    next_poll = now + interval
                time.sleep(max(0.0, min(0.1, left())))
            elapsed = time.monotonic() - t0
            stop()
            live.update(_status_table(fleet.status(timeout=min(interval, 1.0)), elapsed, until))
        if not console.is_terminal:
            console.print()  # Live leaves a file or pipe without the last newline
    except KeyboardInterrupt:  # off the main thread, where OnCtrlC cannot take the signal
        if not console.is_terminal:
            console.print()
        interrupted.set()
        console.print("stopping (Ctrl-C or SIGTERM)")


def _status_table(
    status: Any, elapsed: float, until: str, cut_into: Callable[[Any], str | None] | None = None
) -> Table:
    """``cut_into``: the fleet's, while recording (what befell the run on an engine)."""
    table = Table(title=f"recording {until}: {elapsed:.1f} s", title_justify="left")
    for col in ("engine", "state", "passes", "tokens"):
        table.add_column(col, justify="right" if col in ("passes", "tokens") else "left")
    for r in status or []:
        if r.ok and r.info:
            ranks = r.info.get("ranks") or []
            state = recording_state(r.info)
            if cut_into is not None and cut_into(r):
                state += " (cut into: see above)"
            passes, tokens = map(str, rank_totals(ranks))
        else:
            state, passes, tokens = (f"n/a ({r.error_kind})" if r.error_kind else "n/a"), "-", "-"
        table.add_row(r.engine, state, passes, tokens)
    return table


def _validate(result: Any, saved: dict[str, str], console: Console) -> dict[str, list[str]]:
    """Validate every collected dump and re-read every saved file; the invalid files' problems."""
    from ..schema import validate_dump
    from .validate import check_file

    bad: dict[str, list[str]] = {}
    for name, path in saved.items():
        dump = result.merged if name == "merged" else result.dumps.get(name)
        problems = [f"{f}: {m}" for f, m in validate_dump(dump)] if dump is not None else []
        check = check_file(path)
        problems += [f"{e['field']}: {e['message']}" for e in check["errors"]]
        if problems:
            bad[path] = problems
            console.print(f"INVALID {path}: " + "; ".join(problems), style="red", markup=False)
    if saved and not bad:
        console.print(f"validated {len(saved)} dump file(s): all valid", markup=False)
    return bad


def print_summary(dump: Dump, console: Console | None = None, *, title: str = "") -> None:
    """Per-layer imbalance of ``dump`` (``moe-record summary``'s tables)."""
    from ..analysis.summary import print_summary as draw
    from ..analysis.summary import summarize

    draw(summarize(dump, source=title or None), console or rich_console())
