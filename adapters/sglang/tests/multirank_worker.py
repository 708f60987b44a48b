"""One rank of a multi-process SGLang-like world (gloo on CPU), for ``test_multirank.py``.

Each scenario publishes SGLang's server args (tensor, attention-DP, pipeline sizes, a2a
backend), writes this rank's parallel state as SGLang's launcher does, builds the recorder
through SGLang's ``ExpertDistributionRecorder.init_new`` (our plugin installed), and routes
the tokens of the token shard the scenario says this rank sees: the test's own truth, not the
adapter's topology. Then stat (file and ``EPLBManager``'s object) and per_pass dumps.
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from dataclasses import dataclass

import torch

#: What every rank imports, for a forkserver to import once (installed modules only: Python
#: 3.11's forkserver ignores the parent's sys.path while preloading).
PRELOAD = (
    "moe_record_sglang",
    "sglang.srt.configs.model_config",
    "sglang.srt.eplb.expert_distribution",
    "sglang.srt.eplb.expert_location",
    "sglang.srt.layers.moe.utils",
    "sglang.srt.distributed.utils",
)

NUM_LAYERS, NUM_EXPERTS, TOP_K = 4, 8, 2
MOE_LAYERS = (1, 2, 3)  # layer 0 dense
PASSES = (0, 1, 2)


@dataclass
class Scenario:
    name: str
    world: int
    server_args: dict
    shard_of_rank: list[int]  # which tokens each world rank routes (replicas share a shard)
    expect_shards: int  # topology.num_token_shards the adapter must find
    misrouted: bool = False
    switch_rank: int | None = None  # a side server's ?mode=per_pass reached this rank alone (stat dump only)


SCENARIOS = {
    2: [
        # Plain TP: all-reduce before the MoE, both ranks route every token.
        Scenario("tp2", 2, {"tp_size": 2}, [0, 0], 1),
        # DP attention with an a2a backend: each attention-DP rank routes its own tokens.
        # A fault: ranks SGLang's config makes replicas route different tokens (as if the
        # adapter had misread the topology). The merge refuses; SGLang keeps running.
        Scenario("tp2_misrouted", 2, {"tp_size": 2}, [0, 1], 1, misrouted=True),
        # A misuse: one rank switched to per_pass, the other still in stat, then SGLang's dump.
        Scenario("tp2_mixed_modes", 2, {"tp_size": 2}, [0, 0], 1, switch_rank=1),
        Scenario(
            "dp_attn2_mooncake",
            2,
            {"tp_size": 2, "attn_dp_size": 2, "ep_size": 2, "moe_a2a_backend": "mooncake"},
            [0, 1],
            2,
        ),
    ],
    4: [
        # DP attention without a2a: dp_gather hands every rank the global batch.
        Scenario("tp4_dp_attn2_gathered", 4, {"tp_size": 4, "attn_dp_size": 2}, [0, 0, 0, 0], 1),
        # DeepEP normal with attention TP 2: every rank its own slice.
        Scenario(
            "tp4_dp_attn2_deepep",
            4,
            {"tp_size": 4, "attn_dp_size": 2, "ep_size": 4, "moe_a2a_backend": "deepep", "deepep_mode": "normal"},
            [0, 1, 2, 3],
            4,
        ),
        # The fault again: DP attention without a2a gathers, yet each DP group routed its own.
        Scenario("tp4_dp_attn2_misrouted", 4, {"tp_size": 4, "attn_dp_size": 2}, [0, 0, 1, 1], 1, misrouted=True),
        # Pipeline: two stages of TP 2, one token stream, disjoint layers.
        Scenario("tp2_pp2", 4, {"tp_size": 2, "pp_size": 2}, [0, 0, 0, 0], 1),
    ],
}


def ids_for(shard: int, pass_id: int, layer: int) -> torch.Tensor:
    """The top-k ids shard ``shard`` routes at ``layer`` in pass ``pass_id``; padded rows -1."""
    g = torch.Generator().manual_seed(1000 * shard + 10 * pass_id + layer)
    tokens = 5 + (shard * 3 + pass_id) % 4
    ids = torch.multinomial(torch.arange(1.0, NUM_EXPERTS + 1), tokens * TOP_K, True, generator=g).view(tokens, TOP_K)
    ids[tokens - 1 - (pass_id % 2) :] = -1  # SGLang's padding rows
    return ids


def reference(shards: set[int], layers=MOE_LAYERS) -> torch.Tensor:
    """int64 [NUM_LAYERS, NUM_EXPERTS]: every shard's tokens counted once."""
    out = torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.int64)
    for shard in shards:
        for p in PASSES:
            for layer in layers:
                ids = ids_for(shard, p, layer).flatten()
                out[layer] += torch.bincount(ids[ids >= 0], minlength=NUM_EXPERTS)
    return out


