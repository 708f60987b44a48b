"""The reference engine (``moe-record serve``): a real model, a real recorder, real HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from moe_record_sdk.cli.serve import READY
from moe_record_sdk.schema import decode, validate_dump
from moe_record_sdk.server import DUMP_PATH, START_PATH, STATUS_PATH, STOP_PATH, ServerThread
from moe_record_sdk.server.engine import ReferenceEngine

PROMPTS = [[5, 6, 7, 8], [200, 1, 3], [42] * 10]


@pytest.fixture
def served(tmp_path):
    engines = []

    def start(engine: ReferenceEngine, **options):
        server = ServerThread(engine.app(dump_dir=str(tmp_path / "dumps"), **options)).start()
        engines.append((engine, server))
        return server

    yield start
    for engine, server in engines:
        server.stop()
        engine.attachment.detach()


def test_http_counts_equal_in_process_counts(served):
    """Counts collected over HTTP equal those of the same model and prompts run in-process."""
    engine = ReferenceEngine.tiny(seed=3)
    server = served(engine)
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        assert http.post(START_PATH).status_code == 200
        one = http.post("/generate", json={"input_ids": PROMPTS[0], "max_new_tokens": 6}).json()
        batch = http.post("/generate", json={"input_ids": PROMPTS[1:], "sampling_params": {"max_new_tokens": 4}}).json()
        assert len(one["output_ids"]) == 6 and [len(b["output_ids"]) for b in batch] == [4, 4]
        http.post(STOP_PATH)
        remote = decode(http.post(DUMP_PATH, headers={"accept": "application/x-msgpack"}).content)

    local = ReferenceEngine.tiny(seed=3)
    local.recorder.start()
    outs = local.generate(PROMPTS[:1], 6) + local.generate(PROMPTS[1:], 4)
    reference = local.recorder.dump()
    local.attachment.detach()
    assert outs[0] == one["output_ids"] and outs[1:] == [b["output_ids"] for b in batch]
    assert torch.equal(remote.total_count(), reference.total_count())
    assert remote.window.num_passes == reference.window.num_passes == 6 + 4 + 4
    # Every token of every pass counted once per layer: prompts + generated tokens but the last.
    tokens = sum(len(p) for p in PROMPTS) + 5 + 3 + 3
    assert remote.window.num_tokens == [tokens] * 4 and validate_dump(remote) == []


def test_generate_text_and_bad_requests(served):
    engine = ReferenceEngine.tiny()
    server = served(engine)
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        r = http.post("/generate", json={"text": "héllo", "max_new_tokens": 3})
        assert r.status_code == 200 and r.json()["meta_info"] == {"prompt_tokens": 6, "completion_tokens": 3}
        assert isinstance(r.json()["text"], str)
        bad = [
            b"not json",
            b'{"text": "a", "input_ids": [1]}',
            b"{}",
            b'{"input_ids": [1, 999]}',
            b'{"input_ids": [[]]}',
            b'{"text": "a", "max_new_tokens": 0}',
            b'{"text": "a", "max_new_tokens": 100000}',
            b'{"text": ""}',
            b'{"text": "\\ud800"}',  # a lone surrogate: no UTF-8 for it (was a bare 500)
        ]
        for body in bad:
            r = http.post("/generate", content=body, headers={"accept": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_body", body
        assert http.get("/generate").status_code == 405
        assert http.get("/health").text == "ok\n"


def test_api_key_guards_generate_but_not_health(served):
    server = served(ReferenceEngine.tiny(), api_key="k")
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        assert http.post("/generate", json={"text": "a"}).status_code == 401
        assert http.post("/generate", json={"text": "a"}, headers={"authorization": "Bearer k"}).status_code == 200
        assert http.get("/health").status_code == 200


def test_transformers_moe_config_random_weights(served, tmp_path):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=300, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=6, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=64,
    )  # fmt: skip
    config.save_pretrained(tmp_path / "qwen3moe")
    engine = ReferenceEngine.from_hf_config(str(tmp_path / "qwen3moe" / "config.json"), seed=1)
    assert engine.recorder.layer_ids == [1, 2] and engine.recorder.num_experts == 6
    server = served(engine)
    with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as http:
        http.post(START_PATH)
        out = http.post("/generate", json={"text": "abc", "max_new_tokens": 3}).json()
        assert len(out["output_ids"]) == 3
        dump = decode(http.post(DUMP_PATH + "?return=bytes").content)
    assert dump.window.num_passes == 3  # prompt, then one pass per new token but the last
    assert dump.total_count()[0].sum() == 0  # the dense layer is numbered, not counted
    assert dump.total_count()[1:].sum(1).tolist() == [(3 + 2) * 2] * 2
    # A config file by another name is the model served, not the config.json beside it.
    config.num_experts = 8
    config.to_json_file(str(tmp_path / "qwen3moe" / "variant.json"))
    variant = ReferenceEngine.from_hf_config(str(tmp_path / "qwen3moe" / "variant.json"))
    assert variant.recorder.num_experts == 8


def test_serve_command_starts_answers_and_ends(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "moe_record_sdk",
        "serve",
        "--port",
        "0",
        "--dump-dir",
        str(tmp_path),
        "--threads",
        "1",
        "--api-key",
        "",
        "--mode",
        "per_token",
        "--max-bytes",
        "65536",
        "--buffer-size",
        "8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY), line
        url = line[len(READY) :].strip()
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
            assert http.post(START_PATH).text.startswith("Start recording")
            http.post("/generate", json={"input_ids": [1, 2, 3], "max_new_tokens": 2})
            status = http.get(STATUS_PATH).json()["ranks"][0]
            assert status["passes"] == 2 and status["mode"] == "per_token" and 0 < status["bytes_used"] <= 65536
            assert http.post(DUMP_PATH).status_code == 200
        assert len(os.listdir(tmp_path)) == 1
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        # uvicorn shuts down gracefully, then re-raises the signal: the conventional exit status.
        assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
