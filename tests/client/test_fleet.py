"""The Fleet over real local servers: ours, stock-SGLang-like, down, slow, flaky, restarted."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import httpx
import pytest
import torch

from moe_record_sdk import AsyncFleet, EngineError, Fleet, Recorder
from moe_record_sdk.client import IN_RESPONSE, ON_SERVER, normalize_engine
from moe_record_sdk.schema import load_dump, validate_dump
from moe_record_sdk.server import LocalBackend, make_app

from ..server.helpers import feed, make_recorder


def test_fleet_of_five_healthy_saved_failures_reported(engines, tmp_path):
    """Two of ours, a stock SGLang, one down, one slow past the timeout."""
    rec_a, a = engines.ours()
    rec_b, b = engines.ours()
    rec_s, s, sglang_dir = engines.sglang()
    rec_slow, slow = engines.slow(delay=2.5)
    down = engines.down()
    urls = [a.url, b.url, s.url, down, slow.url]
    with Fleet(urls, timeout=1.0, retries=2, backoff=0.01) as fleet:
        started = fleet.start()
        assert [r.ok for r in started] == [True, True, True, False, True]
        assert started[down].error_kind == "connect" and started[down].attempts == 3  # refused: safe to retry
        assert started[s.url].flavor == "sglang" and started[a.url].flavor == "moe-record"
        assert started[a.url].run_id and started[a.url].instance_id
        expected = {
            u: feed(r, seed=i)
            for i, (u, r) in enumerate([(a.url, rec_a), (b.url, rec_b), (s.url, rec_s), (slow.url, rec_slow)])
        }
        assert fleet.stop().ok is False  # the dead engine
        t0 = time.monotonic()
        result = fleet.dump()
        took = time.monotonic() - t0

    assert took < 2.5, "the slow engine must cost the others nothing"
    ok = {r.engine for r in result if r.ok}
    assert ok == {a.url, b.url, s.url}
    assert result[down].error_kind == "not_started"  # its start failed: not even asked
    assert result[slow.url].error_kind == "timeout" and result[slow.url].attempts == 1  # a dump is never re-sent
    # Ours: the dump came back, exact.
    for u in (a.url, b.url):
        assert result[u].location == IN_RESPONSE and torch.equal(result[u].dump.total_count(), expected[u])
    # Stock SGLang: plain text; its dump is on its own disk, and the result says so.
    assert result[s.url].location == ON_SERVER and result[s.url].dump is None and "SGLANG_EXPERT" in result[s.url].note
    (name,) = os.listdir(sglang_dir)
    assert torch.equal(load_dump(os.path.join(sglang_dir, name)).total_count(), expected[s.url])
    # The merge holds exactly the collected engines, once each.
    assert torch.equal(result.merged.total_count(), expected[a.url] + expected[b.url])
    assert result.merge_error is None and not result.ok
    # Printed, one line an engine and the merge; repr leaves the tensors out.
    text = str(result).splitlines()
    assert text[0].startswith("dump: 3 of 5 engines ok") and len(text) == 7
    assert "FAILED (timeout)" in text[5] and text[6].startswith("  merged: 2 dumps, stat")
    assert "tensor(" not in repr(result) and len(repr(result)) < 8000
    saved = result.save(str(tmp_path / "out"))
    assert set(saved) == {a.url, b.url, "merged"}
    for path in saved.values():
        assert validate_dump(load_dump(path)) == []
    with pytest.raises(EngineError, match=r"dump failed on 2 of 5 engines.*timeout.*") as e:
        result.raise_for_errors()
    assert down in str(e.value) and slow.url in str(e.value)


def test_restart_between_start_and_dump_is_detected(engines):
    rec, server = engines.ours()
    with Fleet([server.url]) as fleet:
        assert fleet.start().ok
        feed(rec, seed=1)
        server.stop()
        # A new process on the same port: a new instance, which recorded something of its own.
        rec2, server2 = engines.ours(port=server.port)
        rec2.start()
        feed(rec2, seed=2)
        result = fleet.dump()
    (r,) = result.results
    assert not r.ok and r.error_kind == "restarted" and "lost" in r.error
    assert r.dump is not None and result.merged is None  # kept for inspection, never merged
    assert server2.url == server.url
    # Restarted and never started there: its "nothing recorded" is reported as the restart it is.
    with Fleet([server2.url]) as fleet:
        assert fleet.start().ok
        server2.stop()
        engines.ours(port=server.port)
        (r,) = fleet.dump().results
    assert r.status_code == 409 and r.error_kind == "restarted" and "lost" in r.error


def test_another_start_in_between_is_reported(engines, http_client, tmp_path):
    rec, server = engines.ours()
    with Fleet([server.url]) as fleet:
        fleet.start()
        feed(rec, seed=3)
        http_client.post(server.url + "/start_expert_distribution_record")  # someone else restarts the window
        since = feed(rec, seed=4)
        result = fleet.dump()
    assert result[0].error_kind == "run_changed" and result.merged is None
    # The engine gave that window away with the dump: saved apart, never merged, not lost.
    saved = result.save(str(tmp_path))
    assert os.path.basename(saved[server.url]).startswith("partial-0-")
    assert torch.equal(load_dump(saved[server.url]).total_count(), since)


def test_another_dump_in_between_is_reported(engines, http_client, tmp_path):
    """Another client's dump takes the first part of this fleet's window: the rest is partial."""
    rec, server = engines.ours()
    with Fleet([server.url]) as fleet:
        assert fleet.start()[0].window == 1
        feed(rec, seed=5)
        theirs = http_client.post(server.url + "/dump_expert_distribution_record?return=bytes")
        assert theirs.status_code == 200 and theirs.headers["x-moe-record-window"] == "1"
        since = feed(rec, seed=6)
        result = fleet.dump()
    (r,) = result.results
    assert r.error_kind == "window_taken" and "window 1 -> 2" in r.error and result.merged is None
    saved = result.save(str(tmp_path))
    assert os.path.basename(saved[server.url]).startswith("partial-0-")
    assert torch.equal(load_dump(saved[server.url]).total_count(), since)


def test_fleet_dumping_its_run_twice_is_whole_each_time(engines):
    """This fleet's own dumps advance the window it expects: no false alarm."""
    rec, server = engines.ours()
    with Fleet([server.url]) as fleet:
        fleet.start()
        first = feed(rec, seed=7)
        one = fleet.dump()
        second = feed(rec, seed=8)
        fleet.stop()
        two = fleet.dump()
    assert one.ok and two.ok and (one[0].window, two[0].window) == (1, 2)
    assert torch.equal(one.merged.total_count(), first) and torch.equal(two.merged.total_count(), second)


