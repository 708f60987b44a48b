"""``moe-record eplb FILE --replicas R --gpus G``: a placement plan from recorded load."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..analysis import metrics as m
from ..analysis.eplb import EplbPlan, rebalance, save_weight, trivial_placement
from ..analysis.summary import moe_layers
from ..errors import MoeRecordError
from ..schema.dump import Dump
from ..schema.io import save_torch
from ..schema.sglang import check_init_expert_location_name
from . import add_command, rich_console
from .convert import (
    ALLOW_PARTIAL_HELP,
    INPUTS_HELP,
    add_input_options,
    check_outputs,
    fail,
    merged,
    positive_int,
    read_args_inputs,
)

#: The most physical slots (--replicas) a plan takes: 64 per GPU on 1024 GPUs. A plan is
#: [layers, slots] tensors and loops over the slots: a million slots already took seconds per
#: layer, 10**12 ended in an out-of-memory traceback, 10**20 in an int64 overflow one.
MAX_SLOTS = 1 << 16


def slot_count(text: str) -> int:
    """An argparse type: an integer in [1, MAX_SLOTS]."""
    value = positive_int(text)
    if value > MAX_SLOTS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SLOTS} physical expert slots, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(sub, "eplb")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="FILE",
        help="one run (several inputs are merged, e.g. per-rank dumps): " + INPUTS_HELP,
    )
    p.add_argument(
        "--replicas",
        type=slot_count,
        required=True,
        metavar="R",
        help=f"physical expert slots (experts + redundant), a multiple of --gpus, at most {MAX_SLOTS}",
    )
    p.add_argument("--gpus", type=positive_int, required=True, metavar="G", help="GPUs of the expert-parallel group")
    p.add_argument(
        "--nodes",
        type=positive_int,
        default=1,
        metavar="N",
        help="nodes (hierarchical plan when --groups is a multiple)",
    )
    p.add_argument(
        "--groups",
        type=positive_int,
        default=1,
        metavar="K",
        help="expert groups of group-limited routing (DeepSeek's n_group)",
    )
    p.add_argument("--allow-partial", action="store_true", help=f"several inputs: {ALLOW_PARTIAL_HELP}")
    p.add_argument(
        "--sglang-out",
        metavar="PT",
        help="write SGLang's --init-expert-location file {physical_to_logical_map: [L, R]}",
    )
    p.add_argument("--weight-out", metavar="PT", help="write the [L, E] weight tensor (EPLB input) as a .pt")
    p.add_argument("--plan-out", metavar="PT", help="write {phy2log, log2phy, logcnt} as a .pt")
    p.add_argument("--json", action="store_true", help="the plan and predicted balance as JSON on stdout")
    add_input_options(p)
    p.set_defaults(func=run)
    return p


def _balance(weight: torch.Tensor, mapping: torch.Tensor, gpus: int, layers: list[int]) -> dict[str, float]:
    """Predicted GPU balance of a placement, averaged over the layers with load."""
    g = m.gpu_loads(weight, num_gpus=gpus, physical_to_logical_map=mapping)[layers]
    loaded = g.sum(-1) > 0
    if not bool(loaded.any()):
        return {"balancedness": 1.0, "imbalance_ratio": 0.0, "max_gpu_load": 0.0}
    return {
        "balancedness": float(m.balancedness(g)[loaded].mean()),
        "imbalance_ratio": float(m.imbalance_ratio(g)[loaded].mean()),
        "max_gpu_load": float(g.amax(-1)[loaded].mean()),
    }


def compare(dump: Dump, plan: EplbPlan, weight: torch.Tensor) -> dict[str, dict[str, float]]:
    """Predicted balance: trivial placement, the dump's own placement (if it has one), the plan."""
    L, E = weight.shape
    layers = moe_layers(dump) or list(range(L))
    G, R = plan.num_gpus, plan.num_replicas
    rows = {f"trivial ({R} slots)": _balance(weight, trivial_placement(L, E, R), G, layers)}
    own = dump.physical_to_logical_map
    if own is not None and own.shape[1] % G == 0:
        rows[f"recorded placement ({own.shape[1]} slots)"] = _balance(weight, own, G, layers)
    rows["plan"] = _balance(weight, plan.phy2log, G, layers)
    return rows


