"""SGLang's own file layouts (written here exactly as sglang 0.5.23 / 0.4.5 write them) load,
validate and convert; our .pt files carry exactly SGLang's keys plus one metadata key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from moe_record_sdk import load_dump, validate_dump
from moe_record_sdk.schema import sglang_file_name
from moe_record_sdk.schema.sglang import META_KEY

from ..dumps import random_dump


def test_our_stat_pt_has_sglang_keys(tmp_path):
    dump = random_dump(1, "stat", num_layers=4, layer_ids=[1, 3])
    path = tmp_path / sglang_file_name(dump)
    dump.save(str(path))
    assert path.name.startswith("expert_distribution_recorder_") and not path.stem.endswith("_0")
    obj = torch.load(path, weights_only=True, map_location="cpu")
    assert set(obj) == {"rank", "logical_count", "average_utilization_rate_over_window", META_KEY}
    assert obj["logical_count"].dtype == torch.int32
    assert list(obj["logical_count"].shape) == [1, 4, 8]
    assert obj["rank"] == 0


def test_our_per_pass_pt_has_sglang_layout(tmp_path):
    dump = random_dump(2, "per_token", replicas=2, rank=3)
    name = sglang_file_name(dump, now=1700000000.5)
    assert name == "expert_distribution_recorder_1700000000.5_3.pt"
    obj = torch.load(dump.save(str(tmp_path / name)), weights_only=True)
    assert set(obj) == {"records", "last_physical_to_logical_map", META_KEY}
    assert obj["last_physical_to_logical_map"].shape == (3, 10)
    rec = obj["records"][0]
    assert {"forward_pass_id", "rank", "gatherer_key", "global_physical_count", "topk_ids_of_layer"} <= set(rec)
    assert rec["rank"] == 3 and rec["gatherer_key"] == "primary"
    assert rec["global_physical_count"].dtype == torch.int32 and rec["global_physical_count"].shape == (3, 10)
    # The physical rows are stored once, in the records: the metadata does not repeat them (it
    # did, up to three times the file's size with int64 rows), and the file reads back whole.
    assert obj[META_KEY]["physical_count"] is None
    back = load_dump(str(tmp_path / name))
    assert torch.equal(back.physical_count, dump.physical_count) and torch.equal(back.logical_count, dump.logical_count)


def test_reads_sglang_stat_file(tmp_path):
    # _StatAccumulator.dump: rank 0 writes {rank, logical_count int32 [B, L, E], average_utilization...}
    count = torch.randint(0, 50, (5, 4, 8), dtype=torch.int32)
    count[:, 0] = 0  # a dense first layer
    path = tmp_path / "expert_distribution_recorder_1700000000.123456.pt"
    torch.save({"rank": 0, "logical_count": count, "average_utilization_rate_over_window": None}, path)
    dump = load_dump(path)
    assert validate_dump(dump) == []
    assert dump.engine.name == "sglang" and dump.model.moe_layer_ids == [1, 2, 3]
    assert torch.equal(dump.logical_count, count.long())
    assert dump.model.top_k is None  # SGLang's stat file does not say


def test_reads_sglang_per_pass_files_with_replicas(tmp_path):
    # _DetailAccumulator.dump: each rank writes {records: [...], last_physical_to_logical_map}
    mapping = torch.tensor([[0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 3, 2]])
    records = [
        {
            "forward_pass_id": p,
            "rank": 1,
            "gatherer_key": "primary",
            "global_physical_count": torch.randint(0, 9, (2, 6), dtype=torch.int32),
        }
        for p in (10, 11, 12)
    ]
    path = tmp_path / "expert_distribution_recorder_1700000000.0_1.pt"
    torch.save({"records": records, "last_physical_to_logical_map": mapping}, path)
    dump = load_dump(path)
    assert validate_dump(dump) == []
    assert dump.window.mode == "per_pass" and dump.topology.rank == 1
    assert [r.forward_pass_id for r in dump.records] == [10, 11, 12]
    phys = torch.stack([r["global_physical_count"] for r in records]).long()
    expected = torch.zeros(3, 2, 4, dtype=torch.int64).scatter_add_(-1, mapping.expand(3, 2, 6), phys)
    assert torch.equal(dump.logical_count, expected)
    assert torch.equal(dump.physical_count, phys)


def test_reads_sglang_per_token_file(tmp_path):
    ids = torch.full((2, 3, 8), -1, dtype=torch.int32)  # _TOP_K_NUM = 8, -1 unfilled
    ids[:, :, :2] = torch.tensor([[[0, 1], [2, 3], [1, 1]], [[3, 2], [0, 0], [1, 2]]], dtype=torch.int32)
    count = torch.zeros(2, 4, dtype=torch.int32)
    for layer in range(2):
        for e in ids[layer][ids[layer] >= 0].tolist():
            count[layer, e] += 1
    rec = {
        "forward_pass_id": 0,
        "rank": 0,
        "gatherer_key": "primary",
        "input_ids": [5, 6, 7],
        "positions": [0, 1, 2],
        "extend_seq_lens": [3],
        "forward_mode": 1,
        "topk_ids_of_layer": ids,
        "global_physical_count": count,
        "misc_objects": [],
    }
    path = tmp_path / "expert_distribution_recorder_1700000000.0_0.pt"
    torch.save({"records": [rec], "last_physical_to_logical_map": torch.arange(4).expand(2, 4).clone()}, path)
    dump = load_dump(path)
    assert validate_dump(dump) == []
    assert dump.window.mode == "per_token"
    assert dump.records[0].input_ids == [5, 6, 7]
    assert torch.equal(dump.records[0].topk_ids_of_layer, ids)


def test_reads_legacy_csv(tmp_path):
    path = tmp_path / "expert_distribution_rank2_timestamp1700000000.5.csv"
    path.write_text("layer_id,expert_id,count\n1,0,5\n1,3,2\n2,7,9\n")
    dump = load_dump(path)
    assert validate_dump(dump) == []
    assert dump.topology.rank == 2
    assert dump.logical_count.shape == (1, 3, 8)
    assert dump.logical_count[0, 1].tolist() == [5, 0, 0, 2, 0, 0, 0, 0]
    assert dump.model.moe_layer_ids == [1, 2]


def test_convert_sglang_file_to_msgpack_via_cli(tmp_path):
    count = torch.randint(0, 50, (2, 3, 4), dtype=torch.int32)
    src = tmp_path / "expert_distribution_recorder_1.0.pt"
    torch.save({"rank": 0, "logical_count": count, "average_utilization_rate_over_window": 0.5}, src)
    out = tmp_path / "out.msgpack"
    load_dump(src).save(str(out))
    back = load_dump(out)
    assert torch.equal(back.logical_count, count.long())
    assert back.average_utilization_rate_over_window == 0.5
    run = subprocess.run(
        [sys.executable, "-m", "moe_record_sdk", "validate", str(src), str(out)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("OK") == 2


def test_legacy_csv_with_unknown_layer_is_refused_by_name(tmp_path):
    from moe_record_sdk import DumpFormatError

    path = tmp_path / "expert_distribution_rank0_timestamp1.0.csv"
    path.write_text("layer_id,expert_id,count\nUNKNOWN,3,7\n")
    with pytest.raises(DumpFormatError, match="line 2: layer_id is UNKNOWN"):
        load_dump(path)


@pytest.mark.parametrize("rows", ["0,0,99999999999999999999999\n", "0,0,9223372036854775807\n0,0,1\n"])
def test_legacy_csv_counts_past_int64_are_refused_not_wrapped(tmp_path, rows):
    from moe_record_sdk import DumpFormatError

    path = tmp_path / "expert_distribution_rank0_timestamp1.0.csv"
    path.write_text("layer_id,expert_id,count\n" + rows)
    with pytest.raises(DumpFormatError, match="layer 0, expert 0: count .* exceeds int64"):
        load_dump(path)


@pytest.mark.parametrize("rank", ["1", 1.0, -1, True])
def test_a_rank_that_is_not_one_is_refused_by_name(tmp_path, rank):
    """A record's rank read as 0 would merge the file as another rank's: refused, naming the field."""
    from moe_record_sdk.errors import DumpFormatError

    record = {"forward_pass_id": 0, "rank": rank, "gatherer_key": "primary",
              "global_physical_count": torch.zeros(2, 4, dtype=torch.int32)}  # fmt: skip
    path = tmp_path / "expert_distribution_recorder_1700000000.0_1.pt"
    torch.save({"records": [record], "last_physical_to_logical_map": torch.arange(4).repeat(2, 1)}, path)
    with pytest.raises(DumpFormatError, match=r"records\[0\]\.rank: expected a rank"):
        load_dump(path)
    stat = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": rank, "logical_count": torch.zeros(1, 2, 4, dtype=torch.int32)}, stat)
    with pytest.raises(DumpFormatError, match="rank: expected a rank"):
        load_dump(stat)


@pytest.mark.parametrize(
    "kind, make",
    [
        ("sparse", lambda t: t.to_sparse()),
        ("meta", lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")),
        ("quantized", lambda t: torch.quantize_per_tensor(t.float(), 1.0, 0, torch.qint8)),
    ],
)
def test_a_tensor_that_is_not_dense_is_refused_by_name(tmp_path, capsys, kind, make):
    """torch.load(weights_only=True) rebuilds sparse, meta and quantized tensors: refused naming the
    field, where every command used to end in a traceback (no storage, no copy, no int view)."""
    from moe_record_sdk.cli import main
    from moe_record_sdk.errors import DumpFormatError

    counts = torch.randint(0, 9, (1, 2, 4), dtype=torch.int32)
    stat = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": make(counts)}, stat)
    with pytest.raises(DumpFormatError, match=rf"logical_count: a {kind} tensor; dumps hold dense tensors"):
        load_dump(stat)
    record = {"forward_pass_id": 0, "rank": 0, "gatherer_key": "primary", "global_physical_count": make(counts[0])}
    per_pass = tmp_path / "expert_distribution_recorder_1700000000.0_0.pt"
    torch.save({"records": [record], "last_physical_to_logical_map": torch.arange(4).repeat(2, 1)}, per_pass)
    assert main(["validate", str(per_pass)]) == 1
    err = capsys.readouterr()
    assert f"records[0].global_physical_count: a {kind} tensor" in err.out + err.err and "Traceback" not in err.err


def test_eplb_outputs_read_as_dumps_say_what_they_are(tmp_path, capsys):
    """A placement or a bare count tensor passed where a dump goes: the error says what the file
    is and where it belongs, not only what it lacks."""
    from moe_record_sdk.cli import main

    placement, weight = tmp_path / "init.pt", tmp_path / "weight.pt"
    torch.save({"physical_to_logical_map": torch.zeros(2, 4, dtype=torch.int64)}, placement)
    torch.save(torch.zeros(2, 4, dtype=torch.int64), weight)
    assert main(["summary", str(placement)]) == 2
    assert "init.pt: an expert placement, not a dump" in capsys.readouterr().err
    assert main(["summary", str(weight)]) == 2
    assert (
        "weight.pt: expected a dict at the top of the .pt, got Tensor [2, 4]: a bare count" in capsys.readouterr().err
    )
