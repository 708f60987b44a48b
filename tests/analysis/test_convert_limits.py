"""Foreign statistics size the dump from their keys: a key or line that would need more than a
dump may hold (schema limits MAX_LAYERS, MAX_ELEMENTS) or a count past int64 is refused, naming
the file and line or key, before anything large is allocated."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from moe_record_sdk import DumpFormatError
from moe_record_sdk.cli import main
from moe_record_sdk.convert import load_megatron_tpe, load_trtllm_statistic
from moe_record_sdk.schema.sglang import MAX_LAYERS
from moe_record_sdk.schema.tensors import MAX_ELEMENTS

INT64_MAX = (1 << 63) - 1


def jsonl(path, *lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def convert(capsys, *args):
    rc = main(["convert", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") <= 1
    return rc, err


def test_megatron_layer_past_the_limit_names_the_line(tmp_path, capsys):
    ok = {"iter": 1, "layer": 0, "tpe": [[1, 1]]}
    src = jsonl(tmp_path / "rank0.jsonl", ok, {"iter": 1, "layer": 100_000_000, "tpe": [[1, 1]]})
    out = tmp_path / "x.json"
    rc, err = convert(capsys, src, "-o", str(out))
    assert rc == 2 and f"{src}: line 2: layer 100000000 is over the limit of {MAX_LAYERS} layers" in err
    assert not out.exists()
    # the last layer a dump may hold is still read
    last = jsonl(tmp_path / "rank0.jsonl", {"iter": 1, "layer": MAX_LAYERS - 1, "tpe": [[1, 1]]})
    assert load_megatron_tpe([last]).logical_count.shape == (1, MAX_LAYERS, 2)


def test_megatron_sizes_past_max_elements(tmp_path, capsys):
    # 2 iterations x 65536 layers x 8192 experts: each line small, the tensor 2^30 counts (8 GiB)
    src = jsonl(
        tmp_path / "rank0.jsonl",
        {"iter": 1, "layer": MAX_LAYERS - 1, "tpe": [[1, 1]]},
        {"iter": 2, "layer": 0, "tpe": [[1, 1]]},
    )
    rc, err = convert(capsys, src, "-o", str(tmp_path / "x.json"), "--megatron-ep-size", "4096")
    assert 2 * MAX_LAYERS * 8192 > MAX_ELEMENTS
    assert rc == 2 and f"{src}: 2 iterations x {MAX_LAYERS} layers x 8192 experts" in err
    assert f"over the limit of {MAX_ELEMENTS} counts" in err
    # an expert axis past the limit on its own: refused at the first line, before any allocation
    rc, err = convert(capsys, src, "-o", str(tmp_path / "x.json"), "--megatron-ep-size", str(10**12))
    assert rc == 2 and f"{src}: line 1: 1 (iteration, layer) pairs x {2 * 10**12} experts" in err
    rc, err = convert(capsys, src, "-o", str(tmp_path / "x.json"), "--num-layers", str(MAX_LAYERS + 1))
    assert rc == 2 and f"{src}: {MAX_LAYERS + 1} layers are over the limit of {MAX_LAYERS}" in err
    assert main(["convert", src, "-o", str(tmp_path / "x.json"), "--megatron-ep-size", "0"]) == 2
    assert "argument --megatron-ep-size: expected an integer > 0, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "lines, match",
    [
        ([{"iter": 1, "layer": 0, "tpe": [[1 << 63, 1]]}], r"line 1: tpe: 9223372036854775808 tokens .* exceed int64"),
        ([{"iter": 1, "layer": 0, "tpe": [[INT64_MAX, 1], [1, 0]]}], r"line 1: tpe: .* exceed int64"),  # microbatches
        ([{"iter": 1, "layer": 0, "tpe": [[1]]}, {"iter": 1, "layer": 0, "tpe": [[INT64_MAX]]}], "line 2: iteration 1"),
        ([{"iter": 1 << 64, "layer": 0, "tpe": [[1]]}], r"line 1: iteration 18446744073709551616 exceeds int64"),
    ],
)
def test_megatron_counts_past_int64_name_the_line(tmp_path, capsys, lines, match):
    src = jsonl(tmp_path / "rank0.jsonl", *lines)
    with pytest.raises(DumpFormatError, match=match) as info:
        load_megatron_tpe([src])
    assert str(info.value).startswith(f"{src}: line ")
    rc, err = convert(capsys, src, "-o", str(tmp_path / "x.json"))
    assert rc == 2 and src in err


def test_megatron_ranks_summed_past_int64(tmp_path):
    # data-parallel ranks holding the same experts are summed: that sum is checked too
    a = jsonl(tmp_path / "rank0.jsonl", {"iter": 3, "layer": 1, "tpe": [[INT64_MAX, 0]]})
    b = jsonl(tmp_path / "rank1.jsonl", {"iter": 3, "layer": 1, "tpe": [[1, 0]]})
    with pytest.raises(DumpFormatError, match=rf"{b}: line 1: iteration 3, layer 1: a summed count exceeds int64"):
        load_megatron_tpe([a, b])
    assert load_megatron_tpe([a, b], ep_size=2).logical_count[0, 1].tolist() == [INT64_MAX, 0, 1, 0]


def trtllm_folder(tmp_path, records, num_experts=4):
    folder = tmp_path / "stat"
    folder.mkdir()
    (folder / "meta_info.json").write_text(json.dumps({"num_experts": num_experts, "num_experts_per_token": 1}))
    safetensors.torch.save_file(records, str(folder / "rank0.safetensors"))
    return str(folder)


def test_trtllm_layer_past_the_limit_names_the_key(tmp_path, capsys):
    folder = trtllm_folder(
        tmp_path, {"0_1": torch.ones(4, dtype=torch.int64), "0_99999999": torch.ones(4, dtype=torch.int64)}
    )
    with pytest.raises(DumpFormatError, match=r"rank0.safetensors: key '0_99999999': layer 99999999 is over the limit"):
        load_trtllm_statistic(folder)
    rc, err = convert(capsys, folder, "-o", str(tmp_path / "x.json"))
    assert rc == 2 and "key '0_99999999'" in err


def test_trtllm_iterations_times_layers_past_max_elements(tmp_path):
    # 8193 iterations on layer 0 and one on the last layer: 8194 x 65536 x 1 > 2^29 counts
    records = {f"{it}_0": torch.ones(1, dtype=torch.int64) for it in range(8193)}
    records[f"9000_{MAX_LAYERS - 1}"] = torch.ones(1, dtype=torch.int64)
    folder = trtllm_folder(tmp_path, records, num_experts=1)
    with pytest.raises(DumpFormatError, match=rf"{folder}: 8194 iterations x {MAX_LAYERS} layers x 1 experts"):
        load_trtllm_statistic(folder)


def test_foreign_inputs_that_are_fifos_are_refused_not_read(tmp_path):
    """Megatron's .jsonl, TensorRT-LLM's meta_info.json and rank files, and summary's
    --placement open their paths directly: a FIFO there is refused by name, at once
    (subprocesses, so that a regression fails on the timeout instead of hanging the suite)."""
    import os
    import subprocess
    import sys

    from moe_record_sdk.convert.safetensors import read_safetensors

    from ..dumps import random_dump

    cli = [sys.executable, "-m", "moe_record_sdk"]
    os.mkfifo(tmp_path / "rank0.jsonl")
    trt = tmp_path / "expert_statistic"
    trt.mkdir()
    os.mkfifo(trt / "meta_info.json")
    dump = tmp_path / "run.msgpack"
    random_dump(seed=1, mode="stat").save(str(dump))
    os.mkfifo(tmp_path / "init.pt")
    cases = [
        (["convert", str(tmp_path / "rank0.jsonl"), "--megatron-ep-size", "1", "-o", str(tmp_path / "a.msgpack")], "rank0.jsonl"),
        (["summary", str(dump), "--placement", str(tmp_path / "init.pt")], "init.pt"),
    ]  # fmt: skip
    for args, name in cases:
        run = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and f"{name}: is a FIFO (named pipe), not a regular file" in run.stderr, (args, run)
    with pytest.raises(DumpFormatError, match="meta_info.json: is a FIFO"):
        load_trtllm_statistic(str(trt))  # (the CLI takes such a folder for no statistic at all)
    os.mkfifo(tmp_path / "rank0.safetensors")
    with pytest.raises(DumpFormatError, match="rank0.safetensors: is a FIFO"):
        read_safetensors(str(tmp_path / "rank0.safetensors"))


def test_hostile_foreign_inputs_are_named_not_tracebacks(tmp_path, capsys):
    """JSON nested past the recursion limit (a safetensors header, TensorRT-LLM's meta file, a
    Megatron line) and a negative or non-list shape raised RecursionError or torch's errors out
    of convert; a 60-byte meta file naming 2e8 experts cost gigabytes, then a dump our readers refuse."""
    import struct

    deep = "[" * 100_000
    folder = tmp_path / "deep_meta"
    folder.mkdir()
    (folder / "meta_info.json").write_text(deep)
    huge = tmp_path / "huge_e"
    huge.mkdir()
    (huge / "meta_info.json").write_text(json.dumps({"num_experts": 200_000_000, "num_experts_per_token": 1}))
    (huge / "rank0.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    cases = [(str(folder), "meta_info.json: expected"), (str(huge), "num_experts=200000000")]
    for name, header in (("deep_header", deep), ("neg_shape", '{"0_0": {"dtype": "I64", "shape": [-2], "data_offsets": [0, 0]}}'),
                         ("str_shape", '{"0_0": {"dtype": "I64", "shape": "4", "data_offsets": [0, 32]}}')):  # fmt: skip
        stat = tmp_path / name
        stat.mkdir()
        (stat / "meta_info.json").write_text(json.dumps({"num_experts": 4, "num_experts_per_token": 1}))
        raw = header.encode()
        (stat / "rank0.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32))
        cases.append((str(stat), "rank0.safetensors"))
    line = tmp_path / "rank0.jsonl"
    line.write_text(deep + "\n")
    cases.append((str(line), "line 1: not JSON"))
    for src, match in cases:
        rc, err = convert(capsys, src, "--num-layers", "1", "-o", str(tmp_path / "x.json"))
        assert rc == 2 and match in err, (src, err)
