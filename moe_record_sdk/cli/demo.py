"""``moe-record demo``: two reference engines on 127.0.0.1, traffic, one Fleet recording, dumps.

Starts two ``moe-record serve`` processes (free ports, the tiny model with two seeds), drives
``/generate`` traffic at both while ``record`` runs across them with one Fleet, writes each
engine's dump and the merged one, validates them, prints the summary and checks that the merge
holds exactly the two engines' counts. Every process it starts is ended before it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
from rich.console import Console

from ..client._models import run_file_kind
from ..errors import MoeRecordError
from . import add_command, rich_console
from .control import STOP_SIGNALS, check_out, positive
from .convert import positive_int
from .serve import READY

#: Marks a folder the demo made: the next demo replaces the dumps there, and only there.
DEMO_MARK = ".moe-record-demo"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        "demo",
        description="Start two reference engines on 127.0.0.1, drive traffic, record across both with one "
        "Fleet call, write the dumps to --out, validate them and print the per-layer summary.",
    )
    p.add_argument("--out", default="moe-record-demo", help="folder for the dumps (default ./moe-record-demo)")
    p.add_argument("--duration", type=positive, default=3.0, help="seconds of recording (default 3)")
    p.add_argument("--engines", type=positive_int, default=2, help="how many engines (default 2)")
    p.add_argument(
        "--mode", choices=("stat", "per_pass", "per_token"), default="stat", help="recording mode (default stat)"
    )
    p.set_defaults(func=run)
    return p


def start_engine(index: int, dump_dir: str, mode: str, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """``moe-record serve --port 0`` in its own process group; returns (process, URL) once ready."""
    cmd = [
        sys.executable, "-m", "moe_record_sdk", "serve", "--host", "127.0.0.1", "--port", "0",
        "--seed", str(index), "--mode", mode, "--dump-dir", dump_dir, "--threads", "1", "--api-key", "",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    url: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith(READY) and not url:
                url.append(line[len(READY) :].strip())

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    try:
        while not url:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MoeRecordError(f"engine {index} did not start:\n" + "\n".join(lines[-20:]))
            time.sleep(0.05)
    except BaseException:  # Ctrl-C while it starts too: its own session, so nothing else would end it
        stop_engine(proc)
        raise
    return proc, url[0]


def stop_engine(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """End the engine's whole process group: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


def traffic(urls: list[str], seed: int = 0):
    """A ``during`` callback for ``record``: /generate requests on every engine until stopped."""

    def drive(stop: threading.Event) -> None:
        rng = random.Random(seed)

        def one(url: str) -> None:
            with httpx.Client(timeout=30.0, trust_env=False) as client:
                while not stop.is_set():
                    prompt = [rng.randrange(256) for _ in range(rng.randint(4, 24))]
                    try:
                        client.post(url + "/generate", json={"input_ids": prompt, "max_new_tokens": rng.randint(4, 12)})
                    except httpx.HTTPError:
                        return  # the engine went away: the record's own calls report it

        threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return drive


@contextlib.contextmanager
def _interrupt_on_stop_signals() -> Iterator[None]:
    """SIGTERM, SIGHUP or Ctrl-C while the engines start: one KeyboardInterrupt, so the demo ends
    and stops the engines it started (SIGTERM would otherwise kill it and leave them running).
    The handler raises and does nothing else: it may run inside another signal's handler."""
    fired = False

    def interrupt(*_: object) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, interrupt) for sig in STOP_SIGNALS} if main else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def run(args: argparse.Namespace) -> int:
    from ..client import Fleet
    from ..server.engine import torch_adapter
    from .record import record

    console = rich_console()

    def say_failed(why: object) -> None:
        console.print(f"moe-record demo: {why}", style="red", markup=False, soft_wrap=True)

    try:
        torch_adapter()  # the engines serve the torch adapter's tiny model
    except MoeRecordError as e:
        say_failed(e)
        return 2
    out = os.path.abspath(args.out)
    if os.path.isfile(os.path.join(out, DEMO_MARK)):  # an earlier demo's folder: its dumps make way
        for name in os.listdir(out):
            if run_file_kind(name):
                with contextlib.suppress(OSError):  # check_out names what stays
                    os.remove(os.path.join(out, name))
    problem = check_out(out)  # any other folder must hold no dumps: nothing is deleted there
    if problem:
        say_failed(problem)
        return 2
    with open(os.path.join(out, DEMO_MARK), "w") as f:
        f.write("made by moe-record demo: the next demo replaces the dumps in this folder\n")
    t0 = time.monotonic()
    procs: list[subprocess.Popen] = []
    try:
        console.print(f"starting {args.engines} reference engines (tiny MoE model) on 127.0.0.1 ...", markup=False)
        urls = []
        with _interrupt_on_stop_signals():
            for i in range(args.engines):
                proc, url = start_engine(i, os.path.join(out, f"server-{i}"), args.mode)
                procs.append(proc)
                urls.append(url)
                console.print(f"  engine {i}: {url}", markup=False)
        console.print(
            f"recording across {len(urls)} engines with one Fleet, traffic on each, for {args.duration:g} s",
            markup=False,
        )
        with Fleet(urls, api_key="", timeout=30.0) as fleet:
            status = record(
                fleet,
                out=out,
                duration=args.duration,
                mode=args.mode,
                interval=0.5,
                console=console,
                during=traffic(urls),
            )
            if status == 0:
                status = _check_merge(out, len(urls), console)
    except MoeRecordError as e:  # an engine that did not start: its own last lines say why
        say_failed(e)
        status = 1
    finally:
        for proc in procs:
            stop_engine(proc)
    left = [p.pid for p in procs if p.poll() is None]
    if left:
        console.print(f"engine processes still running: {left}", style="red")
        return 1
    console.print(f"demo finished in {time.monotonic() - t0:.1f} s; every engine process ended", markup=False)
    return status


def _check_merge(out: str, engines: int, console: Console) -> int:
    """The merged dump must hold exactly the sum of the engines' counts."""
    from ..schema import load_dump

    files = sorted(f for f in os.listdir(out) if run_file_kind(f) == "engine")
    dumps = [load_dump(os.path.join(out, f)) for f in files]
    merged = load_dump(os.path.join(out, next(f for f in os.listdir(out) if run_file_kind(f) == "merged")))
    if len(dumps) != engines:
        console.print(f"expected {engines} engine dumps, found {len(dumps)}", style="red")
        return 1
    total = sum(d.total_count() for d in dumps)
    if not (merged.total_count() == total).all():
        console.print("the merged counts differ from the sum of the engines' counts", style="red")
        return 1
    per = ", ".join(f"{int(d.total_count().sum())}" for d in dumps)
    console.print(
        f"merged counts = sum of the {engines} engines' counts ({per} -> {int(total.sum())} expert picks)", markup=False
    )
    return 0
