"""The plot command writes a real PNG with the panels drawn; without matplotlib it says how to install it."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from PIL import Image, ImageStat

from moe_record_sdk.analysis.optional import MissingDependencyError
from moe_record_sdk.analysis.plot import plot_dumps
from moe_record_sdk.cli import main

from ..dumps import random_dump
from ..server.helpers import make_recorder
from .folders import record_folder


def not_blank(path):
    img = Image.open(path).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    return img.size, len(colours), ImageStat.Stat(img).stddev


@pytest.mark.parametrize("log", [False, True])
def test_plot_cli_writes_a_png(tmp_path, capsys, log):
    a = random_dump(1, "per_pass", num_layers=4, num_experts=16, passes=12, tokens=20).save(str(tmp_path / "a.msgpack"))
    b = random_dump(2, "stat", num_layers=4, num_experts=16, passes=3, tokens=20).save(str(tmp_path / "b.pt"))
    out = tmp_path / "load.png"
    args = ["plot", a, b, "-o", str(out), "--ep-size", "4", "--dpi", "60"] + (["--log"] if log else [])
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (w, h), colours, std = not_blank(out)
    # two rows (two inputs) of three panels (one has passes): 18 x 8.4 inches at 60 dpi
    assert (w, h) == (1080, 504)
    assert colours > 50 and min(std) > 10  # a heatmap and curves, not an empty canvas


def test_single_row_without_passes(tmp_path):
    out = plot_dumps([("one", random_dump(3, "stat", passes=2))], tmp_path / "one.png", dpi=50)
    (w, h), colours, _ = not_blank(out)
    assert (w, h) == (600, 210) and colours > 20  # two panels only


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    # The one fault we cannot produce for real in this environment: matplotlib not installed.
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[plot\]' in the moe-record-sdk checkout"):
        plot_dumps([("x", random_dump(1))], tmp_path / "x.png")
    src = random_dump(1).save(str(tmp_path / "d.msgpack"))
    assert main(["plot", src, "-o", str(tmp_path / "x.png")]) == 2
    assert "pip install -e '.[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_output_without_suffix_gets_png_and_is_reported(tmp_path, capsys):
    src = random_dump(1).save(str(tmp_path / "d.msgpack"))
    out = tmp_path / "load"
    assert main(["plot", src, "-o", str(out), "--dpi", "30"]) == 0
    assert capsys.readouterr().out == f"wrote {out}.png\n"  # the file matplotlib really wrote
    assert not out.exists() and (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = plot_dumps([("one", random_dump(2))], tmp_path / "load.svg", dpi=30)
    assert svg == str(tmp_path / "load.svg") and (tmp_path / "load.svg").read_text().startswith("<?xml")
    assert sorted(os.listdir(tmp_path)) == ["d.msgpack", "load.png", "load.svg"]  # no temporaries


@pytest.mark.parametrize(
    "output, message",
    [
        ("adir", "adir: is a directory; pass an image file name"),
        ("load.v2", "load.v2: unknown image format '.v2'; use one of"),
        ("nodir/load.png", "nodir/load.png: cannot write the image: No such file or directory"),
    ],
)
def test_bad_outputs_are_named(tmp_path, capsys, output, message):
    src = random_dump(1).save(str(tmp_path / "d.msgpack"))
    (tmp_path / "adir").mkdir()
    assert main(["plot", src, "-o", str(tmp_path / output), "--dpi", "30"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"moe-record plot: {tmp_path}/{message}")
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert sorted(os.listdir(tmp_path)) == ["adir", "d.msgpack"] and os.listdir(tmp_path / "adir") == []


@pytest.mark.parametrize(
    "option, value", [("--ep-size", "-2"), ("--ep-size", "0"), ("--dpi", "0"), ("--dpi", "-5"), ("--dpi", "x")]
)
def test_non_positive_sizes_are_refused(tmp_path, capsys, option, value):
    src = random_dump(1).save(str(tmp_path / "d.msgpack"))
    assert main(["plot", src, "-o", str(tmp_path / "p.png"), option, value]) == 2
    assert f"argument {option}: expected an integer > 0, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()
    with pytest.raises(ValueError, match="ep_size: must be >= 1, got -2"):
        plot_dumps([("x", random_dump(1))], tmp_path / "p.png", ep_size=-2)
    with pytest.raises(ValueError, match="dpi: must be >= 1, got 0"):
        plot_dumps([("x", random_dump(1))], tmp_path / "p.png", dpi=0)


def test_file_names_are_titles_not_mathtext_and_ep_size_must_divide(tmp_path, capsys):
    dump = random_dump(3, "stat", num_experts=8)
    for name in ("cost$\\x$.pt", os.fsdecode(b"bad\xff.pt")):
        path = dump.save(str(tmp_path / name))
        assert main(["plot", path, "-o", str(tmp_path / "out.png")]) == 0, capsys.readouterr().err
        not_blank(tmp_path / "out.png")
    path = str(tmp_path / "cost$\\x$.pt")
    assert main(["plot", path, "--ep-size", "3", "-o", str(tmp_path / "e.png")]) == 2
    assert "ep_size: 3 does not divide the 8 experts" in capsys.readouterr().err


def test_plot_draws_the_folder_record_wrote(tmp_path, capsys):
    out, status, _ = record_folder(tmp_path, [make_recorder(), make_recorder()])
    assert status == 0
    png = tmp_path / "load.png"
    assert main(["plot", out, "-o", str(png), "--dpi", "40"]) == 0
    assert capsys.readouterr().out == f"wrote {png}\n" and not_blank(png)[1] > 10
    os.remove(os.path.join(out, "merged.pt"))  # two engines' dumps: plot does not merge, and says so
    assert main(["plot", out, "-o", str(png)]) == 2
    assert f"moe-record plot: {out}: holds 2 engine dumps" in capsys.readouterr().err


def test_the_plots_gpu_balancedness_is_summarys_under_an_eplb_placement():
    """plot --ep-size grouped logical experts contiguously, whatever placement the engine ran:
    0.357 drawn where summary (from the recorded physical counts) says 0.962."""
    from moe_record_sdk import Recorder
    from moe_record_sdk.analysis.plot import gpu_balancedness
    from moe_record_sdk.analysis.summary import summarize

    # 4 experts on 8 slots over 4 GPUs: hot expert 0 on every GPU, the others on one each.
    mapping = torch.tensor([[0, 1, 0, 2, 0, 3, 0, 0]])
    rec = Recorder(num_layers=1, num_experts=4, top_k=1, physical_to_logical_map=mapping)
    rec.start()
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # tokens of expert 0 land on its replicas in turn, the others on their slot
        rec.record(0, torch.tensor([[0], [2], [4], [6], [7], [1], [3], [5]])[torch.randperm(8, generator=g)])
        rec.step()
    dump = rec.dump()
    label, drawn = gpu_balancedness(dump, 4)
    want = summarize(dump, ep_size=4).layers[0].gpus.balancedness
    assert "recorded physical counts" in label and drawn.tolist() == pytest.approx([want])
    from moe_record_sdk.analysis import metrics as m

    contiguous = m.balancedness(m.gpu_loads(dump.total_count(), num_gpus=4))  # what was drawn
    assert want > 0.9 and contiguous.item() < 0.5
