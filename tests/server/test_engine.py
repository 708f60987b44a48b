"""The reference engine (``moe-record serve``): a real model, a real recorder, real HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from moe_record_sdk.cli.serve import READY
from moe_record_sdk.schema import decode, validate_dump
from moe_record_sdk.server import DUMP_PATH, START_PATH, STATUS_PATH, STOP_PATH, ServerThread
from moe_record_sdk.server.control import ControlError
from moe_record_sdk.server.engine import MAX_NEW_TOKENS, MAX_PROMPT_TOKENS, MAX_REQUEST_TOKENS, ReferenceEngine

PROMPTS = [[5, 6, 7, 8], [200, 1, 3], [42] * 10]
#: A long generation: 8 prompts of MAX_NEW_TOKENS, LONG_PASSES forward passes (seconds of CPU).
LONG = {"input_ids": [[1, 2, 3]] * 8, "max_new_tokens": MAX_NEW_TOKENS}
LONG_PASSES = 8 * MAX_NEW_TOKENS


def wait_for(check, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def in_thread(fn) -> tuple[threading.Thread, list]:
    """Run ``fn()`` on a thread; the list gets its result or its exception."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except Exception as e:  # noqa: BLE001 - the test asserts on it
            out.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


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
        r = http.post("/generate", json={"text": "a"})
        assert r.status_code == 401 and not any(k.startswith("x-moe-record") for k in r.headers), r.headers
        assert http.post("/generate", json={"text": "a"}, headers={"authorization": "Bearer k"}).status_code == 200
        assert http.get("/health").status_code == 200