def test_another_stop_in_between_is_reported(engines, http_client):
    """Another client's stop ends this fleet's window early: the dump says so, once the fleet's
    own stop finds the recording already stopped; a second stop of its own is no news."""
    rec, server = engines.ours()
    with Fleet([server.url]) as fleet:
        fleet.start()
        before = feed(rec, seed=9)
        http_client.post(server.url + "/stop_expert_distribution_record")
        stopped = fleet.stop()
        assert stopped.ok and "another client stopped" in stopped[0].note
        result = fleet.dump()
    (r,) = result.results
    assert r.error_kind == "stopped_early" and "partial" in r.error and result.merged is None
    assert torch.equal(r.dump.total_count(), before)
    with Fleet([server.url]) as fleet:
        fleet.start()
        feed(rec, seed=10)
        assert fleet.stop()[0].note is None and fleet.stop()[0].note is None
        assert fleet.dump().ok


def test_another_stop_is_reported_when_this_fleet_dumps_without_stopping(engines, http_client):
    """No stop of this fleet's to find the run stopped: the dump's answer names who stopped it."""
    rec, server = engines.ours()
    with Fleet([server.url]) as fleet:
        fleet.start()
        before = feed(rec, seed=22)
        http_client.post(server.url + "/stop_expert_distribution_record")
        (polled,) = fleet.status().results
        assert fleet._fleet.cut_into(polled) == "another client stopped the run: its dump will be partial"
        result = fleet.dump()
    (r,) = result.results
    assert r.error_kind == "stopped_early" and "another client stopped" in r.error and result.merged is None
    assert torch.equal(r.dump.total_count(), before)


def test_another_stop_is_reported_when_this_fleets_stop_was_retried(engines, http_client):
    """This fleet's stop answered 503 and retried finds the run stopped: by another client (it
    used to be taken for the fleet's own first attempt), or by the fleet's own, which is no news."""
    rec, server, flaky = engines.flaky("/stop_expert_distribution_record", n=1)
    with Fleet([server.url], retries=2, backoff=0.01) as fleet:
        fleet.start()
        feed(rec, seed=23)
        flaky.app, inner = _StopFirst(flaky.app), flaky.app  # another client's stop lands before the retry
        (stopped,) = fleet.stop().results
        flaky.app = inner
        assert stopped.ok and stopped.attempts == 2 and "another client stopped" in stopped.note
        assert fleet.dump()[0].error_kind == "stopped_early"
    flaky.left = 1
    with Fleet([server.url], retries=2, backoff=0.01) as fleet:
        fleet.start()
        expected = feed(rec, seed=24)
        (stopped,) = fleet.stop().results
        assert stopped.ok and stopped.attempts == 2 and stopped.note is None
        result = fleet.dump()
    assert result.ok and torch.equal(result.merged.total_count(), expected)


def test_a_client_id_given_in_headers_is_the_fleets_own(engines):
    """headers={"X-MoE-Record-Client": ...} names the fleet: its own stop is no other client's."""
    rec, server = engines.ours()
    with Fleet([server.url], headers={"X-MoE-Record-Client": "planner-7"}) as fleet:
        assert fleet.client_id == "planner-7"
        fleet.start()
        expected = feed(rec, seed=29)
        (stopped,) = fleet.stop().results
        assert stopped.stopped_by == "planner-7" and stopped.note is None
        result = fleet.dump()
    assert result.ok and torch.equal(result.merged.total_count(), expected)


