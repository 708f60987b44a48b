"""Repository-wide pytest policy.

* ``@pytest.mark.gpu`` tests skip cleanly without CUDA; they are the only skips CI allows.
* Under ``CI=true`` any other skip fails the run: a test that needs vLLM, SGLang or
  transformers must run there.
* ``--full`` runs the long versions of campaigns (fuzzing, soak) instead of the small defaults.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", help="run the full fuzz/soak campaigns")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_bad_skips: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and os.environ.get("CI", "").lower() in ("1", "true", "yes") and "gpu" not in report.keywords:
        _bad_skips.append(f"{report.nodeid}: {report.longrepr}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _bad_skips:
        print("\nCI=true forbids skips outside @pytest.mark.gpu:\n  " + "\n  ".join(_bad_skips))
        session.exitstatus = 1
