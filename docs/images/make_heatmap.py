"""Regenerate docs/images/heatmap.png: a real Recorder fed skewed (Zipf) routing, then `moe-record plot`.

    .venv/bin/python docs/images/make_heatmap.py

The routing is synthetic (random weights route almost uniformly): per layer, expert popularity
follows a Zipf law over a random permutation, and drifts over the passes.
"""

from __future__ import annotations

import os
import tempfile

import torch

from moe_record_sdk import Recorder
from moe_record_sdk.cli import main

L, E, K, PASSES, TOKENS = 12, 64, 8, 60, 256


def run() -> str:
    g = torch.Generator().manual_seed(0)
    rec = Recorder(num_layers=L, num_experts=E, top_k=K, mode="per_pass", buffer_size=PASSES)
    popularity = [
        1.0 / torch.arange(1, E + 1)[torch.randperm(E, generator=g)] ** (0.3 + 0.1 * layer) for layer in range(L)
    ]
    rec.start()
    for p in range(PASSES):
        for layer in range(L):
            drift = 1 + 0.5 * torch.sin(torch.arange(E) / 5 + p / 8)
            tokens = TOKENS + int(128 * torch.sin(torch.tensor(p / 6.0)))  # a varying batch
            ids = torch.multinomial((popularity[layer] * drift).expand(tokens, E), K, generator=g)
            rec.record(layer, ids)
        rec.step()
    dump = rec.dump()
    with tempfile.TemporaryDirectory() as tmp:
        path = dump.save(os.path.join(tmp, "zipf-12x64.msgpack"))
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heatmap.png")
        assert main(["plot", path, "-o", out, "--log", "--ep-size", "8", "--dpi", "90"]) == 0
        main(["summary", path, "--ep-size", "8"])
        main(["eplb", path, "--replicas", "72", "--gpus", "8"])
    return out


if __name__ == "__main__":
    run()
