"""The plot command writes a real PNG with the panels drawn; without matplotlib it says how to install it."""

from __future__ import annotations

import sys

import pytest
from PIL import Image, ImageStat

from moe_record_sdk.analysis.optional import MissingDependencyError
from moe_record_sdk.analysis.plot import plot_dumps
from moe_record_sdk.cli import main

from ..dumps import random_dump


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
    with pytest.raises(MissingDependencyError, match=r"pip install 'moe-record-sdk\[plot\]'"):
        plot_dumps([("x", random_dump(1))], tmp_path / "x.png")
    src = random_dump(1).save(str(tmp_path / "d.msgpack"))
    assert main(["plot", src, "-o", str(tmp_path / "x.png")]) == 2
    assert "moe-record-sdk[plot]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
