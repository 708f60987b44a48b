"""``moe-record start|stop|dump|status --engine URL ...``: one control action on many engines."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from .. import env
from ..client._models import printable, run_file_kind
from ..schema import FORMATS, MODES
from ..server.protocol import H_CLIENT, bearer_token_problem
from . import COMMANDS, add_command

ACTIONS = ("start", "stop", "dump", "status")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--engine`` (repeatable, or comma-separated), ``--api-key``, ``--timeout``, ``--retries``."""
    p.add_argument(
        "--engine", "-e", action="append", required=True, metavar="URL",
        help="an engine's base URL (http://host:port, or host:port); repeat it, or separate with commas",
    )  # fmt: skip
    keys = p.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-key", default=None, help=f"bearer token for the engines (default ${env.MOE_RECORD_API_KEY})"
    )
    keys.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="bearer tokens read from FILE, kept out of the command line (which ps shows): one token for every "
        "engine, or one 'URL TOKEN' line per engine",
    )
    p.add_argument(
        "--timeout",
        type=positive,
        default=60.0,
        help="seconds per request (default 60): the whole call for start/stop/status, each wait for bytes for a dump",
    )
    p.add_argument("--retries", type=int, default=2, help="extra attempts where safe (default 2)")
    p.add_argument(
        "--client-id",
        metavar="ID",
        help="this client's id (x-moe-record-client; default: a new one per run of the command): give the one "
        "a failed dump named to collect the window the engine keeps for it (with dump --resend)",
    )