#: ``rebalance``'s check messages, in the flags' words.
_FLAGS = {
    "num_replicas: ": "--replicas: ",
    "num_gpus=": "--gpus ",
    "num_nodes: ": "--nodes: ",
    "num_groups: ": "--groups: ",
}


def run(args: argparse.Namespace) -> int:
    written: list[tuple[str, str]] = []
    try:
        outputs = [args.sglang_out, args.weight_out, args.plan_out]
        check_outputs(args.paths, outputs)
        if args.sglang_out:
            check_init_expert_location_name(args.sglang_out)
        for out in filter(None, outputs):  # before any is written: all or none
            folder = os.path.dirname(out) or "."
            if not os.path.isdir(folder):
                raise MoeRecordError(f"{out}: cannot write the file: No such file or directory (no folder {folder})")
        dumps = read_args_inputs(args, args.paths, merges=True)
        label, dump = dumps[0] if len(dumps) == 1 else merged(dumps, args.allow_partial)
        weight = dump.total_count().to(torch.int64)
        if weight.numel() and not bool(weight.any()):  # any plan "balances" no load: it would mean nothing
            raise MoeRecordError(
                f"{label}: the dump recorded no tokens (every expert count is 0): no load to plan from"
            )
        plan = rebalance(weight, args.replicas, args.gpus, args.nodes, args.groups)
        if args.sglang_out:
            written.append(("SGLang --init-expert-location", plan.save_sglang(args.sglang_out)))
        if args.weight_out:
            written.append(("weight [L, E]", save_weight(weight, args.weight_out)))
        if args.plan_out:
            plan_dict = {"phy2log": plan.phy2log, "log2phy": plan.log2phy, "logcnt": plan.logcnt}
            written.append(("plan", save_torch(plan_dict, args.plan_out)))
    except (MoeRecordError, OSError, ValueError) as e:
        for _, path in written:  # a later write failed (a full disk): leave no half of the outputs
            os.remove(path)
        return fail("eplb", e, _FLAGS)
    rows = compare(dump, plan, weight)
    L, E = weight.shape
    if args.json:
        json.dump(
            {
                "source": label,
                "num_layers": L,
                "num_experts": E,
                "num_replicas": args.replicas,
                "num_gpus": args.gpus,
                "num_nodes": args.nodes,
                "num_groups": args.groups,
                "hierarchical": plan.hierarchical,
                "global_layers": plan.global_layers,
                "trivial_layers": plan.trivial_layers,
                "predicted": rows,
                "phy2log": plan.phy2log.tolist(),
                "logcnt": plan.logcnt.tolist(),
                "written": {what: path for what, path in written},
            },
            sys.stdout,
        )
        print()
        return 0
    from rich.table import Table

    console = rich_console()
    kind = f"hierarchical over {args.nodes} nodes, {args.groups} groups" if plan.hierarchical else "global"
    console.print(
        f"[bold]{label}[/bold]: {L} layers × {E} experts → {args.replicas} slots on {args.gpus} GPUs ({kind})"
    )
    t = Table(title="Predicted GPU load (mean over MoE layers with load)", title_justify="left")
    for c in ("placement", "balancedness", "(max−mean)/mean", "max GPU load"):
        t.add_column(c, justify="left" if c == "placement" else "right")
    for name, r in rows.items():
        t.add_row(
            name,
            f"{r['balancedness']:.3f}",
            f"{r['imbalance_ratio']:.3f}",
            f"{r['max_gpu_load']:.1f}",
            style="bold" if name == "plan" else None,
        )
    console.print(t)
    if plan.global_layers:
        console.print(
            f"layers planned globally (keeping groups on nodes would not beat the trivial placement): {plan.global_layers}"
        )
    if plan.trivial_layers:
        console.print(f"layers kept trivial (no plan beat it, or no load recorded there): {plan.trivial_layers}")
    unobserved = list(dump.window.unobserved_layers)
    if unobserved:
        console.print(
            f"MoE layers {unobserved} were not observed (no load known): they keep the trivial placement",
            style="yellow",
        )
    redundant = args.replicas - E
    for what, path in written:
        console.print(f"wrote {what}: {path}")
    if args.sglang_out:
        console.print(
            f"SGLang: --init-expert-location {args.sglang_out} --ep-num-redundant-experts {redundant} --ep-size {args.gpus}"
        )
    return 0
