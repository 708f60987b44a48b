"""vLLM adapter for moe-record-sdk: exact expert-load recording as a vLLM plugin.

Enable it with ``VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR=<dir>`` (or ``MOE_RECORD_ENABLE=1``); for
the HTTP endpoints also ``VLLM_PLUGINS=moe_record`` (see the README). In-process engines are
driven with the functions below, which call every worker through ``collective_rpc``.

Example
-------
>>> import moe_record_vllm, vllm                                          # doctest: +SKIP
>>> llm = vllm.LLM(model=path)                                            # doctest: +SKIP
>>> moe_record_vllm.start(llm); llm.generate(prompts)                     # doctest: +SKIP
>>> dumps = moe_record_vllm.dump(llm)       # one Dump per rank           # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from moe_record_sdk import Dump
from moe_record_sdk.schema import decode

from .plugin import RPC_DUMP, RPC_START, RPC_STATUS, RPC_STOP
from .rpc import raise_errors
from .version import SUPPORTED, __version__, check_version


def start(llm: Any, mode: str | None = None) -> list[dict[str, Any]]:
    """Clear and start recording on every worker of ``llm`` (a ``vllm.LLM``); each rank's status."""
    return raise_errors(llm.collective_rpc(RPC_START, args=(mode,)))


def stop(llm: Any) -> list[dict[str, Any]]:
    """Stop recording on every worker; each rank's status."""
    return raise_errors(llm.collective_rpc(RPC_STOP))


def dump(llm: Any, write: bool = False) -> list[Dump]:
    """Every rank's dump of the window (then a new window starts); ``write``: each rank also
    saves its ``.pt`` file into the dump directory."""
    return [decode(raw, "msgpack") for raw in raise_errors(llm.collective_rpc(RPC_DUMP, args=(write,)))]


def status(llm: Any) -> list[dict[str, Any]]:
    """Every rank's status: recording?, mode, passes, tokens, unobserved layers..."""
    return raise_errors(llm.collective_rpc(RPC_STATUS))


__all__ = ["SUPPORTED", "__version__", "check_version", "dump", "start", "status", "stop"]