def ranks_of(rank: int, args: dict) -> dict:
    """The parallel ranks SGLang's launcher writes for world rank ``rank`` (cp = 1)."""
    tp = args.get("tp_size", 1)
    adp = args.get("attn_dp_size", 1)
    ep = args.get("ep_size", 1)
    tp_rank, pp_rank = rank % tp, rank // tp
    atp = tp // adp
    return {
        "launch_world_rank": rank,
        "tp_rank": tp_rank,
        "pp_rank": pp_rank,
        "attn_tp_rank": tp_rank % atp,
        "attn_dp_rank": tp_rank // atp,
        "moe_ep_rank": tp_rank // (tp // ep),
    }


def _route(rec, shard: int) -> None:
    """One model's passes as ModelRunner runs them: this stage's layers only."""
    from sglang.srt.distributed.utils import get_pp_indices
    from sglang.srt.runtime_context import get_parallel

    start, end = get_pp_indices(NUM_LAYERS, get_parallel().pp_rank, get_parallel().pp_size)
    for p in PASSES:
        with rec.with_forward_pass(100 + p, None):
            for layer in range(start, end):
                with rec.with_current_layer(layer):
                    if layer in MOE_LAYERS:
                        rec.on_select_experts(topk_ids=ids_for(shard, p, layer))


def run_scenario(sc: Scenario, rank: int, model_dir: str, out: str) -> dict:
    from moe_record_sglang import SGLangRecorder, install, uninstall
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.layers.moe.utils import initialize_moe_config
    from sglang.srt.runtime_context import get_context, get_parallel

    shard = sc.shard_of_rank[rank]
    report: dict = {"errors": []}
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: report["errors"].append(record.getMessage())
    logging.getLogger("moe_record_sglang").addHandler(handler)
    install()
    try:
        for mode in ("stat", "per_pass") if sc.switch_rank is None else ("stat",):
            dump_dir = os.path.join(out, sc.name, mode)
            with get_context().override_server_args(
                model_path=model_dir,
                device="cpu",
                expert_distribution_recorder_mode=mode,
                expert_distribution_recorder_buffer_size=16,
                **sc.server_args,
            ):
                initialize_moe_config()
                ranks = ranks_of(rank, sc.server_args)
                with get_parallel().override(**ranks):
                    meta = ExpertLocationMetadata.init_trivial(
                        ModelConfig(model_path=model_dir), moe_ep_rank=ranks["moe_ep_rank"]
                    )
                    rec = ExpertDistributionRecorder.init_new(meta, rank=ranks["moe_ep_rank"])  # as ModelRunner
                    assert isinstance(rec, SGLangRecorder), type(rec)
                    rec.dump_dir = dump_dir
                    report[f"topology_{mode}"] = {
                        k: getattr(rec.recorder.topology, k)
                        for k in (
                            "rank",
                            "world_size",
                            "tp_rank",
                            "tp_size",
                            "pp_rank",
                            "pp_size",
                            "token_shard",
                            "num_token_shards",
                        )
                    }
                    rec.start_record("per_pass" if rank == sc.switch_rank else None)
                    _route(rec, shard)
                    rec.stop_record()
                    rec.dump_record()  # stat: every rank merges, rank 0 writes
                    if mode == "stat" and sc.switch_rank is None:
                        rec.start_record()
                        _route(rec, shard)
                        obj = rec.dump_record(output_mode="object")  # EPLBManager's call
                        report["object_total"] = obj["logical_count"].sum(0).tolist()
    finally:
        uninstall()
        logging.getLogger("moe_record_sglang").removeHandler(handler)
    return report


def main(rank: int, world: int, store: str, model_dir: str, out: str) -> None:
    import torch.distributed as dist

    logging.basicConfig(level=logging.ERROR)
    result: dict = {}
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
        for sc in SCENARIOS[world]:
            result[sc.name] = run_scenario(sc, rank, model_dir, out)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        result["error"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # forked: skip the atexit handlers of the process it was forked from
