"""A tiny MoE language model in plain PyTorch: random weights, seedable, fast on a CPU.

For the demo, the reference HTTP server and tests that must not depend on transformers. Its
layout follows transformers 5.x MoE models, so the adapter finds it the same way:
``layers[i].mlp.gate`` is a router returning ``(router_logits, weights, topk_ids)``; the first
``first_dense_layers`` layers have a dense MLP instead (numbered, not recorded). Token mixing is a
causal running mean (no attention), kept in a small cache so ``generate`` does one forward pass
per new token.

Example
-------
>>> model = TinyMoE(TinyMoEConfig(seed=1))
>>> out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
>>> out.shape
torch.Size([1, 5])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyMoEConfig:
    """Shape and seed of a ``TinyMoE``."""

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 64
    num_layers: int = 4
    num_experts: int = 16
    top_k: int = 2
    first_dense_layers: int = 0
    """Leading layers with a dense MLP (DeepSeek's ``first_k_dense_replace``)."""
    seed: int = 0
    """Seed of the random weights: one seed, one model, on any machine."""


class TinyCache:
    """Per layer, the running sum of the mixing input over the tokens seen so far, and their count."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.length = 0


class TinyMoERouter(nn.Module):
    """Softmax router: returns ``(router_logits [T, E], weights [T, k], topk_ids [T, k])``."""

    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden, self.weight)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        return logits, (weights / weights.sum(-1, keepdim=True)).to(hidden.dtype), ids


class TinyExperts(nn.Module):
    """All experts' weights as 3-D tensors; every expert runs on every token (static shapes)."""

    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        self.w_in = nn.Parameter(torch.empty(E, H, I))
        self.w_out = nn.Parameter(torch.empty(E, I, H))

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        every = torch.einsum("th,ehi->tei", hidden, self.w_in)
        every = torch.einsum("tei,eih->teh", F.silu(every), self.w_out)  # [T, E, H]
        chosen = every.gather(1, ids.unsqueeze(-1).expand(-1, -1, every.shape[-1]))  # [T, k, H]
        return (chosen * weights.unsqueeze(-1)).sum(1)


class TinyMoEBlock(nn.Module):
    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        self.gate = TinyMoERouter(config)
        self.experts = TinyExperts(config)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        flat = hidden.reshape(-1, shape[-1])
        _, weights, ids = self.gate(flat)
        return self.experts(flat, ids, weights).reshape(shape)


class TinyMLP(nn.Module):
    def __init__(self, config: TinyMoEConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(hidden)))


class TinyLayer(nn.Module):
    def __init__(self, config: TinyMoEConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.mix_norm = nn.RMSNorm(config.hidden_size)
        self.mix = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.mlp_norm = nn.RMSNorm(config.hidden_size)
        self.mlp = TinyMLP(config) if index < config.first_dense_layers else TinyMoEBlock(config)

    def forward(self, hidden: torch.Tensor, cache: TinyCache | None) -> torch.Tensor:
        x = self.mix_norm(hidden)
        prefix = torch.cumsum(x, dim=1)  # [B, S, H]: causal running sum
        seen = 0
        if cache is not None:
            if self.index in cache.sums:
                prefix = prefix + cache.sums[self.index].unsqueeze(1)
                seen = cache.length
            cache.sums[self.index] = prefix[:, -1]
        count = torch.arange(seen + 1, seen + 1 + x.shape[1], device=x.device, dtype=x.dtype).view(1, -1, 1)
        hidden = hidden + self.mix(prefix / count)
        return hidden + self.mlp(self.mlp_norm(hidden))


class TinyMoE(nn.Module):
    """A tiny MoE causal LM; ``forward(input_ids [B, S]) -> logits [B, S, vocab]``.

    Parameters
    ----------
    config:
        Shape and seed (``TinyMoEConfig()`` by default: 4 layers, 16 experts, top-2, hidden 64).
    """

    def __init__(self, config: TinyMoEConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or TinyMoEConfig()
        if not 1 <= config.top_k <= config.num_experts or not 0 <= config.first_dense_layers <= config.num_layers:
            raise ValueError(f"TinyMoEConfig: inconsistent shape {config}")
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyLayer(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        g = torch.Generator().manual_seed(self.config.seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                fan_in = p.shape[-2] if name.endswith(("w_in", "w_out")) else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)

    def forward(self, input_ids: torch.Tensor, cache: TinyCache | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.lm_head(self.norm(hidden))

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int = 16, stop: Callable[[], bool] | None = None
    ) -> torch.Tensor:
        """Greedy decoding: one forward pass for the prompt, then one per new token but the last.

        Returns ``[B, S + max_new_tokens]`` token ids (prompt included). ``stop`` is checked
        before each forward pass: once it returns True, decoding ends there and the tokens so far
        are returned (fewer new ones).
        """
        cache = TinyCache()
        out = step = input_ids
        for _ in range(max_new_tokens):
            if stop is not None and stop():
                break
            step = self(step, cache)[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, step], dim=1)
        return out