def qwen3_moe_config(tmp_path):
    """A tiny Qwen3-MoE config saved under ``tmp_path/qwen3moe``: 3 layers (the first dense), 6 experts."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=300, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=6, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=64,
    )  # fmt: skip
    config.save_pretrained(tmp_path / "qwen3moe")
    return config


def test_transformers_moe_config_random_weights(served, tmp_path):
    config = qwen3_moe_config(tmp_path)
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


def test_serve_start_begins_a_run_with_its_id(tmp_path):
    """--start records at once, through the endpoints' controller: status names the run and a
    dump carries its id, as after a start request."""
    cmd = [sys.executable, "-m", "moe_record_sdk", "serve", "--port", "0", "--threads", "1", "--api-key", ""]
    proc = subprocess.Popen([*cmd, "--dump-dir", str(tmp_path), "--start"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY), line
        with httpx.Client(base_url=line[len(READY) :].strip(), timeout=30, trust_env=False) as http:
            http.post("/generate", json={"input_ids": [1, 2, 3], "max_new_tokens": 2})
            status = http.get(STATUS_PATH).json()
            assert status["recording"] and status["run_id"] and status["run_id"].startswith(status["instance_id"])
            dump = http.post(DUMP_PATH, params={"return": "bytes", "format": "msgpack"})
            assert dump.headers["x-moe-record-run"] == status["run_id"]
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_serve_reads_its_key_from_a_file_and_warns_of_an_open_bind(tmp_path):
    """--api-key-file keeps the token out of ps; a bind past loopback with no token is said."""
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    cmd = [sys.executable, "-m", "moe_record_sdk", "serve", "--port", "0", "--threads", "1", "--host", "0.0.0.0"]
    for extra, token in ((["--api-key-file", str(key_file)], "s3cret"), (["--api-key", ""], None)):
        proc = subprocess.Popen(
            [*cmd, *extra, "--dump-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            line = proc.stdout.readline()
            assert line.startswith(READY), line
            port = line.strip().rpartition(":")[2]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as http:
                assert http.get(STATUS_PATH).status_code == (401 if token else 200)
                if token:
                    assert http.get(STATUS_PATH, headers={"authorization": f"Bearer {token}"}).status_code == 200
        finally:
            proc.kill()
            proc.wait()
            err = proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()
        assert ("with no bearer token: whoever reaches port" in err) == (token is None), err


def test_a_request_over_the_work_limit_is_400(served):
    engine = ReferenceEngine.tiny()
    engine.recorder.start()
    server = served(engine)
    over = {"input_ids": [[1]] * 16, "max_new_tokens": MAX_NEW_TOKENS}  # 16 * (1 + 1024) tokens
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        r = http.post("/generate", json=over, headers={"accept": "application/json"})
        error = r.json()["error"]
        assert r.status_code == 400 and error["code"] == "bad_body"
        assert f"request: {16 * 1025} tokens" in error["message"] and str(MAX_REQUEST_TOKENS) in error["message"]
        r = http.post("/generate", json={"text": ["ab"] * 1000, "max_new_tokens": 16}, headers={"accept": "x/y"})
        assert r.status_code == 400 and "18000 tokens" in r.text
    assert engine.recorder.status().passes == 0  # refused before any work
    # At the limit exactly it passes (parsed only: generating it takes seconds); one more token does not.
    prompts, n, _ = engine.parse_request(json.dumps({"input_ids": [[1] * 4095] * 4, "max_new_tokens": 1}).encode())
    assert sum(len(p) + n for p in prompts) == MAX_REQUEST_TOKENS
    with pytest.raises(ControlError, match="16388 tokens"):
        engine.parse_request(json.dumps({"input_ids": [[1] * MAX_PROMPT_TOKENS] * 4, "max_new_tokens": 1}).encode())
    assert MAX_PROMPT_TOKENS + MAX_NEW_TOKENS <= MAX_REQUEST_TOKENS  # any one prompt the other limits allow fits


@pytest.mark.parametrize("model", ["tiny", "transformers"])
def test_generate_stops_at_the_next_token_once_cancelled(model, tmp_path):
    """The cancel event is checked between tokens (TinyMoE's loop, transformers' StoppingCriteria)
    and between prompts: set during the 3rd forward pass, the first prompt ends with 3 new tokens."""
    if model == "tiny":
        engine = ReferenceEngine.tiny()
    else:
        qwen3_moe_config(tmp_path)
        engine = ReferenceEngine.from_hf_config(str(tmp_path / "qwen3moe"))
    cancel = threading.Event()
    passes: list[int] = []

    def count(*_: object) -> None:  # a forward hook: the 3rd pass sets the event
        passes.append(1)
        if len(passes) == 3:
            cancel.set()

    hook = engine.model.register_forward_hook(count)
    try:
        assert engine.generate([[1, 2, 3], [4, 5]], 8, cancel) == [engine.generate([[1, 2, 3]], 3)[0]]
        assert len(passes) == 3 + 3 and engine.requests == 1  # the 3-token reference run is the one in full
        assert engine.generate([[1, 2, 3]], 8, cancel) == []  # set before it began: no pass at all
        assert len(passes) == 6
    finally:
        hook.remove()
        engine.attachment.detach()


def test_a_client_that_disconnects_frees_the_engine(served):
    """A long generation stops once its client goes away: the next request is served before the
    first could have run its passes (one request at a time: it would have waited for all of them)."""
    engine = ReferenceEngine.tiny()
    engine.recorder.start()
    server = served(engine)
    body = json.dumps(LONG).encode()
    sock = socket.create_connection((server.host, server.port))
    sock.sendall(
        b"POST /generate HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    wait_for(lambda: engine.recorder.status().passes > 0)  # under way
    sock.close()  # the client gives up (a Ctrl-C'd curl)
    with httpx.Client(base_url=server.url, timeout=120, trust_env=False) as http:
        r = http.post("/generate", json={"input_ids": [4, 5], "max_new_tokens": 2})
    assert r.status_code == 200 and len(r.json()["output_ids"]) == 2
    # The cut-short passes stay recorded (they ran), but far fewer than the whole generation's.
    assert 2 < engine.recorder.status().passes < LONG_PASSES
    assert engine.requests < len(LONG["input_ids"]) + 1  # the first's prompts were not all generated


def test_stopping_the_server_stops_a_generation_in_flight(served):
    engine = ReferenceEngine.tiny()
    engine.recorder.start()
    server = served(engine)
    post = lambda: httpx.post(  # noqa: E731
        server.url + "/generate", json=LONG, headers={"accept": "application/json"}, timeout=120, trust_env=False
    )
    client, answer = in_thread(post)
    wait_for(lambda: engine.recorder.status().passes > 0)
    server.stop(timeout=120)
    client.join(120)
    assert not server.thread.is_alive()
    r = answer[0]
    assert isinstance(r, httpx.Response), r
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    assert engine.recorder.status().passes < LONG_PASSES and not engine._lock.locked()


def test_sigterm_stops_a_generation_in_flight(tmp_path):
    """``moe-record serve`` (as the demo stops it): SIGTERM during a long generation answers it 503
    at once rather than after the whole generation, and the process ends."""
    cmd = [sys.executable, "-m", "moe_record_sdk", "serve", "--port", "0", "--dump-dir", str(tmp_path)]
    proc = subprocess.Popen(cmd + ["--threads", "1", "--start"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY), line
        url = line[len(READY) :].strip()
        post = lambda: httpx.post(  # noqa: E731
            url + "/generate", json=LONG, headers={"accept": "application/json"}, timeout=120, trust_env=False
        )
        client, answer = in_thread(post)
        passes = lambda: httpx.get(url + STATUS_PATH, trust_env=False).json()["ranks"][0]["passes"]  # noqa: E731
        wait_for(lambda: passes() > 0)
        proc.send_signal(signal.SIGTERM)
        client.join(120)
        r = answer[0]
        assert isinstance(r, httpx.Response), r
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_hf_config_without_transformers_is_named(tmp_path, monkeypatch, capsys):
    """--hf-config on an install without transformers (in no extra but [test]) was a traceback."""
    from moe_record_sdk.cli import main

    monkeypatch.setitem(sys.modules, "transformers", None)  # the one fault not producible here for real
    (tmp_path / "config.json").write_text("{}")
    assert main(["serve", "--hf-config", str(tmp_path), "--port", "0", "--dump-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--hf-config needs transformers: pip install transformers" in err and "Traceback" not in err