class _StopFirst:
    """Another client's stop, sent to the app just before the request it wraps."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self.app(scope | {"headers": [(b"accept", b"application/json")]}, _no_body, _drop)
        await self.app(scope, receive, send)


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}


async def _drop(message) -> None:
    pass


@pytest.mark.parametrize("another_stop_first", [False, True])
def test_a_stop_sent_again_after_one_cut_short(engines, http_client, another_stop_first):
    """This fleet's stop, cancelled after it reached the engine, then sent again: the second finds
    the run stopped by the first, which is not news (it used to fail the dump as stopped_early);
    where another client had stopped the run first, it says so (it used to be taken for this
    fleet's first)."""

    class SlowStop(LocalBackend):
        async def stop(self):
            await super().stop()
            await asyncio.sleep(0.5)

    rec = make_recorder()
    server = engines._serve(make_app(SlowStop(rec), dump_dir=engines.dir()))
    fleet = AsyncFleet([server.url])

    async def go():
        await fleet.start()
        expected = feed(rec, seed=14)
        if another_stop_first:
            await asyncio.to_thread(http_client.post, server.url + "/stop_expert_distribution_record")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fleet.stop(), 0.2)  # a Ctrl-C, say
        again = await fleet.stop()
        result = await fleet.dump()
        await fleet.aclose()
        return expected, again, result

    expected, again, result = asyncio.run(go())
    if another_stop_first:
        assert again.ok and "another client stopped" in again[0].note
        assert result[0].error_kind == "stopped_early"
    else:
        assert again.ok and again[0].note is None
        assert result.ok and torch.equal(result.merged.total_count(), expected)


def test_a_dump_answer_cut_on_the_way_is_sent_again_not_lost(engines):
    """The engine sent the whole answer, which never arrived whole (a dropped connection): the
    fleet asks for the same window again, and gets it, instead of losing it (a dump was never
    retried: a second one took the next, empty window)."""
    rec, server, cut = engines.cut("/dump_expert_distribution_record", n=1)
    with Fleet([server.url], retries=1, backoff=0.01) as fleet:
        fleet.start()
        expected = feed(rec, seed=26)
        result = fleet.dump()
        assert cut.left == 0 and result.ok and result[0].attempts == 2 and result[0].window == 1
        assert torch.equal(result.merged.total_count(), expected)
        later = feed(rec, seed=27)  # what the run records next: the resend took no window of its own
        fleet.stop()
        again = fleet.dump()
    assert again.ok and again[0].window == 2 and torch.equal(again.merged.total_count(), later)


def test_a_dump_cut_on_the_way_with_no_retry_left_is_sent_by_the_next(engines):
    """No retry left: the dump fails, and this fleet's next dump gets that window, saying that
    what came since waits on the engine; a progress poll meanwhile raises no alarm."""
    rec, server, cut = engines.cut("/dump_expert_distribution_record", n=1)
    with Fleet([server.url], retries=0) as fleet:
        fleet.start()
        expected = feed(rec, seed=28)
        (failed,) = fleet.dump().results
        assert failed.error_kind == "connection"
        (polled,) = fleet.status().results  # window 2 there: the engine keeps window 1 for this fleet
        assert polled.window == 2 and fleet.cut_into(polled) is None
        later = feed(rec, seed=30)
        fleet.stop()
        result = fleet.dump()
        assert result.ok and result[0].window == 1 and torch.equal(result.merged.total_count(), expected)
        assert "recorded since is its next window: dump again" in result[0].note
        rest = fleet.dump()
    assert rest.ok and rest[0].window == 2 and rest[0].note is None and torch.equal(rest.merged.total_count(), later)


def test_a_dump_that_timed_out_comes_back_with_a_note_and_no_false_alarm(engines):
    """The fleet gave up on a slow dump: the engine kept the window, a poll meanwhile raises no
    alarm, and the next dump brings that window back, saying what came since waits there."""

    class FirstDumpSlow(LocalBackend):
        slow = True

        async def dump(self):
            if self.slow:
                self.slow = False
                await asyncio.sleep(1.0)
            return await super().dump()

    rec = make_recorder()
    server = engines._serve(make_app(FirstDumpSlow(rec), dump_dir=engines.dir()))
    with Fleet([server.url], timeout=0.4) as fleet:
        fleet.start()
        first = feed(rec, seed=34)
        (failed,) = fleet.dump().results
        assert failed.error_kind == "timeout" and f"--client-id {fleet.client_id} --resend 1" in failed.error
        time.sleep(1.0)  # the engine finishes that dump, finds its client gone and keeps the window
        (polled,) = fleet.status().results
        assert polled.window == 2 and fleet.cut_into(polled) is None
        later = feed(rec, seed=35)
        fleet.stop()
        result = fleet.dump()
        assert result.ok and result[0].window == 1 and result[0].resent and "dump again" in result[0].note
        assert torch.equal(result.merged.total_count(), first)
        rest = fleet.dump()
    assert rest.ok and rest[0].window == 2 and torch.equal(rest.merged.total_count(), later)


