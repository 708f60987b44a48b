"""Regenerate spec/fixtures/ours: `python -m tests.schema.make_fixtures` from the repo root."""

from __future__ import annotations

from pathlib import Path

import msgspec

from ..dumps import random_dump

OURS = Path(__file__).resolve().parents[2] / "spec" / "fixtures" / "ours"

FIXTURES = {
    "stat.pt": dict(seed=11, mode="stat", num_layers=4, layer_ids=[1, 2, 3]),
    "stat-ring.msgpack": dict(seed=12, mode="stat", buffer_size=3, passes=5),
    "per_pass-eplb.pt": dict(seed=13, mode="per_pass", replicas=3, rank=1),
    "per_pass.json": dict(seed=14, mode="per_pass"),
    "per_token.pt": dict(seed=15, mode="per_token", passes=3, tokens=4),
    "per_token.msgpack": dict(seed=16, mode="per_token", passes=2, tokens=3),
}


def make(name: str):
    dump = random_dump(**FIXTURES[name])
    # Fixed metadata so regenerating gives the same files.
    window = msgspec.structs.replace(dump.window, start_time=1700000000.0, stop_time=1700000060.0)
    engine = msgspec.structs.replace(dump.engine, version="2.13.0", sdk_version="0.1.0")
    return msgspec.structs.replace(dump, window=window, engine=engine)


if __name__ == "__main__":
    OURS.mkdir(parents=True, exist_ok=True)
    for name in FIXTURES:
        make(name).save(str(OURS / name))
        print(OURS / name)
