"""Where an SGLang rank sits, as our ``Topology``: which ranks routed the same tokens.

SGLang's stat dump all-reduces its counts over the whole world, so ranks that routed the same
tokens are counted once per rank. Our merge counts them once, given ``token_shard``; the rule
is SGLang 0.5.23's own (``layers/moe/topk.py``, where it shards tokens to simulate uniform
experts, and ``layers/layer_boundary/factories.py``, which places the sparse MoE's rows):

* **Gathered MoE** (no all-to-all backend; with or without DP attention): SGLang hands every
  rank of the world one global token buffer (all-reduce, or ``dp_gather`` over attention DP),
  so every rank routes the same tokens: one shard. This includes DP attention without an a2a
  backend, and pipeline stages (which route the same tokens at different layers).
* **Scattered MoE** (an a2a backend such as deepep or mooncake, FP4 all-gather, or DWDP,
  ``is_moe_input_scattered_across_dp_ranks()``): each attention-DP rank routes its own tokens;
  when attention TP is wider than one and the batch is attention-TP sharded
  (``require_gathered_buffer()``, the default of ``ModelRunner.attn_tp_sequence_sharded``),
  each attention-TP rank routes its own slice too.

``--dp-size`` replicas without DP attention are separate worlds (``launch_world_size`` is
``tp_size * pp_size``): each replica is a run of its own, and its in-process dump merges its own
world. Each routes its own requests' tokens, so where one rank of one replica is seen beside the
others' (the side servers, a Fleet over every rank) :func:`across_replicas` places it among all
of them: the replicas are one run of ``dp_size`` times the token shards.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from moe_record_sdk import Dump, Topology

log = logging.getLogger(__name__)


def _parallel(name: str, default: Any) -> Any:
    """``get_parallel().<name>``, or ``default`` where this process has not written it (SGLang
    used at function level, without its launcher)."""
    from sglang.srt.runtime_context import get_parallel

    try:
        value = getattr(get_parallel(), name)
    except (RuntimeError, ValueError, AttributeError):
        return default
    return default if value is None else value


def token_shard() -> tuple[int, int]:
    """(this rank's token shard, number of shards): SGLang's rule, see the module docstring."""
    from sglang.srt.layers.moe.utils import is_moe_input_scattered_across_dp_ranks

    try:
        scattered = is_moe_input_scattered_across_dp_ranks()
    except (RuntimeError, ValueError, AttributeError):  # nothing published: one process
        return 0, 1
    if not scattered:
        return 0, 1  # one global token buffer on every rank
    shard, shards = int(_parallel("attn_dp_rank", 0)), max(int(_parallel("attn_dp_size", 1)), 1)
    attn_tp_size, attn_tp_rank = max(int(_parallel("attn_tp_size", 1)), 1), int(_parallel("attn_tp_rank", 0))
    if attn_tp_size > 1:
        from sglang.srt.layers.layer_boundary.layout import input_scattered_configured
        from sglang.srt.utils.common import require_gathered_buffer

        if require_gathered_buffer():
            shard, shards = shard * attn_tp_size + attn_tp_rank, shards * attn_tp_size
        elif input_scattered_configured():
            # Only some batches scatter the attention input over attention TP: those passes
            # route per attention-TP rank, the others per attention-DP rank. One shard per
            # DP rank it is; the merge refuses replicas that disagree rather than guess.
            log.warning(
                "moe-record: attention-TP input scattering is per batch here; counting attention-TP peers as "
                "replicas (a merge refuses them if some passes routed different tokens)"
            )
    return min(shard, shards - 1), shards


def replica() -> tuple[int, int]:
    """(this process's ``--dp-size`` replica, number of replicas); (0, 1) without replicas.
    With DP attention, ``dp_size`` is the attention-DP width inside one world, not replicas."""
    replicas = int(_parallel("dp_size", 1))
    if replicas <= 1 or _parallel("attn_dp_enabled", False):
        return 0, 1
    return min(int(_parallel("dp_rank", 0)), replicas - 1), replicas


def across_replicas(topology: Topology) -> Topology:
    """``topology`` (a rank within its replica's world) as a rank of all the replicas' ranks:
    replica r's ranks follow replica r - 1's, and its token shards too (replicas route different
    tokens), so the replicas' per-rank dumps merge as one run and a missing replica is refused as a
    missing shard. Replicas have no attention DP, so ``dp`` numbers the replicas."""
    r, replicas = replica()
    if replicas == 1:
        return topology
    ws, shards = topology.world_size, topology.num_token_shards
    return msgspec.structs.replace(
        topology,
        rank=r * ws + topology.rank,
        world_size=replicas * ws,
        dp_rank=r,
        dp_size=replicas,
        token_shard=r * shards + topology.token_shard,
        num_token_shards=replicas * shards,
    )


def with_topology(dump: Dump, topology: Topology) -> Dump:
    """``dump`` as rank ``topology`` (its records' ranks too): a rank's dump placed
    :func:`across_replicas` for its file or side server, so the replicas' dumps merge as one run."""
    if topology == dump.topology:
        return dump
    records = [msgspec.structs.replace(r, rank=topology.rank) for r in dump.records]
    return msgspec.structs.replace(dump, topology=topology, records=records)


def stage_layers(num_layers: int) -> list[int] | None:
    """The decoder layers this pipeline stage runs (SGLang's ``get_pp_indices``), or None for
    all of them (no pipeline parallelism)."""
    pp_size = int(_parallel("pp_size", 1))
    if pp_size <= 1:
        return None
    from sglang.srt.distributed.utils import get_pp_indices

    start, end = get_pp_indices(num_layers, int(_parallel("pp_rank", 0)), pp_size)
    return list(range(start, end))


def sglang_topology(rank: int, ep_size: int) -> Topology:
    """This process's ``Topology`` from SGLang's parallel state.

    Parameters
    ----------
    rank:
        What SGLang passes to ``ExpertDistributionRecorder.init_new`` (its ``moe_ep_rank``),
        used only where SGLang's launcher wrote no world rank.
    ep_size:
        The expert-parallel width of SGLang's ``ExpertLocationMetadata``.

    Example
    -------
    >>> sglang_topology(0, 1).num_token_shards  # doctest: +SKIP
    1
    """
    world_rank = int(_parallel("launch_world_rank", rank))
    world_size = max(int(_parallel("launch_world_size", 1)), world_rank + 1)
    tp_size = max(int(_parallel("tp_size", 1)), 1)
    pp_size = max(int(_parallel("pp_size", 1)), 1)
    dp_size = max(int(_parallel("attn_dp_size", 1)), 1)
    ep_size = max(int(_parallel("moe_ep_size", ep_size)), 1)
    shard, shards = token_shard()
    return Topology(
        rank=world_rank,
        world_size=world_size,
        tp_rank=min(int(_parallel("tp_rank", 0)), tp_size - 1),
        tp_size=tp_size,
        dp_rank=min(int(_parallel("attn_dp_rank", 0)), dp_size - 1),
        dp_size=dp_size,
        ep_rank=min(int(_parallel("moe_ep_rank", rank)), ep_size - 1),
        ep_size=ep_size,
        pp_rank=min(int(_parallel("pp_rank", 0)), pp_size - 1),
        pp_size=pp_size,
        token_shard=shard,
        num_token_shards=shards,
    )