def test_a_window_lost_three_times_is_collected_by_a_later_command(engines, tmp_path, capsys):
    """Every attempt's answer cut: the error names this fleet's client id and window, and a later
    `moe-record dump --client-id ... --resend ...` collects the window the engine keeps for it."""
    from moe_record_sdk.cli import main

    rec, server, cut = engines.cut("/dump_expert_distribution_record", n=3)
    with Fleet([server.url], retries=2, backoff=0.01) as fleet:
        fleet.start()
        expected = feed(rec, seed=36)
        (failed,) = fleet.dump().results
        client = fleet.client_id
    assert cut.left == 0 and failed.attempts == 3 and failed.error_kind == "connection"
    command = f"moe-record dump -e {server.url} --client-id {client} --resend 1 --out NEW_DIR"
    assert command in failed.error
    out = tmp_path / "out"
    argv = command.split()[1:-1] + [str(out), "--json"]
    assert main(argv) == 0
    (engine,) = json.loads(capsys.readouterr().out)["engines"]
    assert engine["window"] == 1 and engine["resent"] and engine["note"] is None
    assert torch.equal(load_dump(engine["saved"]).total_count(), expected)


def test_a_resend_the_engine_cannot_honour_is_said(engines, tmp_path, capsys):
    """Under a mistyped id the engine ignores the resend and takes its current window: the
    result says so (it used to pass as the window asked for). Without --client-id, or with no
    window number, the command refuses at once (exit 2): a random id could never be answered."""
    from moe_record_sdk.cli import main

    rec, server = engines.ours()
    with Fleet([server.url], headers={"x-moe-record-client": "job-1"}) as fleet:
        fleet.start()
        feed(rec, seed=37)
        assert fleet.dump()[0].window == 1
        later = feed(rec, seed=38)
    with Fleet([server.url], headers={"x-moe-record-client": "job-2"}) as other:
        (r,) = other.dump(resend=1).results
    assert r.ok and not r.resent and r.window == 2 and torch.equal(r.dump.total_count(), later)
    assert r.note == (
        "window 1 was not sent again (the engine keeps no such window for client job-2): this dump took "
        "the window it was recording, window 2"
    )
    capsys.readouterr()
    for extra in (["--resend", "1"], ["--client-id", "job-1", "--resend", "0"]):
        assert main(["dump", "-e", server.url, *extra, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "--resend needs --client-id" in err or "'0' is not a window number" in err, err
    assert not (tmp_path / "x").exists()


def test_a_dump_answered_503_is_sent_again(engines):
    """A dump that names its window is retried after a 503 on the default transport too."""
    rec, server, flaky = engines.flaky("/dump_expert_distribution_record", n=1)
    with Fleet([server.url], retries=1, backoff=0.01) as fleet:
        fleet.start()
        expected = feed(rec, seed=31)
        result = fleet.dump()
    assert flaky.left == 0 and result.ok and result[0].attempts == 2
    assert torch.equal(result.merged.total_count(), expected)


def test_a_dump_cut_short_keeps_what_arrived_as_delivered(engines):
    """Cancelled while a slow engine works: the windows that arrived are not asked for again,
    so the next dump brings what came since (it used to bring the same window twice)."""
    rec, fast = engines.ours()
    _, slow = engines.slow(delay=1.0)
    fleet = AsyncFleet([fast.url, slow.url])

    async def go():
        await fleet.start()
        first = feed(rec, seed=32)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fleet.dump(), 0.5)  # a Ctrl-C, say
        arrived = fleet.cut_short[0]
        later = feed(rec, seed=33)
        result = await fleet.dump()
        await fleet.aclose()
        return first, arrived, later, result

    first, arrived, later, result = asyncio.run(go())
    assert arrived.ok and torch.equal(arrived.dump.total_count(), first)
    assert result[0].ok and result[0].window == 2 and torch.equal(result[0].dump.total_count(), later)


def test_a_dump_cut_short_before_sending_leaves_the_runs_as_they_were(engines, monkeypatch):
    """A Ctrl-C before a dump's requests leave re-checks nothing: the outcomes of an earlier call
    cut short (a status here) are not taken for the dump's (they moved the run a window on)."""
    rec, fast = engines.ours()
    _, slow = engines.slow(delay=1.0, slow_status=True)
    fleet = AsyncFleet([fast.url, slow.url])

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    async def go():
        await fleet.start()
        expected = feed(rec, seed=34)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fleet.status(), 0.5)
        assert fleet.cut_short[0].ok and fleet.cut_short[0].window == 1
        with monkeypatch.context() as m:
            m.setattr(fleet, "_calls_for", ctrl_c)
            with pytest.raises(KeyboardInterrupt):
                await fleet.dump()
        result = await fleet.dump()
        await fleet.aclose()
        return expected, result

    expected, result = asyncio.run(go())
    assert result[0].ok, result[0].error
    assert result[0].window == 1 and torch.equal(result[0].dump.total_count(), expected)


