"""Every file the SDK writes goes through one atomic writer, and a path that cannot take it is
named in a one-line error (exit 2), not a traceback, with no temporary left behind."""

from __future__ import annotations

import os

import pytest
import torch

from moe_record_sdk.cli import main
from moe_record_sdk.schema.io import save_torch, write_atomic

from ..dumps import random_dump


def test_write_atomic_writes_and_replaces(tmp_path):
    path = tmp_path / "out.bin"
    assert write_atomic(path, b"first") == str(path)
    assert write_atomic(str(path), b"second") == str(path)
    assert path.read_bytes() == b"second"
    assert os.listdir(tmp_path) == ["out.bin"]  # no temporary left


@pytest.mark.parametrize("where", ["missing/out.bin", "."])
def test_write_atomic_names_the_path(tmp_path, where):
    path = str(tmp_path / where)
    with pytest.raises(OSError, match="cannot write the file") as info:
        write_atomic(path, b"data")
    assert info.value.filename == path
    assert os.listdir(tmp_path) == []


def test_save_torch_loads_back(tmp_path):
    obj = {"physical_to_logical_map": torch.arange(6).reshape(2, 3)}
    path = save_torch(obj, tmp_path / "m.pt")
    assert torch.equal(torch.load(path, weights_only=True)["physical_to_logical_map"], obj["physical_to_logical_map"])


def _commands(src, out):
    eplb = ["eplb", src, "--replicas", "8", "--gpus", "2"]
    return {
        "convert sglang-pt": ["convert", src, "-o", out, "--to", "sglang-pt"],
        "convert tensor": ["convert", src, "-o", out, "--to", "tensor"],
        "convert msgpack": ["convert", src, "-o", out, "--to", "msgpack"],
        "eplb sglang-out": eplb + ["--sglang-out", out],
        "eplb weight-out": eplb + ["--weight-out", out],
        "eplb plan-out": eplb + ["--plan-out", out],
    }


@pytest.mark.parametrize("command", list(_commands("", "")))
@pytest.mark.parametrize("target", ["nodir/x.pt", "adir"])
def test_cli_write_errors_name_the_path(tmp_path, capsys, command, target):
    src = random_dump(1, num_layers=4, num_experts=8).save(str(tmp_path / "d.msgpack"))
    (tmp_path / "adir").mkdir()
    out = str(tmp_path / target)
    assert main(_commands(src, out)[command]) == 2
    err = capsys.readouterr().err
    cause = "No such file or directory" if target.startswith("nodir") else "is a directory"
    assert err.startswith(f"moe-record {command.split()[0]}: {out}: cannot write") and cause in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["adir", "d.msgpack"] and os.listdir(tmp_path / "adir") == []


def test_cli_writes_every_torch_output(tmp_path, capsys):
    dump = random_dump(2, num_layers=4, num_experts=8)
    src = dump.save(str(tmp_path / "d.msgpack"))
    for command, args in _commands(src, str(tmp_path / "x.pt")).items():
        if command == "convert msgpack":
            continue  # not a torch file
        assert main(args) == 0, command
        obj = torch.load(tmp_path / "x.pt", weights_only=True)
        if command == "convert tensor":
            assert torch.equal(obj, dump.total_count())
        elif command == "eplb plan-out":
            assert sorted(obj) == ["log2phy", "logcnt", "phy2log"] and obj["phy2log"].shape == (4, 8)
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["d.msgpack", "x.pt"]
