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


def test_demo_replaces_only_its_own_dumps(tmp_path):
    """A folder holding someone's dumps is refused before any engine starts, and nothing in it
    is deleted (the demo cleared any folder named by --out); its own folder it reuses."""
    theirs = tmp_path / "precious"
    theirs.mkdir()
    (theirs / "engine-important.pt").write_bytes(b"not the demo's")
    (theirs / "merged.pt").write_bytes(b"not the demo's either")
    cmd = [sys.executable, "-m", "moe_record_sdk", "demo", "--duration", "0.5", "--out"]
    proc = subprocess.run([*cmd, str(theirs)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "holds dumps of an earlier run" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(os.listdir(theirs)) == ["engine-important.pt", "merged.pt"]
    assert "starting" not in proc.stdout
    ours = tmp_path / "demo"
    for _ in range(2):  # the second run replaces the first one's dumps
        proc = subprocess.run([*cmd, str(ours)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len([f for f in os.listdir(ours) if f.startswith(("engine-", "merged."))]) == 3
    for bad in (["--engines", "0"], ["--duration", "nan"]):
        proc = subprocess.run([*cmd, str(tmp_path / "x"), *bad], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, bad


def test_demo_stopped_while_engines_start_leaves_no_engine(tmp_path):
    """SIGTERM (``timeout``, a service manager) while the engines start: the engines run in
    sessions of their own, so the demo must end them itself."""
    import signal

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "moe_record_sdk", "demo", "--out", str(out), "--engines", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _processes_mentioning(str(out / "server-0")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_mentioning(str(out / "server-0")), "no engine started"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in output, output
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(out)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(out)) == []


def test_without_the_torch_adapter_demo_and_serve_say_what_to_install(tmp_path):
    """An install of the core with only the SGLang (or vLLM) adapter: ``moe_record_torch``
    cannot be imported (``sys.modules[name] = None`` makes Python refuse it)."""
    for argv in (["serve", "--port", "0"], ["demo", "--out", str(tmp_path / "demo")]):
        code = (
            "import sys; sys.modules['moe_record_torch'] = None\n"
            f"from moe_record_sdk.cli import main; sys.exit(main({argv!r}))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (argv, done.stdout, done.stderr)
        said = " ".join((done.stdout + done.stderr).split())
        assert "needs the torch adapter: pip install -e adapters/torch" in said and "Traceback" not in said
    assert not (tmp_path / "demo").exists()  # refused before any folder or engine
