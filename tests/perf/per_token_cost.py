"""Where per_token's extra cost over stat goes, in a CUDA graph: the tap kernel with one part removed at a time.

Each variant is counter_triton.py with lines replaced, imported from a temporary file (Triton reads
the source), patched in as the kernel of its own Recorder. Medians interleaved, us per layer call.

NVIDIA H200, 2026-11-29, with the ring's per-token pass ids gone (E=256, ratios to a copy at T =
1 / 16 / 128 / 1024 / 4096 / 16384): per_token 1.19 / 1.24 / 1.22 / 1.23 / 1.25 / 1.37; without
the ids' store (``no_id_store``) 1.18 / 1.22 / 1.21 / 1.24 / 1.22 / 1.28; with nothing of the ring
but the ids' store (``ids_store_only``) 1.12 / 1.13 / 1.15 / 1.17 / 1.20 / 1.25; stat 1.09-1.20.
The counting and the ids' write together are per_token's floor here, above 1.2x at large T.
(Storing a pass id per token as well had cost 0.05-0.1x at T >= 4096.)

    python tests/perf/per_token_cost.py [--tokens 1,16,128,1024,4096,16384] [--experts 256]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile

import torch

from moe_record_sdk import Recorder, counter_triton
from moe_record_sdk.bench import LAYERS, _graph_timer

SRC = counter_triton.__file__
ZERO = "tl.program_id(0).to(tl.int64) * 0"
# (line, replacement): every occurrence (the ring's stores are written twice, for the contiguous
# and the wrapping blocks).
EDITS = {
    "no_max": [("_max_lane0(layer_tokens_ptr + row, nv.to(tl.int64), tok_on & (nv > 0), lane)", "pass")],
    "no_id_store": [
        ("tl.store(tok_ids_ptr + base.to(tl.int64) * K + e, ids, mask=keep)", "pass"),
        ("tl.store(tok_ids_ptr + slot.to(tl.int64) * K + e % K, ids, mask=keep)", "pass"),
    ],
    "no_cursor_load": [("cursor = tl.load(cursor_ptr)", f"cursor = {ZERO}")],
    "no_flag_load": [("tok_on = tl.load(token_enabled_ptr) != 0", "tok_on = tl.program_id(0) >= 0")],
}
EDITS["loads_only"] = EDITS["no_max"] + EDITS["no_id_store"]
EDITS["no_loads"] = EDITS["no_cursor_load"] + EDITS["no_flag_load"]
EDITS["ids_store_only"] = EDITS["no_max"] + EDITS["no_loads"]


def variant(name: str, tmp: str):
    with open(SRC) as f:
        text = f.read()
    for old, new in EDITS[name]:
        assert text.count(old) == 1, (name, old)  # the kernel changed: update EDITS
        text = text.replace(old, new)
    path = os.path.join(tmp, f"tap_{name}.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location(f"tap_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._tap_kernel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,16,128,1024,4096,16384")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--trials", type=int, default=30)
    a = ap.parse_args()
    E, K = a.experts, 8
    original = counter_triton._tap_kernel
    tmp = tempfile.mkdtemp()
    kernels = {"per_token": original} | {n: variant(n, tmp) for n in EDITS}
    print(f"{torch.cuda.get_device_name()}: E={E} k=8 int32, graph, median of {a.trials}, us per call")
    for T in [int(t) for t in a.tokens.split(",")]:
        ids = [torch.randint(0, E, (T, K), dtype=torch.int32, device="cuda") for _ in range(LAYERS)]
        fns = {}
        recs = []
        stat = Recorder(LAYERS, E, K, "cuda", "stat")
        stat.start()
        recs.append(stat)
        fns["stat"] = lambda i, r=stat, ids=ids: r.record(i % LAYERS, ids[i % LAYERS])
        for name, kern in kernels.items():
            counter_triton._tap_kernel = kern
            r = Recorder(LAYERS, E, K, "cuda", "per_token", max_bytes=64 << 20)
            r.start()
            for i in range(LAYERS):  # compiles and caches this variant's launcher in the counter
                r.record(i, ids[i])
            torch.cuda.synchronize()
            recs.append(r)
            fns[name] = lambda i, r=r, ids=ids: r.record(i % LAYERS, ids[i % LAYERS])
        counter_triton._tap_kernel = original
        out = torch.empty_like(ids[0])
        fns["copy"] = lambda i, out=out, ids=ids: out.copy_(ids[i % LAYERS])
        timers = {n: _graph_timer(f, 64, 5) for n, f in fns.items()}
        samples = {n: [] for n in timers}
        for _ in range(a.trials):
            for n, once in timers.items():
                samples[n].append(once())
        med = {n: statistics.median(s) for n, s in samples.items()}
        line = "  ".join(f"{n} {v:.2f}" for n, v in med.items())
        print(f"T={T:<6} {line}")
        print("        ratios to copy: " + "  ".join(f"{n} {v / med['copy']:.2f}" for n, v in med.items()))


if __name__ == "__main__":
    main()
