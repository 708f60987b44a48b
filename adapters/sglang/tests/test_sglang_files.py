"""Files both ways: SGLang's own code reads ours (``read_mode_per_pass``, ``--init-expert-location``),
and files SGLang's own recorder wrote (``spec/fixtures/sglang``) load, validate and convert in ours."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from sglang_tiny import NUM_EXPERTS, NUM_LAYERS, TOP_K

from moe_record_sdk import Dump, load_dump, validate_dump

FIXTURES = Path(__file__).resolve().parents[3] / "spec" / "fixtures" / "sglang"
PT_FIXTURES = sorted(FIXTURES.glob("*/*.pt"))
ALL_FIXTURES = PT_FIXTURES + sorted(FIXTURES.glob("legacy/*.csv"))


def _adapter_per_pass_dumps(sglang_config, model_dir, dump_dir, ranks=2) -> list[Dump]:
    """Per-pass dumps of ``ranks`` ranks through the adapter, with EPLB replicas (physical ids)."""
    from moe_record_sglang import build_recorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata

    dumps = []
    with sglang_config("per_pass", ep_num_redundant_experts=2):
        meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
        for rank in range(ranks):
            rec = build_recorder(meta, rank, mode="per_pass", top_k=TOP_K)
            rec.start_record()
            g = torch.Generator().manual_seed(rank)
            for pass_id in (5, 6, 7):
                with rec.with_forward_pass(pass_id, None):
                    for layer in range(1, NUM_LAYERS):
                        with rec.with_current_layer(layer):
                            rec.on_select_experts(
                                topk_ids=torch.randint(-1, NUM_EXPERTS + 2, (4 + rank, TOP_K), generator=g)
                            )
            rec.dump_record()
            dumps.append(rec.last_dump)
    return dumps


def test_read_mode_per_pass_reads_our_per_rank_files(sglang_config, model_dir, dump_dir):
    from sglang.srt.eplb.eplb_simulator.reader import read_mode_per_pass

    dumps = _adapter_per_pass_dumps(sglang_config, model_dir, dump_dir)
    names = sorted(p.name for p in Path(dump_dir).glob("*.pt"))
    assert len(names) == 2 and names[0].endswith("_0.pt") and names[1].endswith("_1.pt")
    out = read_mode_per_pass(Path(dump_dir))  # SGLang's reader: glob, torch.load, sum over ranks per pass
    assert out["forward_pass_ids"] == [5, 6, 7]
    want = dumps[0].physical_count + dumps[1].physical_count  # [passes, L, P]
    assert want.shape == (3, NUM_LAYERS, NUM_EXPERTS + 2)
    assert torch.equal(out["global_physical_count_of_forward_pass"].long(), want)
    assert torch.equal(out["last_physical_to_logical_map"], dumps[0].physical_to_logical_map)
    for d in dumps:
        assert validate_dump(d) == []


def test_init_expert_location_accepts_our_stat_dump(sglang_config, model_dir, tmp_path):
    from moe_record_sglang import SGLangRecorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, compute_initial_expert_location_metadata

    from moe_record_sdk import Recorder

    rec = SGLangRecorder(Recorder(num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, top_k=TOP_K, layer_ids=[1, 2, 3]))
    rec.start_record()
    g = torch.Generator().manual_seed(9)
    for layer in (1, 2, 3):
        with rec.with_forward_pass(layer, None), rec.with_current_layer(layer):
            # skewed load, so the EPLB placement depends on the counts
            rec.on_select_experts(
                topk_ids=torch.multinomial(torch.arange(1.0, 9.0) ** 2, 64 * TOP_K, True, generator=g).view(64, TOP_K)
            )
    rec.dump_dir = str(tmp_path)
    rec.dump_record()
    (path,) = rec.last_paths
    with sglang_config("stat", init_expert_location=path, ep_num_redundant_experts=8):
        model_config = ModelConfig(model_path=model_dir)
        meta = compute_initial_expert_location_metadata(model_config=model_config, moe_ep_rank=0)
        expected = ExpertLocationMetadata.init_by_eplb(
            model_config, logical_count=rec.last_dump.logical_count.to(torch.int32)
        )
    assert meta.physical_to_logical_map.shape == (NUM_LAYERS, NUM_EXPERTS + 8)
    assert torch.equal(meta.physical_to_logical_map, expected.physical_to_logical_map)
    # the hottest expert of each MoE layer got replicas: EPLB read our counts
    for layer in (1, 2, 3):
        hottest = int(rec.last_dump.total_count()[layer].argmax())
        assert int((meta.physical_to_logical_map[layer] == hottest).sum()) > 1


def test_a_count_past_int32_is_written_as_int64_and_sglang_takes_it(sglang_config, model_dir, tmp_path):
    """A long window's cumulative row can pass 2**31 on a hot expert. Its dump used to raise
    inside SGLang's scheduler (which then shuts the server down) after the window was cleared:
    now the file holds int64 counts, and SGLang's --init-expert-location reads them."""
    from moe_record_sglang import SGLangRecorder
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, compute_initial_expert_location_metadata

    from moe_record_sdk import Recorder

    rec = SGLangRecorder(Recorder(num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, top_k=TOP_K), dump_dir=str(tmp_path))
    rec.start_record()
    with rec.with_forward_pass(1, None), rec.with_current_layer(2):
        rec.on_select_experts(topk_ids=torch.tensor([[3, 5]]))
    hot = 2**31 + 7  # as many more tokens [3, 5], as if counted over days: the counters are int64
    rec.recorder.counter.stripes[0, rec.recorder.counter.row_of[2], [3, 5]] += hot
    rec.dump_record()
    (path,) = rec.last_paths
    raw = torch.load(path, weights_only=True)
    assert raw["logical_count"].dtype == torch.int64 and int(raw["logical_count"][:, 2, 3].sum()) == hot + 1
    assert torch.equal(load_dump(path).total_count(), rec.last_dump.total_count())
    assert validate_dump(load_dump(path)) == []
    with sglang_config("stat", init_expert_location=path, ep_num_redundant_experts=8):
        model_config = ModelConfig(model_path=model_dir)
        meta = compute_initial_expert_location_metadata(model_config=model_config, moe_ep_rank=0)
        expected = ExpertLocationMetadata.init_by_eplb(model_config, logical_count=raw["logical_count"])
    assert torch.equal(meta.physical_to_logical_map, expected.physical_to_logical_map)
    assert int((meta.physical_to_logical_map[2] == 3).sum()) > 1  # the hot expert got the replicas


