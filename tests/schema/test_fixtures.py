"""The golden fixtures in spec/fixtures/ load, validate, and still match what we write."""

from __future__ import annotations

import pytest
import torch

from moe_record_sdk import load_dump, validate_dump
from moe_record_sdk.schema import encode

from .make_fixtures import FIXTURES, OURS, make

ALL = sorted(p for p in OURS.parent.rglob("*") if p.is_file() and p.suffix in (".pt", ".msgpack", ".json", ".csv"))


def test_there_are_fixtures():
    assert len([p for p in ALL if p.parent == OURS]) == len(FIXTURES)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(OURS.parent)))
def test_fixture_loads_and_validates(path):
    assert validate_dump(load_dump(path)) == []


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_is_what_we_write_today(name):
    stored, fresh = load_dump(OURS / name), make(name)
    assert encode(stored, "msgpack") == encode(fresh, "msgpack"), (
        f"{name}: regenerate with python -m tests.schema.make_fixtures"
    )
    assert torch.equal(stored.total_count(), fresh.total_count())
