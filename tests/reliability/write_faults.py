"""Child of ``test_atomic_dump``: failing dump writes on real tmpfs mounts, reported as JSON.

Run inside a private mount namespace (``unshare -rm``, or as root) so the mounts vanish with the
process: ``python -m tests.reliability.write_faults WORKDIR``. It records into a Recorder, tries
to dump onto a full filesystem and onto a read-only one, then retries onto a good directory,
and prints what happened: the errors, what each directory holds afterwards, and the counts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from moe_record_sdk import Recorder, load_dump

L, E, K, PASSES, TOKENS = 4, 256, 8, 64, 32


def _mount(path: str, options: str) -> None:
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], check=True)


def _attempt(rec: Recorder, destination: str) -> dict:
    before = rec.status().to_dict()
    try:
        rec.dump(destination)
        error = None
    except Exception as e:  # the test asserts on the type and the message
        error = {"type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e)}
    directory = destination if os.path.isdir(destination) else os.path.dirname(destination)
    return {
        "destination": destination,
        "error": error,
        "left_in_directory": sorted(os.listdir(directory)),
        "status_before": before,
        "status_after": rec.status().to_dict(),
    }


def main(workdir: str) -> dict:
    g = torch.Generator().manual_seed(0)
    # A ring of 64 passes makes every format of the dump larger than the 64 KiB disk below.
    rec = Recorder(num_layers=L, num_experts=E, top_k=K, mode="stat", buffer_size=PASSES)
    reference = torch.zeros(L, E, dtype=torch.int64)
    rec.start()
    for _ in range(PASSES):
        for layer in range(L):
            ids = torch.randint(0, E, (TOKENS, K), generator=g)
            rec.record(layer, ids)
            reference[layer] += torch.bincount(ids.flatten(), minlength=E)
        rec.step()
    full, ro, good = (os.path.join(workdir, n) for n in ("full", "ro", "good"))
    _mount(full, "size=64k")
    _mount(ro, "size=1m,ro")
    os.makedirs(good, exist_ok=True)
    # A small good file already under the name a failing dump overwrites: it must survive intact.
    small = Recorder(num_layers=1, num_experts=4, top_k=1)
    small.start()
    small.record(0, torch.tensor([[1], [2], [2]]))
    kept_path = os.path.join(full, "kept.msgpack")
    kept = small.dump(kept_path)
    attempts = [
        _attempt(rec, full),  # a directory: SGLang's file name, .pt
        _attempt(rec, os.path.join(full, "run.msgpack")),
        _attempt(rec, os.path.join(full, "run.json")),
        _attempt(rec, ro),
        _attempt(rec, os.path.join(ro, "run.msgpack")),
        _attempt(rec, kept_path),
    ]
    kept_intact = torch.equal(load_dump(kept_path).logical_count, kept.logical_count)
    df = subprocess.run(["df", "--output=used", "-B1", full], capture_output=True, text=True, check=True)
    retry = rec.dump(good)
    names = os.listdir(good)
    saved = load_dump(os.path.join(good, names[0]))
    after = rec.dump()  # the retry started a new, empty window
    return {
        "attempts": attempts,
        "full_used_bytes_after": int(df.stdout.split()[-1]),
        "kept_file_intact": kept_intact,
        "retry_files": names,
        "retry_matches_reference": torch.equal(retry.total_count(), reference),
        "saved_matches_reference": torch.equal(saved.total_count(), reference),
        "retry_passes": retry.window.num_passes,
        "reference_total": int(reference.sum()),
        "next_window_total": int(after.total_count().sum()),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
