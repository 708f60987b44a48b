from __future__ import annotations

import json
from pathlib import Path

import moe_record_sdk
from moe_record_sdk.schema.jsonschema import render

SPEC = Path(__file__).resolve().parents[2] / "spec" / "dump-schema-v1.json"


def test_generated_json_schema_is_fresh():
    assert SPEC.read_text() == render(), (
        "stale: run `python -m moe_record_sdk.schema.jsonschema > spec/dump-schema-v1.json`"
    )
    doc = json.loads(SPEC.read_text())
    assert "GENERATED" in doc["$comment"]


def test_public_api_is_sorted_and_importable():
    names = moe_record_sdk.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(moe_record_sdk, name) is not None