def positive(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def check_out(directory: str) -> str | None:
    """Why ``directory`` cannot take a run's dumps, or None. Checked before any engine is
    touched: a dump clears the engines, so a folder found unusable after it loses the recording,
    and dumps of an earlier run beside the new ones would pass for this run's."""
    try:
        os.makedirs(directory, exist_ok=True)
        earlier = sorted(f for f in os.listdir(directory) if run_file_kind(f))
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        return f"--out {directory}: cannot write there: {e.strerror or e}"
    if earlier:
        return f"--out {directory}: holds dumps of an earlier run ({', '.join(earlier[:3])}): choose an empty folder"
    return None


def missing_folders(path: str) -> list[str]:
    """The folders of ``path`` that do not exist yet, deepest first: the ones ``check_out`` makes."""
    missing, path = [], os.path.abspath(path)
    while not os.path.exists(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def remove_if_empty(folders: list[str]) -> None:
    """Remove the folders a command made, when it put nothing in them (deepest first)."""
    for folder in folders:
        try:
            os.rmdir(folder)  # only an empty one
        except OSError:
            return


def save_dumps(
    result: Any, directory: str, fmt: str, echo: Callable[[str], None], client_id: str | None = None
) -> tuple[dict[str, str], bool]:
    """``result.save``; where that fails (a full disk, another run's files saved there
    meanwhile), all of them into a new temporary folder instead: the engines cleared their
    windows when they dumped, so these copies are the only ones. The files that did land in
    ``directory`` are then removed, so no run's set is mixed with another's; they stay when
    the new folder fails too. Returns the files written (by engine URL or ``"merged"``) and
    whether they are all in ``directory``, as asked (a caller exits 1 otherwise: a script
    reading ``directory`` would find nothing, or another run's files); what failed is echoed.
    Where nothing could hold them, each engine still keeps the window it answered for this
    client (``client_id``) until its next dump or start: the command that fetches them again
    is echoed."""
    try:
        return result.save(directory, format=fmt), True
    except OSError as e:
        landed: dict[str, str] = getattr(e, "saved", {})
        echo(f"cannot save into {directory}: {_why(e)}")
    rescue = None
    try:
        rescue = tempfile.mkdtemp(prefix="moe-record-")
        saved = result.save(rescue, format=fmt)
    except OSError as e:
        kept = {**getattr(e, "saved", {}), **landed}  # where both hold one: the asked-for folder's
        if rescue is not None:
            remove_if_empty([rescue])
        where = rescue or f"a temporary folder in {tempfile.gettempdir()}"
        lost = f"the dumps not saved (saved whole: {', '.join(kept.values())})" if kept else "the dumps"
        echo(f"cannot save into {where} either: {_why(e)}: {lost} are not on this machine")
        for command in _refetch(result, kept, client_id):
            echo(f"  the engines keep them until their next dump or start; fetch them again with: {command}")
        return kept, False
    for path in landed.values():
        with contextlib.suppress(OSError):
            os.unlink(path)
    echo(f"saved into {rescue} instead, not into {directory}")
    return saved, False


def _refetch(result: Any, kept: dict[str, str], client_id: str | None) -> list[str]:
    """``moe-record dump`` commands that fetch again the windows not saved: one per window number
    (``--resend`` names one for all the engines of a call)."""
    if client_id is None:
        return []
    by_window: dict[int, list[str]] = {}
    for r in result:
        if r.ok and r.dump is not None and r.window and r.engine not in kept:
            by_window.setdefault(r.window, []).append(r.engine)
    return [
        "moe-record dump " + " ".join(f"-e {e}" for e in engines) + f" --client-id {client_id} --resend {w} "
        "--out NEW_DIR"
        for w, engines in sorted(by_window.items())
    ]


def _why(e: OSError) -> str:
    name = f" ({os.path.basename(e.filename)})" if e.filename else ""
    return f"{e.strerror or e}{name}"


def engines_of(args: argparse.Namespace) -> list[str]:
    return [e for group in args.engine for e in group.split(",") if e.strip()]


def fleet_of(args: argparse.Namespace) -> Any:
    """The Fleet the engine options describe; ``ValueError`` names what is wrong with them."""
    from ..client import Fleet

    engines = engines_of(args)
    api_key = args.api_key if args.api_key_file is None else read_api_keys(args.api_key_file, engines)
    headers = {H_CLIENT: args.client_id} if args.client_id is not None else None
    return Fleet(engines, api_key=api_key, timeout=args.timeout, retries=args.retries, headers=headers)


def read_api_keys(path: str, engines: list[str]) -> str | dict[str, str]:
    """``--api-key-file``: a file holding one token (every engine's), or ``URL TOKEN`` lines, one
    per engine (blank lines and ``#`` comments skipped). Every engine needs its line there."""
    from ..client import normalize_engine

    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: a BOM, as Windows editors write, is not the token's
            lines = [(n, line.strip()) for n, line in enumerate(f, 1)]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    for n, line in lines:  # never echoed: it is a secret
        if not line.isascii() or any(bearer_token_problem(part) for part in line.split()):
            raise ValueError(f"--api-key-file {path}, line {n}: holds a character a bearer token cannot have")
    if len(lines) == 1 and len(lines[0][1].split()) == 1:
        return lines[0][1]
    if not lines:
        raise ValueError(f"--api-key-file {path}: holds no token")
    keys: dict[str, str] = {}
    for n, line in lines:
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"--api-key-file {path}, line {n}: expected 'URL TOKEN' (or one token alone in the file)")
        try:
            url = normalize_engine(parts[0])
        except ValueError:  # its message would echo the field: a token, if the line is swapped
            raise ValueError(f"--api-key-file {path}, line {n}: the first field is not an engine URL") from None
        if url in keys:
            raise ValueError(f"--api-key-file {path}, line {n}: {url} is listed twice")
        keys[url] = parts[1]
    missing = [e for e in engines if normalize_engine(e) not in keys]
    if missing:
        raise ValueError(f"--api-key-file {path}: no token for {', '.join(missing)}")
    return keys


def add_parser(sub: argparse._SubParsersAction) -> None:
    for action in ACTIONS:
        p = add_command(sub, action, description=COMMANDS[action][1].capitalize() + ".")
        add_engine_options(p)
        p.add_argument("--json", action="store_true", help="one JSON document on stdout")
        if action == "start":
            p.add_argument("--mode", choices=MODES, default=None, help="recording mode (default: the engine's)")
        if action == "dump":
            p.add_argument(
                "--out",
                metavar="DIR",
                help="collect the dumps here (each engine's + merged) instead of leaving them on the engines",
            )
            p.add_argument(
                "--format", choices=FORMATS, default="pt", help="file format with --out (default pt, SGLang's)"
            )
            p.add_argument(
                "--resend",
                type=_window,
                metavar="W",
                help="ask for window W again, as a failed dump of --client-id's names it (its answer was lost); "
                "needs --client-id",
            )
        p.set_defaults(func=run, action=action)


#: Ctrl-C, and the polite stops of ``timeout``, systemd, docker and Kubernetes (SIGTERM) and of a
#: closed terminal (SIGHUP).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class OnCtrlC:
    """Ctrl-C (or SIGTERM, SIGHUP: ``STOP_SIGNALS``) runs ``handler`` instead of raising
    ``KeyboardInterrupt`` or ending the process (on the main thread, where signals go; elsewhere
    nothing changes). ``record`` uses it to end the recording however often it is pressed, and a
    dump to finish: the engines clear their windows as they dump, so stopping halfway would lose
    what was collected.

    The signal handler only counts; ``handler`` runs on a watcher thread, once per signal, within
    ``POLL`` s. A Python signal handler runs between any two bytecodes of the main thread, also
    inside another signal's handler: a print there broke half-way through rich's lazy import
    when a second Ctrl-C came (ImportError, exit 1), and an ``Event.set`` there can deadlock on
    the lock the interrupted one holds. ``after``: what the signals do once this exits (default:
    what they did before).
    """

    POLL = 0.02

    def __init__(self, handler: Callable[[], None], after: Any = None) -> None:
        self.handler, self.after, self.previous = handler, after, {}
        self._caught = self._handled = 0
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    def _catch(self, *_: object) -> None:
        self._caught += 1  # nothing else here: see the class's note

    def _watch(self) -> None:
        while True:
            closed = self._closed.wait(self.POLL)
            while self._handled < self._caught:
                self._handled += 1
                self.handler()
            if closed:  # the signals caught until the exit are handled, then no more
                return

    def __enter__(self) -> OnCtrlC:
        if threading.current_thread() is threading.main_thread():
            self._closed.clear()
            self._watcher = threading.Thread(target=self._watch, name="moe-record-stop-signals", daemon=True)
            self._watcher.start()
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._catch)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self.previous.items():
            then = self.after if self.after is not None else previous
            signal.signal(sig, then if then is not None else signal.SIG_DFL)
        self.previous = {}
        if self._watcher is not None:
            self._closed.set()
            self._watcher.join(timeout=5)  # a handler stuck on a blocked terminal must not hang the exit
            self._watcher = None


