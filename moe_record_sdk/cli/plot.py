"""``moe-record plot FILE... -o out.png``: heatmap, per-layer imbalance, load over passes."""

from __future__ import annotations

import argparse

from ..errors import MoeRecordError
from . import add_command
from .convert import INPUTS_HELP, add_input_options, check_outputs, fail, positive_int, read_args_inputs


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(sub, "plot")
    p.add_argument("paths", nargs="+", metavar="FILE", help=INPUTS_HELP)
    p.add_argument(
        "-o", "--output", required=True, metavar="PNG", help="the image to write (.png is added when it has no suffix)"
    )
    p.add_argument("--log", action="store_true", help="log colour scale for the heatmap")
    p.add_argument(
        "--ep-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="also draw balancedness over N GPUs (contiguous experts)",
    )
    p.add_argument("--dpi", type=positive_int, default=110, help="image resolution (default 110)")
    add_input_options(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        from ..analysis.plot import plot_dumps

        check_outputs(args.paths, [args.output])
        dumps = read_args_inputs(args, args.paths)
        path = plot_dumps(dumps, args.output, log=args.log, ep_size=args.ep_size, dpi=args.dpi)
    except (MoeRecordError, OSError, ValueError) as e:
        return fail("plot", e)
    print(f"wrote {path}")
    return 0