def test_a_client_id_in_headers_is_checked_and_trimmed():
    with pytest.raises(ValueError, match=r"x-moe-record-client: expected 1-128 .* got 5 characters: 'job 1'"):
        Fleet(["127.0.0.1:1"], headers={"X-MoE-Record-Client": "job 1"})
    with Fleet(["127.0.0.1:1"], headers={"X-MoE-Record-Client": "job-1 "}) as fleet:
        assert fleet.client_id == "job-1"


def test_dump_whose_client_timed_out_is_kept_for_the_next(engines):
    """The engine finishes a dump after its client gave up: the window goes back to the engine,
    and the next dump delivers it whole, as the window this fleet's start began."""
    # Counts of 64 layers x 1024 experts: over 256 KiB, encoded on a worker thread, where the
    # next dump used to take the lock and the next window before this one was handed back.
    rec, server = engines.slow(delay=1.0, recorder=Recorder(num_layers=64, num_experts=1024, top_k=2))
    with Fleet([server.url], timeout=0.3) as fleet:
        fleet.start()
        expected = feed(rec, seed=11)
        (r,) = fleet.dump().results
        assert r.error_kind == "timeout" and "dump again" in r.error
    # `moe-record dump` run again at once, as the error says, while the engine still works on the
    # first: it waits for that one's turn to end, and gets the window handed back, not the next.
    with Fleet([server.url], timeout=5.0) as again:
        result = again.dump()
    assert result.ok and result[0].window == 1 and torch.equal(result.merged.total_count(), expected)


def test_engine_whose_start_failed_is_not_merged(engines):
    rec_ok, ok = engines.ours()
    rec_bad, bad, flaky = engines.flaky("/start_expert_distribution_record", n=10)
    rec_bad.start()  # it holds a recording, but not this fleet's
    feed(rec_bad, seed=4)
    with Fleet([ok.url, bad.url], retries=2, backoff=0.01) as fleet:
        started = fleet.start()
        assert started[bad.url].error_kind == "http" and "503" in started[bad.url].error
        assert started[bad.url].attempts == 3 and flaky.seen == 3  # start is idempotent: retried
        expected = feed(rec_ok, seed=5)
        theirs = rec_bad.status().passes
        stopped = fleet.stop()
        result = fleet.dump()
    assert stopped[bad.url].error_kind == result[bad.url].error_kind == "not_started"
    assert torch.equal(result.merged.total_count(), expected)
    # The recording there is another client's: neither stopped nor taken (a dump clears).
    assert rec_bad.status().recording and rec_bad.status().passes == theirs > 0


def test_one_engine_under_two_names_is_counted_once_and_nothing_is_lost(engines):
    """127.0.0.1 and localhost are one engine: the second start restarted the first's window, and
    the dump of that window was dropped as another run's. The instance id tells them apart."""
    rec, server = engines.ours()
    port = server.url.rsplit(":", 1)[1]
    with Fleet([f"127.0.0.1:{port}", f"localhost:{port}"]) as fleet:
        started = fleet.start()
        assert [r.ok for r in started] == [True, False] and started[1].error_kind == "duplicate"
        expected = feed(rec, seed=8)
        stopped = fleet.stop()
        result = fleet.dump()
    assert stopped[0].ok and result[0].ok
    for r in (stopped[1], result[1]):  # not "not started": it was, under its other name
        assert r.error_kind == "duplicate" and r.error.startswith(f"the same engine as http://127.0.0.1:{port}: ")
    assert torch.equal(result.merged.total_count(), expected)


def test_retries_only_where_safe(engines):
    rec, server, flaky = engines.flaky("/expert_distribution_record_status", n=1)
    with Fleet([server.url], retries=2, backoff=0.01) as fleet:
        status = fleet.status()
        assert status.ok and status[0].attempts == 2 and flaky.seen == 2
    rec2, server2, flaky2 = engines.flaky("/dump_expert_distribution_record", n=1)
    rec2.start()
    feed(rec2, seed=6)
    with Fleet([server2.url], retries=2, backoff=0.01) as fleet:
        dump = fleet.dump()
    assert not dump.ok and dump[0].attempts == 1 and flaky2.seen == 1  # a dump clears: never re-sent
    assert rec2.status().passes == 3  # and nothing was lost


def test_auth_keys_per_engine_and_from_env(engines, monkeypatch):
    _, a = engines.ours(api_key="ka")
    _, b = engines.ours(api_key="kb")
    with Fleet([a.url, b.url], api_key={a.url: "ka", b.url: "nope"}) as fleet:
        result = fleet.start()
    assert result[a.url].ok and result[b.url].status_code == 401 and result[b.url].error_kind == "http"
    assert "unauthorized" in result[b.url].error
    monkeypatch.setenv("MOE_RECORD_API_KEY", "kb")
    with Fleet([b.url]) as fleet:
        assert fleet.start().ok
    with Fleet([b.url], api_key="") as fleet:
        assert fleet.status()[0].status_code == 401
    # A token no header can carry was a UnicodeEncodeError out of the first call; now it is named.
    for bad in ("clé", "two words", {b.url: "tab\there"}):
        with pytest.raises(ValueError, match=rf"api_key for {re.escape(b.url)}: it holds a character"):
            Fleet([b.url], api_key=bad)


