"""SGLang's real ``select_experts`` (``TopKConfig(torch_native=True)`` on CPU), called by a tiny
model's MoE layers, counts exactly into our recorder: against an independent reference and
against SGLang's own recorder fed the same passes; SGLang's scheduler handler drives it."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from sglang_tiny import (
    MOE_LAYERS,
    NUM_EXPERTS,
    NUM_LAYERS,
    PASSES,
    TOP_K,
    TinyMoE,
    new_recorder,
    reference_counts,
    run_passes,
)

from moe_record_sdk import load_dump, validate_dump


def test_select_experts_counts_exactly(sglang_config, model_dir, dump_dir):
    from moe_record_sglang import SGLangRecorder, install, uninstall

    install()
    try:
        with sglang_config("per_pass"):
            rec = new_recorder(model_dir)
            assert isinstance(rec, SGLangRecorder)
            model = TinyMoE(seed=3)
            run_passes(model, rec, [(100, 4, None)])  # not recording: nothing counted
            model.logits.clear()
            rec.start_record()
            valid = run_passes(model, rec)
            recorded = {layer: list(calls) for layer, calls in model.logits.items()}
            rec.stop_record()
            run_passes(model, rec, [(200, 4, None)])  # stopped: nothing counted
            rec.dump_record()
    finally:
        uninstall()
    want = reference_counts(recorded, valid)
    files = glob.glob(os.path.join(dump_dir, "expert_distribution_recorder_*_0.pt"))
    assert len(files) == 1
    dump = load_dump(files[0])
    assert validate_dump(dump) == []
    assert torch.equal(dump.total_count(), want)
    assert [r.forward_pass_id for r in dump.records] == [p[0] for p in PASSES]  # SGLang's pass ids
    assert dump.window.num_tokens == [0] + [sum(p[1] for p in PASSES)] * len(MOE_LAYERS)
    # SGLang sizes the recorder by every decoder layer; the dense layer 0 never routes, so it is
    # no MoE layer of the dump (it read as 8 dead experts in summary).
    assert dump.model.moe_layer_ids == list(MOE_LAYERS)
    padded = sum(p[1] - v for p, v in zip(PASSES, valid))
    assert dump.window.discarded == [0] + [padded * TOP_K] * len(MOE_LAYERS)  # SGLang's -1 rows
    assert dump.engine.name == "sglang" and dump.engine.version == "0.5.23"
    for i in range(len(PASSES)):  # per pass, too
        assert int(dump.logical_count[i].sum()) == valid[i] * TOP_K * len(MOE_LAYERS)


def test_same_counts_as_sglangs_own_recorder(sglang_config, model_dir, dump_dir, gloo_world, sglang_on_cpu):
    """SGLang's own recorder (its gatherer and accumulator, on CPU) and ours see the same passes."""
    from moe_record_sglang import install, uninstall

    model = TinyMoE(seed=5)
    results = {}
    for who in ("sglang", "ours"):
        if who == "ours":
            install()
        try:
            with sglang_config("per_pass"):
                rec = new_recorder(model_dir)
                rec.start_record()
                run_passes(model, rec)
                rec.dump_record()
        finally:
            uninstall()
        (path,) = glob.glob(os.path.join(dump_dir, "*.pt"))
        results[who] = load_dump(path)
        os.remove(path)
    theirs, ours = results["sglang"], results["ours"]
    assert theirs.engine.name == "sglang" and theirs.engine.adapter is None
    assert torch.equal(ours.logical_count, theirs.logical_count)
    assert [r.forward_pass_id for r in ours.records] == [r.forward_pass_id for r in theirs.records]


def test_by_name_import_before_the_plugin_still_counts(sglang_config, model_dir, dump_dir):
    """A module that did ``from ...topk import select_experts`` before we installed: counted,
    because nothing of the router is patched (the recorder object is what changes)."""
    from sglang.srt.layers.moe import topk as topk_module
    from sglang.srt.layers.moe.topk import TopKConfig

    select_experts_bound_early = topk_module.select_experts
    from moe_record_sglang import install, uninstall

    install()
    try:
        with sglang_config("stat"):
            rec = new_recorder(model_dir)
            rec.start_record()
            logits = torch.randn(6, NUM_EXPERTS, generator=torch.Generator().manual_seed(0))
            with rec.with_forward_pass(0, None), rec.with_current_layer(2):
                out = select_experts_bound_early(torch.zeros(6, 4), logits, TopKConfig(top_k=TOP_K, torch_native=True))
            dump = rec.recorder.dump()
    finally:
        uninstall()
    want = torch.zeros(NUM_EXPERTS, dtype=torch.int64).index_add_(
        0, out.topk_ids.flatten().long(), torch.ones(12, dtype=torch.int64)
    )
    assert torch.equal(dump.total_count()[2], want)


def test_scheduler_handler_drives_our_recorder(sglang_config, model_dir, dump_dir, gloo_world):
    """The endpoints reach ``Scheduler.expert_distribution_handle``: SGLang's real handler."""
    from moe_record_sglang import install, uninstall
    from sglang.srt.managers.io_struct import ExpertDistributionReq, ExpertDistributionReqType
    from sglang.srt.managers.scheduler import Scheduler

    def handle(action):
        return Scheduler.expert_distribution_handle(None, ExpertDistributionReq(action=action))

    install()
    try:
        with sglang_config("stat"):
            rec = new_recorder(model_dir)
            model = TinyMoE(seed=7)
            handle(ExpertDistributionReqType.START_RECORD)
            assert rec.recording
            valid = run_passes(model, rec)
            handle(ExpertDistributionReqType.STOP_RECORD)
            assert not rec.recording
            handle(ExpertDistributionReqType.DUMP_RECORD)
    finally:
        uninstall()
    (path,) = glob.glob(os.path.join(dump_dir, "expert_distribution_recorder_*.pt"))
    assert not path.endswith("_0.pt")  # stat: rank 0's single file, SGLang's name
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert raw["logical_count"].dtype == torch.int32 and raw["logical_count"].shape[1:] == (NUM_LAYERS, NUM_EXPERTS)
    dump = load_dump(path)
    assert validate_dump(dump) == []
    assert torch.equal(dump.total_count(), reference_counts(model.logits, valid))
    assert rec.status()["last_paths"] == [path]


