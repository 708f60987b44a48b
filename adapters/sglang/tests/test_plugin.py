"""The plugin loads through SGLang's own ``load_plugins()``, respects ``SGLANG_PLUGINS``, refuses
unverified SGLang versions, and puts our recorder where SGLang builds its own."""

from __future__ import annotations

import logging

import pytest
import torch

from moe_record_sdk.errors import AdapterError


def test_load_plugins_runs_ours_and_wraps_init_new(sglang_config, model_dir, monkeypatch):
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    from moe_record_sglang import SGLangRecorder
    from moe_record_sglang.plugin import TARGET
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_distribution import ExpertDistributionRecorder, _ExpertDistributionRecorderReal
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    original = ExpertDistributionRecorder.__dict__["init_new"]
    load_plugins()  # SGLang's loader: our entry point registers, then SGLang applies the hook
    try:
        assert TARGET in HookRegistry._patched
        assert ExpertDistributionRecorder.__dict__["init_new"] is not original
        with sglang_config("per_pass"):
            meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
            rec = ExpertDistributionRecorder.init_new(meta, rank=0)  # as ModelRunner calls it
            assert isinstance(rec, SGLangRecorder)
            assert rec.recorder.top_k == 2 and rec.recorder.num_layers == 4 and rec.recorder.mode == "per_pass"
            assert rec.recorder.mapping is None  # trivial placement: physical == logical
        # stat_approx counts DeepEP dispatch: SGLang's own recorder stays, and without DeepEP
        # answers as it always does.
        with sglang_config("stat_approx"), pytest.raises(NotImplementedError):
            ExpertDistributionRecorder.init_new(meta, rank=0)
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
        HookRegistry.reset()


def test_sglang_plugins_whitelist(monkeypatch):
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else")
    assert "moe_record" not in load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    monkeypatch.setenv("SGLANG_PLUGINS", "someone_else,moe_record")
    found = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert found["moe_record"][1] == "moe-record-sglang"
    monkeypatch.delenv("SGLANG_PLUGINS")
    assert "moe_record" in load_plugins_by_group(GENERAL_PLUGINS_GROUP)


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
    assert check_sglang_version("0.5.23") == "0.5.23"

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
        rec.on_select_experts(topk_ids=torch.tensor([[0, 1]]))
    with rec.with_forward_pass(1, None):
        rec.on_select_experts(topk_ids=torch.tensor([[3, 3]]))  # outside any layer: SGLang has no layer either
    assert "ignoring top-k ids of shape (1, 3)" in caplog.text
    assert rec.recorder.dump().total_count()[1].tolist() == [1, 1, 0, 0]