def test_status_of_a_stock_sglang_says_it_has_none(engines):
    _, s, _ = engines.sglang()
    with Fleet([s.url]) as fleet:
        (r,) = fleet.status().results
    assert r.status_code == 404 and "stock SGLang" in r.error


def test_dump_left_on_servers_when_not_collecting(engines):
    rec, server = engines.ours()
    with Fleet([server.url]) as fleet:
        fleet.start()
        feed(rec, seed=7)
        result = fleet.dump(collect=False)
    (r,) = result.results
    assert r.ok and r.location == ON_SERVER and len(r.files) == 1 and os.path.exists(r.files[0])
    assert result.merged is None


def test_async_fleet_with_an_asgi_transport_and_sync_fleet_refuses_a_running_loop():
    rec = make_recorder()
    app = make_app(LocalBackend(rec), dump_dir="/nonexistent-never-written")

    async def go():
        with (
            pytest.raises(RuntimeError, match="AsyncFleet"),
            Fleet(["http://engine"], transport=httpx.ASGITransport(app)) as sync,
        ):
            sync.start()
        async with AsyncFleet(["http://engine"], transport=httpx.ASGITransport(app)) as fleet:
            await fleet.start()
            expected = feed(rec, seed=8)
            return expected, await fleet.dump()

    expected, result = asyncio.run(go())
    assert torch.equal(result.merged.total_count(), expected)


def test_engine_urls():
    assert normalize_engine("127.0.0.1:30000/") == "http://127.0.0.1:30000"
    assert normalize_engine("https://h") == "https://h"
    assert normalize_engine("http://h/") == "http://h"  # port 80, as the URL says
    # A bare host names no port: it meant 80 silently, where no engine serves by default.
    for bare in ("10.0.0.5", "engine-0/", "[::1]"):
        with pytest.raises(ValueError, match=r"names no port; give host:port \(SGLang serves on 30000"):
            normalize_engine(bare)
    with pytest.raises(ValueError, match="more than once"):
        Fleet(["127.0.0.1:1", "http://127.0.0.1:1"])
    with pytest.raises(ValueError, match="not an http"):
        Fleet(["ftp://x"])
    for bad_port in ("127.0.0.1:99999", "127.0.0.1:abc"):
        with pytest.raises(ValueError, match="no valid port"):
            Fleet([bad_port])
    # Scheme and host are case-insensitive: one engine, however spelled, is one engine.
    assert normalize_engine("HTTP://LocalHost:1/") == "http://localhost:1"
    with pytest.raises(ValueError, match="more than once"):
        Fleet(["HTTP://LOCALHOST:1", "localhost:1"])
    # A query or fragment would swallow the endpoint path (requests went to "/", a 404).
    for bad in ("127.0.0.1:1?x=1", "http://127.0.0.1:1/#top", "127.0.0.1:1/?"):
        with pytest.raises(ValueError, match="query or fragment"):
            Fleet([bad])
    # Credentials in the URL are never sent: refused, and the password never echoed.
    for url in ("http://admin:s3cret@10.0.0.1:30000", "ftp://admin:s3cret@x", "http://admin:s3/c#ret@10.0.0.1:1"):
        with pytest.raises(ValueError, match="credentials in the URL") as e:
            Fleet([url])
        assert "s3" not in str(e.value) and "admin" not in str(e.value)
    with pytest.raises(ValueError, match="…@10.0.0.1:30000 has credentials"):
        normalize_engine("http://a:b@10.0.0.1:30000")


def test_results_by_url_as_given_and_ipv6_file_names():
    from moe_record_sdk.client import EngineResult, FleetResult
    from moe_record_sdk.client._models import engine_slug

    result = FleetResult("status", [EngineResult("http://10.0.0.1:30000", "status", True)])
    assert result["10.0.0.1:30000"] is result["http://10.0.0.1:30000/"] is result[0]
    with pytest.raises(KeyError):
        result["10.0.0.2:30000"]
    assert engine_slug("http://[::1]:30000") != engine_slug("http://1:30000")
    assert engine_slug("http://[fe80::1]:8000") == "fe80--1_8000"


@pytest.fixture
def http_client():
    with httpx.Client(timeout=10, trust_env=False) as c:
        yield c


def test_an_html_error_page_is_reported_on_one_line(engines):
    """A proxy in front of an engine answers with an HTML page: the error stays one line."""
    page = b"<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n<h1>502 Bad Gateway</h1>\n</body></html>\n"

    async def proxy(scope, receive, send):
        headers = [(b"content-type", b"text/html"), (b"content-length", str(len(page)).encode())]
        await send({"type": "http.response.start", "status": 502, "headers": headers})
        await send({"type": "http.response.body", "body": page})

    server = engines._serve(proxy)
    with Fleet([server.url], retries=0) as fleet:
        (r,) = fleet.status().results
    assert not r.ok and r.error == "HTTP 502: 502 Bad Gateway 502 Bad Gateway"


