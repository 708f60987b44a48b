"""``moe-record bench``: the tap's cost per layer next to its torch path, SGLang's ``scatter_add_`` and a copy."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..bench import EXPERTS, METHODS, TOKENS, environment, run_bench
from . import add_command, rich_console
from .convert import positive_int

QUICK_TOKENS = (1, 128, 4096)


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _device(text: str) -> torch.device | None:
    """An argparse type: ``cuda``, ``cuda:N`` (a GPU of this machine) or ``cpu``; blank: the default."""
    if not text.strip():
        return None
    try:
        device = torch.device(text)
    except RuntimeError:  # torch's message lists its twenty device types
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: expected cuda, cuda:N or cpu") from None
    if device.type not in ("cuda", "cpu"):
        raise argparse.ArgumentTypeError(f"{text!r}: the bench runs on cuda, cuda:N or cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU is available here")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    return device


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(sub, "bench")
    p.add_argument("--device", type=_device, default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--tokens", type=_ints, default=None, metavar="T,...", help=f"token counts (default {TOKENS})")
    p.add_argument(
        "--experts", type=_ints, default=list(EXPERTS), metavar="E,...", help=f"expert counts (default {EXPERTS})"
    )
    p.add_argument("--top-k", type=int, default=8, help="experts per token (default 8)")
    p.add_argument("--dtype", choices=["int32", "int64"], default="int32", help="top-k ids dtype (default int32)")
    p.add_argument("--no-graph", action="store_true", help="eager only, no CUDA graph")
    p.add_argument("--trials", type=positive_int, default=None, help="timings per median (default 30, --quick 5)")
    p.add_argument("--quick", action="store_true", help=f"a fast smoke run: T in {QUICK_TOKENS}, fewer trials")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout instead of tables")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not 1 <= args.top_k <= min(args.experts):
        print(f"moe-record bench: --top-k {args.top_k} must be in [1, min(--experts)]", file=sys.stderr)
        return 2
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    trials = args.trials or (5 if args.quick else 30)
    progress = None if args.json else (lambda msg: print(f"  timing {msg} ...", file=sys.stderr, flush=True))
    rows = run_bench(
        args.device,
        tokens=tokens,
        experts=args.experts,
        top_k=args.top_k,
        dtype=getattr(torch, args.dtype),
        graph=False if args.no_graph else None,
        trials=trials,
        taps=16 if args.quick else 64,
        progress=progress,
    )
    env = environment(args.device) | {"top_k": args.top_k, "dtype": args.dtype, "trials": trials}
    if args.json:
        json.dump({"environment": env, "unit": "us per call", "rows": rows}, sys.stdout, indent=2)
        print()
    else:
        print_tables(rows, env)
    return 0


def print_tables(rows: list[dict], env: dict) -> None:
    """One rich table per (where, E): microseconds per call, then the ratios that matter."""
    from rich import box
    from rich.table import Table

    console = rich_console()
    console.print(
        f"[bold]moe-record bench[/]: {env['card']} ({env['device']}), torch {env['torch']}, triton {env['triton']}, "
        f"tap kernel: {env['kernel']}, top_k={env['top_k']}, {env['dtype']} ids, median of {env['trials']}"
    )
    for where in ("eager", "graph"):
        for E in dict.fromkeys(r["E"] for r in rows):
            sel = [r for r in rows if r["where"] == where and r["E"] == E]
            if not sel:
                continue
            table = Table(
                title=f"{where}, E={E}: microseconds per layer call", title_justify="left", box=box.SIMPLE_HEAD
            )
            table.add_column("T", justify="right")
            for name in METHODS:
                table.add_column(name, justify="right")
            for ratio in ("ours/copy", "per_token/copy", "ring/copy", "torch/ours", "sglang/ours", "scatter/ours"):
                table.add_column(ratio, justify="right", style="bold")
            for r in sel:
                table.add_row(
                    str(r["T"]),
                    *(f"{r[n]:.2f}" for n in METHODS),
                    f"{r['ours'] / r['copy']:.2f}",
                    f"{r['per_token'] / r['copy']:.2f}",
                    f"{r['ring'] / r['copy']:.2f}",
                    f"{r['torch'] / r['ours']:.1f}",
                    f"{r['sglang'] / r['ours']:.1f}",
                    f"{r['scatter'] / r['ours']:.1f}",
                )
            console.print(table)
