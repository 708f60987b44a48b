"""Every endpoint and error path of the control app, over real uvicorn on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re

import pytest
import torch

from moe_record_sdk import Recorder, Topology
from moe_record_sdk.schema import decode, load_dump
from moe_record_sdk.server import (
    DUMP_PATH,
    DUMP_TEXT,
    START_PATH,
    START_TEXT,
    STATUS_PATH,
    STOP_PATH,
    STOP_TEXT,
    ControlHandler,
    LocalBackend,
)
from moe_record_sdk.server.protocol import DUMP_JSON, MEDIA_TYPES

from .helpers import E, K, L, feed, make_recorder

SGLANG_STAT = re.compile(r"^expert_distribution_recorder_\d+\.\d+\.pt$")
SGLANG_RANKED = re.compile(r"^expert_distribution_recorder_\d+\.\d+_(\d+)\.pt$")
JSON = {"accept": "application/json"}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_sglang_answers_and_file(serve, http, tmp_path, method):
    """Stock-SGLang behaviour: 200 + SGLang's exact lines, and SGLang's .pt file in the dump dir."""
    rec = make_recorder()
    server = serve(rec)
    r = http.request(method, server.url + START_PATH)
    assert (r.status_code, r.text) == (200, START_TEXT)
    assert r.headers["content-type"].startswith("text/plain")
    expected = feed(rec, seed=1)
    r = http.request(method, server.url + STOP_PATH)
    assert (r.status_code, r.text) == (200, STOP_TEXT)
    feed(rec, seed=2)  # stopped: not counted
    r = http.request(method, server.url + DUMP_PATH)
    assert (r.status_code, r.text) == (200, DUMP_TEXT)
    files = os.listdir(tmp_path / "dumps")
    assert len(files) == 1 and SGLANG_STAT.match(files[0]), files
    # SGLang's own reader path: torch.load(weights_only=True), its keys, int32 [B, L, E].
    obj = torch.load(tmp_path / "dumps" / files[0], weights_only=True, map_location="cpu")
    assert obj["rank"] == 0 and obj["logical_count"].dtype == torch.int32
    assert torch.equal(obj["logical_count"].sum(0).long(), expected)


def test_json_answers_identity_and_run_ids(serve, http):
    rec = make_recorder()
    server = serve(rec)
    a = http.post(server.url + START_PATH, headers=JSON).json()
    assert a["ok"] and a["action"] == "start" and a["recording"] is True and a["message"] == START_TEXT.strip()
    assert "mode" not in a  # none asked for: the engine's own, which status reports (not null)
    assert http.post(server.url + START_PATH + "?mode=stat", headers=JSON).json()["mode"] == "stat"
    assert a["run_id"].startswith(a["instance_id"]) and rec.recording
    b = http.post(server.url + START_PATH, headers=JSON).json()
    assert b["instance_id"] == a["instance_id"] and b["run_id"] != a["run_id"]
    r = http.post(server.url + STOP_PATH, headers=JSON)
    assert r.json()["recording"] is False and r.headers["x-moe-record-run"] == b["run_id"]
    st = http.get(server.url + STATUS_PATH).json()
    assert st["instance_id"] == a["instance_id"] and st["run_id"] == b["run_id"] and st["enabled"] and not st["auth"]
    assert st["ranks"] == [{**st["ranks"][0], "rank": 0, "recording": False, "mode": "stat"}]


def test_start_mode_from_query_and_body(serve, http):
    rec = make_recorder(buffer_size=4)
    server = serve(rec)
    assert http.post(server.url + START_PATH + "?mode=per_pass").status_code == 200
    assert http.get(server.url + STATUS_PATH).json()["ranks"][0]["mode"] == "per_pass"
    # null or empty in the body is "not given": the query's value stands (it used to be erased)
    for mode, body in (("stat", {"mode": None}), ("per_pass", {"mode": ""})):
        assert http.post(server.url + START_PATH + f"?mode={mode}", json=body).status_code == 200
        assert rec.mode == mode
    r = http.post(server.url + START_PATH, json={"mode": "per_token"})
    assert r.status_code == 200 and rec.mode == "per_token"
    feed(rec, seed=3, passes=2)
    r = http.post(server.url + DUMP_PATH, headers={"accept": "application/x-msgpack"})
    dump = decode(r.content, "msgpack")
    assert dump.mode == "per_token" and len(dump.records) == 2
    assert dump.records[0].topk_ids_of_layer.shape == (L, 5, K)


@pytest.mark.parametrize(
    "query, body, code",
    [
        ("?mode=fast", None, "unknown_mode"),
        ("", b'{"mode": "fast"}', "unknown_mode"),
        ("", b'{"mode": 3}', "bad_body"),
        ("", b"mode=stat", "bad_body"),
        ("", b'["stat"]', "bad_body"),
        ("?mdoe=stat", None, "unknown_option"),
        ("?mode=stat&mode=per_token", None, "bad_option"),
        ("", b'{"mode": "stat", "mode": "per_token"}', "bad_body"),
        ("?path=/etc/passwd", None, "unknown_option"),
    ],
)
def test_bad_start_requests_are_400(serve, http, query, body, code):
    rec = make_recorder()
    server = serve(rec)
    r = http.post(server.url + START_PATH + query, content=body, headers=JSON)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == code
    assert not rec.recording
    plain = http.post(server.url + START_PATH + query, content=body)
    assert plain.status_code == 400 and plain.headers["content-type"].startswith("text/plain") and plain.text.strip()


def test_dump_with_nothing_recorded_is_409(serve, http, tmp_path):
    server = serve(make_recorder())
    r = http.post(server.url + DUMP_PATH, headers=JSON)
    assert r.status_code == 409 and r.json()["error"]["code"] == "nothing_recorded"
    assert not (tmp_path / "dumps").exists()


def test_wrong_method_is_405_with_allow(serve, http):
    server = serve(make_recorder())
    for path in (START_PATH, STOP_PATH, DUMP_PATH, STATUS_PATH):
        for method in ("PUT", "DELETE", "PATCH"):
            r = http.request(method, server.url + path)
            assert r.status_code == 405 and r.headers["allow"] == "GET, POST", (method, path)


def test_oversized_body_is_413(serve, http):
    rec = make_recorder()
    server = serve(rec, max_body=1024)
    big = b'{"mode": "stat", "pad": "' + b"x" * 4096 + b'"}'
    assert http.post(server.url + START_PATH, content=big).status_code == 413
    # Streamed without a Content-Length: refused while reading, never buffered whole.
    r = http.post(server.url + START_PATH, content=iter([b"x" * 512] * 64))
    assert r.status_code == 413
    assert not rec.recording


def test_unknown_path_404_and_disabled_absent(serve, http):
    on = serve(make_recorder())
    assert http.get(on.url + "/nope").status_code == 404
    off = serve(make_recorder(), enabled=False)
    for path in (START_PATH, STOP_PATH, DUMP_PATH, STATUS_PATH):
        r = http.post(off.url + path)
        assert r.status_code == 404
        assert not any(k.startswith("x-moe-record") for k in r.headers)  # nothing tells it is there


def test_bearer_token(serve, http):
    rec = make_recorder()
    server = serve(rec, api_key="s3cret")
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "s3cret"},
        {"authorization": "Bearer s3cret2"},
        {"authorization": "Bearer S3CRET"},
        {"authorization": "Basic s3cret"},
        {"authorization": "Bearer s3 cret"},
    ):
        r = http.post(server.url + START_PATH, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
    assert not rec.recording
    r = http.post(server.url + START_PATH, headers={"authorization": "Bearer s3cret"})
    assert (r.status_code, r.text) == (200, START_TEXT) and rec.recording
    # Without the key, nothing tells which engine this is or that a run started.
    for headers in ({}, {"authorization": "Bearer wrong", "accept": "application/json"}):
        r = http.post(server.url + STATUS_PATH, headers=headers)
        assert r.status_code == 401 and not any(k.startswith("x-moe-record") for k in r.headers), r.headers
    r = http.get(server.url + "/nope")  # nor does probing paths (it did: a 404 named the instance)
    assert r.status_code == 404 and not any(k.startswith("x-moe-record") for k in r.headers), r.headers
    assert http.get(server.url + STATUS_PATH, headers={"authorization": "Bearer s3cret"}).json()["auth"] is True
    # The scheme is case-insensitive (RFC 7235); the token is not. One or more spaces part them
    # (RFC 7235's 1*SP).
    for value in ("bearer s3cret", "Bearer  s3cret"):
        assert http.get(server.url + STATUS_PATH, headers={"authorization": value}).status_code == 200, value


def test_a_non_ascii_key_matches_when_sent_as_utf8(serve, http):
    """An engine given a non-ASCII key (vLLM's --api-key takes any text) could never be
    matched: the header's bytes were read as latin-1 and compared with the key's UTF-8."""
    server = serve(make_recorder(), api_key="clé")
    sent = {"authorization": "Bearer clé".encode()}
    assert http.post(server.url + START_PATH, headers=sent).status_code == 200
    assert http.post(server.url + START_PATH, headers={"authorization": b"Bearer cl\xe9"}).status_code == 401


def test_browsers_cross_site_requests_are_refused(serve, http):
    """The endpoints take GET and change state: a web page's <img src=.../start...> made a
    browser discard the recorded window. Browsers say where a request comes from; programs
    (curl, httpx, SGLang's clients, the Fleet) send none of it and pass."""
    rec = make_recorder()
    server = serve(rec)
    rec.start()
    feed(rec, seed=1)
    host = server.url.partition("://")[2]
    for headers in (
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
        {"origin": "http://evil.example"},
        {"origin": "null"},
    ):
        r = http.get(server.url + START_PATH, headers={**headers, "accept": "application/json"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_site", headers
    assert rec.status().passes == 3  # the window is still there
    for headers in ({}, {"origin": f"http://{host}", "sec-fetch-site": "same-origin"}, {"sec-fetch-site": "none"}):
        assert http.get(server.url + STATUS_PATH, headers=headers).status_code == 200, headers


def test_a_loopback_only_server_answers_only_to_loopback_hosts(serve, http):
    """DNS rebinding: a page at evil.example, its name then pointed at 127.0.0.1, reaches a
    loopback server as same-origin; only its Host header tells. Served with local_only (as
    `moe-record serve` does on a loopback address), such a Host is refused."""
    server = serve(make_recorder(), local_only=True)
    port = server.url.rpartition(":")[2]
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        r = http.get(server.url + STATUS_PATH, headers={"host": host, "accept": "application/json"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "bad_host", host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.2", "localhost"):
        assert http.get(server.url + STATUS_PATH, headers={"host": host}).status_code == 200, host


def test_a_request_body_nested_too_deep_is_400(serve, http):
    server = serve(make_recorder())
    deep = b"[" * 60_000  # under the body limit (64 KiB), past json's recursion limit
    r = http.post(server.url + START_PATH, content=deep, headers={"accept": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_body"


@pytest.mark.parametrize("fmt", ["msgpack", "json", "pt"])
def test_dump_bytes_equal_in_process_counts(serve, http, tmp_path, fmt):
    rec = make_recorder()
    server = serve(rec)
    http.post(server.url + START_PATH)
    expected = feed(rec, seed=4)
    r = http.post(server.url + DUMP_PATH + f"?return=bytes&format={fmt}")
    assert r.status_code == 200 and r.headers["x-moe-record-format"] == fmt
    dump = decode(r.content, fmt)
    assert torch.equal(dump.total_count(), expected)
    assert dump.window.num_passes == 3
    assert not (tmp_path / "dumps").exists()  # return=bytes: no file


def test_dump_return_both_writes_the_file_too(serve, http, tmp_path):
    rec = make_recorder()
    server = serve(rec)
    http.post(server.url + START_PATH)
    expected = feed(rec, seed=5)
    r = http.post(server.url + DUMP_PATH, params={"return": "both"}, headers={"accept": "application/x-msgpack"})
    files = json.loads(r.headers["x-moe-record-files"])
    assert len(files) == 1 and os.path.dirname(files[0]) == str(tmp_path / "dumps")
    assert torch.equal(load_dump(files[0]).total_count(), expected)
    assert torch.equal(decode(r.content).total_count(), expected)


@pytest.mark.parametrize("query", ["?return=all", "?format=csv", "?return=bytes&format=npz", "?format=json&format=pt"])
def test_bad_dump_options_are_400(serve, http, query):
    rec = make_recorder()
    server = serve(rec)
    http.post(server.url + START_PATH)
    feed(rec, seed=6)
    r = http.post(server.url + DUMP_PATH + query, headers=JSON)
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_option"
    assert rec.status().passes == 3  # nothing was dumped (a dump clears)


def test_dump_json_answer_lists_files_in_dump_dir(serve, http, tmp_path):
    rec = make_recorder()
    server = serve(rec)
    http.post(server.url + START_PATH)
    feed(rec, seed=7)
    doc = http.post(server.url + DUMP_PATH, headers=JSON).json()
    assert doc["dump_dir"] == str(tmp_path / "dumps") and doc["num_passes"] == 3 and doc["mode"] == "stat"
    assert [os.path.basename(f) for f in doc["files"]] == os.listdir(tmp_path / "dumps")


def test_one_ranks_stat_file_is_named_by_its_rank(serve, http, tmp_path):
    """A side server holds one rank of a larger world: its stat file is not SGLang's global one."""
    rec = make_recorder(1, 2)
    server = serve(rec)
    http.post(server.url + START_PATH)
    feed(rec, seed=8)
    doc = http.post(server.url + DUMP_PATH, headers=JSON).json()
    assert [os.path.basename(f).endswith("_1.pt") for f in doc["files"]] == [True]


def test_two_ranks_merged_in_bytes_and_one_file_per_rank(serve, http, tmp_path):
    r0, r1 = make_recorder(0, 2, buffer_size=8), make_recorder(1, 2, buffer_size=8)
    server = serve(r0, r1)
    http.post(server.url + START_PATH + "?mode=per_pass")
    e0, e1 = feed(r0, seed=8, passes=2), feed(r1, seed=9, passes=3)
    r = http.post(server.url + DUMP_PATH + "?return=both")
    assert r.headers["x-moe-record-ranks"] == "2"
    merged = decode(r.content)
    assert torch.equal(merged.total_count(), e0 + e1) and merged.topology.world_size == 1
    names = sorted(os.listdir(tmp_path / "dumps"))
    assert sorted(int(SGLANG_RANKED.match(n).group(1)) for n in names) == [0, 1]  # SGLang: a file per rank
    # stat: one file, the merge (as SGLang's rank 0 writes the all-reduced counts)
    http.post(server.url + START_PATH + "?mode=stat")
    feed(r0, seed=10)
    feed(r1, seed=11)
    http.post(server.url + DUMP_PATH)
    stat_files = [n for n in os.listdir(tmp_path / "dumps") if SGLANG_STAT.match(n)]
    assert len(stat_files) == 1


def test_failed_write_keeps_the_recording_for_a_retry(serve, http, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the dump directory should be")
    rec = make_recorder()
    server = serve(rec, dump_dir=str(blocker / "dumps"))
    http.post(server.url + START_PATH)
    expected = feed(rec, seed=12)
    r = http.post(server.url + DUMP_PATH, headers=JSON)
    assert r.status_code == 500 and r.json()["error"]["code"] == "dump_write_failed"
    assert "kept" in r.json()["error"]["message"]
    blocker.unlink()
    feed(rec, seed=13)  # the next window: stays for the dump after
    assert http.post(server.url + DUMP_PATH).status_code == 200
    (path,) = [os.path.join(blocker, "dumps", n) for n in os.listdir(blocker / "dumps")]
    assert torch.equal(load_dump(path).total_count(), expected)


def test_handler_without_any_server(tmp_path):
    """The handler alone, as a FastAPI (vLLM) route would call it."""
    rec = make_recorder()
    handler = ControlHandler(LocalBackend(rec), dump_dir=str(tmp_path))

    async def go():
        a = await handler.handle("POST", START_PATH, "mode=stat", [(b"accept", b"application/json")], b"")
        feed(rec, seed=14)
        b = await handler.handle("GET", DUMP_PATH, {"return": "bytes"}, {}, b"")
        c = await handler.handle("POST", "/elsewhere", None, None)
        return a, b, c

    a, b, c = asyncio.run(go())
    assert a.status == 200 and a.json()["run_id"]
    assert b.status == 200 and decode(b.body).total_count().sum() == 3 * L * 5 * K
    assert c.status == 404


def test_errors_are_json_for_either_msgpack_type_and_the_dump_json_type(serve, http):
    server = serve(make_recorder())
    for accept in ("application/x-msgpack", "application/msgpack", DUMP_JSON):
        r = http.get(server.url + START_PATH + "?mode=fast", headers={"accept": accept})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_mode"


@pytest.mark.parametrize(
    "accept, fmt",
    [(DUMP_JSON, "json"), (f"{DUMP_JSON}, application/x-msgpack;q=0.1", "msgpack"), ("application/json", None)],
)
def test_a_dump_comes_in_the_format_accept_names(serve, http, accept, fmt):
    rec = make_recorder()
    server = serve(rec)
    http.post(server.url + START_PATH)
    expected = feed(rec, seed=9)
    r = http.post(server.url + DUMP_PATH, headers={"accept": accept})
    assert r.status_code == 200
    if fmt is None:  # a JSON answer about the files written on the engine's disk
        assert r.json()["files"]
        return
    assert r.headers["x-moe-record-format"] == fmt and r.headers["content-type"] == MEDIA_TYPES[fmt]
    assert torch.equal(decode(r.content, fmt).total_count(), expected)


@pytest.mark.parametrize(
    "accept, kind",
    [
        ("*/*", "text"),  # curl's default: SGLang's line
        ("application/*", "text"),
        ("application/json;q=0, text/plain", "text"),
        ("application/json; q=0.5, */*;q=0.1", "json"),
        ("text/html, Application/JSON", "json"),
        ("application/json;q=oops", "text"),
        ("application/json;q=1.5", "text"),  # RFC 9110: 0 to 1, three decimals at most
        ("application/json;q=1e0", "text"),
        ("application/json;q=0.001", "json"),
        ("application/msgpack;q=0", "text"),
    ],
)
def test_accept_names_types_with_their_weights(serve, http, accept, kind):
    server = serve(make_recorder())
    r = http.post(server.url + START_PATH, headers={"accept": accept})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json" if kind == "json" else "text/plain")


def test_a_start_clears_a_window_kept_after_a_failed_write(serve, http, tmp_path):
    """A start after a failed write begins a new run: the next dump is that run's window, under
    that run's id, not the kept one relabelled with it."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the dump directory should be")
    rec = make_recorder()
    server = serve(rec, dump_dir=str(blocker / "dumps"))
    http.post(server.url + START_PATH)
    feed(rec, seed=12, passes=5)
    assert http.post(server.url + DUMP_PATH, headers=JSON).status_code == 500  # kept
    run = http.post(server.url + START_PATH, headers=JSON).json()["run_id"]
    expected = feed(rec, seed=13, passes=2)
    r = http.post(server.url + DUMP_PATH + "?return=bytes")
    dump = decode(r.content)
    assert dump.window.num_passes == 2 and torch.equal(dump.total_count(), expected)
    assert r.headers["x-moe-record-run"] == run


class _CountsPastInt32(LocalBackend):
    """A count past int32 (2**31 ids in one layer would take minutes to record for real)."""

    async def dump(self):
        dumps = await super().dump()
        for d in dumps:
            d.logical_count = d.logical_count.to(torch.int64)
            d.logical_count[..., 0] += 2**31
        return dumps


@pytest.mark.parametrize("how", ["?return=file", "?return=bytes&format=pt"])
def test_a_count_past_int32_goes_into_pt_as_int64(how, tmp_path, http):
    """SGLang's .pt holds int32 counts; a window with a count past int32 (a long one, a hot
    expert) is written with int64 counts, which SGLang's readers and EPLB take too. Before, the
    dump failed (a 500, the window kept), so a .pt of that window could never be had."""
    from moe_record_sdk.server import ServerThread, make_app

    rec = make_recorder()
    server = ServerThread(make_app(_CountsPastInt32(rec), dump_dir=str(tmp_path / "dumps"))).start()
    try:
        http.post(server.url + START_PATH)
        expected = feed(rec, seed=14)
        expected[:, 0] += 2**31
        r = http.post(server.url + DUMP_PATH + how, headers=JSON if how == "?return=file" else {})
        assert r.status_code == 200, r.text
        if how == "?return=file":
            (path,) = r.json()["files"]
            raw = torch.load(path, weights_only=True)
        else:
            raw = torch.load(io.BytesIO(r.content), weights_only=True)
        assert raw["logical_count"].dtype == torch.int64
        assert torch.equal(raw["logical_count"].sum(0), expected)
    finally:
        server.stop()


def test_ranks_that_do_not_merge_are_written_one_file_each(serve, http, tmp_path):
    """Ranks that disagree on the model (an engine's fault): their windows are taken when the
    merge finds out, so each is written as a file of its own and the 500 names them; nothing
    recorded is lost."""
    topo = Topology(rank=1, world_size=2, dp_rank=1, dp_size=2, token_shard=1, num_token_shards=2)
    r0, r1 = make_recorder(0, 2), Recorder(num_layers=L, num_experts=2 * E, top_k=K, topology=topo)
    server = serve(r0, r1)
    http.post(server.url + START_PATH)
    e0, e1 = feed(r0, seed=15), feed(r1, seed=16)
    r = http.post(server.url + DUMP_PATH + "?return=bytes", headers=JSON)
    assert r.status_code == 500 and r.json()["error"]["code"] == "dump_merge_failed", r.text
    files = sorted(os.listdir(tmp_path / "dumps"))
    assert len(files) == 2 and all(f.endswith(".msgpack") and f in r.json()["error"]["message"] for f in files)
    got = sorted((load_dump(str(tmp_path / "dumps" / f)) for f in files), key=lambda d: d.topology.rank)
    assert torch.equal(got[0].total_count(), e0) and torch.equal(got[1].total_count(), e1)


@pytest.mark.parametrize("query", ["?return=&format=", "?format=", "?return="])
def test_empty_dump_options_are_as_if_not_given(serve, http, query):
    rec = make_recorder()
    server = serve(rec)
    http.post(server.url + START_PATH)
    feed(rec, seed=17)
    r = http.post(server.url + DUMP_PATH + query)
    assert r.status_code == 200 and r.text == DUMP_TEXT  # SGLang's answer: the file written


def test_a_text_error_is_one_line_whatever_the_client_sent(serve, http):
    """Names the client sent are echoed in errors; a newline in them (%0A) must not break the
    one-line text answer."""
    server = serve(make_recorder())
    for url in (server.url + START_PATH + "?a%0Ab=1", server.url + "/a%0Ab"):
        r = http.post(url)
        assert r.status_code in (400, 404) and r.text.count("\n") == 1 and r.text.endswith("\n"), r.text


def test_an_undelivered_window_of_an_older_run_is_not_kept(tmp_path):
    """A start clears a kept window: one handed back after a newer start (its answer was still
    being encoded) is dropped, not delivered as the new run's first window."""
    rec = make_recorder()
    handler = ControlHandler(LocalBackend(rec), dump_dir=str(tmp_path))

    async def go():
        await handler.handle("POST", START_PATH, "", {}, b"")
        feed(rec, seed=15)
        old = await handler.handle("POST", DUMP_PATH, "return=bytes", {}, b"")
        await handler.handle("POST", START_PATH, "", {}, b"")  # another client's start meanwhile
        new = feed(rec, seed=16)
        old.undelivered()  # the old answer's client turned out to be gone
        return new, await handler.handle("POST", DUMP_PATH, "return=bytes", {}, b"")

    new, again = asyncio.run(go())
    assert again.headers["x-moe-record-window"] == "1" and torch.equal(decode(again.body).total_count(), new)


def test_a_dump_over_the_clients_limit_is_413_and_kept(serve, http):
    """x-moe-record-max-bytes: an answer the client would hang up on is not sent; the window stays."""
    rec = make_recorder()
    url = serve(rec).url
    http.post(url + START_PATH)
    expected = feed(rec, seed=17)
    small = http.post(url + DUMP_PATH + "?return=bytes", headers={"x-moe-record-max-bytes": "100", **JSON})
    assert small.status_code == 413 and small.json()["error"]["code"] == "too_large"
    assert "over the 100 this client takes" in small.json()["error"]["message"]
    whole = http.post(url + DUMP_PATH + "?return=bytes")
    assert whole.headers["x-moe-record-window"] == "1" and torch.equal(decode(whole.content).total_count(), expected)


def test_a_dump_over_the_limit_written_as_files_too_is_not_delivered_twice(serve, http, tmp_path):
    """return=both: the file holds the window; kept as well, the next dump would deliver it again."""
    rec = make_recorder()
    url = serve(rec).url
    http.post(url + START_PATH)
    feed(rec, seed=18)
    small = http.post(url + DUMP_PATH + "?return=both", headers={"x-moe-record-max-bytes": "100", **JSON})
    assert small.status_code == 413 and "the dump is in " + str(tmp_path / "dumps") in small.json()["error"]["message"]
    (file,) = json.loads(small.headers["x-moe-record-files"])  # as a dump's answer names them
    assert os.path.dirname(file) == str(tmp_path / "dumps")
    after = http.post(url + DUMP_PATH + "?return=bytes")
    assert after.headers["x-moe-record-window"] == "2" and decode(after.content).total_count().sum() == 0


def test_a_malformed_size_limit_is_refused_before_the_window_is_taken(serve, http):
    rec = make_recorder()
    url = serve(rec).url
    http.post(url + START_PATH)
    expected = feed(rec, seed=19)
    for bad in ("9" * 5000, "1e9", "-1"):
        answer = http.post(url + DUMP_PATH + "?return=bytes", headers={"x-moe-record-max-bytes": bad, **JSON})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "bad_header"
    whole = http.post(url + DUMP_PATH + "?return=bytes")
    assert whole.headers["x-moe-record-window"] == "1" and torch.equal(decode(whole.content).total_count(), expected)


def test_answers_name_the_client_whose_stop_ended_the_run(serve, http):
    """x-moe-record-client on a stop: the run's first stop is remembered, and every answer names
    it (JSON stopped_by, the x-moe-record-stopped-by header), a dump's the one its window had."""
    rec = make_recorder()
    url = serve(rec, api_key="k").url
    auth = {"authorization": "Bearer k", **JSON}
    http.post(url + START_PATH, headers=auth)
    assert http.get(url + STATUS_PATH, headers=auth).json()["stopped_by"] is None
    bad = http.post(url + STOP_PATH, headers={"x-moe-record-client": "a b", **auth})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_header" and rec.recording
    first = http.post(url + STOP_PATH, headers={"x-moe-record-client": "fleet-1", **auth})
    assert first.json()["stopped_by"] == "fleet-1" and not first.json()["already_stopped"]
    again = http.post(url + STOP_PATH, headers={"x-moe-record-client": "other", **auth})
    assert again.json()["already_stopped"] and again.json()["stopped_by"] == "fleet-1"
    dump = http.post(url + DUMP_PATH + "?return=bytes", headers={"authorization": "Bearer k"})
    assert dump.headers["x-moe-record-stopped-by"] == "fleet-1"
    assert "x-moe-record-stopped-by" not in http.get(url + STATUS_PATH).headers  # 401: nothing of the run
    http.post(url + START_PATH, headers=auth)
    status = http.get(url + STATUS_PATH, headers=auth)
    assert status.json()["stopped_by"] is None and "x-moe-record-stopped-by" not in status.headers
    anonymous = http.post(url + STOP_PATH, headers=auth)  # SGLang's clients name none
    assert anonymous.json()["stopped_by"] == "*" and anonymous.headers["x-moe-record-stopped-by"] == "*"


def test_a_window_is_sent_again_only_to_the_client_it_was_answered_to(serve, http):
    """x-moe-record-resend: the last window answered is kept until the next take or start, and
    sent again to its own client; anyone else's dump takes the next window as before."""
    rec = make_recorder()
    url = serve(rec).url
    a, b = {"x-moe-record-client": "a"}, {"x-moe-record-client": "b"}

    def dump(headers: dict[str, str]) -> tuple[str, torch.Tensor]:
        r = http.post(url + DUMP_PATH + "?return=bytes", headers=headers)
        assert r.status_code == 200, r.text
        return r.headers["x-moe-record-window"], decode(r.content).total_count()

    http.post(url + START_PATH)
    first = feed(rec, seed=40)
    assert dump(a)[0] == "1"
    again = dump({**a, "x-moe-record-resend": "1"})
    assert again[0] == "1" and torch.equal(again[1], first)
    bad = http.post(url + DUMP_PATH, headers={**a, **JSON, "x-moe-record-resend": "one"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_header"
    second = feed(rec, seed=41)
    theirs = dump({**b, "x-moe-record-resend": "1"})  # not b's window: the next one is taken
    assert theirs[0] == "2" and torch.equal(theirs[1], second)
    window, counts = dump({**a, "x-moe-record-resend": "1"})  # no longer held: a new take
    assert window == "3" and counts.sum() == 0
    http.post(url + START_PATH)
    feed(rec, seed=42)
    window, _ = dump({**a, "x-moe-record-resend": "3"})  # a start let it go
    assert window == "1"


def test_a_kept_window_answered_to_another_client_is_not_sent_again_to_the_first(serve, http):
    """A's dump over its limit: the engine keeps the window and gives it to B's dump (as the CLI
    advises); A asking for it again then gets the next window, not B's a second time."""
    rec = make_recorder()
    url = serve(rec).url
    a, b = {"x-moe-record-client": "a"}, {"x-moe-record-client": "b"}
    http.post(url + START_PATH)
    feed(rec, seed=43)
    small = http.post(url + DUMP_PATH + "?return=bytes", headers={**a, "x-moe-record-max-bytes": "100"})
    assert small.status_code == 413
    theirs = http.post(url + DUMP_PATH + "?return=bytes", headers=b)
    assert theirs.headers["x-moe-record-window"] == "1" and "x-moe-record-resent" not in theirs.headers
    again = http.post(url + DUMP_PATH + "?return=bytes", headers={**a, "x-moe-record-resend": "1"})
    assert again.headers["x-moe-record-window"] == "2" and decode(again.content).total_count().sum() == 0
    mine = http.post(url + DUMP_PATH + "?return=bytes", headers={**a, "x-moe-record-resend": "2"})
    assert mine.headers["x-moe-record-window"] == "2" and mine.headers["x-moe-record-resent"] == "true"


def test_a_malformed_client_id_is_refused_before_a_start(serve, http):
    rec = make_recorder()
    url = serve(rec).url
    r = http.post(url + START_PATH, headers={"x-moe-record-client": "x" * 129, **JSON})
    assert r.status_code == 400 and "got 129 characters" in r.json()["error"]["message"] and not rec.recording


def test_nothing_is_kept_for_a_client_that_could_not_ask_for_it_again(tmp_path):
    """A dump without a client id (curl, SGLang's clients): no copy stays in the engine's memory."""
    rec = make_recorder()
    handler = ControlHandler(LocalBackend(rec), dump_dir=str(tmp_path))

    async def go(headers):
        await handler.handle("POST", START_PATH, None, None)
        feed(rec, seed=44)
        return await handler.handle("POST", DUMP_PATH, "return=bytes", headers)

    assert asyncio.run(go({})).status == 200 and handler.controller._sent is None
    assert asyncio.run(go({"x-moe-record-client": "a"})).status == 200 and handler.controller._sent is not None


def test_resent_marks_a_window_its_own_client_asked_for_again(serve, http):
    """x-moe-record-resent says this request got its own window again: a kept window counts when
    its client asks for it, and not when it goes to another client's dump."""
    rec = make_recorder()
    url = serve(rec).url
    a, b = {"x-moe-record-client": "a"}, {"x-moe-record-client": "b"}
    small = {"x-moe-record-max-bytes": "100"}

    def dump(*headers: dict[str, str]):
        return http.post(url + DUMP_PATH + "?return=bytes", headers={k: v for h in headers for k, v in h.items()})

    http.post(url + START_PATH)
    feed(rec, seed=45)
    assert dump(a).headers["x-moe-record-window"] == "1"
    assert dump(a, {"x-moe-record-resend": "1"}, small).status_code == 413  # sent again, then kept
    theirs = dump(b)
    assert theirs.headers["x-moe-record-window"] == "1" and "x-moe-record-resent" not in theirs.headers
    feed(rec, seed=46)
    assert dump(a, small).status_code == 413  # window 2, kept for the next dump
    mine = dump(a, {"x-moe-record-resend": "2"})
    assert mine.headers["x-moe-record-window"] == "2" and mine.headers["x-moe-record-resent"] == "true"
