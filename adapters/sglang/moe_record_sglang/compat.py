"""Which SGLang is installed, read from package metadata before any sglang import."""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from moe_record_sdk.errors import AdapterError

from .version import SUPPORTED


def sglang_version() -> str | None:
    """The installed ``sglang`` distribution's version, or None when it is not installed."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: str | None = None) -> str:
    """Return the SGLang version, or raise ``AdapterError`` naming it when it is not one this
    adapter was verified against (``SUPPORTED``).

    >>> check_sglang_version("0.5.23")
    '0.5.23'
    """
    found = sglang_version() if version is None else version
    if found is None:
        raise AdapterError("moe-record-sglang: sglang is not installed")
    try:
        ok = Version(found) in SpecifierSet(SUPPORTED)
    except InvalidVersion:
        ok = False
    if not ok:
        raise AdapterError(
            f"moe-record-sglang: sglang {found} is not supported (verified: {SUPPORTED}); "
            "SGLang's own expert distribution recorder stays in charge"
        )
    return found
