"""The plugin loads through SGLang's own ``load_plugins()``, respects ``SGLANG_PLUGINS``, refuses
unverified SGLang versions, and puts our recorder where SGLang builds its own."""

from __future__ import annotations

import logging

import pytest
import torch

from moe_record_sdk.errors import AdapterError


def test_load_plugins_runs_ours_and_wraps_init_new(sglang_config, model_dir, monkeypatch, caplog):
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    from moe_record_sglang import SGLangRecorder, install
    from moe_record_sglang.plugin import RUNNER_TARGET, TARGET, _state
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder, _ExpertDistributionRecorderReal
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.model_executor.model_runner import ModelRunner
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    original = ExpertDistributionRecorder.__dict__["init_new"]
    original_forward = ModelRunner.__dict__["forward"]
    load_plugins()  # SGLang's loader: our entry point registers, then SGLang applies the hook
    try:
        assert TARGET in HookRegistry._patched and RUNNER_TARGET in HookRegistry._patched
        assert ModelRunner.__dict__["forward"] is not original_forward  # draft passes told apart
        assert ExpertDistributionRecorder.__dict__["init_new"] is not original
        hooked = ExpertDistributionRecorder.__dict__["init_new"]
        with sglang_config("per_pass"):
            meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
            rec = ExpertDistributionRecorder.init_new(meta, rank=0)  # as ModelRunner calls it
            assert isinstance(rec, SGLangRecorder)
            assert rec.recorder.top_k == 2 and rec.recorder.num_layers == 4 and rec.recorder.mode == "per_pass"
            assert rec.recorder.mapping is None  # trivial placement: physical == logical
        # A script's install() beside the loaded plugin wraps nothing more: one wrap, one warning.
        install()
        assert ExpertDistributionRecorder.__dict__["init_new"] is hooked
        # stat_approx counts DeepEP dispatch: SGLang's own recorder stays, and without DeepEP
        # answers as it always does.
        with caplog.at_level(logging.WARNING), sglang_config("stat_approx"), pytest.raises(NotImplementedError):
            ExpertDistributionRecorder.init_new(meta, rank=0)
        assert sum("stays in charge" in r.getMessage() for r in caplog.records) == 1
        with sglang_config(None):  # recording off: SGLang's no-op recorder
            assert not isinstance(ExpertDistributionRecorder.init_new(meta, rank=0), SGLangRecorder)
        with sglang_config("stat", expert_balancedness_report_mode="server_log"):
            try:
                got = ExpertDistributionRecorder.init_new(meta, rank=0)
            except Exception:
                got = None  # SGLang's real recorder wants a process group for its metrics; not ours either way
            assert not isinstance(got, SGLangRecorder)
            assert got is None or isinstance(got, _ExpertDistributionRecorderReal)
    finally:
        # Restore SGLang's class for the other tests (HookRegistry has no undo of its own).
        type.__setattr__(ExpertDistributionRecorder, "init_new", original)
        type.__setattr__(ModelRunner, "forward", original_forward)
        HookRegistry.reset()
        _state["registered"] = False


def test_sglang_plugins_whitelist(monkeypatch):
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else")
    assert "moe_record" not in load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else,moe_record")
    found = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert found["moe_record"][1] == "moe-record-sglang"
    monkeypatch.delenv("SGLANG_PLUGINS")
    assert "moe_record" in load_plugins_by_group(GENERAL_PLUGINS_GROUP)


def test_rocm_megamoe_prefill_only_recording_keeps_sglangs_recorder(sglang_config, monkeypatch):
    """On ROCm with MegaMoE's prefill-only EPLB, SGLang records prefill passes only; ours would
    count decode passes too, so SGLang's recorder stays (ROCm cannot run here: its check is set)."""
    from moe_record_sglang.plugin import unsupported_reason
    from sglang.srt.eplb import expert_distribution

    with sglang_config("stat"):
        assert unsupported_reason() is None
        monkeypatch.setattr(expert_distribution, "megamoe_prefill_only_recorder_enabled", lambda: True)
        assert "records prefill passes only" in unsupported_reason()


def test_unverified_sglang_version_is_refused_naming_it(tmp_path, monkeypatch, caplog):
    # A real distribution record of another sglang version, first on the path: what
    # importlib.metadata (and so our check) sees when that version is installed.
    info = tmp_path / "sglang-0.4.6.post5.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sglang\nVersion: 0.4.6.post5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from moe_record_sglang import check_sglang_version, register

    with pytest.raises(AdapterError, match=r"sglang 0\.4\.6\.post5 is not supported"):
        register()
    with pytest.raises(AdapterError, match="0.6.0"):
        check_sglang_version("0.6.0")
    with pytest.raises(AdapterError, match="0.5.23.post1"):  # its internals were never read
        check_sglang_version("0.5.23.post1")
    assert check_sglang_version("0.5.23") == "0.5.23"
    assert check_sglang_version("0.5.23+cu130") == "0.5.23+cu130"  # a local build of it

    # SGLang's loader logs the refusal and carries on with its own recorder.
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    func, _ = load_plugins_by_group(GENERAL_PLUGINS_GROUP)["moe_record"]
    with pytest.raises(AdapterError):
        func()


def test_install_is_idempotent_and_uninstall_restores(sglang_config, model_dir):
    from moe_record_sglang import install, uninstall
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder

    before = ExpertDistributionRecorder.__dict__["init_new"]
    install()
    patched = ExpertDistributionRecorder.__dict__["init_new"]
    install()
    assert ExpertDistributionRecorder.__dict__["init_new"] is patched
    uninstall()
    assert ExpertDistributionRecorder.__dict__["init_new"].__func__ is before.__func__
    uninstall()


