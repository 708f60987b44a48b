"""Tune the Triton tap's launch shape in a CUDA graph, and measure the floor it sits on.

Prints microseconds per layer call (medians, interleaved) of the stat tap, the per_token tap
and a bare torch copy of the same ids, for each launch shape of ``counter_triton`` (``SHAPES``:
stripes, direct atomics at every T, a histogram/atomics split, warps), and the best shape (the
lowest worst-case ratio to the copy); with ``--floor``, an empty Triton kernel (loads the flag,
writes nothing), a Triton copy of the ids and a bare ``tl.histogram`` kernel (the least any tap
built on it pays). Used to pick the defaults in ``counter_triton``; the notes there cite its
figures.

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

# name -> counter_triton settings, over the defaults of ``BEFORE`` (the tap as first shipped:
# one copy of the counters). "before" is the baseline every other shape is compared with.
BEFORE = {
    "STRIPES": 1,
    "DIRECT_MAX": 1024,
    "DIRECT_BLOCK": 128,
    "DIRECT_WARPS": 1,
    "HIST_BLOCKS": (512, 1024),
    "ATOMIC_BLOCK": 0,
    "MAX_PROGRAMS": 132,
    "NUM_WARPS": 8,
}
ALL = 1 << 62  # DIRECT_MAX: one atomic per id at every T
SHAPES = {
    "before": {},
    "s16": {"STRIPES": 16},
    "s64": {"STRIPES": 64},
    "s16-d128": {"STRIPES": 16, "DIRECT_MAX": ALL},
    "s16-d512": {"STRIPES": 16, "DIRECT_MAX": ALL, "DIRECT_BLOCK": 512, "DIRECT_WARPS": 4},
    "s64-d512": {"STRIPES": 64, "DIRECT_MAX": ALL, "DIRECT_BLOCK": 512, "DIRECT_WARPS": 4},
    "s16-hyb": {"STRIPES": 16, "HIST_BLOCKS": (512,), "ATOMIC_BLOCK": 512},
    "s16-w4": {"STRIPES": 16, "NUM_WARPS": 4},
    "s16-d32k": {"STRIPES": 16, "DIRECT_MAX": 32768},  # direct up to T=4096 (k=8): shipped until 2026-11-28
    # Bigger histogram programs: fewer of them, so fewer per-bin atomics when they add their bins.
    "b1k-w16": {"STRIPES": 16, "DIRECT_MAX": 32768, "HIST_BLOCKS": (1024,), "NUM_WARPS": 16},
    "b2k-w8": {"STRIPES": 16, "DIRECT_MAX": 32768, "HIST_BLOCKS": (2048,)},
    "b2k-w16": {"STRIPES": 16, "DIRECT_MAX": 32768, "HIST_BLOCKS": (2048,), "NUM_WARPS": 16},
    "b4k-w16": {"STRIPES": 16, "DIRECT_MAX": 32768, "HIST_BLOCKS": (4096,), "NUM_WARPS": 16},
    "h16k-b2k-w16": {"STRIPES": 16, "DIRECT_MAX": 16384, "HIST_BLOCKS": (2048,), "NUM_WARPS": 16},
    # More, smaller histogram programs: less histogram work each, more per-bin atomics.
    "p264": {"STRIPES": 16, "DIRECT_MAX": 32768, "HIST_BLOCKS": (512,), "MAX_PROGRAMS": 264},  # shipped
    "p264-w4": {"STRIPES": 16, "DIRECT_MAX": 32768, "HIST_BLOCKS": (512,), "MAX_PROGRAMS": 264, "NUM_WARPS": 4},
    "p528": {"STRIPES": 16, "DIRECT_MAX": 32768, "HIST_BLOCKS": (256,), "MAX_PROGRAMS": 528},
    "p528-s64": {"STRIPES": 64, "DIRECT_MAX": 32768, "HIST_BLOCKS": (256,), "MAX_PROGRAMS": 528},
    "h16k-p264": {"STRIPES": 16, "DIRECT_MAX": 16384, "HIST_BLOCKS": (256,), "MAX_PROGRAMS": 264},
    # More stripes: fewer per-id atomics queue on one address on the direct path at T=4096.
    "s32-p264": {"STRIPES": 32, "DIRECT_MAX": 32768, "HIST_BLOCKS": (512,), "MAX_PROGRAMS": 264},
    "s64-p264": {"STRIPES": 64, "DIRECT_MAX": 32768, "HIST_BLOCKS": (512,), "MAX_PROGRAMS": 264},
}
KNOBS = tuple(BEFORE)


@triton.jit
def _empty(flag_ptr, out_ptr):
    on = tl.load(flag_ptr) != 0
    tl.store(out_ptr, 1, mask=on & (tl.program_id(0) < 0))


@triton.jit
def _bare_histogram(
    ids_ptr, n, counts_ptr, S: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr, ATOMICS: tl.constexpr
):
    # tl.histogram per program and one atomic per nonzero bin into stripe pid % G: the tap's
    # histogram path without its flags, padding and discard bins, i.e. what any tap built on
    # tl.histogram pays at least.
    pid = tl.program_id(0)
    hist = tl.zeros([S], dtype=tl.int32)
    for b in range(pid, tl.cdiv(n, BLOCK), tl.num_programs(0)):
        e = b * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(ids_ptr + e, mask=e < n, other=-1)
        ok = (x >= 0) & (x < S)
        hist += tl.histogram(tl.where(ok, x, 0), S, mask=ok)
    bins = tl.arange(0, S)
    ptr = counts_ptr + (pid % G) * S + bins
    tl.atomic_add(ptr, hist.to(tl.int64), mask=(hist > 0) & ATOMICS, sem="relaxed")


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
    for k, v in (BEFORE | SHAPES[shape]).items():
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
    print("floor (us per call in a graph, E=256, k=8): empty Triton kernel, Triton copy, torch copy;")
    print("a bare tl.histogram kernel (512-id programs, 16 stripes) with and without its per-bin atomics")
    flag = torch.ones((), dtype=torch.int64, device="cuda")
    counts = torch.zeros(16, 256, dtype=torch.int64, device="cuda")
    for T in tokens:
        src = torch.randint(0, 256, (T * 8,), dtype=torch.int32, device="cuda")
        dst = torch.empty_like(src)
        n = src.numel()
        grid = (triton.cdiv(n, 1024),)
        hgrid = (min(triton.cdiv(n, 512), counter_triton.MAX_PROGRAMS),)

        def hist(i: int, s: torch.Tensor = src, n: int = n, g: tuple = hgrid, atomics: bool = True) -> None:
            _bare_histogram[g](s, n, counts, S=256, G=16, BLOCK=512, ATOMICS=atomics, num_warps=8)

        counts.zero_()
        hist(0)
        assert torch.equal(counts.sum(0), torch.bincount(src.long(), minlength=256)), "bare histogram: wrong counts"
        timers = {
            "empty": _graph_timer(lambda i, d=dst: _empty[(1,)](flag, d), 64, 5),
            "tcopy": _graph_timer(lambda i, s=src, d=dst, g=grid, n=n: _copy[g](s, d, n, BLOCK=1024), 64, 5),
            "copy": _graph_timer(lambda i, s=src, d=dst: d.copy_(s), 64, 5),
            "hist": _graph_timer(hist, 64, 5),
            "hist0": _graph_timer(lambda i: hist(i, atomics=False), 64, 5),
        }
        m = _median(timers, trials)
        print(
            f"T={T:>6} empty {m['empty']:.2f}  triton copy {m['tcopy']:.2f}  torch copy {m['copy']:.2f}  "
            f"bare histogram {m['hist']:.2f} ({m['hist'] / m['copy']:.2f}x the copy), "
            f"without atomics {m['hist0']:.2f} ({m['hist0'] / m['copy']:.2f}x)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", default="256")
    p.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--trials", type=int, default=15)
    p.add_argument("--floor", action="store_true", help="also time the floor (empty kernel, copies)")
    a = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    defaults = {k: getattr(counter_triton, k) for k in KNOBS}
    results = tune(ints(a.experts), ints(a.tokens), a.shapes.split(","), a.trials)
    for k, v in defaults.items():
        setattr(counter_triton, k, v)
    if a.floor:
        floor(ints(a.tokens), a.trials)
    winner = best(results)
    print(f"best shape: {winner} = {BEFORE | SHAPES[winner]}")
    return winner


if __name__ == "__main__":
    main()
