"""Child of ``test_atomic_dump``: writes one large dump in a loop until it is killed."""

from __future__ import annotations

import itertools
import os

from moe_record_sdk import Dump, save_dump

from ..dumps import random_dump

FORMATS = ("pt", "msgpack", "json")


def big_dump() -> Dump:
    """A stat dump with a 100-pass ring: 0.8 MB as .pt, 1.6 MB as msgpack, 2.2 MB as JSON."""
    return random_dump(7, "stat", num_layers=8, num_experts=256, top_k=8, passes=100, tokens=16, buffer_size=100)


def write_forever(directory: str, ready) -> None:
    """Overwrite ``a.<fmt>`` and create ``n<i>.<fmt>`` in every format, round and round."""
    dump = big_dump()
    ready.set()
    for i in itertools.count():
        fmt = FORMATS[i % len(FORMATS)]
        save_dump(dump, os.path.join(directory, f"a.{fmt}"))
        save_dump(dump, os.path.join(directory, f"n{i}.{fmt}"))
