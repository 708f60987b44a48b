"""An independent routing of given token sequences: transformers' ``Qwen3MoeForCausalLM`` on the
same checkpoint, its own router's top-k (``Qwen3MoeTopKRouter`` returns the indices)."""

from __future__ import annotations

import torch


class ReferenceRouter:
    def __init__(self, model_dir: str) -> None:
        from transformers import Qwen3MoeForCausalLM

        self.model = Qwen3MoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        cfg = self.model.config
        self.num_layers, self.num_experts, self.top_k = cfg.num_hidden_layers, cfg.num_experts, cfg.num_experts_per_tok

    def __call__(self, sequences: list[list[int]]) -> tuple[torch.Tensor, float]:
        """Counts int64 [L, E] of the top-k experts of every token of every sequence (each run
        as one causal forward: what prefill + decode compute), and the smallest gap between
        the k-th and (k+1)-th router logit (how safe the comparison is from rounding)."""
        counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.int64)
        margin = float("inf")
        seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            layer.mlp.gate.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, (out[0], out[2])))
            for i, layer in enumerate(self.model.model.layers)
        ]
        try:
            with torch.no_grad():
                for seq in sequences:
                    seen.clear()
                    self.model(torch.tensor([seq]))
                    for layer, (logits, ids) in seen.items():
                        counts[layer] += torch.bincount(ids.reshape(-1), minlength=self.num_experts)
                        top = logits.float().topk(self.top_k + 1, dim=-1).values
                        margin = min(margin, float((top[:, -2] - top[:, -1]).min()))
        finally:
            for h in hooks:
                h.remove()
        return counts, margin