def finishing_dump(echo: Callable[[str], None]) -> Callable[[], None]:
    """What a stop signal does once a dump is under way: say so, and go on."""
    return lambda: echo("finishing the dump; please wait")


def wait_on_ctrl_c(echo: Callable[[str], None]) -> OnCtrlC:
    return OnCtrlC(finishing_dump(echo))


def _window(text: str) -> int:
    """An argparse type: a window number (1, 2, ...)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a window number: expected 1, 2, ...")
    return int(text)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "resend", None) is not None and args.client_id is None:
        # An engine keeps a window for the client its answer went to: under a new random id the
        # resend would be ignored, and the dump would take (and clear) the current window instead.
        print("moe-record dump: --resend needs --client-id, the id the failed dump named", file=sys.stderr)
        return 2
    try:
        fleet = fleet_of(args)
    except ValueError as e:
        print(f"moe-record {args.action}: {e}", file=sys.stderr)
        return 2
    made = missing_folders(args.out) if args.action == "dump" and args.out else []
    problem = check_out(args.out) if args.action == "dump" and args.out else None
    if problem:
        print(f"moe-record dump: {problem}", file=sys.stderr)
        return 2
    saved: dict[str, str] = {}
    in_place = True
    with fleet:
        if args.action != "dump":
            try:
                result = fleet.start(args.mode) if args.action == "start" else getattr(fleet, args.action)()
            except KeyboardInterrupt:  # an engine that does not answer, and Ctrl-C: say who did
                print(f"moe-record {args.action}: interrupted", file=sys.stderr)
                if fleet.cut_short is not None and args.json:
                    json.dump(result_json(fleet.cut_short), sys.stdout, indent=2)
                    print()
                elif fleet.cut_short is not None:
                    print_result(fleet.cut_short, echo=lambda line: print(line, file=sys.stderr))
                return 130
        else:
            echo = lambda line: print(line, file=sys.stderr)  # noqa: E731
            with wait_on_ctrl_c(echo):  # taken, a dump is gone from the engines: save it whatever comes
                result = fleet.dump(collect=bool(args.out), resend=args.resend)
                if args.out:
                    saved, in_place = save_dumps(result, args.out, args.format, echo, fleet.client_id)
                    remove_if_empty(made)  # no engine gave a dump: no folder left behind
    if args.json:
        json.dump(result_json(result, saved) | {"client_id": fleet.client_id}, sys.stdout, indent=2)
        print()
        for hint in filter(None, map(_hint, result)):
            print(hint, file=sys.stderr)
    else:
        print_result(result, saved)
    return 0 if result.ok and in_place else 1


def result_json(result: Any, saved: dict[str, str] | None = None) -> dict[str, Any]:
    """A FleetResult as plain JSON (dumps are summarized, not inlined)."""
    saved = saved or {}
    engines = []
    for r in result:
        doc = {
            "engine": r.engine, "ok": r.ok, "status_code": r.status_code, "elapsed_s": round(r.elapsed, 6),
            "attempts": r.attempts, "error": r.error, "error_kind": r.error_kind, "flavor": r.flavor,
            "instance_id": r.instance_id, "run_id": r.run_id, "window": r.window, "stopped_by": r.stopped_by,
            "location": r.location, "files": r.files,
            "note": r.note, "resent": r.resent, "saved": saved.get(r.engine),
        }  # fmt: skip
        if r.info is not None:
            doc["info"] = r.info
        if r.dump is not None:
            doc["dump"] = {
                "mode": r.dump.mode,
                "passes": r.dump.window.num_passes,
                "tokens": max(r.dump.window.num_tokens or [0]),
            }
        engines.append(doc)
    return {
        "action": result.action, "ok": result.ok, "elapsed_s": round(result.elapsed, 6), "engines": engines,
        "merged": saved.get("merged"), "merge_error": result.merge_error,
    }  # fmt: skip


def rank_totals(ranks: list[dict[str, Any]]) -> tuple[int, int]:
    """An engine's passes and tokens from its ranks' status: ranks of one token shard (tensor-
    parallel replicas, pipeline stages) ran the same passes over the same tokens, so each shard
    counts once (its largest figures); shards (data-parallel ranks) add up."""
    shards: dict[object, tuple[int, int]] = {}
    for x in ranks:
        shard = x.get("token_shard", 0)
        passes, tokens = shards.get(shard, (0, 0))
        shards[shard] = max(passes, int(x.get("passes") or 0)), max(tokens, int(x.get("tokens") or 0))
    return sum(p for p, _ in shards.values()), sum(t for _, t in shards.values())


def recording_state(info: dict[str, Any]) -> str:
    """An engine's state from its status: recording, stopped (a run started and ended), or idle."""
    if info.get("recording"):
        return "recording"
    return "stopped" if info.get("run_id") else "idle"


