"""Converters, on files written the way each tool writes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from moe_record_sdk import DumpFormatError, load_dump, validate_dump
from moe_record_sdk.cli import main
from moe_record_sdk.convert import load_megatron_tpe, load_trtllm_statistic, read_inputs, to_sglang_stat_dict
from moe_record_sdk.schema.io import _msgpack_enc

from ..dumps import random_dump
from ..server.helpers import make_recorder
from .folders import record_folder


def write_trtllm(folder, records_per_rank, num_experts, top_k, raw=False):
    """As TensorRT-LLM's ``ExpertStatistic._set_iter`` at ``iter == stop``
    (``tensorrt_llm/_torch/expert_statistic.py``, commit 0fccc5b9): rank 0 writes
    ``meta_info.json`` with ``json.dump``; every rank ``safetensors.torch.save_file(self._records,
    f"{path}/rank{rank}.safetensors")`` with keys ``f"{iter}_{layer}"`` -> int64 bincount."""
    os.makedirs(folder, exist_ok=True)
    with open(f"{folder}/meta_info.json", "w") as f:
        json.dump({"num_experts": num_experts, "num_experts_per_token": top_k}, f)
    for rank, records in enumerate(records_per_rank):
        safetensors.torch.save_file(records, f"{folder}/rank{rank}.safetensors")
        if raw:  # the later loader's raw ids file (examples/wide_ep/ep_load_balancer/utils.py), skipped
            safetensors.torch.save_file(
                {k: torch.zeros(3, top_k, dtype=torch.int32) for k in records}, f"{folder}/rank{rank}_raw.safetensors"
            )


def trtllm_records(seed, iters, layers, num_experts, top_k, tokens=16):
    """What ``_maybe_add_info`` accumulates: ``torch.bincount(ids.flatten(), minlength=E)``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for it in iters:
        for layer in layers:
            ids = torch.randint(0, num_experts, (tokens, top_k), generator=g)
            out[f"{it}_{layer}"] = torch.bincount(ids.flatten(), minlength=num_experts)
    return out


def test_trtllm_folder(tmp_path):
    iters, layers, E = [5, 6, 7], [3, 4, 6], 8  # DeepSeek-like: dense layers 0-2 are not recorded
    ranks = [trtllm_records(r, iters, layers, E, 2) for r in range(3)]
    folder = str(tmp_path / "expert_statistic")
    write_trtllm(folder, ranks, E, 2, raw=True)
    dump = load_trtllm_statistic(folder)
    assert validate_dump(dump) == []
    assert dump.engine.name == "tensorrt-llm" and dump.model.top_k == 2
    assert dump.model.num_layers == 7 and dump.model.moe_layer_ids == layers
    assert dump.logical_count.shape == (3, 7, E)
    assert [r.forward_pass_id for r in dump.records] == iters
    for i, it in enumerate(iters):  # ranks summed element-wise, like TensorRT-LLM's load_expert_statistic
        for layer in layers:
            want = sum(r[f"{it}_{layer}"] for r in ranks)
            assert torch.equal(dump.logical_count[i, layer], want)
    assert int(dump.logical_count[:, :3].sum()) == 0
    assert load_trtllm_statistic(folder, num_layers=10).logical_count.shape == (3, 10, E)


