"""Tune the Triton tap's launch shape in a CUDA graph, and measure the floor it sits on.

Prints microseconds per layer call (medians, interleaved) of the stat tap, the per_token tap
and a bare torch copy of the same ids, for each launch shape of ``counter_triton``; then the
floor: an empty Triton kernel (loads the flag, writes nothing) and a Triton copy of the ids.
Used to pick the defaults in ``counter_triton``; the notes there cite its figures.

    python tests/perf/tune_tap.py [--experts 256] [--tokens 1,16,128,1024,4096,16384]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import triton
import triton.language as tl

from moe_record_sdk import counter_triton
from moe_record_sdk.bench import _graph_timer, _methods

# name -> counter_triton settings; "direct" forces one atomic per id at every T.
SHAPES = {
    "default": {},
    "d256": {"DIRECT_MAX": 256},
    "d2048": {"DIRECT_MAX": 2048},
    "db256w2": {"DIRECT_BLOCK": 256, "DIRECT_WARPS": 2},
    "hb1024": {"HIST_BLOCKS": (1024,)},
    "hb256": {"HIST_BLOCKS": (256, 512, 1024)},
    "p64": {"MAX_PROGRAMS": 64},
    "w4": {"NUM_WARPS": 4},
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--experts", default="256")
    p.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--trials", type=int, default=15)
    a = p.parse_args()
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    knobs = ("DIRECT_MAX", "DIRECT_BLOCK", "DIRECT_WARPS", "HIST_BLOCKS", "MAX_PROGRAMS", "NUM_WARPS")
    defaults = {k: getattr(counter_triton, k) for k in knobs}
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, defaults)
    print(f"{'E':>4} {'T':>6} {'shape':>12} {'ours':>7} {'tok':>7} {'copy':>7} {'o/c':>5} {'t/c':>5}")
    for E in ints(a.experts):
        for T in ints(a.tokens):
            fns, _ = _methods(torch.device("cuda"), E, T, 8, torch.int32)
            for shape in a.shapes.split(","):
                for k, v in (defaults | SHAPES[shape]).items():
                    setattr(counter_triton, k, v)
                timers = {n: _graph_timer(fns[n], 64, 5) for n in ("ours", "per_token", "copy")}
                m = _median(timers, a.trials)
                print(
                    f"{E:>4} {T:>6} {shape:>12} {m['ours']:7.2f} {m['per_token']:7.2f} {m['copy']:7.2f} "
                    f"{m['ours'] / m['copy']:5.2f} {m['per_token'] / m['copy']:5.2f}",
                    flush=True,
                )
            for k, v in defaults.items():
                setattr(counter_triton, k, v)
    print("floor: empty Triton kernel, Triton copy, torch copy (us per call in a graph)")
    flag = torch.ones((), dtype=torch.int64, device="cuda")
    for T in ints(a.tokens):
        src = torch.randint(0, 256, (T * 8,), dtype=torch.int32, device="cuda")
        dst = torch.empty_like(src)
        grid = (triton.cdiv(src.numel(), 1024),)
        timers = {
            "empty": _graph_timer(lambda i, d=dst: _empty[(1,)](flag, d), 64, 5),
            "tcopy": _graph_timer(lambda i, s=src, d=dst, g=grid: _copy[g](s, d, s.numel(), BLOCK=1024), 64, 5),
            "copy": _graph_timer(lambda i, s=src, d=dst: d.copy_(s), 64, 5),
        }
        m = _median(timers, a.trials)
        print(f"T={T:>6} empty {m['empty']:.2f}  triton copy {m['tcopy']:.2f}  torch copy {m['copy']:.2f}", flush=True)


if __name__ == "__main__":
    main()
