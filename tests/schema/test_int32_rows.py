"""A recorder's int32 ring rows stay int32 through the dump and every encoding; sums are int64."""

from __future__ import annotations

import pytest
import torch

from moe_record_sdk import Recorder, validate_dump
from moe_record_sdk.schema import decode, encode
from moe_record_sdk.schema.dump import row_sum


def _ring_dump():
    rec = Recorder(3, 8, 2, buffer_size=4, layer_ids=[0, 2])
    rec.start()
    g = torch.Generator().manual_seed(0)
    for _ in range(6):  # two passes fall out of the ring
        for layer in rec.layer_ids:
            rec.record(layer, torch.randint(0, 8, (5, 2), generator=g))
        rec.step()
    return rec.dump()


@pytest.mark.parametrize("fmt", ["msgpack", "json", "pt"])
def test_ring_rows_stay_int32(fmt):
    dump = _ring_dump()
    assert dump.logical_count.dtype == torch.int32 and dump.logical_count.shape == (4, 3, 8)
    assert dump.total_logical_count is not None and dump.total_logical_count.dtype == torch.int64
    assert validate_dump(dump) == []
    back = decode(encode(dump, fmt))
    assert back.logical_count.dtype == torch.int32 and torch.equal(back.logical_count, dump.logical_count)
    assert back.total_count().dtype == torch.int64 and torch.equal(back.total_count(), dump.total_count())
    back.logical_count += 1  # the decoded tensor owns writable memory, not the message's bytes


def test_row_sum_is_exact_where_int32_partial_sums_would_overflow():
    big = torch.iinfo(torch.int32).max
    rows = torch.tensor([[big, 1], [big, 2], [big, 3], [-big, 4]], dtype=torch.int32)
    got = row_sum(rows)
    assert got.dtype == torch.int64 and got.tolist() == [2 * big, 10]
    rnd = torch.randint(0, 1 << 20, (50, 3, 4), dtype=torch.int32)
    assert torch.equal(row_sum(rnd), rnd.to(torch.int64).sum(0))
    assert torch.equal(row_sum(rnd.to(torch.int64)), rnd.to(torch.int64).sum(0))