def test_trtllm_bad_folders_are_named(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    with pytest.raises(DumpFormatError, match="no meta_info.json"):
        load_trtllm_statistic(str(folder))
    (folder / "meta_info.json").write_text('{"num_experts": 4}')
    with pytest.raises(DumpFormatError, match="num_experts_per_token"):
        load_trtllm_statistic(str(folder))
    (folder / "meta_info.json").write_text('{"num_experts": 4, "num_experts_per_token": 2}')
    with pytest.raises(DumpFormatError, match="no rank"):
        load_trtllm_statistic(str(folder))
    safetensors.torch.save_file({"3-1": torch.zeros(4, dtype=torch.int64)}, str(folder / "rank0.safetensors"))
    with pytest.raises(DumpFormatError, match=r"rank0.safetensors: key '3-1'"):
        load_trtllm_statistic(str(folder))
    safetensors.torch.save_file({"3_1": torch.zeros(5, dtype=torch.int64)}, str(folder / "rank0.safetensors"))
    with pytest.raises(DumpFormatError, match="length num_experts=4"):
        load_trtllm_statistic(str(folder))
    (folder / "rank0.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(DumpFormatError, match="header length"):
        load_trtllm_statistic(str(folder))


def write_megatron(folder, rank, iteration, decoder, mtp=None):
    """As Megatron's ``ActivationLogger.save_tpe`` (``megatron/training/activation_logging.py``):
    appends ``json.dumps({"iter", "block", "layer", "tpe"}) + "\\n"`` per layer to
    ``{save}/tokens_per_expert/rank{R}.jsonl``, decoder layers sorted, then MTP ones."""
    tpe_dir = os.path.join(folder, "tokens_per_expert")
    os.makedirs(tpe_dir, exist_ok=True)
    lines = [
        json.dumps({"iter": iteration, "block": "decoder", "layer": layer, "tpe": mbs}) + "\n"
        for layer, mbs in sorted(decoder.items())
    ]
    for (mtp_idx, layer), mbs in sorted((mtp or {}).items()):
        lines.append(
            json.dumps({"iter": iteration, "block": "mtp", "mtp_idx": mtp_idx, "layer": layer, "tpe": mbs}) + "\n"
        )
    path = os.path.join(tpe_dir, f"rank{rank}.jsonl")
    with open(path, "a") as f:
        f.writelines(lines)
    return path


def test_megatron_jsonl_expert_parallel(tmp_path):
    # 4 ranks, EP 2 (ranks 0,2 hold experts 0-2; ranks 1,3 hold 3-5), 2 layers, 2 iterations, 2 microbatches
    paths = set()
    for it in (100, 200):
        for rank in range(4):
            decoder = {layer: [[rank + layer + it // 100, 1, 0], [2, 0, rank]] for layer in (0, 1)}
            paths.add(write_megatron(str(tmp_path), rank, it, decoder, mtp={(0, 0): [[50, 50, 50]]}))
    paths = sorted(paths)
    dump = load_megatron_tpe(paths, ep_size=2)
    with pytest.raises(DumpFormatError, match=r"no file of expert-parallel rank\(s\) \[1\] of ep_size=2"):
        load_megatron_tpe([p for p in paths if "rank1" not in p and "rank3" not in p], ep_size=2)
    # A wrong EP size that still names every EP rank: 4 files are no whole number of groups of 3
    # (it used to give 9 experts, some ranks' counts added onto others').
    with pytest.raises(DumpFormatError, match="4 rank files are not a whole number of expert-parallel groups"):
        load_megatron_tpe(paths, ep_size=3)
    assert validate_dump(dump) == []
    assert dump.engine.name == "megatron" and dump.model.num_logical_experts == 6
    assert [r.forward_pass_id for r in dump.records] == [100, 200]

    # layer 1, iteration 200: experts 0-2 from ranks 0 and 2, experts 3-5 from ranks 1 and 3
    def local(rank, layer, it):
        return torch.tensor([rank + layer + it // 100 + 2, 1, rank])

    assert (
        dump.logical_count[1, 1].tolist()
        == (local(0, 1, 200) + local(2, 1, 200)).tolist() + (local(1, 1, 200) + local(3, 1, 200)).tolist()
    )
    assert int(dump.logical_count.sum()) == sum(
        int(local(r, layer, it).sum()) for r in range(4) for layer in (0, 1) for it in (100, 200)
    )
    # ep_size 1: every rank holds all its experts (pure data parallel): ranks summed
    assert load_megatron_tpe(paths).logical_count.shape == (2, 2, 3)


def test_megatron_bad_lines_are_named(tmp_path):
    p = tmp_path / "rank0.jsonl"
    p.write_text('{"iter": 1, "block": "decoder", "layer": 0, "tpe": [[1, 2]]}\nnot json\n')
    with pytest.raises(DumpFormatError, match="rank0.jsonl: line 2: not JSON"):
        load_megatron_tpe([str(p)])
    p.write_text('{"iter": 1, "block": "decoder", "layer": 0, "tpe": [[1, 2], [3]]}\n')
    with pytest.raises(DumpFormatError, match="line 1: tpe: microbatches"):
        load_megatron_tpe([str(p)])
    p.write_text('{"iter": 1, "block": "decoder", "tpe": [[1, 2]]}\n')
    with pytest.raises(DumpFormatError, match="line 1: missing key 'layer'"):
        load_megatron_tpe([str(p)])
    p.write_text('{"iter": 1, "block": "decoder", "layer": 0, "tpe": [[1, -2]]}\n')
    with pytest.raises(DumpFormatError, match="tpe: expected a non-negative integer"):
        load_megatron_tpe([str(p)])


def test_sglang_files_through_read_inputs_and_out_again(tmp_path):
    # SGLang 0.4.5's legacy CSV (layer_id,expert_id,count; seen pairs only) and a stat .pt as
    # SGLang writes it (rank 0: {rank, logical_count int32 [B, L, E], average_utilization_rate_over_window})
    csv_path = tmp_path / "expert_distribution_rank0_timestamp1700000000.0.csv"
    csv_path.write_text("layer_id,expert_id,count\n0,1,5\n1,3,2\n")
    pt_path = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    count = torch.randint(0, 9, (2, 3, 4), dtype=torch.int32)
    torch.save({"rank": 0, "logical_count": count, "average_utilization_rate_over_window": 0.5}, pt_path)
    (label_csv, from_csv), (label_pt, from_pt) = read_inputs([str(csv_path), str(pt_path)])
    assert from_csv.total_count().tolist() == [[0, 5, 0, 0], [0, 0, 0, 2]]
    assert torch.equal(from_pt.logical_count, count.long())

    assert main(["convert", str(csv_path), "-o", str(tmp_path / "sglang.json"), "--to", "sglang-pt"]) == 2
    assert not (tmp_path / "sglang.json").exists()  # SGLang would read it as JSON
    out = tmp_path / "sglang.pt"
    assert main(["convert", str(csv_path), "-o", str(out), "--to", "sglang-pt"]) == 0
    back = torch.load(out, weights_only=True)
    assert sorted(back) == ["average_utilization_rate_over_window", "logical_count", "rank"]
    assert back["logical_count"].dtype == torch.int32 and back["logical_count"].tolist() == [
        [[0, 5, 0, 0], [0, 0, 0, 2]]
    ]


def test_convert_cli_every_target(tmp_path, capsys):
    folder = str(tmp_path / "es")
    write_trtllm(folder, [trtllm_records(0, [0, 1], [0, 1], 4, 1)], 4, 1)
    src = load_trtllm_statistic(folder)
    for to, name in [("msgpack", "a.msgpack"), ("json", "a.json"), ("pt", "a.pt")]:
        out = str(tmp_path / name)
        assert main(["convert", folder, "-o", out, "--to", to]) == 0
        assert _msgpack_enc.encode(load_dump(out)) == _msgpack_enc.encode(src)
    assert main(["convert", folder, "-o", str(tmp_path / "b.msgpack")]) == 0  # format from the suffix
    out = str(tmp_path / "t.pt")
    assert main(["convert", folder, "-o", out, "--to", "tensor"]) == 0
    t = torch.load(out, weights_only=True)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.int64 and torch.equal(t, src.total_count())
    out = str(tmp_path / "s.pt")
    assert main(["convert", folder, "-o", out, "--to", "sglang-pt"]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["logical_count"], src.logical_count.int())
    assert "tensorrt-llm, per_pass, 2 rows" in capsys.readouterr().out

    a, b = random_dump(1).save(str(tmp_path / "x.msgpack")), random_dump(2).save(str(tmp_path / "y.msgpack"))
    assert main(["convert", a, b, "-o", str(tmp_path / "z.pt")]) == 2
    assert "2 runs given" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "z.pt")]) == 2
    assert "missing.pt: no such file" in capsys.readouterr().err


def test_sglang_stat_dict_uses_exact_totals_when_rows_dropped():
    dump = random_dump(3, "per_pass", passes=7, buffer_size=3)
    assert dump.total_logical_count is not None
    d = to_sglang_stat_dict(dump)
    assert d["logical_count"].shape[0] == 1 and torch.equal(d["logical_count"][0].long(), dump.total_count())


def test_analyses_refuse_invalid_dumps_and_a_file_given_twice(tmp_path, capsys):
    """What validate refuses, summary / eplb / convert do not analyse; a file named twice would
    be merged twice."""
    path = random_dump(1).save(str(tmp_path / "d.json"))
    with open(path) as f:
        raw = json.load(f)
    raw["model"]["top_k"] = 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(DumpFormatError, match=r"bad.json: not a valid dump: model.top_k: must be in \[1"):
        read_inputs([str(bad)])
    for command in (["summary", str(bad)], ["convert", str(bad), "-o", str(tmp_path / "x.pt")]):
        assert main(command) == 2
        assert "model.top_k" in capsys.readouterr().err
    with pytest.raises(DumpFormatError, match="given twice"):
        read_inputs([path, os.path.join(str(tmp_path), ".", "d.json")])
    assert len(read_inputs([path])) == 1


def test_convert_does_not_write_over_its_input(tmp_path, capsys):
    src = random_dump(2, "stat").save(str(tmp_path / "run.msgpack"))
    before = Path(src).read_bytes()
    assert main(["convert", src, "-o", src, "--to", "json"]) == 2
    assert "is also an input" in capsys.readouterr().err and Path(src).read_bytes() == before


def test_convert_reads_the_folder_record_wrote(tmp_path, capsys):
    out, status, (a,) = record_folder(tmp_path, [make_recorder()], name="demo")
    assert status == 0 and len(os.listdir(out)) == 2  # one engine: its dump and the merged one
    (Path(out) / ".moe-record-demo").write_text("")  # as `moe-record demo` marks its folder
    tensor = str(tmp_path / "t.pt")
    assert main(["convert", out, "-o", tensor, "--to", "tensor"]) == 0
    assert capsys.readouterr().out.startswith(f"{os.path.join(out, 'merged.pt')} (")
    assert torch.equal(torch.load(tensor, weights_only=True), a)
    assert main(["convert", out, "-o", os.path.join(out, "x.msgpack")]) == 2  # not into the folder it reads
    assert "a folder read as input" in capsys.readouterr().err
