"""Sequence-parallel MoE (vLLM 0.32: DP > 1 with expert parallelism and its default all-to-all,
``ParallelConfig.use_sequence_parallel_moe``): each TP rank routes its chunk of its DP rank's
tokens, the batch zero-padded to a multiple of TP. The adapter called those ranks replicas, so
their dumps disagreed and every dump answered 500; and the padding rows would have been counted.

Emulated with vLLM's own ``ParallelConfig`` and ``sequence_parallel_chunk_impl`` (what
DeepseekV2MoE / Qwen3MoE route on each TP rank), the adapter's ``_topology`` and tap, and the
SDK's merge (what the vLLM endpoint runs on its workers' dumps)."""

from __future__ import annotations

import types

import pytest
import torch

from moe_record_sdk import Recorder
from moe_record_sdk.merge import merge_dumps

DP, TP, L, E, K = 2, 2, 2, 8, 2


@pytest.mark.parametrize("expert_parallel", [True, False])
def test_each_tp_rank_counts_its_own_chunk_and_the_merge_counts_every_token_once(monkeypatch, expert_parallel):
    import vllm.distributed.parallel_state as ps
    import vllm.model_executor.models.utils as vu
    from moe_record_vllm.tap import _capture_fn
    from moe_record_vllm.worker import _topology
    from vllm.config import ParallelConfig

    pc = ParallelConfig(data_parallel_size=DP, tensor_parallel_size=TP, enable_expert_parallel=expert_parallel)
    assert pc.use_sequence_parallel_moe == expert_parallel
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(L, 16, E, generator=g)
    tokens = {0: 5, 1: 7}  # odd: padded to a multiple of TP, and the padding routes too
    hidden = {d: torch.randn(tokens[d], 16, generator=g) for d in range(DP)}

    def route(h: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.topk(h @ gate[layer], K, dim=-1).indices

    truth = sum(
        torch.stack([torch.bincount(route(hidden[d], i).flatten(), minlength=E) for i in range(L)]) for d in range(DP)
    )
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: TP)
    monkeypatch.setattr(ps, "get_pp_group", lambda: types.SimpleNamespace(world_size=1, rank_in_group=0))
    monkeypatch.setattr(vu, "get_tensor_model_parallel_world_size", lambda: TP)
    dumps = []
    for d in range(DP):
        for t in range(TP):
            monkeypatch.setattr(ps, "get_tensor_model_parallel_rank", lambda t=t: t)
            monkeypatch.setattr(vu, "get_tensor_model_parallel_rank", lambda t=t: t)
            config = types.SimpleNamespace(
                parallel_config=types.SimpleNamespace(data_parallel_rank=d, data_parallel_size=DP)
            )
            moe = types.SimpleNamespace(
                ep_rank=d * TP + t, ep_size=DP * TP, is_sequence_parallel=pc.use_sequence_parallel_moe
            )
            topology = _topology(config, types.SimpleNamespace(moe_config=moe))
            rec = Recorder(L, E, K, topology=topology)
            rec.start()
            # What the model routes on this rank: its chunk under sequence parallelism, else all.
            h = vu.sequence_parallel_chunk_impl(hidden[d]) if expert_parallel else hidden[d]
            num_valid = torch.tensor(tokens[d])  # the worker's: the DP rank's scheduled tokens
            for layer in range(L):
                _capture_fn(rec, layer, num_valid, None, chunk=t if expert_parallel else 0)(route(h, layer))
            rec.step()
            rec.stop()
            dumps.append(rec.dump())
    merged = merge_dumps(dumps, sources=[f"rank {x.topology.rank}" for x in dumps])
    assert torch.equal(merged.total_count(), truth)
    assert merged.window.num_tokens == [sum(tokens.values())] * L
