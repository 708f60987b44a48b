"""A tiny MoE model whose MoE layers route through SGLang's real ``select_experts``, the way
SGLang's model files do (decoder loop under ``with_current_layer``, pass under
``with_forward_pass``), plus an independent count of what it routed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

NUM_LAYERS = 4  # layer 0 is dense, as in DeepSeek's first_k_dense_replace
NUM_EXPERTS = 8
TOP_K = 2
HIDDEN = 32
MOE_LAYERS = tuple(range(1, NUM_LAYERS))


@dataclass
class Batch:
    """The fields of SGLang's ForwardBatch its recorders read at a pass start (per_token)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    extend_seq_lens_cpu: list[int] = field(default_factory=list)
    forward_mode: object = None


class TinyMoE(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(128, HIDDEN, generator=g))
        self.dense = nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
        self.gates = nn.Parameter(torch.randn(NUM_LAYERS, HIDDEN, NUM_EXPERTS, generator=g))
        self.experts = nn.Parameter(torch.randn(NUM_LAYERS, NUM_EXPERTS, HIDDEN, HIDDEN, generator=g) / HIDDEN**0.5)
        self.logits: dict[int, list[torch.Tensor]] = {}

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, num_token_non_padded: torch.Tensor | None = None) -> torch.Tensor:
        from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
        from sglang.srt.layers.moe.topk import TopKConfig, select_experts

        config = TopKConfig(top_k=TOP_K, renormalize=True, torch_native=True)
        hidden = self.embed[input_ids]
        for layer in range(NUM_LAYERS):
            with get_global_expert_distribution_recorder().with_current_layer(layer):
                if layer not in MOE_LAYERS:
                    hidden = hidden + torch.tanh(hidden @ self.dense)
                    continue
                logits = hidden @ self.gates[layer]
                out = select_experts(hidden, logits, config, layer_id=layer, num_token_non_padded=num_token_non_padded)
                self.logits.setdefault(layer, []).append(logits)
                weights = self.experts[layer][out.topk_ids.clamp(min=0)]  # [T, k, H, H]
                mixed = torch.einsum("tkhd,td->tkh", weights, hidden) * out.topk_weights.unsqueeze(-1)
                hidden = hidden + torch.tanh(mixed.sum(1))
        return hidden


def reference_counts(logits_per_layer: dict[int, list[torch.Tensor]], valid_rows: list[int]) -> torch.Tensor:
    """int64 [NUM_LAYERS, NUM_EXPERTS]: top-k of the softmax of each call's logits, first rows only."""
    out = torch.zeros(NUM_LAYERS, NUM_EXPERTS, dtype=torch.int64)
    for layer, calls in logits_per_layer.items():
        for logits, n in zip(calls, valid_rows, strict=True):
            ids = torch.topk(torch.softmax(logits.float(), dim=-1), TOP_K, dim=-1).indices[:n]
            for e in ids.flatten().tolist():
                out[layer, e] += 1
    return out


PASSES = [(0, 9, None), (1, 5, 3), (2, 12, None), (3, 7, 6)]  # (pass id, tokens, non-padded rows)


def new_recorder(model_dir: str, rank: int = 0):
    """What ``ModelRunner.maybe_init_expert_location_metadata`` does, with SGLang's own functions
    (under published server args): the recorder SGLang builds, made global."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder, set_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=rank)
    rec = ExpertDistributionRecorder.init_new(meta, rank=rank)
    set_global_expert_distribution_recorder(rec)
    return rec


def run_passes(model: TinyMoE, rec, passes=PASSES) -> list[int]:
    """Run forward passes the way ModelRunner.forward brackets them; return each pass's valid rows."""
    g = torch.Generator().manual_seed(1)
    valid = []
    for pass_id, tokens, non_padded in passes:
        ids = torch.randint(0, 128, (tokens,), generator=g)
        batch = Batch(input_ids=ids, positions=torch.arange(tokens), extend_seq_lens_cpu=[tokens])
        n = torch.tensor(non_padded) if non_padded is not None else None
        with rec.with_forward_pass(pass_id, batch):
            model(ids, num_token_non_padded=n)
        valid.append(tokens if non_padded is None else non_padded)
    return valid
