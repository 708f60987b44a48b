"""The adapter registry: a third-party adapter pip-installed from a throwaway wheel is found through
its entry point and used with no change to the core; broken adapters are reported, never fatal."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from moe_record_sdk.cli import main
from moe_record_sdk.errors import AdapterError, RecorderError
from moe_record_sdk.plugins import AdapterRegistry, hookimpl

PKG = "acme_moe_adapter"

# A made-up engine and its adapter, as a third party would ship them.
ENGINE = '''
"""AcmeEngine: routes tokens with a fixed rule and calls its listeners with the top-k ids."""
import torch


class AcmeEngine:
    num_layers, num_experts, top_k = 3, 4, 2

    def __init__(self):
        self.listeners = []
        self.step_listeners = []

    def forward(self, num_tokens):
        for layer in range(1, self.num_layers):  # layer 0 is dense
            ids = (torch.arange(num_tokens * self.top_k).view(num_tokens, self.top_k) + layer) % self.num_experts
            for fn in self.listeners:
                fn(layer, ids)
        for fn in self.step_listeners:
            fn()
'''

ADAPTER = """
from moe_record_sdk import Recorder
from moe_record_sdk.errors import AdapterError, RecorderError
from moe_record_sdk.plugins import AdapterInfo, Attachment, LayerMap, hookimpl

from .engine import AcmeEngine


@hookimpl
def moe_record_adapter_info():
    return AdapterInfo(name="acme", engine="", version="1.2.3", distribution="acme-moe-adapter")


@hookimpl
def moe_record_layer_map(target):
    if isinstance(target, AcmeEngine):
        return LayerMap(num_layers=3, moe_layer_ids=(1, 2), num_experts=4, top_k=2, model_name="acme")


@hookimpl
def moe_record_attach(target, recorder, options):
    lm = moe_record_layer_map(target)
    if lm is None:
        return None
    if target.listeners:
        raise AdapterError("acme: already attached")
    recorder = recorder or Recorder(**lm.recorder_kwargs(), **options)
    target.listeners.append(recorder.record)
    target.step_listeners.append(recorder.step)

    def undo():
        target.listeners.clear()
        target.step_listeners.clear()

    return Attachment(adapter="acme", layer_map=lm, undo=undo, recorder=recorder)
"""

BROKEN_IMPORT = "raise ImportError('acme_broken needs libacme.so')\n"

RAISING = """
from moe_record_sdk.plugins import AdapterInfo, hookimpl


@hookimpl
def moe_record_adapter_info():
    return AdapterInfo(name="acme_raising", engine="", version="0.0.1")


@hookimpl
def moe_record_layer_map(target):
    raise RuntimeError("acme_raising has a bug")
"""

OLD = """
from moe_record_sdk.plugins import AdapterInfo, hookimpl


@hookimpl
def moe_record_adapter_info():
    return AdapterInfo(name="acme_old", engine="torch", version="0.1", engine_versions="<1.0")
"""

BAD_SPEC = """
from moe_record_sdk.plugins import AdapterInfo, hookimpl


@hookimpl
def moe_record_adapter_info():
    return AdapterInfo(name="acme_badspec", engine="torch", version="0.1", engine_versions="2.4+")
