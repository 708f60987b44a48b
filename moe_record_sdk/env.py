"""Every environment variable moe-record-sdk reads, in one place, each documented.

Engines' own names come first: we honour them so a stock setup keeps working.

=========================================  =====================================================
``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``  where SGLang (and our endpoints) write dump files;
                                             SGLang's default is ``/tmp``
``VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR``    the same for vLLM (its 2025 endpoints, PR 19658);
                                             read first on the vLLM side
``MOE_RECORD_DUMP_DIR``                      ours; overrides both for any engine
``MOE_RECORD_ENABLE``                        vLLM: ``1``/``true``/``yes``/``on`` turns recording
                                             and the HTTP control endpoints on (off by default:
                                             they are absent, 404)
``MOE_RECORD_API_KEY``                       bearer token the endpoints require when set; also
                                             the key the client and CLI send by default
``MOE_RECORD_MODE``                          default recording mode: ``stat``, ``per_pass`` or
                                             ``per_token``
``MOE_RECORD_MAX_BODY``                      largest control request body accepted, bytes (413
                                             above; default 65536)
``MOE_RECORD_MAX_BYTES``                     vLLM: ``per_token``'s bound on its rings per rank,
                                             bytes (default 256 MiB)
``MOE_RECORD_BUFFER_SIZE``                   vLLM: rows of the per-pass ring (default 1000)
``MOE_RECORD_SGLANG_PORT``                   SGLang: base port of the opt-in per-rank side
                                             servers (rank r on base + r)
``MOE_RECORD_SGLANG_HOST``                   SGLang: their address (default ``127.0.0.1``)
=========================================  =====================================================

Example
-------
>>> from moe_record_sdk import env
>>> env.dump_dir("sglang", environ={})
'/tmp'
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR = "SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"
"""SGLang's dump directory (``sglang/srt/environ.py``, default ``/tmp``)."""

VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR = "VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR"
"""vLLM's dump directory from its SGLang-compatible endpoints (vLLM PR 19658)."""

MOE_RECORD_DUMP_DIR = "MOE_RECORD_DUMP_DIR"
"""Our dump directory; wins over the engines' names."""

MOE_RECORD_ENABLE = "MOE_RECORD_ENABLE"
"""vLLM: turns recording and the HTTP control endpoints on (they are absent otherwise)."""

MOE_RECORD_API_KEY = "MOE_RECORD_API_KEY"
"""Bearer token required by the endpoints when set, and sent by the client and CLI by default."""

MOE_RECORD_MODE = "MOE_RECORD_MODE"
"""Default recording mode of engines that start recording without being told one."""

MOE_RECORD_MAX_BODY = "MOE_RECORD_MAX_BODY"
"""Largest control request body accepted, in bytes."""

MOE_RECORD_MAX_BYTES = "MOE_RECORD_MAX_BYTES"
"""Engines whose recorder we build (vLLM): ``per_token``'s bound on its rings, in bytes, per
rank (default 256 MiB, on the GPU)."""

MOE_RECORD_BUFFER_SIZE = "MOE_RECORD_BUFFER_SIZE"
"""Engines whose recorder we build (vLLM): rows of the per-pass ring (SGLang's buffer size)."""

MOE_RECORD_SGLANG_PORT = "MOE_RECORD_SGLANG_PORT"
"""SGLang adapter: base port of the opt-in per-rank side server (our HTTP extensions); rank r
listens on base + r."""

MOE_RECORD_SGLANG_HOST = "MOE_RECORD_SGLANG_HOST"
"""SGLang adapter: address the per-rank side servers listen on (default 127.0.0.1)."""

#: SGLang's default dump directory (``EnvStr("/tmp")`` in sglang 0.5.23).
DEFAULT_DUMP_DIR = "/tmp"
#: Control requests carry at most ``{"mode": ...}``: 64 KiB is generous.
DEFAULT_MAX_BODY = 64 * 1024

ALL: tuple[str, ...] = (
    SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR,
    VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR,
    MOE_RECORD_DUMP_DIR,
    MOE_RECORD_ENABLE,
    MOE_RECORD_API_KEY,
    MOE_RECORD_MODE,
    MOE_RECORD_MAX_BODY,
    MOE_RECORD_MAX_BYTES,
    MOE_RECORD_BUFFER_SIZE,
    MOE_RECORD_SGLANG_PORT,
    MOE_RECORD_SGLANG_HOST,
)

_TRUE = ("1", "true", "yes", "on")


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def dump_dir(engine: str = "sglang", environ: Mapping[str, str] | None = None) -> str:
    """The directory dump files go to: ours, then the engine's own variable, then the other
    engine's, then ``/tmp`` (SGLang's default).

    ``engine``: ``"sglang"`` (also the torch reference server) or ``"vllm"``.
    """
    e = _env(environ)
    order = [MOE_RECORD_DUMP_DIR]
    if engine == "vllm":
        order += [VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR, SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR]
    else:
        order += [SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR, VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR]
    for name in order:
        if e.get(name):
            return e[name]
    return DEFAULT_DUMP_DIR


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``MOE_RECORD_ENABLE`` turns the endpoints on."""
    return _env(environ).get(MOE_RECORD_ENABLE, "").strip().lower() in _TRUE


def api_key(environ: Mapping[str, str] | None = None) -> str | None:
    """``MOE_RECORD_API_KEY``, or None when unset or empty."""
    return _env(environ).get(MOE_RECORD_API_KEY) or None


def mode(environ: Mapping[str, str] | None = None, default: str = "stat") -> str:
    """``MOE_RECORD_MODE``, or ``default``; a value that is not a mode is an error naming the variable."""
    from .schema.names import MODES

    value = _env(environ).get(MOE_RECORD_MODE) or default
    if value not in MODES:
        raise ValueError(f"{MOE_RECORD_MODE}: expected one of {', '.join(MODES)}, got {value!r}")
    return value


def max_body(environ: Mapping[str, str] | None = None) -> int:
    """``MOE_RECORD_MAX_BODY`` in bytes, or 64 KiB; a value that is not an integer is an error."""
    value = _int(MOE_RECORD_MAX_BODY, "a number of bytes", environ)
    return DEFAULT_MAX_BODY if value is None else value


#: The variable behind each ``recorder_options`` key, for messages.
VARIABLE_OF = {"max_bytes": MOE_RECORD_MAX_BYTES, "buffer_size": MOE_RECORD_BUFFER_SIZE}


def recorder_options(environ: Mapping[str, str] | None = None) -> dict[str, int]:
    """``Recorder`` keyword arguments from ``MOE_RECORD_MAX_BYTES`` / ``MOE_RECORD_BUFFER_SIZE``
    (only those set)."""
    options = {
        "max_bytes": _int(VARIABLE_OF["max_bytes"], "a number of bytes", environ),
        "buffer_size": _int(VARIABLE_OF["buffer_size"], "a number of rows", environ),
    }
    return {k: v for k, v in options.items() if v is not None}


def _int(name: str, what: str, environ: Mapping[str, str] | None) -> int | None:
    """The integer in variable ``name``, None when unset or empty; anything else is an error."""
    raw = _env(environ).get(name)
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected {what}, got {raw!r}") from None
