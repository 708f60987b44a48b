"""A short soak: the tiny model with recording on in each mode, dumped periodically; counts exact,
nothing lost, memory flat. ``tests/perf/soak.py`` runs the long one (100,000 passes per mode)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_soak_counts_exact_and_memory_flat(request):
    passes = "20000" if request.config.getoption("--full") else "1200"
    out = subprocess.run(
        [sys.executable, "tests/perf/soak.py", "--passes", passes, "--dump-every", "100", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    report = json.loads(out.stdout)
    for mode in report["modes"]:
        assert mode["counts_exact"], mode
        assert mode["counted"] == mode["reference"] > 0
        assert mode["nothing_lost"], mode
        assert mode["passes_dumped"] == int(passes)
        assert mode["files_written_and_read_back"] >= 1
        assert mode["memory_flat"], mode
    assert [m["mode"] for m in report["modes"]] == ["stat", "per_pass", "per_token"]
    assert out.returncode == 0 and report["ok"]
