"""The ``moe-record`` parser and the package's lazy public names."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moe_record_sdk
from moe_record_sdk.cli import COMMANDS, main


def test_help_version_control_commands_and_the_package_import_load_no_torch():
    """`moe-record --help` or `status` answered in ~2 s while torch loaded; they need none of it."""
    code = (
        "import sys, contextlib, io\n"
        "import moe_record_sdk\n"
        "from moe_record_sdk.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main(argv) == 0, argv\n"
        "heavy = sorted({'torch', 'httpx', 'rich', 'msgspec'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        # start, stop and status need no dump: no torch either (an engine that is down: exit 1)
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['status', '-e', 'http://127.0.0.1:9', '--retries', '0']) == 1\n"
        "assert 'torch' not in sys.modules\n"
        # record loads torch with the first dump, where Ctrl-C is handled, not as it starts
        "import moe_record_sdk.cli.record\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_builds_its_parser_with_its_help_line(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: moe-record {command} ")
    assert main(["--help"]) == 0
    assert COMMANDS[command][1][:40] in " ".join(capsys.readouterr().out.split())


def test_an_unknown_command_is_named_with_the_choices(capsys):
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "'record'" in err


def test_every_public_name_resolves():
    for name in moe_record_sdk.__all__:
        assert getattr(moe_record_sdk, name) is not None, name
    assert set(moe_record_sdk.__all__) <= set(dir(moe_record_sdk))
    with pytest.raises(AttributeError, match="no_such_name"):
        moe_record_sdk.no_such_name  # noqa: B018
