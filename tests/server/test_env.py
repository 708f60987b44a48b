"""The environment variables of ``moe_record_sdk.env``: names, precedence, parsing."""

from __future__ import annotations

import pytest

from moe_record_sdk import env


def test_dump_dir_precedence():
    sg, vl, ours = (
        env.SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR,
        env.VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR,
        env.MOE_RECORD_DUMP_DIR,
    )
    assert env.dump_dir("sglang", {}) == "/tmp"  # SGLang's default
    both = {sg: "/s", vl: "/v"}
    assert env.dump_dir("sglang", both) == "/s" and env.dump_dir("vllm", both) == "/v"
    assert env.dump_dir("vllm", {sg: "/s"}) == "/s"
    assert env.dump_dir("sglang", {**both, ours: "/o"}) == env.dump_dir("vllm", {**both, ours: "/o"}) == "/o"


def test_switches_and_numbers():
    assert not env.enabled({}) and not env.enabled({env.MOE_RECORD_ENABLE: "0"})
    assert all(env.enabled({env.MOE_RECORD_ENABLE: v}) for v in ("1", "true", "YES", " on "))
    assert env.api_key({}) is None and env.api_key({env.MOE_RECORD_API_KEY: ""}) is None
    assert env.api_key({env.MOE_RECORD_API_KEY: "k"}) == "k"
    assert env.mode({}) == "stat" and env.mode({env.MOE_RECORD_MODE: "per_pass"}) == "per_pass"
    with pytest.raises(ValueError, match="MOE_RECORD_MODE: expected one of stat, per_pass, per_token, got 'stats'"):
        env.mode({env.MOE_RECORD_MODE: "stats"})
    assert env.max_body({}) == 65536 and env.max_body({env.MOE_RECORD_MAX_BODY: "10"}) == 10
    with pytest.raises(ValueError, match="MOE_RECORD_MAX_BODY"):
        env.max_body({env.MOE_RECORD_MAX_BODY: "10k"})
    assert env.recorder_options({}) == {}
    assert env.recorder_options({env.MOE_RECORD_MAX_BYTES: "65536", env.MOE_RECORD_BUFFER_SIZE: "8"}) == {
        "max_bytes": 65536,
        "buffer_size": 8,
    }
    with pytest.raises(ValueError, match="MOE_RECORD_BUFFER_SIZE: expected a number of rows, got '8 rows'"):
        env.recorder_options({env.MOE_RECORD_BUFFER_SIZE: "8 rows"})


def test_every_name_is_documented():
    for name in env.ALL:
        assert f"``{name}``" in env.__doc__, name


def test_a_bad_mode_in_the_environment_is_named_by_serve_and_breaks_no_other_command(monkeypatch, capsys):
    from moe_record_sdk.cli import main

    monkeypatch.setenv(env.MOE_RECORD_MODE, "stats")
    assert main(["serve", "--port", "0"]) == 2
    assert "moe-record serve: MOE_RECORD_MODE: expected one of" in capsys.readouterr().err
    assert main(["validate", "--help"]) == 0  # building the parser reads no environment


def test_serve_names_a_dump_folder_it_cannot_write_before_serving(tmp_path, capsys):
    """Found at start, not at the first dump (a 500 then): the folder named, exit 2."""
    from moe_record_sdk.cli import main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["serve", "--port", "0", "--dump-dir", str(blocker / "dumps")]) == 2
    assert f"moe-record serve: dump folder {blocker / 'dumps'}: cannot write there" in capsys.readouterr().err
