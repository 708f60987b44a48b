"""Dump files are atomic: a kill never leaves a partial file under a final name, and a failing
write (disk full, read-only directory) raises a clear error and keeps the recording for a retry."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time

import pytest
import torch

from moe_record_sdk import load_dump

from .dump_writer import big_dump

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sigkill_during_dumps_never_leaves_a_partial_final_file(tmp_path, request):
    rounds = 150 if request.config.getoption("--full") else 12
    # A fork server that imported torch once: each writer starts in milliseconds.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["moe_record_sdk", "tests.reliability.dump_writer"])
    from .dump_writer import write_forever

    rng = random.Random(0)
    for _ in range(rounds):
        ready = ctx.Event()
        writer = ctx.Process(target=write_forever, args=(str(tmp_path), ready))
        writer.start()
        assert ready.wait(60), "the writer did not start"
        time.sleep(rng.uniform(0.0, 0.3))
        writer.kill()  # SIGKILL: no handler, no cleanup runs
        writer.join(10)
        assert writer.exitcode == -9

    names = os.listdir(tmp_path)
    final = [n for n in names if not n.startswith(".")]
    temporary = [n for n in names if n.startswith(".")]
    reference = big_dump().total_count()
    for name in final:
        dump = load_dump(tmp_path / name)  # raises on any partial or corrupt file
        assert torch.equal(dump.total_count(), reference), name
    # Every kill that landed mid-write left its temporary file (hidden, ``.tmp``), never a final one.
    assert all(n.endswith(".tmp") for n in temporary)
    assert temporary, "no kill landed during a write: the test did not exercise the case"
    assert len(final) >= 3  # the writers got past their first files
    print(f"\nrounds={rounds} final_files_checked={len(final)} killed_mid_write={len(temporary)}")


def _fault_command(workdir: str) -> list[str]:
    child = [sys.executable, "-m", "tests.reliability.write_faults", workdir]
    if shutil.which("unshare"):
        return ["unshare", "-rm", *child]  # a private mount namespace: the mounts die with the child
    assert os.geteuid() == 0, "needs root or unshare to mount a tmpfs"
    return child


def test_failing_writes_raise_clear_errors_and_keep_the_recording(tmp_path):
    out = subprocess.run(_fault_command(str(tmp_path)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    expected = {"full": (28, "No space left on device"), "ro": (30, "Read-only file system")}
    for attempt in report["attempts"]:
        errno, cause = expected["full" if "/full" in attempt["destination"] else "ro"]
        error = attempt["error"]
        assert error is not None, attempt
        assert error["type"] == "OSError" and error["errno"] == errno
        # The message names the file asked for (not the temporary file) and the cause.
        assert cause in error["message"] and ".tmp" not in error["message"]
        assert attempt["destination"] in error["message"]
        # No temporary file is left behind; the recording is untouched.
        assert all(not n.startswith(".") for n in attempt["left_in_directory"])
        assert attempt["status_after"] == attempt["status_before"]
        assert attempt["status_after"]["passes"] == 64
    assert report["full_used_bytes_after"] <= 4096  # only the small kept file's page
    assert report["kept_file_intact"]
    assert report["retry_matches_reference"] and report["saved_matches_reference"]
    assert report["retry_passes"] == 64 and report["next_window_total"] == 0


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    # The fork server and the fault child import ``tests.…`` from the repository root.
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
