"""A tiny Qwen3-MoE checkpoint built from a config (random weights, no download).

vLLM's CPU attention needs head_dim in {32, 64, 80, ...}; 2 layers x 8 experts, top-2.
The routers' weights are scaled up so top-k choices have wide margins: vLLM and transformers
then pick the same experts despite their different kernels (float32 both sides).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

NUM_LAYERS, NUM_EXPERTS, TOP_K, VOCAB = 2, 8, 2, 1024
GATE_SCALE = 30.0


def _corpus() -> list[str]:
    """A few stdlib sources: enough text for a byte-level BPE, always on disk."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(lib / name).read_text() for name in ("textwrap.py", "json/decoder.py", "string.py", "heapq.py")]


def _tokenizer(path: str):
    """A byte-level BPE trained here on stdlib sources, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 24, special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast


def build_tiny_dense(path: str | os.PathLike[str], seed: int = 0) -> str:
    """A dense ``Qwen3ForCausalLM`` of the same size: a model with no MoE layer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    path = str(path)
    fast = _tokenizer(path)
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_LAYERS, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=512, tie_word_embeddings=False,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id, pad_token_id=fast.eos_token_id, torch_dtype="float32",
    )  # fmt: skip
    Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(path)
    return path


def build_tiny_moe(
    path: str | os.PathLike[str],
    seed: int = 0,
    *,
    num_layers: int = NUM_LAYERS,
    num_experts: int = NUM_EXPERTS,
    top_k: int = TOP_K,
    hidden_size: int = 64,
) -> str:
    """Write the tokenizer and a random-weight ``Qwen3MoeForCausalLM`` (float32) to ``path``."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    path = str(path)
    fast = _tokenizer(path)
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        moe_intermediate_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=max(2, hidden_size // 32),
        num_key_value_heads=1,
        head_dim=32,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=fast.eos_token_id,
        bos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
        torch_dtype="float32",
    )
    model = Qwen3MoeForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.mul_(GATE_SCALE)
    model.save_pretrained(path)
    return path
