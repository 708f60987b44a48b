"""Record folders made by ``moe-record record``'s own code, for the offline tools' tests."""

from __future__ import annotations

import io
import os

import torch
from rich.console import Console

from moe_record_sdk import Recorder
from moe_record_sdk.cli.record import record
from moe_record_sdk.client import Fleet
from moe_record_sdk.client._models import run_file_kind
from moe_record_sdk.server import LocalBackend, ServerThread, make_app

from ..server.helpers import feed


def record_folder(tmp_path, recorders: list[Recorder], name: str = "rec") -> tuple[str, int, list[torch.Tensor]]:
    """What ``moe-record record --out DIR`` leaves in DIR, made by its own code over real local
    engines serving ``recorders``, each fed while recording: (DIR, record's exit status, each
    engine's expected counts [L, E])."""
    servers = [
        ServerThread(make_app(LocalBackend(r), dump_dir=str(tmp_path / f"{name}-disk-{i}"))).start()
        for i, r in enumerate(recorders)
    ]
    expected: list[torch.Tensor] = []
    out = str(tmp_path / name)
    try:
        with Fleet([s.url for s in servers], timeout=30.0, retries=0) as fleet:
            status = record(
                fleet,
                out=out,
                duration=0.2,
                interval=0.1,
                console=Console(file=io.StringIO()),
                during=lambda stop: expected.extend(feed(r, seed=i) for i, r in enumerate(recorders)),
            )
    finally:
        for server in servers:
            server.stop()
    return out, status, expected


def engine_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if run_file_kind(n) == "engine")
