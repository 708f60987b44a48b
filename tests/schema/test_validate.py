"""`moe-record validate`: every rejection names its field; hostile pickles never run."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import msgspec
import pytest
import torch

from moe_record_sdk.cli import main
from moe_record_sdk.errors import DumpFormatError
from moe_record_sdk.schema import detect_format, load_dump
from moe_record_sdk.schema.io import _enc_hook
from moe_record_sdk.schema.tensors import tensor_to_wire

from ..dumps import random_dump


def write_raw(path, raw: dict) -> str:
    path.write_bytes(msgspec.msgpack.encode(raw))
    return str(path)


def raw_dump(mode: str = "stat") -> dict:
    return msgspec.to_builtins(random_dump(5, mode), enc_hook=_enc_hook, builtin_types=(bytes,))


def validate(capsys, *paths: str, json_out: bool = False) -> tuple[int, str]:
    code = main(["validate", *(["--json"] if json_out else []), *paths])
    return code, capsys.readouterr().out


def test_valid_files_and_folders(tmp_path, capsys):
    for i, mode in enumerate(["stat", "per_pass", "per_token"]):
        random_dump(i, mode).save(str(tmp_path / f"{mode}.msgpack"))
    random_dump(9).save(str(tmp_path / "sub.pt"))
    code, out = validate(capsys, str(tmp_path))
    assert code == 0
    assert out.count("OK") == 4


@pytest.mark.parametrize(
    ("mutate", "field", "words"),
    [
        (
            lambda r: r.update(logical_count=tensor_to_wire(-torch.ones(1, 3, 8, dtype=torch.int64))),
            "logical_count",
            "negative",
        ),
        (lambda r: r.update(logical_count=tensor_to_wire(torch.ones(1, 3, 8))), "logical_count", "integers"),
        (
            lambda r: r.update(logical_count=tensor_to_wire(torch.ones(1, 3, 5, dtype=torch.int64))),
            "logical_count",
            "shape",
        ),
        (lambda r: r["model"].update(moe_layer_ids=[0, 7]), "model.moe_layer_ids[1]", "outside"),
        (lambda r: r["window"].update(num_tokens=[1, 2, 3]), "logical_count[:, 0, :]", "num_tokens x top_k"),
        (lambda r: r["topology"].update(rank=4), "topology.rank", "outside"),
        (lambda r: r["window"].update(start_time=float("nan")), "window.start_time", "finite"),  # nan < x is False
        (lambda r: r["window"].update(stop_time=float("inf")), "window.stop_time", "finite"),
    ],
)
def test_invalid_dump_names_field(tmp_path, capsys, mutate, field, words):
    raw = raw_dump()
    mutate(raw)
    code, out = validate(capsys, write_raw(tmp_path / "bad.msgpack", raw))
    assert code == 1
    assert f"INVALID  {tmp_path / 'bad.msgpack'}: {field}: " in out
    assert words in out


def test_records_repeat_pass_id(tmp_path, capsys):
    raw = raw_dump("per_pass")
    raw["records"][1]["forward_pass_id"] = raw["records"][0]["forward_pass_id"]
    code, out = validate(capsys, write_raw(tmp_path / "bad.msgpack", raw))
    assert code == 1 and "records[1].forward_pass_id: pass 0 repeats for rank 0" in out


def test_wrong_schema_version(tmp_path, capsys):
    raw = raw_dump()
    raw["schema_version"] = 7
    code, out = validate(capsys, write_raw(tmp_path / "future.msgpack", raw))
    assert code == 1 and "schema_version: 7 is not supported" in out


@pytest.mark.parametrize("suffix", [".pt", ".msgpack", ".json"])
def test_truncated_file(tmp_path, capsys, suffix):
    path = tmp_path / f"d{suffix}"
    random_dump(3, "per_pass").save(str(path))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, out = validate(capsys, str(path))
    assert code == 1 and "INVALID" in out and str(path) in out


@pytest.mark.parametrize("suffix", [".json", ".msgpack"])
def test_an_empty_file_or_a_byte_order_mark_is_said(tmp_path, capsys, suffix):
    """Both read as "unknown format" before; a JSON dump saved with a BOM is named as such."""
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    code, out = validate(capsys, str(empty))
    assert code == 1 and str(empty) in out and "empty (0 bytes)" in out
    bom = tmp_path / f"bom{suffix}"
    random_dump(3).save(str(tmp_path / "d.json"))
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "d.json").read_bytes())
    code, out = validate(capsys, str(bom))
    assert code == 1 and "starts with a UTF-8 byte-order mark" in out


def test_a_decode_error_names_its_field(tmp_path, capsys):
    """msgspec names the field at the end of its message ("- at `$.engine.name`"): the result's
    field column carries it (it said "$", the field buried in the text)."""
    raw = raw_dump()
    raw["logical_count"]["dtype"] = "complex64"
    raw["engine"]["name"] = 5
    code, out = validate(capsys, write_raw(tmp_path / "a.msgpack", raw), json_out=True)
    (error,) = json.loads(out)["files"][0]["errors"]
    assert code == 1 and error["field"] in ("engine.name", "logical_count.dtype"), error
    raw = raw_dump()
    raw["logical_count"]["dtype"] = "complex64"
    code, out = validate(capsys, write_raw(tmp_path / "b.msgpack", raw), json_out=True)
    (error,) = json.loads(out)["files"][0]["errors"]
    assert error == {"field": "logical_count.dtype", "message": "unknown tensor dtype 'complex64'"}


def test_window_counters_that_contradict_the_rows_are_invalid():
    """A per_pass window of 4 rows claiming 99 (or 0) passes, and a stat dump without a ring that
    holds 4 rows: each was accepted (summary then printed "99 passes")."""
    from moe_record_sdk import validate_dump

    per_pass = random_dump(1, "per_pass")
    assert validate_dump(per_pass) == [] and per_pass.window.num_passes == 4
    for claimed in (99, 0):
        bad = msgspec.structs.replace(per_pass, window=msgspec.structs.replace(per_pass.window, num_passes=claimed))
        assert ("window.num_passes", f"{claimed}, but the dump holds 4 passes and dropped 0") in validate_dump(bad)
    dropped = msgspec.structs.replace(per_pass.window, num_passes=10, dropped_passes=6)
    assert validate_dump(msgspec.structs.replace(per_pass, window=dropped)) == []
    stat = random_dump(2, "stat", buffer_size=4)
    assert validate_dump(stat) == [] and stat.logical_count.shape[0] == 4
    bad = msgspec.structs.replace(stat, window=msgspec.structs.replace(stat.window, buffer_size=0))
    assert ("logical_count", "4 rows, but window.buffer_size is 0 (0: one cumulative row)") in validate_dump(bad)


def test_tensor_bytes_disagree_with_shape(tmp_path, capsys):
    raw = raw_dump()
    raw["logical_count"]["shape"] = [1000, 1000, 1000]
    code, out = validate(capsys, write_raw(tmp_path / "huge.msgpack", raw))
    assert code == 1 and "logical_count.data: 96 bytes, but dtype int32 and shape [1000, 1000, 1000] need" in out


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "expert_distribution_recorder_1.0.pt"
    torch.save({"rank": 0, "logical_count": torch.zeros(1, 2, 2, dtype=torch.int32), "x": _Evil(str(marker))}, path)
    code, out = validate(capsys, str(path))
    assert code == 1 and "weights_only" in out
    assert not marker.exists()
    # a bare pickle (not a torch zip) is refused the same way
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_Evil(str(marker)), protocol=2))
    code, out = validate(capsys, str(raw))
    assert code == 1 and not marker.exists()


def test_a_torch_whose_weights_only_load_is_unsafe_loads_no_pt(tmp_path, monkeypatch):
    """pyproject asks for torch 2.10 (weights_only=True ran code before 2.6 and could corrupt
    memory before 2.10); an older torch installed past it refuses .pt files, naming why."""
    path = random_dump(1).save(str(tmp_path / "d.pt"))
    assert load_dump(path).total_count().sum() > 0
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")  # the one fault not producible here for real
    with pytest.raises(DumpFormatError, match=r"d\.pt: not loaded: torch 2\.9\.1\+cu128 .*CVE-2026-24747"):
        load_dump(path)


def test_a_pt_whose_bytes_changed_fails_its_crc(tmp_path, capsys):
    """torch.load does not check the zip's CRC-32: a flipped byte in a count loaded as a
    plausible, wrong count (an SGLang file has no token totals to catch it)."""
    import zipfile

    path = tmp_path / "expert_distribution_recorder_1.0.pt"
    torch.save({"rank": 0, "logical_count": torch.arange(16, dtype=torch.int32).view(1, 2, 8)}, path)
    with zipfile.ZipFile(path) as z:
        entry = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    data = bytearray(path.read_bytes())
    at = entry.header_offset  # the local header's own name and extra lengths (torch pads the extra)
    start = (
        at + 30 + int.from_bytes(data[at + 26 : at + 28], "little") + int.from_bytes(data[at + 28 : at + 30], "little")
    )
    data[start + 8] ^= 0x01  # inside the stored counts
    path.write_bytes(bytes(data))
    code, out = validate(capsys, str(path))
    assert code == 1 and f"corrupt: zip entry {entry.filename} fails its CRC-32 check" in out, out


def test_json_output_and_exit_codes(tmp_path, capsys):
    good = random_dump(1).save(str(tmp_path / "good.json"))
    raw = raw_dump()
    raw["logical_count"] = tensor_to_wire(-torch.ones(1, 3, 8, dtype=torch.int64))
    bad = write_raw(tmp_path / "bad.msgpack", raw)
    code, out = validate(capsys, good, bad, json_out=True)
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False
    assert [f["ok"] for f in doc["files"]] == [True, False]
    assert doc["files"][1]["errors"][0]["field"] == "logical_count"
    assert main(["validate", str(tmp_path / "missing.pt")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["validate", str(empty)]) == 2


def test_console_script_entry(tmp_path):
    path = random_dump(2).save(str(tmp_path / "d.msgpack"))
    run = subprocess.run([sys.executable, "-m", "moe_record_sdk", "validate", path], capture_output=True, text=True)
    assert run.returncode == 0 and "OK" in run.stdout


def test_fifo_and_devices_are_refused_not_read(tmp_path):
    """Opening a FIFO waits for a writer and /dev/zero never ends: refused by name, at once
    (subprocesses, so that a regression fails on the timeout instead of hanging the suite)."""
    fifo = tmp_path / "pipe.msgpack"
    os.mkfifo(fifo)
    folder = tmp_path / "run"
    folder.mkdir()
    os.mkfifo(folder / "rank0.pt")  # found by searching a folder, as dumps are
    cli = [sys.executable, "-m", "moe_record_sdk"]
    run = subprocess.run(
        [*cli, "validate", str(fifo), "/dev/zero", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 1
    assert f"INVALID  {fifo}: $: is a FIFO (named pipe), not a regular file; pass a dump file" in run.stdout
    assert "INVALID  /dev/zero: $: is a character device, not a regular file" in run.stdout
    assert f"INVALID  {folder / 'rank0.pt'}: $: is a FIFO (named pipe)" in run.stdout
    # the other commands read through the same load_dump
    for args in (["summary", str(fifo)], ["merge", str(fifo), "-o", str(tmp_path / "m.msgpack")]):
        run = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and f"{fifo}: is a FIFO (named pipe), not a regular file" in run.stderr, args
    code = "import sys\nfrom moe_record_sdk import load_dump\ntry:\n    load_dump(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)"
    run = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    assert run.stdout.startswith(f"DumpFormatError {fifo}: is a FIFO (named pipe), not a regular file")


def test_a_folder_where_a_file_is_expected(tmp_path):
    for read in (detect_format, load_dump):
        with pytest.raises(DumpFormatError, match="is a directory; pass a file"):
            read(str(tmp_path))


INT64_MAX = torch.iinfo(torch.int64).max


def past_int64(raw: dict, case: str) -> None:
    """Counts whose sums pass INT64_MAX: an int64 sum wraps, to a negative count or to 0."""
    raw["window"].update(num_tokens=None, discarded=None)
    if case == "layer":  # one layer's experts: the true sum equals num_tokens x top_k, the wrapped one is negative
        count = torch.zeros(1, 3, 8, dtype=torch.int64)
        count[0, 0, :2] = 1 << 62
        raw["window"].update(num_tokens=[1 << 62, 0, 0], discarded=[0, 0, 0])
    elif case == "layer_to_zero":  # sums to 2^64, which wraps to 0: layer 0's counts went unseen
        count = torch.zeros(1, 3, 8, dtype=torch.int64)
        count[0, 0, :3] = torch.tensor([INT64_MAX, INT64_MAX, 2])
        raw["model"]["moe_layer_ids"] = [1, 2]
    elif case == "rows":  # one expert's passes: the wrapped total is negative, below any total
        count = torch.zeros(2, 3, 8, dtype=torch.int64)
        count[:, 1, 4] = 3 << 61
    else:  # physical slots of one expert: 2^64 wraps to its logical count, 0
        count = torch.zeros(1, 3, 8, dtype=torch.int64)
        mapping = torch.cat([torch.arange(8), torch.zeros(2, dtype=torch.int64)]).expand(3, 10).clone()
        phys = torch.zeros(1, 3, 10, dtype=torch.int64)
        phys[0, 2, [0, 8, 9]] = torch.tensor([INT64_MAX, INT64_MAX, 2])
        raw["model"]["num_physical_experts"] = 10
        raw.update(physical_to_logical_map=tensor_to_wire(mapping), physical_count=tensor_to_wire(phys))
    raw["logical_count"] = tensor_to_wire(count)


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("layer", "logical_count[:, 0, :]: the layer's counts sum past int64"),
        ("layer_to_zero", "logical_count[:, 0, :]: the layer's counts sum past int64"),
        ("rows", "logical_count[:, 1, 4]: the rows sum past int64"),
        ("physical", "physical_count[0, 2, :]: the slots of expert 0 sum past int64"),
    ],
)
def test_sums_past_int64_are_named_not_wrapped(tmp_path, capsys, case, problem):
    raw = raw_dump()
    past_int64(raw, case)
    path = write_raw(tmp_path / "big.msgpack", raw)
    code, out = validate(capsys, path)
    assert code == 1
    assert f"INVALID  {path}: {problem}\n" in out
    assert "num_tokens x top_k" not in out  # no mismatch made up from a wrapped sum
    if case == "layer_to_zero":
        assert "layer 0 has counts but is not in model.moe_layer_ids" in out


def test_sums_up_to_int64_max_are_exact(tmp_path, capsys):
    raw = raw_dump()
    count = torch.zeros(2, 3, 8, dtype=torch.int64)
    count[:, 0, :2] = 1 << 60  # layer 0 sums to 2^62, within int64 past the cheap bound
    count[0, 1, 0], count[1, 1, 0] = INT64_MAX - 5, 5  # one expert's rows: INT64_MAX exactly
    raw["logical_count"] = tensor_to_wire(count)
    raw["window"].update(num_tokens=[1 << 61, 1 << 62, 0], discarded=[0, 1, 0], buffer_size=2)  # a 2-row ring
    code, out = validate(capsys, write_raw(tmp_path / "big.msgpack", raw))
    assert code == 0, out
