"""Recording enabled on a model without MoE layers: vLLM serves it, and control says why
nothing records instead of failing the engine."""

from __future__ import annotations

import gc

import moe_record_vllm
import pytest

from moe_record_sdk.errors import AdapterError


def test_a_dense_model_is_served_and_control_names_the_reason(tmp_path) -> None:
    from tiny_model import build_tiny_dense
    from vllm import LLM, SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm = LLM(
        model=build_tiny_dense(tmp_path / "dense"),
        enforce_eager=True,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=2,
    )
    try:
        (out,) = llm.generate(
            [{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False
        )
        assert len(out.outputs[0].token_ids) == 4
        with pytest.raises(AdapterError, match="no MoE layer"):
            moe_record_vllm.start(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        cleanup_dist_env_and_memory()
        gc.collect()
