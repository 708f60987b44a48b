"""Fixtures for tests against the real sglang 0.5.23 package (function level: its server needs
CUDA). SGLang reads its flags from a published ``ServerArgs``; ``sglang_config`` publishes one
with SGLang's own test helper ``RuntimeContext.override_server_args``."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from sglang_tiny import NUM_EXPERTS, NUM_LAYERS, TOP_K


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> str:
    """A tiny Qwen3-MoE config (no weights): SGLang's ModelConfig and model registry read it."""
    path = tmp_path_factory.mktemp("tiny-qwen3-moe")
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "moe_intermediate_size": 16,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "num_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "max_position_embeddings": 256,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture
def sglang_config(model_dir, tmp_path):
    """``sglang_config(mode, **fields)``: a context publishing SGLang's flags for the tiny model,
    CPU device, dumps into ``tmp_path/dumps``; SGLang's global recorder is restored after."""
    from sglang.srt.eplb.expert_distribution import (
        get_global_expert_distribution_recorder,
        set_global_expert_distribution_recorder,
    )
    from sglang.srt.runtime_context import get_context

    previous = get_global_expert_distribution_recorder()

    @contextlib.contextmanager
    def publish(mode: str | None, **fields) -> Iterator[None]:
        fields.setdefault("expert_distribution_recorder_buffer_size", 1000)
        with get_context().override_server_args(
            model_path=model_dir, device="cpu", expert_distribution_recorder_mode=mode, **fields
        ):
            yield

    yield publish
    set_global_expert_distribution_recorder(previous)


@pytest.fixture
def sglang_on_cpu(monkeypatch):
    """SGLang's own recorder on this CPU machine. Its select-experts gatherer allocates on
    ``sglang.srt.utils.get_device()``, which answers only for accelerators (its CPU engine switch,
    ``SGLANG_USE_CPU_ENGINE``, makes unrelated imports need the CPU ``sgl_kernel``). Only that
    device lookup is replaced; gatherers, accumulators, buffers and dump code run as shipped."""
    from sglang.srt.eplb import expert_distribution

    monkeypatch.setattr(expert_distribution, "get_device", lambda device_id=None: "cpu")


@pytest.fixture
def dump_dir(tmp_path, monkeypatch) -> str:
    path = tmp_path / "dumps"
    monkeypatch.setenv("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", str(path))
    monkeypatch.delenv("MOE_RECORD_DUMP_DIR", raising=False)
    return str(path)


@pytest.fixture(scope="session")
def gloo_world():
    """A real one-process gloo world: SGLang's stat dump all-reduces over it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    # left for the process: other session-scoped users may follow
