"""Optional dependencies: import them, or say which extra installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import MoeRecordError

#: module -> the pip requirement that brings it
EXTRAS = {
    "matplotlib": "pip install -e '.[plot]' in the moe-record-sdk checkout (or pip install matplotlib)",
    "prometheus_client": "pip install -e '.[metrics]' in the moe-record-sdk checkout (or pip install prometheus-client)",
}


class MissingDependencyError(MoeRecordError):
    """An optional dependency is not installed; the message says how to install it."""


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        hint = EXTRAS.get(module, f"pip install {module}")
        raise MissingDependencyError(f"{purpose} needs {module}: {hint}") from None
