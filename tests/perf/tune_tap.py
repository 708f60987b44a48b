"""Tune the Triton tap's launch shape in a CUDA graph, and measure the floor it sits on.

Prints microseconds per layer call (medians, interleaved) of the stat tap, the per_token tap
and a bare torch copy of the same ids, for each launch shape of ``counter_triton`` (``SHAPES``:
ids per thread and warps per program, stripes, up to how many ids one atomic per id is used), and the best
shape (the lowest worst-case ratio to the copy); with ``--floor``, an empty Triton kernel (loads
the flag, writes nothing) and a Triton copy of the ids. Used to pick the defaults in
``counter_triton``; the notes there cite its figures.

    python tests/perf/tune_tap.py [--experts 256] [--tokens 1,16,128,1024,4096,16384] [--floor]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl

from moe_record_sdk import counter_triton
from moe_record_sdk.bench import _graph_timer, _methods

# name -> counter_triton settings over the shipped ones (``SHIPPED``, read at import).
KNOBS = ("STRIPES", "LAUNCH", "ATOMICS_MAX")
SHIPPED = {k: getattr(counter_triton, k) for k in KNOBS}
SHAPES = {
    "shipped": {},
    "atomics": {"ATOMICS_MAX": 1 << 62},  # one atomic per id at every T (where PTX is not available)
    "hist": {"ATOMICS_MAX": 0},  # the histogram at every T
    "1x2": {"LAUNCH": ((None, 1, 2),)},  # ids per thread x warps, at every T
    "1x4": {"LAUNCH": ((None, 1, 4),)},
    "1x8": {"LAUNCH": ((None, 1, 8),)},
    "2x8": {"LAUNCH": ((None, 2, 8),)},
    "4x8": {"LAUNCH": ((None, 4, 8),)},
    "8x8": {"LAUNCH": ((None, 8, 8),)},
    "2x16": {"LAUNCH": ((None, 2, 16),)},
    "4x16": {"LAUNCH": ((None, 4, 16),)},
    "8x16": {"LAUNCH": ((None, 8, 16),)},
    "4x32": {"LAUNCH": ((None, 4, 32),)},
    "s4": {"STRIPES": 4},
    "s64": {"STRIPES": 64},
}


@triton.jit
def _empty(flag_ptr, out_ptr):
    on = tl.load(flag_ptr) != 0
    tl.store(out_ptr, 1, mask=on & (tl.program_id(0) < 0))


@triton.jit
def _copy(src, dst, n, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + e, tl.load(src + e, mask=e < n), mask=e < n)


def _median(timers: dict, trials: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {n: [] for n in timers}
    for _ in range(trials):
        for n, once in timers.items():
            samples[n].append(once())
    return {n: statistics.median(s) for n, s in samples.items()}


def apply(shape: str) -> None:
    """Set ``counter_triton``'s launch knobs to a named shape (recorders built after see it)."""
    for k, v in (SHIPPED | SHAPES[shape]).items():
        setattr(counter_triton, k, v)


def tune(experts: list[int], tokens: list[int], shapes: list[str], trials: int) -> dict:
    """Time every shape; return {shape: {(E, T): {"ours", "per_token", "copy"}}} in us per call."""
    out: dict = {}
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    print(f"{'E':>4} {'T':>6} {'shape':>10} {'ours':>7} {'tok':>7} {'copy':>7} {'o/c':>5} {'t/c':>5}")
    for E in experts:
        for T in tokens:
            for shape in shapes:
                apply(shape)  # before building the recorders: the stripes are allocated with them
                fns, _ = _methods(torch.device("cuda"), E, T, 8, torch.int32)
                timers = {n: _graph_timer(fns[n], 64, 5) for n in ("ours", "per_token", "copy")}
                m = _median(timers, trials)
                out.setdefault(shape, {})[E, T] = m
                print(
                    f"{E:>4} {T:>6} {shape:>10} {m['ours']:7.2f} {m['per_token']:7.2f} {m['copy']:7.2f} "
                    f"{m['ours'] / m['copy']:5.2f} {m['per_token'] / m['copy']:5.2f}",
                    flush=True,
                )
                del fns, timers
    return out


def best(results: dict) -> str:
    """The shape whose worst ``ours / copy`` ratio over all (E, T) is lowest (then the mean)."""

    def score(shape: str) -> tuple[float, float]:
        r = [m["ours"] / m["copy"] for m in results[shape].values()]
        return max(r), sum(r) / len(r)

    return min(results, key=score)


def floor(tokens: list[int], trials: int) -> None:
    print("floor (us per call in a graph, E=256, k=8): empty Triton kernel, Triton copy, torch copy")
    flag = torch.ones((), dtype=torch.int64, device="cuda")
    for T in tokens:
        src = torch.randint(0, 256, (T * 8,), dtype=torch.int32, device="cuda")
        dst = torch.empty_like(src)
        n = src.numel()
        grid = (triton.cdiv(n, 1024),)
        timers = {
            "empty": _graph_timer(lambda i, d=dst: _empty[(1,)](flag, d), 64, 5),
            "tcopy": _graph_timer(lambda i, s=src, d=dst, g=grid, n=n: _copy[g](s, d, n, BLOCK=1024), 64, 5),
            "copy": _graph_timer(lambda i, s=src, d=dst: d.copy_(s), 64, 5),
        }
        m = _median(timers, trials)
        print(f"T={T:>6} empty {m['empty']:.2f}  triton copy {m['tcopy']:.2f}  torch copy {m['copy']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", default="256")
    p.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--floor", action="store_true", help="also time the floor (empty kernel, copies)")
    a = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    results = tune(ints(a.experts), ints(a.tokens), a.shapes.split(","), a.trials)
    apply("shipped")
    if a.floor:
        floor(ints(a.tokens), a.trials)
    winner = best(results)
    print(f"best shape: {winner} = {SHIPPED | SHAPES[winner]}")
    return winner


if __name__ == "__main__":
    main()
