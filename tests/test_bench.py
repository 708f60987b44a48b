"""``moe-record bench`` on the CPU path: runs quickly, times every method, prints JSON or tables."""

from __future__ import annotations

import json

from moe_record_sdk.bench import METHODS
from moe_record_sdk.cli import main


def test_bench_json_on_cpu(capsys):
    argv = ["bench", "--device", "cpu", "--quick", "--tokens", "0,5", "--experts", "8", "--top-k", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["environment"]["kernel"] == "torch" and out["environment"]["device"] == "cpu"
    rows = out["rows"]
    assert [(r["E"], r["T"], r["where"]) for r in rows] == [(8, 0, "eager"), (8, 5, "eager")]
    assert all(r[m] > 0 for r in rows for m in METHODS)


def test_bench_table_on_cpu(capsys):
    assert main(["bench", "--device", "cpu", "--quick", "--tokens", "3", "--experts", "4", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "eager, E=4" in out and "ours/copy" in out


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "--device", "cpu", "--experts", "4", "--top-k", "5"]) == 2
    assert main(["bench", "--tokens", "a,b"]) == 2


def test_bench_names_a_device_it_cannot_use(capsys):
    """A device torch does not know, or one the bench cannot time on, or a GPU this machine does
    not have: exit 2 naming --device (it used to end in torch's traceback)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = f"cuda:{gpus}" if gpus else "cuda"
    for device, why in [
        ("bogus", "'bogus' is not a device: expected cuda, cuda:N or cpu"),
        ("cuda:x", "'cuda:x' is not a device"),
        ("meta", "'meta': the bench runs on cuda, cuda:N or cpu"),
        (
            missing,
            f"'{missing}': this machine has {gpus} CUDA GPU(s)" if gpus else "'cuda': no CUDA GPU is available here",
        ),
    ]:
        assert main(["bench", "--device", device, "--quick", "--experts", "4", "--top-k", "2"]) == 2, device
        err = capsys.readouterr().err
        assert f"argument --device: {why}" in err and "Traceback" not in err, err
    assert main(["bench", "--device", "cpu", "--trials", "-1"]) == 2  # was statistics' "no median" traceback
    assert "argument --trials: expected an integer > 0, got '-1'" in capsys.readouterr().err