def test_a_dump_that_cannot_be_written_never_raises_into_sglang_and_is_kept(tmp_path, caplog):
    """SGLang's scheduler calls dump_record unguarded: a dump folder that cannot be written (here
    a file) used to raise there, taking the server down with the already cleared window. Now the
    file goes to a new temporary folder, named in the log."""
    from moe_record_sglang import SGLangRecorder

    from moe_record_sdk import Recorder

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    rec = SGLangRecorder(Recorder(num_layers=NUM_LAYERS, num_experts=NUM_EXPERTS, top_k=TOP_K), dump_dir=str(blocked))
    rec.start_record()
    with rec.with_forward_pass(1, None), rec.with_current_layer(1):
        rec.on_select_experts(topk_ids=torch.tensor([[0, 1], [1, 2]]))
    with caplog.at_level("ERROR"):
        assert rec.dump_record() is None
    (path,) = rec.last_paths
    assert not path.startswith(str(blocked)) and f"wrote it to {path} instead" in caplog.text
    assert str(blocked) in caplog.text
    assert torch.equal(load_dump(path).total_count(), rec.last_dump.total_count())
    assert int(load_dump(path).total_count().sum()) == 4


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sglang_written_fixture_loads_validates_and_converts(path, tmp_path):
    dump = load_dump(path)
    assert validate_dump(dump) == []
    assert dump.engine.name == "sglang"
    assert dump.model.num_layers == NUM_LAYERS and dump.model.num_logical_experts == NUM_EXPERTS
    assert dump.logical_count.device.type == "cpu"
    for fmt in ("msgpack", "json", "pt"):
        back = load_dump(dump.save(str(tmp_path / f"converted.{fmt}")))
        assert torch.equal(back.logical_count, dump.logical_count)
        assert validate_dump(back) == []
    run = subprocess.run(
        [sys.executable, "-m", "moe_record_sdk", "validate", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr


@pytest.mark.parametrize("path", PT_FIXTURES, ids=lambda p: p.parent.name)
def test_fixtures_hold_cuda_storages_like_sglangs_files(path):
    with zipfile.ZipFile(path) as z:
        pickle = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"cuda:0" in pickle
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # as on any CPU-only machine, without map_location


def test_fixture_contents(tmp_path):
    stat = load_dump(FIXTURES / "stat" / "expert_distribution_recorder_1700000000.25.pt")
    assert stat.window.mode == "stat" and stat.logical_count.shape == (4, NUM_LAYERS, NUM_EXPERTS)
    assert stat.logical_count[:, 0].sum() == 0 and stat.logical_count[3].sum() == 0  # dense layer, unwritten row
    assert stat.logical_count.sum((1, 2)).tolist()[:3] == [t * TOP_K * 3 for t in (5, 3, 6)]
    per_pass = load_dump(next((FIXTURES / "per_pass").glob("*.pt")))
    assert per_pass.model.num_physical_experts == NUM_EXPERTS + 2
    assert [r.forward_pass_id for r in per_pass.records] == [20, 21]
    assert torch.equal(per_pass.logical_count.sum((1, 2)), per_pass.physical_count.sum((1, 2)))
    per_token = load_dump(next((FIXTURES / "per_token").glob("*.pt")))
    assert per_token.window.mode == "per_token" and per_token.records[0].input_ids is not None
    assert per_token.logical_count.sum((1, 2)).tolist() == [t * TOP_K * 3 for t in (3, 2)]


def test_fixtures_are_what_the_generator_writes(tmp_path, gloo_world):
    from make_sglang_fixtures import make

    for new in make(tmp_path):
        rel = new.relative_to(tmp_path)
        old = FIXTURES / rel
        assert old.exists(), f"{rel}: regenerate spec/fixtures/sglang"
        if new.suffix == ".csv":
            assert new.read_text() == old.read_text()
            continue
        a = torch.load(new, weights_only=True, map_location="cpu")
        b = torch.load(old, weights_only=True, map_location="cpu")
        assert repr(a) == repr(b), f"{rel} differs from what make_sglang_fixtures.py writes"


def test_sglang_written_fixtures_merge_and_convert_with_the_cli(tmp_path):
    from moe_record_sdk.merge import merge_dumps

    paths = [*PT_FIXTURES, *FIXTURES.glob("legacy/*.csv")]
    dumps = [load_dump(p) for p in paths]
    merged = merge_dumps(dumps, sources=[str(p) for p in paths])  # separate runs: summed, reduced to stat
    assert validate_dump(merged) == []
    assert merged.window.mode == "stat"
    assert all(d.total_count().shape == (NUM_LAYERS, NUM_EXPERTS) for d in dumps)
    assert torch.equal(merged.total_count(), sum(d.total_count() for d in dumps))
    out = tmp_path / "stat.msgpack"
    src = next((FIXTURES / "stat").glob("*.pt"))
    run = subprocess.run(
        [sys.executable, "-m", "moe_record_sdk", "convert", str(src), "-o", str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert torch.equal(load_dump(out).logical_count, load_dump(src).logical_count)


def test_eplb_plan_binds_to_sglang_init_by_mapping(tmp_path):
    """`moe-record eplb`'s SGLang export is what `--init-expert-location` takes (init_by_mapping),
    and SGLang derives from it exactly our logical->physical map."""
    import inspect

    from sglang.srt.eplb.expert_location import ExpertLocationMetadata, _compute_logical_to_all_physical_map

    from moe_record_sdk.analysis import rebalance

    weight = ((torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) ** 4) * 1000).round()
    plan = rebalance(weight, 24, 8)
    data = torch.load(plan.save_sglang(tmp_path / "init.pt"), weights_only=True, map_location="cpu")
    inspect.signature(ExpertLocationMetadata.init_by_mapping).bind(None, **data, moe_ep_rank=0)
    ref = torch.as_tensor(
        _compute_logical_to_all_physical_map(
            data["physical_to_logical_map"], num_logical_experts=16, ep_size=8, moe_ep_rank=None
        )
    )
    width = plan.log2phy.shape[-1]
    assert torch.equal(ref[..., :width], plan.log2phy)
    assert bool((ref[..., width:] == -1).all())
