"""summarize / print_summary / the summary command, on dumps with known counts."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import msgspec
import pytest
import torch
from rich.console import Console

from moe_record_sdk import Recorder, Topology
from moe_record_sdk.analysis import print_summary, summarize, to_csv, to_json
from moe_record_sdk.cli import main
from moe_record_sdk.merge import merge_dumps
from moe_record_sdk.schema import sglang_file_name

from ..dumps import random_dump
from ..server.helpers import make_recorder
from .folders import engine_files, record_folder


def known_dump(mode="stat", mapping=None, passes=((0, 0, 1, 2), (0, 3))):
    """Layer 1 of 3 is MoE-free (dense); layers 0 and 2 see the given top-1 ids per pass."""
    rec = Recorder(num_layers=3, num_experts=4, top_k=1, mode=mode, layer_ids=[0, 2], physical_to_logical_map=mapping)
    rec.start()
    for ids in passes:
        t = torch.tensor(ids).unsqueeze(1)
        rec.record(0, t)
        rec.record(2, torch.zeros_like(t))  # layer 2: everything on expert 0
        rec.step()
    return rec.dump()


def test_per_layer_values():
    s = summarize(known_dump(), source="k")
    assert [r.layer for r in s.layers] == [0, 2]  # only the MoE layers
    l0, l2 = s.layers
    # layer 0: ids 0,0,1,2,0,3 -> [3, 1, 1, 1]; mean 1.5, max 3
    assert l0.tokens == 6 and l0.experts.assignments == 6
    assert l0.experts.max_over_mean == pytest.approx(2.0)
    assert l0.experts.imbalance_ratio == pytest.approx(1.0)
    assert l0.experts.balancedness == pytest.approx((1.5 + 1e-5) / (3 + 1e-5))
    assert l0.experts.jain == pytest.approx(36 / (4 * 12))
    assert l0.experts.hot == [(0, pytest.approx(2.0))] and l0.experts.dead == []
    # layer 2: one hot expert, the worst score
    assert l2.experts.max_over_mean == pytest.approx(4.0) and l2.experts.dead == [1, 2, 3]
    o = s.overall
    assert o.layers == 2 and o.tokens == 6 and o.assignments == 12 and o.dead_experts == 3
    assert o.worst_layer == 2
    assert o.experts.imbalance_ratio == pytest.approx((1.0 + 3.0) / 2)
    assert s.passes == [] and s.ep_size is None and l0.gpus is None


def test_per_gpu_contiguous_and_from_physical_counts():
    s = summarize(known_dump(), ep_size=2)
    assert s.placement == "contiguous"
    assert s.layers[0].gpus.assignments == 6 and s.layers[0].gpus.max == 4  # GPU 0: experts 0,1 -> 3 + 1
    assert s.layers[0].gpus.imbalance_ratio == pytest.approx(4 / 3 - 1)
    # expert 0 replicated on slots 0 and 4; the recorder counts physical slots exactly
    mapping = torch.tensor([[0, 1, 2, 3, 0, 0]] * 3)
    dump = known_dump(mapping=mapping, passes=((0, 4, 1, 2), (4, 3)))
    s = summarize(dump, ep_size=2)
    assert s.placement == "recorded physical counts"
    # slots 0-2 on GPU 0: 1 + 1 + 1; slots 3-5 on GPU 1: 1 + 2 + 0
    assert s.layers[0].gpus.max == 3 and s.layers[0].gpus.balancedness == pytest.approx(1.0)
    # a placement given explicitly is predicted: layer 0's [3, 1, 1, 1] with expert 0 split evenly
    # over slots 0, 4, 5 -> GPU 0: 1 + 1 + 1, GPU 1: 1 + 1 + 1
    s = summarize(known_dump(), ep_size=2, physical_to_logical_map=mapping)
    assert s.placement == "physical_to_logical_map"
    assert s.layers[0].gpus.max == pytest.approx(3.0) and s.layers[0].gpus.imbalance_ratio == pytest.approx(0.0)
    with pytest.raises(ValueError, match="ep_size: 3 does not divide the 4 experts"):
        summarize(known_dump(), ep_size=3)


def test_over_passes():
    s = summarize(known_dump(mode="per_pass"), ep_size=2)
    assert [p.forward_pass_id for p in s.passes] == [0, 1]
    # pass 1 of layer 0: ids 0,3 -> [1, 0, 0, 1]: max/mean 2; layer 2: [2, 0, 0, 0]: 4 -> mean 3
    assert s.passes[1].experts.max_over_mean == pytest.approx(3.0)
    assert s.passes[1].assignments == 4
    assert s.passes[1].gpus.balancedness == pytest.approx(((1 + 1e-5) / (1 + 1e-5) + (1 + 1e-5) / (2 + 1e-5)) / 2)


def test_outputs():
    s = summarize(known_dump(mode="per_pass"), ep_size=2, source="k")
    back = json.loads(to_json([s]))
    assert back[0]["layers"][0]["experts"]["imbalance_ratio"] == pytest.approx(1.0)
    rows = list(csv.DictReader(io.StringIO(to_csv(s))))
    assert {(r["scope"], r["over"]) for r in rows} == {
        (a, b) for a in ("layer", "overall", "pass") for b in ("experts", "gpus")
    }
    first = rows[0]
    assert first["layer"] == "0" and first["hot"] == "0:2.00" and float(first["jain"]) == pytest.approx(0.75)
    console = Console(record=True, width=120)
    print_summary(s, console)
    text = console.export_text()
    assert "Load over experts" in text and "Load over 2 GPUs (contiguous)" in text and "Over 2 passes" in text
    assert "e0:2.0" in text and "worst layer 2" in text


def test_cli(tmp_path, capsys):
    path = known_dump().save(str(tmp_path / "d.pt"))
    assert main(["summary", path, "--json", "--ep-size", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["source"] == path and out[0]["layers"][1]["experts"]["dead"] == [1, 2, 3]
    assert main(["summary", path, "--csv"]) == 0
    assert capsys.readouterr().out.startswith("source,scope,layer")
    assert main(["summary", path]) == 0
    assert "Load over experts" in capsys.readouterr().out
    plan = tmp_path / "plan.pt"
    torch.save({"physical_to_logical_map": torch.tensor([[0, 1, 2, 3, 0, 0]] * 3)}, plan)
    assert main(["summary", path, "--json", "--ep-size", "3", "--placement", str(plan)]) == 0
    assert json.loads(capsys.readouterr().out)[0]["placement"] == "physical_to_logical_map"
    assert main(["summary", path, "--ep-size", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err


def rank_dump(rank, ids):
    topo = Topology(rank=rank, world_size=2, dp_rank=rank, dp_size=2, token_shard=rank, num_token_shards=2)
    rec = Recorder(num_layers=1, num_experts=4, top_k=1, topology=topo)
    rec.start()
    rec.record(0, torch.tensor(ids).unsqueeze(1))
    rec.step()
    return rec.dump()


def test_cli_merges_data_parallel_ranks(tmp_path, capsys):
    a = rank_dump(0, [0, 0, 1]).save(str(tmp_path / "r0.msgpack"))
    b = rank_dump(1, [2, 3, 0]).save(str(tmp_path / "r1.msgpack"))
    assert main(["summary", a, b, "--json"]) == 0
    assert [s["overall"]["assignments"] for s in json.loads(capsys.readouterr().out)] == [3, 3]
    assert main(["summary", a, b, "--json", "--merge"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["source"].startswith("merged(") and s["layers"][0]["experts"]["max"] == 3.0  # expert 0: 2 + 1
    assert main(["eplb", a, b, "--replicas", "4", "--gpus", "2", "--json"]) == 0  # eplb merges on its own
    assert json.loads(capsys.readouterr().out)["source"].startswith("merged(")


def test_cli_refuses_gpu_and_hot_counts_below_one(tmp_path, capsys):
    path = known_dump().save(str(tmp_path / "d.msgpack"))
    for flag, value in (("--ep-size", "-2"), ("--ep-size", "0"), ("--hot", "-1"), ("--hot", "x")):
        assert main(["summary", path, flag, value]) == 2, (flag, value)
        assert f"argument {flag}: expected an integer > 0, got '{value}'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="ep_size: 0; expected a GPU count >= 1"):
        summarize(known_dump(), ep_size=0)  # not silently "no ep_size"


def test_gpu_load_covers_the_passes_the_ring_dropped(tmp_path, capsys):
    # expert 0 on slots 0 and 4; GPU 0 holds slots 0-2, GPU 1 slots 3-5. Each of 5 passes sends
    # two tokens to slot 0 and one to slot 3; the ring keeps the last 2 passes only.
    rec = Recorder(1, 4, 1, mode="stat", buffer_size=2, physical_to_logical_map=torch.tensor([[0, 1, 2, 3, 0, 1]]))
    rec.start()
    for _ in range(5):
        rec.record(0, torch.tensor([[0], [0], [3]]))
        rec.step()
    dump = rec.dump()
    assert dump.physical_count.sum().item() == 6  # what the old summary counted as exact
    s = summarize(dump, ep_size=2)
    assert s.placement == "physical_to_logical_map, physical counts incomplete"
    g = s.layers[0].gpus
    # all 15 assignments: expert 0's 10 split over its two slots -> GPU 0: 5, GPU 1: 5 + 5 (expert 3)
    assert s.layers[0].experts.assignments == 15 and g.assignments == 15 and (g.max, g.mean) == (10, 7.5)
    path = dump.save(str(tmp_path / "ring.msgpack"))
    assert main(["summary", path, "--ep-size", "2"]) == 0
    assert "Load over 2 GPUs (physical_to_logical_map, physical counts incomplete)" in capsys.readouterr().out


def placement_dump():
    """4 layers, 8 experts, top-2: every expert 2 tokens per layer, expert 7 (and 0) one more."""
    rec = Recorder(4, 8, 2, mode="stat")
    rec.start()
    for ids in ([[0, 1], [2, 3], [4, 5], [6, 7]],) * 2 + ([[7, 0]],):
        for layer in range(4):
            rec.record(layer, torch.tensor(ids))
        rec.step()
    return rec.dump()


def test_cli_placement_must_place_every_loaded_expert_and_know_the_gpus(tmp_path, capsys):
    path = placement_dump().save(str(tmp_path / "d.msgpack"))
    full, miss, flt = (str(tmp_path / n) for n in ("full.pt", "miss.pt", "float.pt"))
    torch.save({"physical_to_logical_map": torch.arange(8).expand(4, 8).clone()}, full)
    torch.save({"physical_to_logical_map": torch.tensor([[0, 1, 2, 3, 4, 5, 6, 6]] * 4)}, miss)
    torch.save({"physical_to_logical_map": torch.arange(8).expand(4, 8).float()}, flt)
    assert main(["summary", path, "--placement", full, "--ep-size", "2", "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["placement"] == "physical_to_logical_map" and s["layers"][0]["gpus"]["mean"] == 9.0  # 18 / 2
    assert main(["summary", path, "--placement", miss, "--ep-size", "2"]) == 2  # not a mean of 7.5
    err = capsys.readouterr().err
    # The placement's checks name its file (they named only the parameter).
    assert f"--placement {miss}: layer 0 has no slot for expert 7, which got 3 token(s)" in err
    assert "3 more such (layer, expert) pairs" in err
    assert main(["summary", path, "--placement", full]) == 2  # the dump does not say its GPUs
    assert f"--placement {full}: a placement needs the GPU count (ep_size, --ep-size)" in capsys.readouterr().err
    # SGLang's --init-expert-location also takes JSON: so does --placement (it was "not a loadable .pt").
    as_json = tmp_path / "init.json"
    as_json.write_text(json.dumps({"physical_to_logical_map": torch.arange(8).expand(4, 8).tolist()}))
    assert main(["summary", path, "--placement", str(as_json), "--ep-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["layers"][0]["gpus"]["mean"] == 9.0
    as_json.write_text(json.dumps({"physical_to_logical_map": [[0, 1], [2]]}))
    assert main(["summary", path, "--placement", str(as_json), "--ep-size", "2"]) == 2
    assert f"{as_json}: physical_to_logical_map: expected [layers, physical slots] lists" in capsys.readouterr().err
    assert main(["summary", path, "--placement", flt, "--ep-size", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{flt}: physical_to_logical_map: expected an int tensor" in err and "got torch.float32 [4, 8]" in err
    # a dump that knows its EP group needs no --ep-size
    rec = Recorder(1, 4, 1, topology=Topology(world_size=2, ep_size=2))
    rec.start()
    rec.record(0, torch.tensor([[0], [1], [1]]))
    rec.step()
    s = summarize(rec.dump(), physical_to_logical_map=torch.tensor([[1, 0, 2, 3]]))
    assert s.ep_size == 2 and [r.gpus.max for r in s.layers] == [3.0]  # GPU 0: slots of experts 1, 0


def test_cli_sglang_file_without_ep_size_has_no_gpu_table(tmp_path, capsys):
    # SGLang's files name a rank but no EP size; a rank-3 file once read as ep_size 4.
    fixture = "spec/fixtures/sglang/per_pass/expert_distribution_recorder_1700000001.5_0.pt"
    obj = torch.load(fixture, weights_only=True, map_location="cpu")
    obj["records"] = [dict(r, rank=3) for r in obj["records"]]
    path = str(tmp_path / "expert_distribution_recorder_1700000001.5_3.pt")
    torch.save(obj, path)
    assert main(["summary", path, "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["ep_size"] is None and s["placement"] is None and s["layers"][0]["gpus"] is None
    assert main(["summary", path]) == 0
    out = capsys.readouterr().out
    assert "Load over experts" in out and "GPUs" not in out
    assert main(["summary", path, "--ep-size", "2", "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["placement"] == "recorded physical counts"
    assert s["overall"]["assignments"] == sum(r["gpus"]["assignments"] for r in s["layers"])


def test_a_placement_file_is_size_checked_before_loading(tmp_path, capsys):
    path = random_dump(1, "stat", num_layers=2, num_experts=4).save(str(tmp_path / "run.msgpack"))
    plan = tmp_path / "plan.pt"
    # 8 bytes of storage viewed as [2**20, 2**20]: loading it as-is would allocate 8 TiB on use.
    torch.save({"physical_to_logical_map": torch.zeros(1, dtype=torch.int64).expand(2**20, 2**20)}, plan)
    assert main(["summary", path, "--placement", str(plan)]) == 2
    err = capsys.readouterr().err
    assert (
        "physical_to_logical_map: views 1099511627776 elements over a 8-byte storage" in err
        and len(err.strip().splitlines()) == 1
    )


def test_json_of_a_file_whose_name_is_not_utf8(tmp_path, capsys):
    """A file name with a byte that is not UTF-8 (a surrogate escape in Python): JSON out, its
    name escaped (msgspec refused the surrogate with a traceback)."""
    import os

    from ..dumps import random_dump

    path = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"r\xff.msgpack"))
    random_dump(seed=1, mode="stat").save(path)
    assert main(["summary", "--json", path]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert doc["source"].endswith("r\\udcff.msgpack")


def test_summary_reads_the_folder_record_wrote(tmp_path, capsys):
    out, status, (a, b) = record_folder(tmp_path, [make_recorder(), make_recorder()])
    assert status == 0 and sorted(os.listdir(out))[-1] == "merged.pt" and len(engine_files(out)) == 2
    for merge in ([], ["--merge"]):  # the merged dump, read once (not beside the engines' it sums)
        assert main(["summary", out, "--json", *merge]) == 0
        (s,) = json.loads(capsys.readouterr().out)
        assert s["source"] == os.path.join(out, "merged.pt")
        assert s["overall"]["assignments"] == int((a + b).sum())
    # Without merged.pt (as when record could not merge): one engine dump is read as it is...
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(engine_files(out)[0], single)
    assert main(["summary", str(single), "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["source"] == engine_files(str(single))[0] and s["overall"]["assignments"] == int(a.sum())
    # ...several are merged with --merge, and otherwise refused, naming the folder and what to pass.
    os.remove(os.path.join(out, "merged.pt"))
    assert main(["summary", out, "--json", "--merge"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["source"] == f"merged({', '.join(engine_files(out))})"
    assert s["overall"]["assignments"] == int((a + b).sum())
    assert main(["summary", out]) == 2
    err = capsys.readouterr().err
    assert f"moe-record summary: {out}: holds 2 engine dumps (" in err and "no merged.*" in err
    assert "pass the engine-* files themselves, or merge them (summary --merge" in err


def test_a_folder_record_did_not_write_is_refused_naming_what_it_holds(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["summary", str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: a folder without the dumps `moe-record record --out` writes (engine-*, merged.*)" in err
    assert "meta_info.json (it is empty): pass dump files" in err
    other = tmp_path / "other"
    other.mkdir()
    for n in ("a.txt", "b.pt", "c.pt", "d.pt", "e.pt"):
        (other / n).write_bytes(b"")
    assert main(["summary", str(other)]) == 2
    assert "(it holds: a.txt, b.pt, c.pt, d.pt and 1 more): pass dump files" in capsys.readouterr().err
    twice = tmp_path / "twice"
    twice.mkdir()
    random_dump(1).save(str(twice / "merged.pt"))
    random_dump(1).save(str(twice / "merged.json"))
    assert main(["summary", str(twice)]) == 2
    assert f"{twice}: holds 2 merged dumps (merged.json, merged.pt): pass one of them" in capsys.readouterr().err


def test_summary_placement_takes_the_plan_eplb_writes(tmp_path, capsys):
    path = placement_dump().save(str(tmp_path / "d.msgpack"))
    init, plan = str(tmp_path / "init.pt"), str(tmp_path / "plan.pt")
    eplb = ["eplb", path, "--replicas", "10", "--gpus", "2", "--sglang-out", init, "--plan-out", plan]
    assert main(eplb) == 0
    capsys.readouterr()
    summaries = []
    for placement in (init, plan):  # the same placement, read from either file
        assert main(["summary", path, "--placement", placement, "--ep-size", "2", "--json"]) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    assert summaries[0] == summaries[1]
    assert summaries[1][0]["placement"] == "physical_to_logical_map" and summaries[1][0]["layers"][0]["gpus"]
    other = str(tmp_path / "other.pt")
    torch.save({"log2phy": torch.zeros(4, 8, 1, dtype=torch.int64)}, other)
    assert main(["summary", path, "--placement", other, "--ep-size", "2"]) == 2
    assert (
        f"{other}: holds neither physical_to_logical_map nor phy2log: not a placement file" in capsys.readouterr().err
    )


def merged_per_pass():
    """Two engines' per_pass dumps merged: each engine's passes 0 and 1, as two token groups."""
    a = known_dump(mode="per_pass")
    b = known_dump(mode="per_pass", passes=((1, 1), (2, 2), (3,)))
    b = msgspec.structs.replace(b, window=msgspec.structs.replace(b.window, start_time=a.window.start_time + 1))
    return merge_dumps([a, b])


def test_passes_of_a_merge_are_told_apart_by_rank():
    """A merge's per-pass rows are two engines' passes side by side, not one run of five passes:
    each pass keeps its id and its group, and the table and CSV say which."""
    s = summarize(merged_per_pass(), source="m")
    assert [(p.rank, p.forward_pass_id) for p in s.passes] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    out = io.StringIO()
    print_summary(s, Console(file=out, width=200), max_pass_rows=2)
    text = out.getvalue()
    assert "Over 5 passes of 2 token groups (DP ranks or engines)" in text
    rows = [line.split()[:2] for line in text.splitlines() if "–" in line and line.split()[0] in ("0", "1")]
    assert rows == [["0", "0–1"], ["1", "0–2"]], text  # by pass id, a chunk never spans two ranks
    table = list(csv.DictReader(io.StringIO(to_csv(s))))
    passes = [(r["rank"], r["forward_pass_id"]) for r in table if r["scope"] == "pass"]
    assert passes == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1"), ("1", "2")]


def test_plot_draws_each_rank_of_a_merge_as_its_own_line():
    from matplotlib.figure import Figure

    from moe_record_sdk.analysis.plot import _passes

    ax = Figure().add_subplot()
    _passes(ax, merged_per_pass(), None)
    lines = ax.get_lines()  # assignments: one line per rank, each over its own pass ids
    assert [list(line.get_xdata()) for line in lines] == [[0, 1], [0, 1, 2]]
    assert "2 token groups" in ax.get_title()


def test_tables_on_a_pipe_are_not_folded_at_80_columns(tmp_path, capsys, monkeypatch):
    """Written to a log or a pipe, rich would fold every table at 80 columns (hot and dead lists
    wrapped and cut); 160 there, or what COLUMNS says."""
    path = random_dump(3, num_layers=4, num_experts=64).save(str(tmp_path / "d.msgpack"))
    monkeypatch.delenv("COLUMNS", raising=False)
    assert main(["summary", path]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) > 80
    monkeypatch.setenv("COLUMNS", "70")
    assert main(["summary", path]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 70


def test_a_folder_of_sglang_dumps_reads_as_sglangs_reader_takes_it(tmp_path, capsys):
    """SGLang's ``read_mode_per_pass(dir)`` takes its dump directory: so do summary and eplb."""
    fixture = os.path.join(os.path.dirname(__file__), "..", "..", "spec", "fixtures", "sglang", "stat")
    assert main(["summary", fixture, "--json"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["source"].endswith("expert_distribution_recorder_1700000000.25.pt")
    folder = tmp_path / "sglang-dumps"  # one per_pass file per rank, as SGLang's endpoint writes them
    folder.mkdir()
    want = 0
    for rank in (0, 1):
        d = random_dump(rank, "per_pass", rank=rank)
        topology = Topology(rank=rank, world_size=2, token_shard=rank, num_token_shards=2)  # ranks route their own
        d = msgspec.structs.replace(
            d, topology=topology, records=[msgspec.structs.replace(r, rank=rank) for r in d.records]
        )
        d.save(str(folder / sglang_file_name(d, now=1700000000.5)))
        want += int(d.total_count().sum())
    (folder / "notes.txt").write_text("not a dump\n")
    assert main(["summary", str(folder), "--json", "--merge"]) == 0
    (s,) = json.loads(capsys.readouterr().out)
    assert s["overall"]["assignments"] == want
    assert main(["summary", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: holds 2 SGLang dumps (expert_distribution_recorder_1700000000.5_0.pt, " in err


def test_hot_n_names_n_experts_in_the_table_too(tmp_path, capsys, monkeypatch):
    """--hot 6 kept six hot experts in --json, and the table still named three."""
    import re

    monkeypatch.setenv("COLUMNS", "400")  # one line per layer
    path = random_dump(1).save(str(tmp_path / "d.msgpack"))
    shown = {}
    for n in (3, 6):
        assert main(["summary", path, "--hot", str(n)]) == 0
        shown[n] = len(re.findall(r"\be\d+:\d", capsys.readouterr().out))
        assert main(["summary", path, "--hot", str(n), "--json"]) == 0
        kept = sum(len(layer["experts"]["hot"]) for layer in json.loads(capsys.readouterr().out)[0]["layers"])
        assert shown[n] == kept, (n, shown[n], kept)
    assert shown[6] > shown[3]


def test_what_the_tables_leave_out_is_said(tmp_path, capsys):
    """Unobserved MoE layers, passes the ring dropped and discarded slots were in no table and
    unsaid (the header counted 9 passes, the pass table 4)."""
    rec = Recorder(num_layers=3, num_experts=4, top_k=1, layer_ids=[0, 2], unobserved_layers=[1], mode="per_pass",
                   buffer_size=2)  # fmt: skip
    rec.start()
    for _ in range(5):
        rec.record(0, torch.tensor([[0], [1], [-1]]))
        rec.record(2, torch.tensor([[3], [3], [2]]))
        rec.step()
    path = rec.dump().save(str(tmp_path / "d.msgpack"))
    assert main(["summary", path]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "MoE layers [1] not observed (in no table); 3 passes dropped from the ring" in out, out
    assert "5 top-k slots discarded" in out
    assert main(["summary", path, "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["unobserved_layers"], doc["dropped_passes"], doc["discarded"]) == ([1], 3, 5)


def test_passes_summarized_in_chunks_equal_all_at_once(monkeypatch):
    """Per-pass metrics are computed a chunk of passes at a time (a float64 copy of every pass
    took 5x a large file in RAM): the same figures as all at once, across chunk boundaries."""
    from moe_record_sdk.analysis import summary as module

    mapping = torch.tensor([[0, 1, 2, 3, 0, 1], [3, 2, 1, 0, 3, 2]])
    rec = Recorder(
        num_layers=2, num_experts=4, top_k=2, mode="per_pass", buffer_size=10, physical_to_logical_map=mapping
    )
    rec.start()
    g = torch.Generator().manual_seed(3)
    for _ in range(7):
        for layer in range(2):
            rec.record(layer, torch.randint(0, 6, (int(torch.randint(1, 9, (1,), generator=g)), 2), generator=g))
        rec.step()
    dump = rec.dump()
    whole = to_json(summarize(dump, ep_size=2))
    monkeypatch.setattr(module, "_PASS_CHUNK", 3)  # 7 passes: chunks of 3, 3 and 1
    assert to_json(summarize(dump, ep_size=2)) == whole
    assert len(json.loads(whole)["passes"]) == 7