@pytest.mark.parametrize("redundant", [0, 2], ids=lambda r: f"redundant{r}")
def test_counts_follow_an_eplb_rebalance_as_sglangs_own(sglang_config, model_dir, gloo_world, sglang_on_cpu, redundant):
    """EPLBManager rewrites the expert placement in place (``ExpertLocationMetadata.update``);
    SGLang's recorder maps physical slots with the placement of dump time, and so must ours,
    also when EPLB starts from the identity placement (no redundant experts)."""
    from moe_record_sglang import SGLangRecorder, install, uninstall
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    skew = torch.zeros(1, NUM_LAYERS, NUM_EXPERTS, dtype=torch.int32)
    skew[..., 0] = 1000
    skew[..., 1:] = torch.arange(1, NUM_EXPERTS, dtype=torch.int32)
    got = {}
    for who in ("sglang", "ours"):
        if who == "ours":
            install()
        try:
            with sglang_config("stat", enable_eplb=True, ep_num_redundant_experts=redundant):
                model_config = ModelConfig(model_path=model_dir)
                meta = ExpertLocationMetadata.init_trivial(model_config, moe_ep_rank=0)
                rec = ExpertDistributionRecorder.init_new(meta, rank=0)
                assert isinstance(rec, SGLangRecorder) == (who == "ours")
                before = meta.physical_to_logical_map_cpu.clone()
                rebalanced = ExpertLocationMetadata.init_by_eplb(model_config, logical_count=skew)
                meta.update(rebalanced, update_layer_ids=list(range(NUM_LAYERS)))
                assert not torch.equal(meta.physical_to_logical_map_cpu, before)  # experts moved
                rec.start_record()
                g = torch.Generator().manual_seed(0)
                with rec.with_forward_pass(0, None):
                    for layer in MOE_LAYERS:
                        with rec.with_current_layer(layer):
                            slots = torch.randint(0, NUM_EXPERTS + redundant, (40, TOP_K), generator=g)
                            rec.on_select_experts(topk_ids=slots)
                got[who] = rec.dump_record(output_mode="object")["logical_count"].sum(0).long()
        finally:
            uninstall()
    assert int(got["sglang"].sum()) == 40 * TOP_K * len(MOE_LAYERS)
    assert torch.equal(got["ours"], got["sglang"])


def test_a_draft_models_passes_make_no_pass_and_count_nothing(sglang_config, model_dir, dump_dir):
    """Speculative decoding (EAGLE, MTP): SGLang's draft model has its own ``ModelRunner``, which
    numbers its passes from 1 as the served model's does and brackets them with the same global
    recorder; a draft MoE model routes through ``select_experts`` too. SGLang's real
    ``ModelRunner.forward`` runs here, on runners holding only the state it reads around the
    model call (``_forward_raw`` runs the tiny model)."""
    from types import SimpleNamespace

    from moe_record_sglang import install, uninstall
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang_tiny import Batch

    def runner(model: TinyMoE, is_draft_worker: bool) -> ModelRunner:
        r = object.__new__(ModelRunner)  # a real runner needs a GPU and weights
        r.__dict__.update(
            forward_pass_id=0, is_draft_worker=is_draft_worker, msprobe_debugger=None, canary_manager=None,
            enable_elastic_ep=False, eplb_manager=None, decode_cuda_graph_runner=None,
        )  # fmt: skip

        def forward_raw(batch, *args):
            model(batch.input_ids)
            return SimpleNamespace(can_run_graph=False)

        r._forward_raw = forward_raw
        return r

    g = torch.Generator().manual_seed(5)

    def batch(tokens: int) -> Batch:
        b = Batch(input_ids=torch.randint(0, 128, (tokens,), generator=g), positions=torch.arange(tokens))
        b.forward_mode, b.batch_size = ForwardMode.DECODE, tokens
        b.apply_deprecated_skip_attn_backend_init = lambda value: None
        return b

    shipped = ModelRunner.__dict__["forward"]
    install()
    try:
        assert ModelRunner.__dict__["forward"] is not shipped
        with sglang_config("per_pass"):
            rec = new_recorder(model_dir)
            target_model, draft_model = TinyMoE(seed=1), TinyMoE(seed=2)
            target, draft = runner(target_model, False), runner(draft_model, True)
            rec.start_record()
            for tokens in (3, 5, 4):  # a target pass, then the draft's steps: ids 1, 1, 2, 2, 3, ...
                target.forward(batch(tokens))
                draft.forward(batch(tokens))
                draft.forward(batch(tokens))
            rec.stop_record()
            rec.dump_record()
    finally:
        uninstall()
    assert ModelRunner.__dict__["forward"] is shipped  # uninstall() undid the wrap
    assert draft.forward_pass_id == 6 and draft_model.logits  # the draft ran and routed
    (path,) = glob.glob(os.path.join(dump_dir, "*.pt"))
    dump = load_dump(path)
    assert validate_dump(dump) == []
    assert [r.forward_pass_id for r in dump.records] == [1, 2, 3]  # the served model's passes only
    assert torch.equal(dump.total_count(), reference_counts(target_model.logits, [3, 5, 4]))
