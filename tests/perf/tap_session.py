"""One GPU session for the tap, in one process: tune the launch shape, then time with the winner.

1. ``tune_tap``: every launch shape in a CUDA graph (E=256); the best (lowest worst-case ratio
   to a bare copy) is applied to ``counter_triton``.
2. The eager launch: host cost per tap through Triton's dispatcher vs the cached compiled
   kernel vs the torch path vs a bare copy.
3. ``moe-record bench`` (graph and eager, E=64 and 256), JSON and tables.
4. ``tests/perf/e2e_overhead.py``.

Writes tune.log, eager.txt, bench.json, bench.txt, e2e.log, e2e.json under OUT and prints the
tables last.

    python tests/perf/tap_session.py OUT [--tune-trials 15] [--e2e-trials 20] [--eager-reps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e_overhead  # noqa: E402
import tune_tap  # noqa: E402

from moe_record_sdk import Recorder, counter_triton  # noqa: E402
from moe_record_sdk.cli import main as cli_main  # noqa: E402
from moe_record_sdk.cli.bench import print_tables  # noqa: E402


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()

    def isatty(self) -> bool:
        return False


@contextlib.contextmanager
def _log(path: str, echo: bool = True):
    with open(path, "w") as f, contextlib.redirect_stdout(_Tee(f, sys.__stdout__) if echo else f):
        yield


def _eager_one(T: int, calls: int) -> dict[str, float]:
    ids = torch.randint(0, 256, (T, 8), dtype=torch.int32, device="cuda")
    fast = Recorder(8, 256, 8, "cuda", "stat")
    jit = Recorder(8, 256, 8, "cuda", "stat")
    ref = Recorder(8, 256, 8, "cuda", "stat")
    ref.counter.kernel = "torch"
    dst = torch.empty_like(ids)

    def jit_tap(i: int) -> None:
        jit.counter.tap_launches.clear()  # every call through Triton's dispatcher
        jit.record(i % 8, ids)

    fns = {
        "cached kernel": lambda i: fast.record(i % 8, ids),
        "triton dispatch": jit_tap,
        "torch path": lambda i: ref.record(i % 8, ids),
        "copy": lambda i: dst.copy_(ids),
    }
    for r in (fast, jit, ref):
        r.start()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for trial in range(8):  # trial 0 warms up
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for i in range(calls):
                fn(i)
            host = time.perf_counter() - t0
            torch.cuda.synchronize()
            if trial:
                samples[name].append(host * 1e6 / calls)
    assert torch.equal(fast.counter.total_counts(), ref.counter.total_counts())
    return {n: statistics.median(v) for n, v in samples.items()}


def eager_launch(out: str, calls: int = 400) -> None:
    """Host time per eager tap (perf_counter over ``calls`` taps, then one sync)."""
    lines = [f"{torch.cuda.get_device_name()}: eager tap, us per call (host clock, {calls} calls, median of 7)"]
    for T in (1, 16, 4096):
        med = _eager_one(T, calls)
        lines.append(f"T={T:>5} " + "  ".join(f"{n} {v:6.2f}" for n, v in med.items()))
    text = "\n".join(lines)
    print(text, flush=True)
    with open(os.path.join(out, "eager.txt"), "w") as f:
        f.write(text + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--tune-trials", type=int, default=15)
    p.add_argument("--shapes", default=",".join(tune_tap.SHAPES))
    p.add_argument("--bench-trials", type=int, default=30)
    p.add_argument("--e2e-trials", type=int, default=20)
    p.add_argument("--eager-reps", type=int, default=5)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    with _log(os.path.join(a.out, "tune.log")):
        winner = tune_tap.main(["--shapes", a.shapes, "--trials", str(a.tune_trials), "--floor"])
    tune_tap.apply(winner)
    knobs = {k: getattr(counter_triton, k) for k in tune_tap.KNOBS}
    print(f"[{time.time() - t0:.0f}s] applied {winner}: {knobs}", flush=True)

    eager_launch(a.out)
    print(f"[{time.time() - t0:.0f}s] eager launch done", flush=True)

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["bench", "--json", "--trials", str(a.bench_trials)])
    assert rc == 0, rc
    result = json.loads(buf.getvalue())
    result["environment"]["tap_shape"] = {"name": winner, **{k: str(v) for k, v in knobs.items()}}
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"[{time.time() - t0:.0f}s] bench done", flush=True)

    with _log(os.path.join(a.out, "e2e.log"), echo=False):
        e2e_overhead.main(
            [
                "--trials",
                str(a.e2e_trials),
                "--eager-reps",
                str(a.eager_reps),
                "--json",
                os.path.join(a.out, "e2e.json"),
            ]
        )
    print(f"[{time.time() - t0:.0f}s] e2e done", flush=True)

    # The tables last: the reply carries the end of the output.
    with _log(os.path.join(a.out, "bench.txt")):
        print(f"tap shape: {winner} {knobs}")
        print_tables(result["rows"], result["environment"])
    with open(os.path.join(a.out, "e2e.log")) as f:
        print(f.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