def test_wrong_width_ids_are_skipped_not_fatal(sglang_config, caplog):
    from moe_record_sglang import SGLangRecorder

    from moe_record_sdk import Recorder

    rec = SGLangRecorder(Recorder(num_layers=2, num_experts=4, top_k=2, mode="stat"))
    rec.start_record()
    with caplog.at_level(logging.WARNING), rec.with_forward_pass(0, None), rec.with_current_layer(1):
        rec.on_select_experts(topk_ids=torch.tensor([[0, 1, 2]]))  # 3 columns: not this model's top_k
        rec.on_select_experts(topk_ids=torch.tensor([[0, 1, 2], [3, 2, 1]]))  # again, another batch size
        rec.on_select_experts(topk_ids=torch.tensor([[0, 1]]))
    with rec.with_forward_pass(1, None):
        rec.on_select_experts(topk_ids=torch.tensor([[3, 3]]))  # outside any layer: SGLang has no layer either
    assert "ignoring top-k ids of shape (1, 3)" in caplog.text
    assert caplog.text.count("ignoring top-k ids") == 1  # once, not once per batch size
    assert rec.recorder.dump().total_count()[1].tolist() == [1, 1, 0, 0]


def test_registry_attach_builds_or_checks_the_recorder(sglang_config, model_dir):
    """``AdapterRegistry.attach(metadata)`` (the ``moe_record_attach`` hook): with no recorder
    the adapter builds one sized for SGLang's physical slots; a recorder that cannot count
    them is refused naming why; neither mistake marks the adapter broken."""
    from moe_record_sglang import SGLangRecorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    from moe_record_sdk import Recorder
    from moe_record_sdk.plugins import AdapterRegistry

    registry = AdapterRegistry()
    with sglang_config("stat", ep_num_redundant_experts=2):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        before = get_global_expert_distribution_recorder()
        with registry.attach(meta, mode="per_pass") as att:  # no recorder: the adapter builds one
            rec = get_global_expert_distribution_recorder()
            assert isinstance(rec, SGLangRecorder) and rec.recorder is att.recorder
            assert att.recorder.mode == "per_pass" and att.recorder.num_slots == 10  # 8 experts + 2 replicas
            rec.start_record()
            with rec.with_forward_pass(0, None), rec.with_current_layer(1):
                rec.on_select_experts(topk_ids=torch.tensor([[8, 9], [0, 1]]))  # replica slots of experts 0, 1
            assert att.recorder.dump().total_count()[1].tolist() == [2, 2, 0, 0, 0, 0, 0, 0]
        assert get_global_expert_distribution_recorder() is before
        logical_only = Recorder(num_layers=4, num_experts=8, top_k=2)  # replica slots 8, 9 would be lost
        with pytest.raises(AdapterError, match="8 expert slots != SGLang's 10 physical experts"):
            registry.attach(meta, logical_only)
        with pytest.raises(AdapterError, match="mode: 'bogus'"):
            registry.attach(meta, mode="bogus")
        assert [r.status for r in registry.adapters() if r.name == "sglang"] == ["ok"]
        with registry.attach(meta, Recorder(**registry.layer_map(meta).recorder_kwargs())) as att:
            assert att.layer_map.num_experts == 8
        assert get_global_expert_distribution_recorder() is before


def test_a_callers_recorder_under_eplb_follows_the_rebalanced_map(sglang_config, model_dir):
    """Under --enable-eplb the placement starts as the identity and EPLB rewrites it: a caller's
    recorder with no map was accepted and, after a rebalance, counted slots as experts; and it
    took modes EPLB cannot read. Now it is refused by name, and one with the map counts the
    experts the rebalanced slots hold, under build_recorder's guards."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import get_global_expert_distribution_recorder
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    from moe_record_sdk import Recorder
    from moe_record_sdk.errors import RecorderError
    from moe_record_sdk.plugins import AdapterRegistry

    registry = AdapterRegistry()
    with sglang_config("stat", enable_eplb=True, ep_num_redundant_experts=0):
        model_config = ModelConfig(model_path=model_dir)
        meta = ExpertLocationMetadata.init_trivial(model_config, moe_ep_rank=0)
        with pytest.raises(AdapterError, match=r"no physical_to_logical_map, but SGLang's EPLB \(--enable-eplb\)"):
            registry.attach(meta, Recorder(num_layers=4, num_experts=8, top_k=2))
        with registry.attach(meta, Recorder(**registry.layer_map(meta).recorder_kwargs())):
            rec = get_global_expert_distribution_recorder()
            with pytest.raises(RecorderError, match="EPLB"):
                rec.start_record("per_pass")
            skew = torch.zeros(1, 4, 8, dtype=torch.int32)
            skew[..., 0] = 1000
            skew[..., 1:] = torch.arange(1, 8, dtype=torch.int32)
            meta.update(
                ExpertLocationMetadata.init_by_eplb(model_config, logical_count=skew), update_layer_ids=[0, 1, 2, 3]
            )
            moved = meta.physical_to_logical_map_cpu[1]
            assert not torch.equal(moved, torch.arange(8))  # the rebalance moved experts
            rec.start_record()
            with rec.with_forward_pass(0, None), rec.with_current_layer(1):
                rec.on_select_experts(topk_ids=torch.tensor([[0, 1], [2, 3]]))
            got = rec.dump_record(output_mode="object")["logical_count"].sum(0)[1]
            assert got.tolist() == torch.bincount(moved[:4], minlength=8).tolist()