"""

ENTRY_POINTS = f"""\
[moe_record_sdk.adapters]
acme = {PKG}.adapter
acme_badspec = {PKG}.badspec
acme_broken_import = {PKG}.broken
acme_dup = {PKG}.old
acme_old = {PKG}.old
acme_raising = {PKG}.raising
"""


def _wheel(dest: Path) -> Path:
    """A pure-Python wheel of the package above, written by hand (no build backend needed)."""
    dist = f"{PKG}-1.2.3.dist-info"
    files = {
        f"{PKG}/__init__.py": "",
        f"{PKG}/engine.py": ENGINE,
        f"{PKG}/adapter.py": ADAPTER,
        f"{PKG}/broken.py": BROKEN_IMPORT,
        f"{PKG}/raising.py": RAISING,
        f"{PKG}/old.py": OLD,
        f"{PKG}/badspec.py": BAD_SPEC,
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: acme-moe-adapter\nVersion: 1.2.3\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/entry_points.txt": ENTRY_POINTS,
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = dest / f"{PKG}-1.2.3-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """pip-install the throwaway wheel into a fresh target folder."""
    tmp = tmp_path_factory.mktemp("thirdparty")
    target = tmp / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(_wheel(tmp)),
        ],
        check=True,
        timeout=120,
    )
    # A second distribution that registers one of the same adapter names.
    shadow = target / "acme_shadow-0.1.dist-info"
    shadow.mkdir()
    (shadow / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-shadow\nVersion: 0.1\n")
    (shadow / "entry_points.txt").write_text(f"[moe_record_sdk.adapters]\nacme_dup = {PKG}.old\n")
    return target


@pytest.fixture
def on_path(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    yield installed
    for name in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[name]


def test_third_party_adapter_is_discovered_and_used(on_path) -> None:
    from acme_moe_adapter.engine import AcmeEngine

    registry = AdapterRegistry()
    reports = {r.name: r for r in registry.adapters()}
    assert reports["acme"].status == "ok"
    assert reports["acme"].info.version == "1.2.3" and reports["acme"].distribution == "acme-moe-adapter 1.2.3"
    assert reports["acme"].source == f"{PKG}.adapter"

    engine = AcmeEngine()
    assert registry.which(engine) == "acme"
    assert registry.layer_map(engine).moe_layer_ids == (1, 2)
    att = registry.attach(engine, mode="stat")
    att.recorder.start()
    engine.forward(3)
    engine.forward(5)
    dump = att.recorder.dump()
    assert dump.window.num_passes == 2 and dump.window.num_tokens == [0, 8, 8]
    want = torch.zeros(3, 4, dtype=torch.int64)
    for n in (3, 5):
        for layer in (1, 2):
            want[layer] += torch.bincount(((torch.arange(n * 2) + layer) % 4), minlength=4)
    assert torch.equal(dump.total_count(), want)
    with pytest.raises(AdapterError, match="acme: already attached"):
        registry.attach(engine)
    att.detach()
    assert engine.listeners == []


def test_broken_adapters_are_reported_and_others_keep_working(on_path, capsys) -> None:
    from acme_moe_adapter.engine import AcmeEngine

    registry = AdapterRegistry()
    reports = {r.name: r for r in registry.adapters()}
    assert reports["acme_broken_import"].status == "broken"
    assert "import failed: ImportError: acme_broken needs libacme.so" in reports["acme_broken_import"].error
    assert reports["acme_old"].status == "unsupported"
    assert "outside the supported <1.0" in reports["acme_old"].error
    assert reports["acme_raising"].status == "ok"  # until its hook raises
    # A malformed specifier raised out of the registry, and took every adapter down with it.
    assert reports["acme_badspec"].status == "broken"
    assert "engine check failed: InvalidSpecifier" in reports["acme_badspec"].error
    # Two distributions with one name: which loaded was chance (it hid the other); now neither, named.
    assert reports["acme_dup"].status == "broken"
    assert "two distributions register adapter 'acme_dup'" in reports["acme_dup"].error
    assert "acme-moe-adapter 1.2.3" in reports["acme_dup"].error and "acme-shadow 0.1" in reports["acme_dup"].error

    # The raising hook is asked before acme (pluggy calls later registrations first): it is
    # reported and unregistered, and acme still serves the engine.
    assert registry.which(AcmeEngine()) == "acme"
    raising = {r.name: r for r in registry.adapters()}["acme_raising"]
    assert (
        raising.status == "broken"
        and "moe_record_layer_map raised RuntimeError: acme_raising has a bug" in raising.error
    )
    assert registry.which(AcmeEngine()) == "acme"
    with pytest.raises(AdapterError, match="adapter 'acme_raising' is not available .broken"):
        registry.layer_map(AcmeEngine(), adapter="acme_raising")

    # The torch adapter, installed beside them, is untouched.
    from moe_record_torch.tiny import TinyMoE, TinyMoEConfig

    assert registry.which(TinyMoE(TinyMoEConfig(num_layers=1))) == "torch"

    # `moe-record adapters` lists them all, with versions and reasons.
    assert main(["adapters", "--json"]) == 0
    listed = {a["name"]: a for a in json.loads(capsys.readouterr().out)["adapters"]}
    assert listed["acme"]["info"]["version"] == "1.2.3" and listed["acme"]["status"] == "ok"
    assert listed["acme_broken_import"]["status"] == "broken" and listed["torch"]["status"] == "ok"
    assert main(["adapters"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^acme_old\s+unsupported\s+0\.1\s+torch", table, re.M), table
    assert "acme_broken_import: import failed" in table


def test_register_without_entry_point() -> None:
    class Inline:
        pass

    from moe_record_sdk.plugins import LayerMap, hookimpl

    class Plugin:
        @hookimpl
        def moe_record_layer_map(self, target):
            return (
                LayerMap(num_layers=1, moe_layer_ids=(0,), num_experts=2, top_k=1)
                if isinstance(target, Inline)
                else None
            )

    registry = AdapterRegistry(entry_points=False)
    assert registry.register(Plugin(), "inline").status == "ok"
    with pytest.raises(AdapterError, match="adapter 'inline' is already registered"):
        registry.register(Plugin(), "inline")  # reported the working one broken while it served
    assert [(r.name, r.status) for r in registry.adapters()] == [("inline", "ok")]
    assert registry.layer_map(Inline()).num_experts == 2
    with pytest.raises(AdapterError, match="no adapter serves int"):
        registry.layer_map(3)


def test_an_engine_not_installed_is_no_warning(caplog) -> None:
    """Every adapter but the engine's own is "not installed" on a machine: that was a WARNING
    per adapter on stderr for each command that loads them; a broken one still warns."""
    import logging

    from moe_record_sdk.plugins import AdapterInfo, hookimpl

    class Absent:
        @hookimpl
        def moe_record_adapter_info(self):
            return AdapterInfo(name="absent", engine="no-such-engine-here", version="0.1")

    class Broken:
        @hookimpl
        def moe_record_adapter_info(self):
            raise RuntimeError("bug")

    registry = AdapterRegistry(entry_points=False)
    with caplog.at_level(logging.INFO, logger="moe_record_sdk.plugins.manager"):
        assert registry.register(Absent(), "absent").status == "unsupported"
        assert registry.register(Broken(), "broken").status == "broken"
    levels = {r.getMessage().split()[2]: r.levelname for r in caplog.records}
    assert levels == {"absent": "INFO", "broken": "WARNING"}, levels


def test_a_callers_mistake_leaves_the_adapter_working() -> None:
    """A bad option is the caller's to fix: it is named, and the adapter serves the next call."""
    from moe_record_torch.tiny import TinyMoE, TinyMoEConfig

    model = TinyMoE(TinyMoEConfig(num_layers=2))
    registry = AdapterRegistry()
    with pytest.raises(RecorderError, match="mode: 'sometimes' is not one of"):
        registry.attach(model, mode="sometimes")
    with pytest.raises(AdapterError, match=r"unknown options \['bufer_size'\]; Recorder options are .*'buffer_size'"):
        registry.attach(model, bufer_size=8)
    with pytest.raises(RecorderError, match="buffer_size: expected an int, got str"):
        registry.attach(model, buffer_size="8")
    assert {r.name: r.status for r in registry.adapters()}["torch"] == "ok"
    att = registry.attach(model, buffer_size=8)
    assert att.adapter == "torch" and att.recorder.num_layers == 2
    att.detach()


def test_what_a_broken_adapter_raised_reaches_the_caller() -> None:
    class Buggy:
        @hookimpl
        def moe_record_layer_map(self, target):
            return target.no_such_attribute

    registry = AdapterRegistry(entry_points=False)
    registry.register(Buggy(), "buggy")
    with pytest.raises(
        AdapterError, match="no adapter serves int .*buggy's moe_record_layer_map raised AttributeError"
    ):
        registry.layer_map(3)
    assert {r.name: r.status for r in registry.adapters()}["buggy"] == "broken"