def test_max_dump_bytes_holds_on_a_transport_passed_in_too():
    """The same limit through httpx's transports (https engines, a transport passed in): a dump
    over it is that engine's too_large failure, and one under it is collected."""
    rec = make_recorder()
    app = make_app(LocalBackend(rec), dump_dir="/nonexistent-never-written")

    async def go(limit):
        async with AsyncFleet(["http://engine"], transport=httpx.ASGITransport(app), max_dump_bytes=limit) as fleet:
            await fleet.start()
            feed(rec, seed=9)
            return (await fleet.dump()).results[0]

    refused = asyncio.run(go(100))
    assert refused.error_kind == "too_large" and "over the limit of 100 (max_dump_bytes)" in refused.error
    assert asyncio.run(go(None)).ok


def test_a_fault_in_one_decode_or_in_the_merge_keeps_every_dump_taken(engines, monkeypatch):
    """Faults no real input produces here (the fuzz tests hold decode and merge to MoeRecordError),
    injected: the engines cleared their windows when they dumped, so an exception out of
    Fleet.dump would lose every dump. One engine's decode fault is its bad_dump; a merge fault is
    the merge_error, with every engine's dump kept."""
    import moe_record_sdk.client.fleet as fleet_module
    from moe_record_sdk import schema

    (rec_a, a), (rec_b, b) = engines.ours(), engines.ours()
    real_decode = schema.decode

    def decode(body, fmt, source):
        if source == a.url:
            raise ValueError("injected decode fault")
        return real_decode(body, fmt, source)

    def merge(dumps, sources=None):
        raise RuntimeError("injected merge fault")

    with Fleet([a.url, b.url]) as fleet:
        fleet.start()
        feed(rec_a, seed=1)
        feed(rec_b, seed=2)
        monkeypatch.setattr(schema, "decode", decode)  # where the Fleet finds it
        bad, good = fleet.dump().results
        assert bad.error_kind == "bad_dump" and "ValueError: injected decode fault" in bad.error
        assert good.ok and good.dump is not None
        monkeypatch.setattr(schema, "decode", real_decode)
        monkeypatch.setattr(fleet_module, "merge_engines", merge)
        fleet.start()
        expected = [feed(rec_a, seed=3), feed(rec_b, seed=4)]
        result = fleet.dump()
    assert result.merge_error == "RuntimeError: injected merge fault" and result.merged is None
    assert [torch.equal(r.dump.total_count(), e) for r, e in zip(result, expected)] == [True, True]


def test_a_dump_over_max_dump_bytes_is_refused_by_the_engine_which_keeps_it(engines):
    """The fleet says how much it takes: our engine answers 413 and keeps the window, instead of
    sending it to a client that hangs up on it (the window was lost that way)."""
    rec, server = engines.ours()
    with Fleet([server.url], max_dump_bytes=400) as small:  # the dump: 718 bytes; the 413 answer: ~250
        small.start()
        expected = feed(rec, seed=13)
        (r,) = small.dump().results
    assert r.error_kind == "too_large" and "the recording is kept" in r.error
    with Fleet([server.url]) as fleet:
        result = fleet.dump()
    assert result.ok and torch.equal(result.merged.total_count(), expected)


def test_a_dump_over_the_limit_that_went_into_files_is_named_and_not_blamed_on_others(engines):
    """keep_files (return=both) and a dump over max_dump_bytes: the 413 names the engine's file,
    and this fleet's next dump is its own next window, not "another client's dump"."""
    rec, server = engines.ours(make_recorder(mode="per_pass"))  # its dump grows with its passes
    with Fleet([server.url], max_dump_bytes=1500.0) as fleet:  # a float limit is sent as bytes too
        fleet.start()
        feed(rec, seed=20, passes=8)  # ~2 KB: over
        (r,) = fleet.dump(keep_files=True).results
        assert r.error_kind == "too_large" and len(r.files) == 1 and os.path.exists(r.files[0])
        later = feed(rec, seed=21, passes=1, tokens=1)  # ~0.8 KB
        result = fleet.dump()
    assert result.ok and result[0].window == 2 and torch.equal(result.merged.total_count(), later)


@pytest.mark.parametrize("cap", [None, 1])
def test_async_fleet_serves_one_event_loop_after_another(engines, cap):
    """One AsyncFleet, each call under its own asyncio.run (a script's habit): connections and
    locks of a finished loop are not reused in the next (they would never be read there)."""
    rec, server = engines.ours()
    fleet = AsyncFleet([server.url], max_concurrency=cap)
    assert asyncio.run(asyncio.wait_for(fleet.start(), 10)).ok
    expected = feed(rec, seed=12)
    assert asyncio.run(asyncio.wait_for(fleet.stop(), 10)).ok
    result = asyncio.run(asyncio.wait_for(fleet.dump(), 10))
    assert result.ok and torch.equal(result.merged.total_count(), expected)
    asyncio.run(fleet.aclose())


