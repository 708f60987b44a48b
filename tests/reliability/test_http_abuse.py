"""The control endpoints under abuse, on a real uvicorn on 127.0.0.1 in front of a recording engine.

100 concurrent mixed start/stop/dump/status requests: no crash, a consistent state afterwards;
100 concurrent dumps and status reads while passes run: no count lost or counted twice; oversized
and malformed requests get 4xx; with a key, a missing or wrong bearer token gets 401; the request
never chooses a file path; the endpoints are absent unless enabled.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import random
import threading

import httpx
import pytest
import torch

from moe_record_sdk import Recorder
from moe_record_sdk.schema.io import decode
from moe_record_sdk.server import LocalBackend, ServerThread, make_app
from moe_record_sdk.server import handler as handler_module
from moe_record_sdk.server.protocol import DUMP_PATH, H_FILES, START_PATH, STATUS_PATH, STOP_PATH

L, E, K, TOKENS = 4, 16, 2, 8


class Engine:
    """Forward passes on a thread, counting what it fed while the counted flag is up."""

    def __init__(self, rec: Recorder, seed: int = 0) -> None:
        self.rec, self.g = rec, torch.Generator().manual_seed(seed)
        self.reference = torch.zeros(L, E, dtype=torch.int64)
        self.passes, self.errors = 0, []

    def run(self, passes: int | None = None, until: threading.Event | None = None) -> None:
        try:
            while (passes is None or self.passes < passes) and not (until and until.is_set()):
                for layer in range(L):
                    ids = torch.randint(0, E, (TOKENS, K), generator=self.g)
                    self.rec.record(layer, ids)
                    self.reference[layer] += torch.bincount(ids.flatten(), minlength=E)
                self.rec.step()
                self.passes += 1
        except BaseException as e:  # reported by the test
            self.errors.append(e)


def _recorder() -> Recorder:
    return Recorder(num_layers=L, num_experts=E, top_k=K, mode="stat")


def _request(client: httpx.AsyncClient, action: str, rng: random.Random):
    if action == "start":
        mode = rng.choice(["stat", "per_pass", "per_token", None])
        return client.post(START_PATH, params={"mode": mode} if mode else None)
    if action == "stop":
        return client.request(rng.choice(["GET", "POST"]), STOP_PATH)
    if action == "dump":
        return client.post(DUMP_PATH, params={"return": rng.choice(["bytes", "file", "both"]), "format": "msgpack"})
    return client.get(STATUS_PATH, headers={"accept": "application/json"})


async def _storm(url: str, actions: list[str], seed: int) -> list[httpx.Response]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(actions), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(_request(client, a, rng) for a in actions))


def test_concurrent_mixed_requests_then_exact_counts(tmp_path):
    rec = _recorder()
    app = make_app(LocalBackend(rec), dump_dir=str(tmp_path))
    with ServerThread(app) as server:
        # 1. A storm of 100 mixed requests, mode switches included, while passes run.
        engine, done = Engine(rec), threading.Event()
        thread = threading.Thread(target=engine.run, kwargs={"until": done})
        thread.start()
        rng = random.Random(1)
        actions = [rng.choice(["start", "stop", "dump", "status"]) for _ in range(100)]
        responses = asyncio.run(_storm(server.url, actions, seed=2))
        done.set()
        thread.join(30)
        assert engine.errors == [] and engine.passes > 0
        assert [r.status_code for r in responses] == [200] * 100, [r.text for r in responses if r.status_code != 200]
        for action, r in zip(actions, responses):
            if action == "dump" and "x-moe-record-format" in r.headers:
                decode(r.content, "msgpack")  # every dump in a body is whole
            for path in json.loads(r.headers.get(H_FILES, "[]")):
                assert os.path.dirname(path) == str(tmp_path)

        # 2. The state afterwards is consistent and follows each call.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            client.post(STOP_PATH).raise_for_status()
            status = client.get(STATUS_PATH).json()
            assert status["recording"] is False and all(not r["recording"] for r in status["ranks"])
            client.post(START_PATH, params={"mode": "stat"}).raise_for_status()
            status = client.get(STATUS_PATH).json()
            assert status["recording"] is True and status["ranks"][0]["mode"] == "stat"
            assert status["ranks"][0]["passes"] == 0

        # 3. 100 concurrent dumps and status reads while 2,000 passes run: every count lands once.
        engine = Engine(rec, seed=3)
        thread = threading.Thread(target=engine.run, kwargs={"passes": 2000})
        thread.start()
        actions = ["dump" if i % 5 < 3 else "status" for i in range(100)]

        async def dumps_during_passes() -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
                reqs = [
                    client.post(DUMP_PATH, params={"return": "bytes", "format": "msgpack"}) if a == "dump"
                    else client.get(STATUS_PATH)
                    for a in actions
                ]  # fmt: skip
                return await asyncio.gather(*reqs)

        responses = asyncio.run(dumps_during_passes())
        thread.join(60)
        assert engine.errors == [] and engine.passes == 2000
        assert all(r.status_code == 200 for r in responses)
        last = httpx.post(server.url + DUMP_PATH, params={"return": "bytes", "format": "msgpack"}, timeout=30)
        dumps = [decode(r.content, "msgpack") for r in [*responses, last] if r.headers.get("x-moe-record-format")]
        assert len(dumps) == 61
        total = sum(d.total_count() for d in dumps)
        assert torch.equal(total, engine.reference)  # nothing lost, nothing counted twice
        assert sum(d.window.num_passes for d in dumps) == 2000


@pytest.fixture
def server(tmp_path):
    app = make_app(LocalBackend(_recorder()), dump_dir=str(tmp_path / "dumps"), api_key="s3cret-key", max_body=1024)
    with ServerThread(app) as s:
        yield s


def test_malformed_and_oversized_requests_get_4xx(server):
    auth = {"authorization": "Bearer s3cret-key"}
    with httpx.Client(base_url=server.url, timeout=30, headers=auth) as c:
        cases = {
            "oversized body": c.post(START_PATH, content=b"{" + b" " * 4096 + b"}"),
            "oversized, chunked": c.post(START_PATH, content=iter([b" " * 600, b" " * 600])),
            "body not JSON": c.post(START_PATH, content=b"\xff\xfe not json"),
            "body not an object": c.post(START_PATH, content=b"[1, 2]"),
            "option of the wrong type": c.post(START_PATH, json={"mode": 3}),
            "unknown mode": c.post(START_PATH, params={"mode": "everything"}),
            "unknown option": c.post(START_PATH, params={"mode": "stat", "verbose": "1"}),
            "unknown format": c.post(DUMP_PATH, params={"return": "bytes", "format": "exe"}),
            "unknown return": c.post(DUMP_PATH, params={"return": "socket"}),
            "wrong method": c.put(STATUS_PATH),
            "unknown path": c.get("/dump_expert_distribution_record/../../etc/passwd"),
        }
        for name, r in cases.items():
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            assert r.text.strip(), name  # every refusal says why
        assert cases["oversized body"].status_code == 413
        assert c.get(STATUS_PATH).status_code == 200  # and the server is still fine


def test_bearer_token_required_and_compared_in_constant_time(server):
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer s3cret-ke"},
                    {"authorization": "s3cret-key"}, {"authorization": "Basic czNjcmV0LWtleQ=="}):  # fmt: skip
        for method, path in (("POST", START_PATH), ("POST", STOP_PATH), ("POST", DUMP_PATH), ("GET", STATUS_PATH)):
            r = httpx.request(method, server.url + path, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, path, r.status_code)
            assert r.headers.get("www-authenticate") == "Bearer"
    ok = httpx.get(server.url + STATUS_PATH, headers={"authorization": "Bearer s3cret-key"}, timeout=30)
    assert ok.status_code == 200
    assert "hmac.compare_digest" in inspect.getsource(handler_module.check_bearer)


def test_the_request_never_chooses_a_file_path(server, tmp_path):
    auth = {"authorization": "Bearer s3cret-key"}
    evil = tmp_path / "evil"
    with httpx.Client(base_url=server.url, timeout=30, headers=auth) as c:
        c.post(START_PATH).raise_for_status()
        for params, body in (
            ({"path": str(evil / "x.pt")}, None),
            ({"dump_dir": str(evil)}, None),
            ({"file": "../../evil.pt"}, None),
            (None, {"path": str(evil / "x.pt")}),
            (None, {"dump_dir": str(evil)}),
        ):
            r = c.post(DUMP_PATH, params=params, json=body)
            assert r.status_code == 400, r.text
        r = c.post(DUMP_PATH, headers={"accept": "application/json"})
        assert r.status_code == 200
        files = r.json()["files"]
    assert files and all(os.path.dirname(f) == str(tmp_path / "dumps") for f in files)
    assert not evil.exists() and not (tmp_path.parent / "evil.pt").exists()


def test_endpoints_absent_unless_enabled(tmp_path):
    app = make_app(LocalBackend(_recorder()), dump_dir=str(tmp_path), enabled=False)
    with ServerThread(app) as s:
        for method, path in (("POST", START_PATH), ("POST", STOP_PATH), ("POST", DUMP_PATH), ("GET", STATUS_PATH)):
            assert httpx.request(method, s.url + path, timeout=30).status_code == 404
    assert os.listdir(tmp_path) == []
