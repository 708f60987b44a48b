"""Ours -> each encoding -> ours is lossless, for random dumps of every mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_record_sdk import load_dump, validate_dump
from moe_record_sdk.schema import decode, encode
from moe_record_sdk.schema.io import _msgpack_enc

from ..dumps import random_dump


def canonical(dump) -> bytes:
    return _msgpack_enc.encode(dump)


dump_params = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**31),
        "mode": st.sampled_from(["stat", "per_pass", "per_token"]),
        "num_layers": st.integers(1, 4),
        "num_experts": st.integers(2, 9),
        "passes": st.integers(0, 5),
        "tokens": st.integers(0, 7),
        "replicas": st.sampled_from([0, 0, 3]),
        "buffer_size": st.sampled_from([None, 2, 8]),
    }
)


@settings(max_examples=60, deadline=None)
@given(dump_params, st.sampled_from(["msgpack", "json", "pt"]))
def test_roundtrip_bytes(params, fmt):
    top_k = min(2, params["num_experts"])
    dump = random_dump(top_k=top_k, **params)
    assert validate_dump(dump) == []
    back = decode(encode(dump, fmt))
    assert canonical(back) == canonical(dump)


@pytest.mark.parametrize("suffix", [".pt", ".msgpack", ".json"])
@pytest.mark.parametrize("mode", ["stat", "per_pass", "per_token"])
def test_roundtrip_files(tmp_path, suffix, mode):
    dump = random_dump(7, mode, replicas=2, layer_ids=[0, 2])
    path = dump.save(str(tmp_path / f"d{suffix}"))
    back = load_dump(path)
    assert canonical(back) == canonical(dump)
    assert torch.equal(back.total_count(), dump.total_count())
    assert [p.name for p in tmp_path.iterdir()] == [f"d{suffix}"]  # no temporary left behind
    if mode != "stat":  # per-pass rows come back as the int32 they were, from every format
        assert back.logical_count.dtype == dump.logical_count.dtype == torch.int32


def test_unknown_keys_are_ignored_inside_tensors_too():
    """A later v1 writer may add keys; a v1 reader opens its files (dump-schema.md, Versioning)."""
    import json

    dump = random_dump(3)
    doc = json.loads(encode(dump, "json"))
    doc["logical_count"]["byteorder"] = "little"
    doc["window"]["added_later"] = 1
    back = decode(json.dumps(doc).encode(), "json")
    assert torch.equal(back.total_count(), dump.total_count())


def test_ring_wrap_keeps_exact_totals():
    dump = random_dump(3, "per_pass", passes=7, buffer_size=3)
    assert dump.logical_count.shape[0] == 3
    assert dump.window.dropped_passes == 4
    assert dump.total_logical_count is not None
    back = decode(encode(dump, "pt"))
    assert torch.equal(back.total_count(), dump.total_count())
    assert [r.forward_pass_id for r in back.records] == [4, 5, 6]


def test_a_large_tensor_reads_back_as_written_and_an_empty_one_naming_huge_axes_is_refused():
    """A merge of 36 ranks' 1000-pass rings ([36000, 61, 256], 562M counts) was written, then
    refused by the reader ("over the limit of 536870912"): a tensor whose bytes are on the wire
    is bounded by them. An empty tensor carries no bytes, so its axes are still bounded."""
    from moe_record_sdk.errors import DumpFormatError
    from moe_record_sdk.schema.tensors import tensor_from_wire

    n = (1 << 29) + 8  # int8: 512 MiB, past the old limit
    t = tensor_from_wire({"dtype": "int8", "shape": [8, n // 8], "data": bytes(n)})
    assert t.shape == (8, n // 8) and t.dtype == torch.int8
    with pytest.raises(DumpFormatError, match=r"\$.shape: \[0, 1048576, 2\] is empty but spans more than"):
        tensor_from_wire({"dtype": "int32", "shape": [0, 1 << 20, 2], "data": b""})
    with pytest.raises(DumpFormatError, match=r"\$.data: 4 bytes, but dtype int32 and shape \[1073741824\] need"):
        tensor_from_wire({"dtype": "int32", "shape": [1 << 30], "data": b"\0\0\0\0"})