def test_polls_with_a_timeout_of_their_own_keep_no_requests_per_value(engines):
    """`record` polls status with the time left in its interval as the timeout: each value kept
    its own set of prepared requests for the fleet's life (82 KB a poll of 32 engines, ~7 GB a
    day polling once a second). A call's own timeout now replaces the last one kept."""
    _, a = engines.ours()
    _, b = engines.ours()
    with Fleet([a.url, b.url], retries=0) as fleet:
        for i in range(50):
            assert fleet.status(timeout=1.0 + i / 100).ok
        assert fleet.status().ok
        kept = fleet._fleet._calls
        assert len(kept) == 2  # status with the fleet's timeout, and with the last one of its own
        assert {limit for limit, _ in kept.values()} == {fleet._fleet.timeout, 1.49}


def test_one_engines_merge_is_its_dump_saved_once(engines, tmp_path):
    """With one engine the merge is that engine's dump: it was encoded and written twice (two
    identical 1 GB files for a large per_token window). merged.pt is now a second name of it."""
    rec, server = engines.ours()
    with Fleet([server.url]) as fleet:
        fleet.start()
        expected = feed(rec, seed=8)
        saved = fleet.dump().save(str(tmp_path / "one"))
    engine, merged = os.stat(saved[server.url]), os.stat(saved["merged"])
    assert (engine.st_ino, engine.st_nlink) == (merged.st_ino, 2)
    assert torch.equal(load_dump(saved["merged"]).total_count(), expected)
    _, other = engines.ours()
    with Fleet([server.url, other.url]) as fleet:  # a real merge: its own file
        fleet.start()
        saved = fleet.dump().save(str(tmp_path / "two"))
    assert os.stat(saved["merged"]).st_ino not in {os.stat(saved[e]).st_ino for e in (server.url, other.url)}


@pytest.mark.parametrize(("dp", "tp", "per_server"), [(2, 2, 1), (4, 1, 2)])
def test_data_parallel_servers_that_hold_some_ranks_merge_them_and_the_fleet_sums(engines, dp, tp, per_server):
    """vLLM behind an external or hybrid load balancer: each API server reaches only its own DP
    ranks. Its merge refused the other servers' token shards as missing, so every dump answered
    500. A backend that holds some ranks by design merges those; the Fleet over every server
    sums them: each token once."""
    from moe_record_sdk import EngineInfo, Topology

    def ranks_of(d: int) -> list[Recorder]:  # the vLLM worker's topology: TP ranks share the DP rank's shard
        return [
            Recorder(
                4,
                8,
                2,
                engine=EngineInfo(name="vllm"),
                topology=Topology(
                    rank=d * tp + t,
                    world_size=dp * tp,
                    tp_rank=t,
                    tp_size=tp,
                    dp_rank=d,
                    dp_size=dp,
                    token_shard=d,
                    num_token_shards=dp,
                ),
            )
            for t in range(tp)
        ]

    recs = [ranks_of(d) for d in range(dp)]
    urls = {}
    for some in (False, True):
        urls[some] = []
        for first in range(0, dp, per_server):
            workers = [r for d in range(first, first + per_server) for r in recs[d]]
            app = make_app(LocalBackend(*workers, some_ranks=some), dump_dir=engines.dir(), engine="vllm")
            urls[some].append(engines._serve(app).url)
    for some in (False, True):
        truth = torch.zeros(4, 8, dtype=torch.int64)
        with Fleet(urls[some], retries=0) as fleet:
            assert fleet.start().ok
            g = torch.Generator().manual_seed(dp)
            for d in range(dp):
                ids = torch.randint(0, 8, (10 + d, 2), generator=g)
                truth += torch.bincount(ids.flatten(), minlength=8).expand(4, 8)
                for r in recs[d]:  # TP workers of one DP rank route the same tokens
                    for layer in range(4):
                        r.record(layer, ids)
                    r.step()
            result = fleet.dump()
        if some:
            assert result.ok and torch.equal(result.merged.total_count(), truth)
        else:
            assert result.failed and all(r.status_code == 500 and "are missing" in r.error for r in result.failed)


def test_a_fleet_of_one_rank_of_several_checks_the_run_is_whole(engines):
    """One side server of a two-shard deployment (or one API server of a DP fleet) was returned
    as the merge, holding half the tokens and no error. It is checked like any merge now; one
    rank of tensor-parallel replicas is the whole run's count and merges."""
    from moe_record_sdk import Topology

    from ..server.helpers import E, K, L

    for shards, ok in ((2, False), (1, True)):
        topology = Topology(rank=0, world_size=2, token_shard=0, num_token_shards=shards)
        rec = Recorder(num_layers=L, num_experts=E, top_k=K, topology=topology)
        _, server = engines.ours(recorder=rec)
        with Fleet([server.url], retries=0) as fleet:
            fleet.start()
            expected = feed(rec, seed=9)
            result = fleet.dump()
        assert result[0].ok  # the engine's own dump is collected either way
        if ok:
            assert torch.equal(result.merged.total_count(), expected)
        else:
            assert result.merged is None and "token shards [1] are missing" in result.merge_error
