"""Prometheus metrics over a live Recorder, through a real prometheus-client registry."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from moe_record_sdk import Recorder
from moe_record_sdk.analysis import metrics as m
from moe_record_sdk.analysis.prometheus import make_collector, make_metrics_app


def scrape(registry):
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def recorder_with_load():
    rec = Recorder(num_layers=3, num_experts=4, top_k=2, layer_ids=[0, 2])
    rec.start()
    rec.record(0, torch.tensor([[0, 1], [0, 2], [0, 3], [1, -1]]))  # [3, 2, 1, 1] + one discarded slot
    rec.record(2, torch.tensor([[3, 2], [3, 2]]))  # [0, 0, 2, 2]
    rec.step()
    return rec


def test_per_layer_balance_and_totals():
    rec = recorder_with_load()
    reg = CollectorRegistry()
    reg.register(make_collector(rec, ep_size=2))
    got = scrape(reg)
    L0, L2 = (("layer", "0"),), (("layer", "2"),)
    assert got[("moe_record_recording", ())] == 1.0
    assert got[("moe_record_window_passes", ())] == 1.0
    assert got[("moe_record_window_tokens", ())] == 4.0
    assert got[("moe_record_layer_assignments", L0)] == 7.0 and got[("moe_record_layer_assignments", L2)] == 4.0
    assert got[("moe_record_layer_balancedness", L0)] == pytest.approx(
        m.balancedness(torch.tensor([3, 2, 1, 1])).item()
    )
    assert got[("moe_record_layer_imbalance_ratio", L2)] == pytest.approx(1.0)
    assert got[("moe_record_layer_dead_experts", L2)] == 2.0
    assert got[("moe_record_imbalance_ratio", ())] == pytest.approx(((3 / 1.75 - 1) + 1.0) / 2)
    # GPUs: layer 0 -> [5, 2]; layer 2 -> [0, 4]
    assert got[("moe_record_layer_gpu_balancedness", L0)] == pytest.approx((3.5 + 1e-5) / (5 + 1e-5))
    # bounded cardinality: nothing per expert, nothing for the dense layer 1
    assert not any(name == "moe_record_expert_assignments" for name, _ in got)
    assert not any(labels == (("layer", "1"),) for _, labels in got)
    # reading metrics does not end the window: the dump still holds everything
    assert int(rec.dump().total_count().sum()) == 11


def test_per_expert_series_when_asked_and_window_reset():
    rec = recorder_with_load()
    reg = CollectorRegistry()
    reg.register(make_collector(rec, per_expert=True, prefix="moe"))
    got = scrape(reg)
    experts = {labels: v for (name, labels), v in got.items() if name == "moe_expert_assignments"}
    assert len(experts) == 2 * 4
    assert experts[(("expert", "0"), ("layer", "0"))] == 3.0
    rec.dump()  # a new window: counts start again
    got = scrape(reg)
    assert got[("moe_layer_assignments", (("layer", "0"),))] == 0.0
    assert ("moe_imbalance_ratio", ()) not in got  # no load, no mean ratio


def test_callable_source_and_asgi_app():
    counts = torch.tensor([[4, 4, 4, 4], [16, 0, 0, 0]])
    app = make_metrics_app(lambda: counts)

    async def get():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get("/")

    r = asyncio.run(get())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'moe_record_layer_imbalance_ratio{layer="0"} 0.0' in r.text
    assert 'moe_record_layer_imbalance_ratio{layer="1"} 3.0' in r.text
    assert "moe_record_recording" not in r.text  # a bare tensor has no status


def test_gpu_balance_from_physical_slots():
    # expert 0 replicated in slots 0 and 3; two GPUs hold slots 0-1 and 2-3
    rec = Recorder(num_layers=1, num_experts=3, top_k=1, physical_to_logical_map=torch.tensor([[0, 1, 2, 0]]))
    rec.start()
    rec.record(0, torch.tensor([[0], [3], [3], [1]]))  # slots: GPU 0 gets 2, GPU 1 gets 2
    rec.step()
    reg = CollectorRegistry()
    reg.register(make_collector(rec, ep_size=2))
    got = scrape(reg)
    assert got[("moe_record_layer_gpu_balancedness", (("layer", "0"),))] == pytest.approx(1.0)
    # over logical experts [3, 1, 0]: expert 2 is dead
    assert got[("moe_record_layer_dead_experts", (("layer", "0"),))] == 1.0


def test_missing_prometheus_client_says_how_to_install(monkeypatch):
    import sys

    from moe_record_sdk.analysis.optional import MissingDependencyError

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # the one fault we cannot produce for real
    with pytest.raises(MissingDependencyError, match=r"\[metrics\]. in the moe-record-sdk checkout"):
        make_collector(lambda: torch.ones(1, 2))


def test_recorder_peek_matches_the_dump_and_keeps_the_window():
    rec = Recorder(
        num_layers=2, num_experts=3, top_k=1, layer_ids=[1], physical_to_logical_map=torch.tensor([[0, 1, 2, 0]] * 2)
    )
    rec.start()
    rec.record(1, torch.tensor([[0], [3], [2], [-1]]))
    rec.step()
    assert rec.peek().tolist() == [[0, 0, 0], [2, 0, 1]]
    assert rec.peek(physical=True).tolist() == [[0, 0, 0, 0], [1, 0, 1, 1]]
    dump = rec.dump()
    assert torch.equal(dump.total_count(), torch.tensor([[0, 0, 0], [2, 0, 1]]))
    assert int(rec.peek().sum()) == 0  # the dump started a new window


def test_bad_options_fail_at_construction_not_at_every_scrape():
    """ep_size that does not divide the experts failed every scrape (HTTP 500); ep_size=0 turned the
    GPU series off without a word; a prefix was silently rewritten ("9x" -> "_x_...")."""
    rec = recorder_with_load()
    for options, match in (
        ({"ep_size": 3}, "ep_size: 3 does not divide the recorder's 4 expert slots"),
        ({"ep_size": 0}, "ep_size: expected a GPU count >= 1, got 0"),
        ({"prefix": "9x"}, "prefix: '9x' is not a Prometheus metric name"),
        ({"prefix": "a b"}, "prefix: 'a b' is not"),
    ):
        with pytest.raises(ValueError, match=match):
            make_collector(rec, **options)


def test_a_dump_whose_ring_dropped_passes_gets_gpu_loads_from_its_totals():
    """A Dump source's GPU balancedness came from its physical ring rows alone when the ring had
    dropped passes, while its other gauges used the window's totals: now both from the totals
    (and the map), as summary does."""
    from moe_record_sdk.analysis.summary import summarize

    mapping = torch.tensor([[0, 1, 2, 0]])  # expert 0 on both GPUs
    rec = Recorder(
        num_layers=1, num_experts=3, top_k=1, physical_to_logical_map=mapping, mode="per_pass", buffer_size=2
    )
    rec.start()
    for ids in ([[1], [1], [1], [1]], [[0], [3], [2], [1]], [[0], [0], [3], [3]]):  # the first pass drops out
        rec.record(0, torch.tensor(ids))
        rec.step()
    dump = rec.dump()
    assert dump.window.dropped_passes == 1 and dump.total_logical_count is not None
    reg = CollectorRegistry()
    reg.register(make_collector(lambda: dump, ep_size=2))
    got = scrape(reg)[("moe_record_layer_gpu_balancedness", (("layer", "0"),))]
    assert got == pytest.approx(summarize(dump, ep_size=2).layers[0].gpus.balancedness)