def _hint(r: Any) -> str | None:
    """What to do about an engine's failure, where this CLI knows: a 401 wants a key option; a
    window the engine kept after a 413 is dumped anyway into the engine's folder (this CLI's limit
    is the machine's memory, so a larger one is no option here)."""
    if r.status_code == 401:
        return f"  {r.engine} wants a bearer token: --api-key T, $MOE_RECORD_API_KEY, or --api-key-file F"
    if r.error_kind != "too_large" or r.status_code != 413 or r.files:
        return None
    return (
        f"  {r.engine} kept its window: `moe-record dump --engine {r.engine}` (and your key option) without --out "
        "writes it into the engine's dump folder"
    )


def print_result(result: Any, saved: dict[str, str] | None = None, echo: Callable[[str], Any] = print) -> None:
    """One line per engine, then the merge and a count of successes."""
    saved = saved or {}
    for r in result:
        line = r.describe()
        if r.action == "status" and r.ok and r.info:
            ranks = r.info.get("ranks") or []
            state = recording_state(r.info)
            mode = ranks[0].get("mode") if ranks else "?"
            passes, tokens = rank_totals(ranks)
            run_id = r.info.get("run_id")  # None until the engine's first start
            line += f" {state}, mode {mode}, {passes} passes, {tokens} tokens, {len(ranks)} rank(s), "
            line += f"run {run_id}" if run_id else "no run started yet"
        if r.engine in saved:
            line += f" -> {saved[r.engine]}"
        echo(printable(line))
        hint = _hint(r)
        if hint:
            echo(hint)
    if "merged" in saved:
        echo(f"merged -> {saved['merged']}")
    if result.merge_error:
        echo(f"merge failed: {result.merge_error}")
    n_bad = len(result.failed)
    echo(f"{result.action}: {len(result) - n_bad}/{len(result)} engines ok in {result.elapsed * 1000:.0f} ms")
