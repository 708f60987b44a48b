"""``moe-record start|stop|dump|status|record`` against real local servers."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time

import httpx
import pytest
import torch

from moe_record_sdk.cli import main
from moe_record_sdk.cli.record import record
from moe_record_sdk.client import Fleet
from moe_record_sdk.schema import load_dump

from ..server.helpers import feed, make_recorder


@pytest.fixture(autouse=True)
def _stop_signals_as_they_were():
    """`record` run in-process leaves Ctrl-C, SIGTERM and SIGHUP ignored (meant for its own
    process's exit): give pytest its handlers back."""
    import signal

    from moe_record_sdk.cli.control import STOP_SIGNALS

    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_control_commands_exit_status_and_saved_dumps(engines, tmp_path, capsys):
    rec_a, a = engines.ours()
    rec_b, b = engines.ours()
    both = ["--engine", a.url, "-e", b.url]
    assert main(["start", *both, "--mode", "per_pass"]) == 0
    assert rec_a.mode == rec_b.mode == "per_pass" and rec_a.recording
    ea, eb = feed(rec_a, seed=1), feed(rec_b, seed=2)
    capsys.readouterr()
    assert main(["status", *both, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and [e["info"]["ranks"][0]["passes"] for e in doc["engines"]] == [3, 3]
    assert main(["stop", f"--engine={a.url},{b.url}"]) == 0
    out = tmp_path / "out"
    assert main(["dump", *both, "--out", str(out), "--format", "msgpack"]) == 0
    text = capsys.readouterr().out
    assert "dump: 2/2 engines ok" in text and "merged ->" in text
    assert torch.equal(load_dump(str(out / "merged.msgpack")).total_count(), ea + eb)
    assert len(os.listdir(out)) == 3


def test_status_counts_tensor_parallel_replicas_once_and_adds_data_parallel_ranks(engines, capsys):
    """An engine's passes and tokens over its ranks: TP replicas (one token shard) ran the same
    passes over the same tokens; DP ranks (shards) their own. status summed every rank's passes
    (a 2-rank TP engine read "6 passes" for 3) and took the largest token count (a DP engine's
    tokens read as one rank's)."""
    from moe_record_sdk import Recorder, Topology
    from moe_record_sdk.server import LocalBackend, make_app

    def ranks(shards: int) -> list[Recorder]:
        return [
            Recorder(
                num_layers=4,
                num_experts=8,
                top_k=2,
                topology=Topology(rank=r, world_size=2, token_shard=r % shards, num_token_shards=shards),
            )
            for r in range(2)
        ]

    tp, dp = ranks(1), ranks(2)
    a = engines._serve(make_app(LocalBackend(*tp), dump_dir=engines.dir()))
    b = engines._serve(make_app(LocalBackend(*dp), dump_dir=engines.dir()))
    assert main(["start", "-e", a.url, "-e", b.url]) == 0
    for rec in tp:  # replicas: the same 3 passes of 5 tokens (15)
        feed(rec, seed=1)
    feed(dp[0], seed=2)  # 3 passes of 5 tokens
    feed(dp[1], seed=3, passes=2, tokens=4)  # 2 of 4: 8
    capsys.readouterr()
    assert main(["status", "-e", a.url, "-e", b.url]) == 0
    out = capsys.readouterr().out
    assert "recording, mode stat, 3 passes, 15 tokens, 2 rank(s)" in out  # was 6 passes
    assert "recording, mode stat, 5 passes, 23 tokens, 2 rank(s)" in out  # was 5 passes, 15 tokens


def test_a_failing_engine_gives_exit_1_and_the_others_work(engines, capsys):
    rec, a = engines.ours()
    down = engines.down()
    assert main(["start", "-e", a.url, "-e", down, "--retries", "0"]) == 1
    out = capsys.readouterr().out
    assert f"{down} start: FAILED (connect)" in out and f"{a.url} start: ok" in out and "1/2 engines ok" in out
    assert rec.recording
    feed(rec, seed=3)
    assert main(["dump", "-e", a.url, "-e", down, "--retries", "0"]) == 1  # without --out: files on the engine
    assert "dump left on the server's disk" in capsys.readouterr().out
    assert main(["start", "-e", "ftp://x"]) == 2


def test_record_saves_validates_and_summarizes(engines, tmp_path, capsys):
    rec_a, a = engines.ours()
    rec_b, b = engines.ours()
    down = engines.down()
    expected: dict[str, torch.Tensor] = {}

    def traffic() -> None:  # what the engines' users would send while recording runs
        deadline = time.monotonic() + 10
        while not (rec_a.recording and rec_b.recording) and time.monotonic() < deadline:
            time.sleep(0.01)
        expected["a"], expected["b"] = feed(rec_a, seed=4), feed(rec_b, seed=5)

    t = threading.Thread(target=traffic)
    t.start()
    out = tmp_path / "rec"
    status = main(
        [
            "record",
            "-e",
            a.url,
            "-e",
            b.url,
            "-e",
            down,
            "--duration",
            "0.6",
            "--interval",
            "0.2",
            "--out",
            str(out),
            "--retries",
            "0",
        ]
    )
    t.join()
    text = capsys.readouterr().out
    assert status == 1  # one engine failed...
    assert f"{down} start: FAILED" in text or "start failed" in text
    assert "recording on 2 of 3 engines: the merge will cover only those" in text
    # ...and the others' dumps are saved, validated and summarized.
    assert "validated 3 dump file(s): all valid" in text and "Load over experts, per MoE layer" in text
    assert sorted(os.listdir(out)) == sorted(
        ["merged.pt", f"engine-0-127.0.0.1_{a.port}.pt", f"engine-1-127.0.0.1_{b.port}.pt"]
    )
    assert torch.equal(load_dump(str(out / "merged.pt")).total_count(), expected["a"] + expected["b"])
    assert not rec_a.recording  # stopped

    # All engines healthy: exit 0.
    t = threading.Thread(target=lambda: (time.sleep(0.2), feed(rec_a, seed=6)))
    t.start()
    assert main(["record", "-e", a.url, "--duration", "0.5", "--interval", "0.2", "--out", str(tmp_path / "rec2")]) == 0
    t.join()
    assert "no token was routed" not in capsys.readouterr().out
    # No traffic: still exit 0 (every engine did its part), but said.
    assert main(["record", "-e", a.url, "--duration", "0.3", "--interval", "0.2", "--out", str(tmp_path / "rec3")]) == 0
    assert "no token was routed while recording" in capsys.readouterr().out


def test_record_says_at_once_when_another_client_stops_its_run(engines, tmp_path):
    """Another client's stop while `record` runs: the progress table says so while recording, the
    dump is reported partial (saved apart, out of the merge) and the exit status is 1."""
    import io

    from rich.console import Console

    rec, a = engines.ours()
    rec_b, b = engines.ours()

    def someone_else(stop) -> None:
        feed(rec, seed=17)
        feed(rec_b, seed=18)
        httpx.post(a.url + "/stop_expert_distribution_record", timeout=10)
        stop.wait(10)

    text = io.StringIO()
    with Fleet([a.url, b.url]) as fleet:
        status = record(
            fleet, out=str(tmp_path / "out"), duration=1.2, interval=0.2, during=someone_else,
            console=Console(file=text, width=250),
        )  # fmt: skip
    output = text.getvalue()
    assert status == 1 and f"{a.url}: another client stopped the run: its dump will be partial" in output
    assert output.count("another client stopped the run") == 1  # said once, not at every poll
    assert "FAILED (stopped_early) another client stopped this run's recording" in output
    assert sorted(f.split("-")[0] for f in os.listdir(tmp_path / "out")) == ["engine", "merged.pt", "partial"]


def test_api_keys_from_a_file_one_for_all_or_one_per_engine(engines, tmp_path, capsys):
    """--api-key-file keeps tokens out of the command line (ps shows it): one token for every
    engine, or a line per engine where each has its own."""
    _, a = engines.ours(api_key="key-a")
    _, b = engines.ours(api_key="key-b")
    one, each, short, bad = (tmp_path / name for name in ("one", "each", "short", "bad"))
    one.write_text("key-a\n")
    each.write_text(f"# engine token\n{a.url} key-a\n\n{b.url.removeprefix('http://')} key-b\n")
    short.write_text(f"{a.url} key-a\n")
    bad.write_text(f"{a.url} key-a extra\n{b.url} key-b\n")
    assert main(["status", "-e", a.url, "--api-key-file", str(one)]) == 0
    assert main(["status", "-e", a.url, "-e", b.url, "--api-key-file", str(one)]) == 1  # b wants its own
    out = capsys.readouterr().out
    assert "HTTP 401" in out and f"{b.url} wants a bearer token: --api-key T, $MOE_RECORD_API_KEY" in out
    assert main(["status", "-e", a.url, "-e", b.url, "--api-key-file", str(each)]) == 0
    capsys.readouterr()
    assert main(["status", "-e", a.url, "-e", b.url, "--api-key-file", str(short)]) == 2
    assert f"no token for {b.url}" in capsys.readouterr().err
    assert main(["status", "-e", a.url, "-e", b.url, "--api-key-file", str(bad)]) == 2
    assert "line 1: expected 'URL TOKEN'" in capsys.readouterr().err
    assert main(["status", "-e", a.url, "--api-key-file", str(tmp_path / "none")]) == 2
    assert "cannot read it: No such file" in capsys.readouterr().err
    bom, odd, swapped = (tmp_path / name for name in ("bom", "odd", "swapped"))
    bom.write_bytes(b"\xef\xbb\xbfkey-a\r\n")  # a Windows editor's file
    assert main(["status", "-e", a.url, "--api-key-file", str(bom)]) == 0
    capsys.readouterr()
    odd.write_text("k\u00e9y-a\n", encoding="utf-8")
    assert main(["status", "-e", a.url, "--api-key-file", str(odd)]) == 2
    err = capsys.readouterr().err
    assert "line 1: holds a character a bearer token cannot have" in err and "Traceback" not in err
    swapped.write_text(f"se:cr:et {a.url}\nother {b.url}\n")
    assert main(["status", "-e", a.url, "-e", b.url, "--api-key-file", str(swapped)]) == 2
    err = capsys.readouterr().err
    assert "line 1: the first field is not an engine URL" in err and "se:cr:et" not in err


def test_record_over_one_engine_listed_twice_raises_no_false_alarm(engines, tmp_path):
    """127.0.0.1 and localhost: the second start restarts the run; the polls compare with that
    run, not the first answer's, so no "another client restarted the run" while recording."""
    import io

    from rich.console import Console

    rec, a = engines.ours()
    port = a.url.rsplit(":", 1)[1]
    text = io.StringIO()
    with Fleet([f"127.0.0.1:{port}", f"localhost:{port}"]) as fleet:
        status = record(
            fleet, out=str(tmp_path / "out"), duration=0.6, interval=0.2, during=lambda stop: feed(rec, seed=22),
            console=Console(file=text, width=250),
        )  # fmt: skip
    output = text.getvalue()
    assert status == 1 and "duplicate" in output and "another client" not in output


def test_a_bad_out_folder_is_refused_before_any_engine_is_touched(engines, tmp_path, capsys):
    """A dump clears the engines: an --out found unusable only after it would lose the recording."""
    rec, a = engines.ours()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert main(["record", "-e", a.url, "--duration", "0.2", "--out", str(a_file)]) == 2
    assert "--out" in capsys.readouterr().out and not rec.recording  # never started
    rec.start()
    expected = feed(rec, seed=7)
    assert main(["dump", "-e", a.url, "--out", str(a_file)]) == 2
    # A folder holding an earlier run's dumps: new files beside them would pass for one run.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "merged.pt").write_bytes(b"")
    assert main(["dump", "-e", a.url, "--out", str(earlier)]) == 2
    assert "earlier run" in capsys.readouterr().err
    assert rec.status().passes == 3  # nothing was dumped: the recording is still on the engine
    assert main(["dump", "-e", a.url, "--out", str(tmp_path / "new")]) == 0
    assert torch.equal(load_dump(str(tmp_path / "new" / "merged.pt")).total_count(), expected)
    # No engine gave a dump: the folders the command made are not left behind, empty.
    assert main(["dump", "-e", engines.down(), "--retries", "0", "--out", str(tmp_path / "none" / "here")]) == 1
    assert not (tmp_path / "none").exists()


def test_dumps_that_cannot_be_saved_go_to_a_new_folder(engines, tmp_path, capsys, monkeypatch):
    """The disk fills between the check and the save (a fault made here by hand): the collected
    dumps, the only copies once the engines have cleared, are saved elsewhere and said where."""
    from moe_record_sdk import schema

    rec, a = engines.ours()
    rec.start()
    expected = feed(rec, seed=8)
    real_save, failed = schema.save_dump, []

    def save_dump(dump, path, *args, **kwargs):
        if not failed:
            failed.append(path)
            raise OSError(28, "No space left on device")
        return real_save(dump, path, *args, **kwargs)

    monkeypatch.setattr(schema, "save_dump", save_dump)  # where FleetResult.save finds it
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the new folder goes there, not in /tmp
    assert main(["dump", "-e", a.url, "--out", str(tmp_path / "full")]) == 1  # not where asked
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"instead, not into {tmp_path / 'full'}" in err
    rescue = err.rsplit("saved into ", 1)[1].split()[0]
    assert os.path.dirname(rescue) == str(tmp_path)
    assert torch.equal(load_dump(os.path.join(rescue, "merged.pt")).total_count(), expected)


def test_dumps_that_cannot_be_saved_anywhere_are_fetched_again_as_told(engines, tmp_path, capsys, monkeypatch):
    """--out and the temporary folder both full (a fault made by hand): no traceback, the files
    that did land are named, and the exit status is 1. The rest were called LOST, though each
    engine keeps the window it answered for this client until its next dump or start, and the
    client id that fetches it again was printed nowhere: the command that does is printed, and works."""
    from moe_record_sdk import schema

    recs = [engines.ours() for _ in range(2)]
    assert main(["start", "-e", ",".join(server.url for _, server in recs)]) == 0  # a run: its windows are numbered
    for rec, _ in recs:
        feed(rec, seed=12)
    real_save = schema.save_dump

    def save_dump(dump, path, *args, **kwargs):
        if os.path.basename(path).startswith("engine-0-"):
            return real_save(dump, path, *args, **kwargs)
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(schema, "save_dump", save_dump)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    urls = [server.url for _, server in recs]
    assert main(["dump", "-e", ",".join(urls), "--out", str(tmp_path / "full")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (first,) = os.listdir(tmp_path / "full")
    assert f"cannot save into {tmp_path / 'full'}: No space left on device (engine-1-" in err
    assert "either" in err and f"saved whole: {tmp_path / 'full' / first}) are not on this machine" in err
    # Nothing saved anywhere: said so, and no empty temporary folder is left behind.
    monkeypatch.setattr(schema, "save_dump", lambda dump, path, *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    expected = sum(feed(rec, seed=13) for rec, _ in recs)
    before = set(os.listdir(tmp_path))
    assert main(["dump", "-e", ",".join(urls), "--out", str(tmp_path / "full2")]) == 1
    err = capsys.readouterr().err
    assert "full: the dumps are not on this machine" in err
    assert set(os.listdir(tmp_path)) == before  # neither --out (made by the command) nor a temporary folder
    (command,) = [line.split("fetch them again with: ")[1] for line in err.splitlines() if "fetch them again" in line]
    monkeypatch.setattr(schema, "save_dump", real_save)
    argv = command.replace("NEW_DIR", str(tmp_path / "again")).split()
    assert argv[:2] == ["moe-record", "dump"] and main(argv[1:]) == 0
    assert torch.equal(load_dump(str(tmp_path / "again" / "merged.pt")).total_count(), expected)


def test_two_runs_into_one_folder_never_replace_each_others_files(engines, tmp_path, monkeypatch):
    """Two `record` runs given one --out both find it empty before they start; the second to
    save finds the first's files: they stay as they were, the second's go to a folder of their own."""
    from moe_record_sdk.cli.control import save_dumps

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    out, lines, results = str(tmp_path / "out"), [], []
    for seed in (15, 16):
        rec, a = engines.ours()
        with Fleet([a.url]) as fleet:
            fleet.start()
            feed(rec, seed=seed)
            results.append(fleet.dump())
    first, _ = save_dumps(results[0], out, "pt", lines.append)
    second, in_place = save_dumps(results[1], out, "pt", lines.append)
    assert not in_place and os.path.dirname(second["merged"]) != out
    assert "File exists (merged.pt)" in lines[0] and lines[1].startswith("saved into")
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in first.values())  # the first's only
    for result, saved in ((results[0], first), (results[1], second)):
        assert torch.equal(load_dump(saved["merged"]).total_count(), result.merged.total_count())


def test_dump_lines_say_what_the_ring_dropped(engines, tmp_path, capsys):
    rec, a = engines.ours(make_recorder(mode="per_pass", buffer_size=2))
    rec.start()
    feed(rec, seed=9)  # 3 passes into a 2-row ring
    assert main(["dump", "-e", a.url, "--out", str(tmp_path / "d")]) == 0
    assert "dump collected (3 passes, 1 pass dropped)" in capsys.readouterr().out


def test_ctrl_c_during_a_dump_still_saves_what_was_taken(engines, tmp_path):
    """The fast engine's window is taken (and cleared) while a slow one still answers: a Ctrl-C
    then may not lose it. The CLI runs in its own process, as a user's would."""
    import signal
    import subprocess
    import sys

    rec, fast = engines.ours()
    rec.start()
    expected = feed(rec, seed=12)
    rec_slow, slow = engines.slow(delay=4.0)
    rec_slow.start()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moe_record_sdk", "dump", "-e", fast.url, "-e", slow.url, "--timeout", "20"]
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while rec.status().passes and time.monotonic() < deadline:  # until the fast engine was dumped
            time.sleep(0.05)
        assert rec.status().passes == 0, "the fast engine was not dumped"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "finishing the dump; please wait" in output and "Traceback" not in output
    saved = [f for f in os.listdir(out) if f.startswith("engine-0-")]
    assert len(saved) == 1 and torch.equal(load_dump(str(out / saved[0])).total_count(), expected)


def test_an_engine_whose_status_hangs_does_not_stretch_the_recording(engines, tmp_path):
    """Progress polls wait at most their interval, and the engines are stopped before the last
    poll: --duration 1 records about a second even when one engine's status answers only after
    6 s (the timeout is 20)."""
    rec, fast = engines.ours()
    _, stuck = engines.slow(delay=6.0, slow_status=True)
    with Fleet([fast.url, stuck.url], timeout=20) as fleet:
        record(fleet, out=str(tmp_path / "out"), duration=1.0, interval=1.0, during=lambda stop: None)
    window = load_dump(str(tmp_path / "out" / "merged.pt")).window
    # was 7+ (a 6 s poll, then another), then 2 (the last poll, 1 s, came before the stop)
    assert window.stop_time - window.start_time < 1.8


def _record_under_signals(engines, tmp_path, seed: int, send):
    """`moe-record record` in its own process, as a user's, against an engine whose dump takes
    1 s (signals go on while it is taken), fed once it records; then ``send(proc)`` signals it.
    Returns (the engine's recorder, --out, exit status, output, the counts fed)."""
    import subprocess
    import sys

    rec, server = engines.slow(delay=1.0)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moe_record_sdk", "record", "-e", server.url, "--interval", "0.2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not rec.status().recording and time.monotonic() < deadline:
            time.sleep(0.05)
        expected = feed(rec, seed=seed)
        send(proc)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return rec, out, proc.returncode, output, expected


@pytest.mark.parametrize(("signame", "times"), [("SIGINT", 60), ("SIGTERM", 1)])
def test_ctrl_c_or_sigterm_stops_dumps_and_saves(engines, tmp_path, signame, times):
    """`record` until Ctrl-C, and a burst of Ctrl-C: the recording ends once, the engines are
    stopped and dumped, and the dumps saved (a second KeyboardInterrupt used to skip all that).
    SIGTERM (`timeout`, systemd, docker, Kubernetes) does the same: it used to kill the process
    at once, saving nothing and leaving the engines recording."""
    import signal

    def burst(proc) -> None:
        for _ in range(times):
            proc.send_signal(getattr(signal, signame))
            time.sleep(0.02)

    rec, out, status, output, expected = _record_under_signals(engines, tmp_path, 13, burst)
    assert status == 0, output
    assert "stopping (Ctrl-C or SIGTERM)" in output and "Traceback" not in output
    assert not rec.status().recording
    assert torch.equal(load_dump(str(out / "merged.pt")).total_count(), expected)


def test_a_console_that_went_away_does_not_lose_the_recording(engines, tmp_path):
    """The reader of record's output went away (a pipe's reader exited, an ssh session dropped:
    EPIPE, EIO) while it recorded: its next print raised, after the engines had stopped and
    before they were dumped; nothing was saved. Console output is best-effort now: the engines
    are stopped and dumped, the dumps saved, and the exit status is the run's."""
    import signal
    import subprocess
    import sys

    rec, server = engines.ours()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moe_record_sdk", "record", "-e", server.url, "--interval", "0.1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not rec.status().recording and time.monotonic() < deadline:
            time.sleep(0.05)
        expected = feed(rec, seed=21)
        proc.stdout.close()  # nobody reads its output any more
        proc.stderr.close()
        time.sleep(0.3)  # a progress refresh or two meet the closed pipe
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=60)
    finally:
        proc.kill()
    assert status == 0
    assert not rec.status().recording
    assert torch.equal(load_dump(str(out / "merged.pt")).total_count(), expected)


def test_record_json_reports_each_step_per_engine_on_stdout(engines, tmp_path, capsys):
    """`record --json`: one JSON document on stdout (for scripts: each step's per-engine results,
    the files, the problems, the exit status); progress and the summary go to stderr."""
    rec, a = engines.ours()
    down = engines.down()
    t = threading.Thread(target=lambda: (time.sleep(0.2), feed(rec, seed=8)))
    t.start()
    out = tmp_path / "rec"
    argv = ["record", "-e", a.url, "-e", down, "--retries", "0", "--duration", "0.5", "--interval", "0.2"]
    status = main([*argv, "--out", str(out), "--json"])
    t.join()
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # nothing else on stdout
    assert status == doc["exit_status"] == 1
    assert doc["action"] == "record" and doc["out"] == str(out)
    for step in ("start", "stop", "dump"):
        assert [(e["engine"], e["ok"]) for e in doc[step]["engines"]] == [(a.url, True), (down, False)], step
        assert doc[step]["engines"][1]["error_kind"] == ("connect" if step == "start" else "not_started"), step
    saved = doc["dump"]["engines"][0]["saved"]
    assert os.path.isfile(saved) and os.path.isfile(doc["dump"]["merged"])
    assert torch.equal(load_dump(saved).total_count(), load_dump(doc["dump"]["merged"]).total_count())
    assert doc["invalid"] == {} and doc["problems"] == ["some engines FAILED"]
    assert "Load over experts, per MoE layer" in captured.err and "start failed" in captured.err
    assert "stop failed" not in captured.err  # an engine whose start failed is not said failed again
    # A fleet that cannot be built (a duplicate engine, a bad URL) printed no JSON at all.
    for engines_given in ([a.url, a.url], ["ftp://x:1"]):
        assert main(["record", *[f"-e{e}" for e in engines_given], "--out", str(tmp_path / "x"), "--json"]) == 2
        doc = json.loads(capsys.readouterr().out)
        assert doc["exit_status"] == 2 and doc["problems"], doc


def test_record_against_stock_sglang_says_where_the_dump_went(engines, tmp_path, capsys):
    """A stock SGLang server keeps its dump on its own disk: nothing is saved here, and the last
    line says so (not "dumps in" an empty folder); the folder record made is removed."""
    rec, server, server_dir = engines.sglang()
    out = tmp_path / "new" / "rec"
    status = main(["record", "-e", server.url, "--duration", "0.3", "--interval", "0.1", "--out", str(out)])
    text = capsys.readouterr().out
    assert status == 0, text
    last = text.strip().splitlines()[-1]
    assert last == "no dump saved: 1 engine(s) left theirs on their own disk (listed above)", text
    assert "dump left on the server's disk" in text and os.listdir(server_dir)
    assert not (tmp_path / "new").exists()  # both folders it made, and only those
    assert tmp_path.exists()


def test_record_over_ours_and_stock_sglang_says_what_the_merge_covers(engines, tmp_path, capsys):
    """With a stock SGLang server in the fleet, merged.pt holds our engines' load only and SGLang
    records in its own mode: both were said only in --json (exit 0, a merge that looked whole)."""
    rec, ours = engines.ours()
    _, sglang, _ = engines.sglang()
    out = tmp_path / "rec"
    argv = ["record", "-e", ours.url, "-e", sglang.url, "--mode", "per_pass", "--duration", "0.3", "--out", str(out)]
    assert main([*argv, "--interval", "0.1"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert f"{sglang.url}: a stock SGLang server ignores mode" in text, text
    assert f"the merge covers 1 of 2 engines: {sglang.url} left their dumps on their own disks" in text, text


def test_record_where_no_engine_starts_leaves_no_folder(engines, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["record", "-e", engines.down(), "--retries", "0", "--duration", "0.2", "--out", str(out)]) == 1
    assert "no engine started recording" in capsys.readouterr().out
    assert not out.exists()
    kept = tmp_path / "kept"  # a folder that was there before: left as it was
    kept.mkdir()
    assert main(["record", "-e", engines.down(), "--retries", "0", "--duration", "0.2", "--out", str(kept)]) == 1
    assert kept.is_dir()


def test_a_stop_signal_before_record_handles_them_starts_no_engine(engines, tmp_path, capsys):
    """A signal caught by `moe-record record` before record() installs its handler (here: the
    flag already set) is not lost: no engine is started, and the status says interrupted."""
    _, engine = engines.ours()
    stop = threading.Event()
    stop.set()
    with Fleet([engine.url], retries=0) as fleet:
        assert record(fleet, out=str(tmp_path / "out"), duration=5.0, interrupted=stop) == 130
        assert not fleet.status()[0].info["recording"]
    assert "interrupted before any engine started" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_stop_signals_until_exit_neither_kill_nor_cut_the_report(engines, tmp_path, signame):
    """A stop signal repeated until `record` exits (a held Ctrl-C, a supervisor that keeps asking)
    ends the recording once; the dump, the report and the exit status come as usual. SIGTERM and
    SIGHUP used to kill the process once record had saved (only SIGINT was ignored then): exit -15,
    not 0."""
    import signal

    def until_exit(proc) -> None:
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(getattr(signal, signame))
            time.sleep(0.01)

    _, out, status, output, expected = _record_under_signals(engines, tmp_path, 14, until_exit)
    assert status == 0, output
    assert "validated 2 dump file(s): all valid" in output and "Traceback" not in output
    assert torch.equal(load_dump(str(out / "merged.pt")).total_count(), expected)


def test_ctrl_c_is_answered_at_once_while_the_engines_take_their_time_to_stop(engines, tmp_path):
    """Ctrl-C ends the recording, and the engines' stop answers may take up to the timeout: the
    first Ctrl-C is said at once, not after the stop (a user pressed it again, then again), and a
    second one during the stop is answered too, while the engine has still not stopped."""
    import signal
    import subprocess
    import sys

    rec, server = engines.slow(delay=3.0, slow_stop=True)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "moe_record_sdk", "record", "-e", server.url, "--interval", "0.2", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not rec.status().recording and time.monotonic() < deadline:
            time.sleep(0.05)
        expected = feed(rec, seed=23)

        def read_until(text: str) -> None:
            for line in proc.stdout:
                lines.append(line)
                if text in line:
                    return
            raise AssertionError(f"no {text!r} in {''.join(lines)}")

        proc.send_signal(signal.SIGINT)
        read_until("stopping (Ctrl-C or SIGTERM)")
        assert rec.status().recording  # said before the engine's 3 s stop answered
        proc.send_signal(signal.SIGINT)
        read_until("finishing the dump; please wait")
        assert rec.status().recording  # the second is answered during the stop, too
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert not rec.status().recording
    assert torch.equal(load_dump(str(out / "merged.pt")).total_count(), expected)


def test_stop_signal_handlers_run_off_the_main_thread_once_per_signal():
    """What a stop signal does runs on a watcher thread, once per signal: run in the signal's own
    context, between two bytecodes of the main thread, a second Ctrl-C's print broke the first's
    half-way through rich's lazy import (ImportError: `record` exited 1 under a burst), and a
    lock the interrupted code held (an Event's, here a plain one) would deadlock."""
    import signal

    from moe_record_sdk.cli.control import OnCtrlC

    lock, ran = threading.Lock(), []

    def handler() -> None:
        if lock.acquire(timeout=2):  # in the main thread, which holds it, this cannot succeed
            ran.append("main" if threading.current_thread() is threading.main_thread() else "watcher")
            lock.release()
        else:
            ran.append("deadlock")

    before = signal.getsignal(signal.SIGTERM)
    with OnCtrlC(handler):
        with lock:
            for _ in range(5):
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        deadline = time.monotonic() + 10
        while len(ran) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert ran == ["watcher"] * 5
    assert signal.getsignal(signal.SIGTERM) is before  # put back as it was


def test_status_of_an_engine_never_started_says_so(engines, capsys):
    """An engine that never recorded has no run id: the line said "run None"."""
    _, a = engines.ours()
    assert main(["status", "-e", a.url]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.endswith("idle, mode stat, 0 passes, 0 tokens, 1 rank(s), no run started yet"), line
    assert main(["start", "-e", a.url]) == 0
    capsys.readouterr()
    assert main(["status", "-e", a.url, "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["engines"][0]["run_id"]
    assert main(["status", "-e", a.url]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert run_id and line.endswith(f"recording, mode stat, 0 passes, 0 tokens, 1 rank(s), run {run_id}"), line
    # A run that ended reads "stopped", not "idle" as if it never recorded (record's last table said so).
    assert main(["stop", "-e", a.url, "--client-id", "ops"]) == 0 and main(["status", "-e", a.url]) == 0
    line = capsys.readouterr().out.splitlines()[-2]
    assert line.endswith(f"stopped, mode stat, 0 passes, 0 tokens, 1 rank(s), run {run_id}"), line
    # A stop of a stopped run says so, and whose stop it was (it read a plain "ok").
    assert main(["stop", "-e", a.url]) == 0
    assert "(already stopped by client ops: nothing changed)" in capsys.readouterr().out


def _ctrl_c_beside_a_hung_engine(engines, *args: str, seed: int | None = None):
    """``moe-record <args> -e <healthy> -e <hung>`` in its own process, Ctrl-C once the healthy
    engine records (fed first when ``seed``). The hung engine takes the connection and never
    answers. Returns (exit status, output, healthy URL, hung URL, the counts fed)."""
    import signal
    import socket
    import subprocess
    import sys

    rec, ok = engines.ours()
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        hung_url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        cmd = [sys.executable, "-m", "moe_record_sdk", *args[:1], "-e", ok.url, "-e", hung_url, *args[1:]]
        # Ctrl-C as at a terminal: a test runner started in the background inherits SIGINT
        # ignored, and Python then installs no KeyboardInterrupt for it in the child.
        default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=default_sigint
        )
        try:
            deadline = time.monotonic() + 60
            while not rec.status().recording and time.monotonic() < deadline:
                time.sleep(0.05)
            expected = feed(rec, seed=seed) if seed is not None else None
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
            output, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    return proc.returncode, output, ok.url, hung_url, expected


def test_ctrl_c_while_an_engine_hangs_says_who_started(engines):
    """`moe-record start` over a healthy engine and one that never answers, cut by Ctrl-C: the
    engines that had answered are listed, the other as interrupted; no traceback."""
    status, output, ok_url, hung_url, _ = _ctrl_c_beside_a_hung_engine(engines, "start")
    assert status == 130, output
    assert "moe-record start: interrupted" in output and "Traceback" not in output
    assert f"{ok_url} start: ok" in output
    assert f"{hung_url} start: FAILED (interrupted) no answer before the interrupt" in output


def test_ctrl_c_during_records_start_says_what_it_waits_for(engines, tmp_path):
    """Ctrl-C while `record`'s start waits on an engine that never answers: said at once, then
    the start ends at the timeout and the engines that started are stopped, dumped and saved."""
    out = tmp_path / "out"
    status, output, _, _, expected = _ctrl_c_beside_a_hung_engine(
        engines, "record", "--timeout", "3", "--out", str(out), seed=19
    )
    assert status == 1, output  # the hung engine failed
    assert "stopping: the start ends once every engine has answered" in output and "Traceback" not in output
    (saved,) = [f for f in os.listdir(out) if f.startswith("engine-0-")]
    assert torch.equal(load_dump(str(out / saved)).total_count(), expected)


def test_a_dump_too_large_for_this_machine_says_how_to_leave_it_on_the_engine(engines, tmp_path, capsys, monkeypatch):
    """The CLI takes at most this machine's memory and has no larger limit to offer: a 413 says
    how to dump anyway (into the engine's own folder), and that works, with the whole window."""
    from moe_record_sdk.client import fleet as fleet_module

    rec, server = engines.ours()
    assert main(["start", "-e", server.url]) == 0
    expected = feed(rec, seed=31)
    monkeypatch.setattr(fleet_module, "_memory_size", lambda: 400)  # a machine smaller than the dump (718 bytes)
    capsys.readouterr()
    assert main(["dump", "-e", server.url, "--out", str(tmp_path / "out")]) == 1
    text = capsys.readouterr().out
    assert f"{server.url} kept its window: `moe-record dump --engine {server.url}` (and your key option)" in text
    monkeypatch.undo()
    assert main(["dump", "-e", server.url, "--json"]) == 0
    (engine,) = json.loads(capsys.readouterr().out)["engines"]
    assert engine["location"] == "server-disk" and len(engine["files"]) == 1
    assert torch.equal(load_dump(engine["files"][0]).total_count(), expected)


def test_what_an_engine_says_reaches_the_terminal_escaped(capsys):
    """An engine's error text went to the terminal raw: escape sequences could clear the screen,
    retitle the window or hide a link, and a newline forge a line of the report."""
    import http.server

    class Hostile(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = b"x\x1b[2J\x1b]0;TITLE\x07\nstatus: 2/2 engines ok"
            self.send_response(500)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert main(["status", "-e", f"127.0.0.1:{server.server_address[1]}", "--retries", "0"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "x\\x1b[2J\\x1b]0;TITLE\\x07" in out
    assert not any(line.startswith("status: 2/2") for line in out.splitlines())  # no forged line


def test_record_says_which_engine_may_still_be_recording_when_its_stop_failed(engines, tmp_path, capsys):
    """An engine whose stop failed kept recording after record exited, and nothing said so."""
    from moe_record_sdk.server.protocol import STOP_PATH

    rec, server, _ = engines.flaky(STOP_PATH, 10)  # its stops answer 503, retries included
    argv = ["record", "-e", server.url, "--retries", "0", "--duration", "0.3", "--interval", "0.1"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert rec.status().recording
    assert f"{server.url} may still be recording: `moe-record stop -e {server.url}` ends it" in text, text
