"""``rebalance`` (what ``moe-record eplb`` plans with) against the loops it replaced, side by side.

``reference_rebalance`` (tests/analysis/test_eplb.py) is ``rebalance`` with the straightforward
loops of its building blocks put back: each configuration is planned by both on the same skewed
loads (DeepSeek-V3's 61 layers x 256 experts by default), the plans must be identical, and the
seconds of each and their ratio are printed.

    python tests/perf/eplb_speed.py [--layers 61] [--configs 1024/8,288/32/4/8] [--no-reference]

A configuration is ``R/G[/N/K]``: slots, GPUs, nodes, expert groups.

Figures (2026-11-28, 2 shared CPU cores, defaults; identical plans), seconds and ratio:
288/32/4/8 0.076 vs 0.478 (6.3x), 288/8 0.057 vs 0.532 (9.4x), 1024/8 0.451 vs 17.5 (39x),
1024/32/4/8 0.326 vs 7.79 (24x), 1024/64/8/8 0.358 vs 5.24 (15x), 1024/256 1.20 vs 31.0 (26x).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from moe_record_sdk.analysis.eplb import rebalance  # noqa: E402
from tests.analysis.test_eplb import reference_rebalance  # noqa: E402

CONFIGS = "288/32/4/8,288/8,1024/8,1024/32/4/8,1024/64/8/8,1024/256"


def timed(plan, w: torch.Tensor, args: list[int]):
    start = time.perf_counter()
    out = plan(w, *args)
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--configs", default=CONFIGS, help=f"R/G[/N/K], comma-separated (default {CONFIGS})")
    p.add_argument("--no-reference", action="store_true", help="time rebalance alone")
    a = p.parse_args()
    # Skewed like recorded loads: a few hot experts per layer, most cold, integer counts.
    g = torch.Generator().manual_seed(0)
    w = ((torch.rand(a.layers, a.experts, generator=g) ** 4) * 10_000).round().long()
    print(f"{a.layers} layers x {a.experts} experts")
    print(f"{'R/G/N/K':>14} {'rebalance s':>12} {'reference s':>12} {'ratio':>8}")
    for config in a.configs.split(","):
        args = [int(x) for x in config.split("/")]
        new_s, new = timed(rebalance, w, args)
        if a.no_reference:
            print(f"{config:>14} {new_s:12.3f}")
            continue
        ref_s, ref = timed(reference_rebalance, w, args)
        same = all(torch.equal(getattr(new, k), getattr(ref, k)) for k in ("phy2log", "log2phy", "logcnt"))
        same = same and (new.global_layers, new.trivial_layers) == (ref.global_layers, ref.trivial_layers)
        assert same, f"{config}: the plans differ"
        print(f"{config:>14} {new_s:12.3f} {ref_s:12.3f} {ref_s / new_s:7.1f}x", flush=True)


if __name__ == "__main__":
    main()
