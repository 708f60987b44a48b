"""The golden fixtures in spec/fixtures/ load, validate, and still match what we write."""

from __future__ import annotations

import pytest
import torch

from moe_record_sdk import load_dump, validate_dump

from .make_fixtures import FIXTURES, OURS, make

ALL = sorted(p for p in OURS.parent.rglob("*") if p.is_file() and p.suffix in (".pt", ".msgpack", ".json", ".csv"))


def test_there_are_fixtures():
    assert len([p for p in ALL if p.parent == OURS]) == len(FIXTURES)


@pytest.mark.parametrize("path", ALL, ids=lambda p: str(p.relative_to(OURS.parent)))
def test_fixture_loads_and_validates(path):
    assert validate_dump(load_dump(path)) == []


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_is_what_we_write_today(name, tmp_path):
    """Byte for byte: a change in what we write (a dtype, a field) shows here. Files written
    before such a change move to a folder of their own beside it, where readers still load them."""
    make(name).save(str(tmp_path / name))
    assert (tmp_path / name).read_bytes() == (OURS / name).read_bytes(), (
        f"{name}: what we write changed; keep the old file in a folder of its own under spec/fixtures/, "
        "then regenerate with python -m tests.schema.make_fixtures"
    )
    assert torch.equal(load_dump(OURS / name).total_count(), make(name).total_count())
