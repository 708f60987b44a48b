"""``moe-record demo``: two engines, one Fleet recording, valid dumps, nothing left running."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from moe_record_sdk.schema import load_dump, validate_dump


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue  # ended meanwhile
    return pids


def test_demo_records_two_engines_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "demo"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "moe_record_sdk", "demo", "--out", str(out), "--duration", "1.5"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert took < 60
    assert "validated 3 dump file(s): all valid" in proc.stdout
    assert "merged counts = sum of the 2 engines' counts" in proc.stdout
    assert "every engine process ended" in proc.stdout
    files = sorted(os.listdir(out))
    assert files[-1] == "merged.pt" and len([f for f in files if f.startswith("engine-")]) == 2
    engines = [load_dump(str(out / f)) for f in files if f.startswith("engine-")]
    merged = load_dump(str(out / "merged.pt"))
    assert validate_dump(merged) == [] and all(e.window.num_passes > 0 for e in engines)
    assert merged.window.num_passes == sum(e.window.num_passes for e in engines)
    assert _processes_mentioning(str(out)) == []  # the engines' command lines name the out folder
