"""The ``vllm.general_plugins`` entry point: runs in every vLLM process, workers included.

What it installs (once per process, only when recording is enabled, and only on a supported
vLLM; nothing in vLLM's source is patched):

* ``WorkerWrapperBase.load_model``: the wrapper reached it through ``__getattr__``; ours calls the
  worker's, then builds the worker's :class:`~moe_record_vllm.worker.WorkerRecording`, before
  vLLM's profile run, Dynamo trace and CUDA-graph capture.
* ``WorkerWrapperBase.moe_record_{start,stop,dump,status}``: the control methods, called by
  string name through ``collective_rpc`` (no callable is shipped, no insecure serialization).
* one more factor in vLLM's AOT compile-cache key, because the tap is part of the traced graph:
  without it a graph cached by a run without the plugin would be loaded and count nothing.

Recording is enabled by ``VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR`` (vLLM PR 19658's name; it
also names the dump directory) or ``MOE_RECORD_ENABLE=1``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from moe_record_sdk import env
from moe_record_sdk.errors import AdapterError

from .rpc import errors_as_data
from .version import __version__, check_version

log = logging.getLogger("vllm.moe_record")  # under vLLM's logger: its handlers print it

#: The control methods added to every worker, by the name ``collective_rpc`` calls.
RPC_START, RPC_STOP, RPC_DUMP, RPC_STATUS = (
    "moe_record_start",
    "moe_record_stop",
    "moe_record_dump",
    "moe_record_status",
)

_installed = False


def enabled(environ: Any = None) -> bool:
    """Whether recording is switched on for vLLM."""
    e = os.environ if environ is None else environ
    return bool(e.get(env.VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR)) or env.enabled(e)


def register() -> None:
    """vLLM calls this in every process; it must be re-entrant."""
    global _installed
    if _installed or not enabled():
        return
    try:
        check_version()
    except AdapterError as e:
        # Refuse, loudly, but leave vLLM serving: the endpoints answer with the same message.
        log.error("%s; expert-load recording is off", e)
        return
    _install()
    _installed = True


def _recording(wrapper: Any) -> Any:
    # vars(): the wrapper forwards unknown attributes to its worker through __getattr__.
    rec = vars(wrapper).get("_moe_record")
    if rec is None:
        why = vars(wrapper).get("_moe_record_error") or "its model is not loaded yet"
        raise AdapterError(f"moe-record-vllm: this worker has no recorder: {why}")
    return rec


def _load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
    from .worker import WorkerRecording

    out = self.worker.load_model(*args, **kwargs)
    if vars(self).get("_moe_record") is None:
        try:
            self._moe_record = WorkerRecording(self.worker)
        except AdapterError as e:  # e.g. a dense model: serve it anyway, say why nothing records
            log.error("%s; expert-load recording is off in this worker", e)
            self._moe_record_error = str(e)
    return out


def _start(self: Any, mode: str | None = None) -> dict[str, Any]:
    return _recording(self).start(mode)


def _stop(self: Any) -> dict[str, Any]:
    return _recording(self).stop()


def _dump(self: Any, write: bool = False, fmt: str = "msgpack") -> bytes:
    return _recording(self).dump(write=write, fmt=fmt)


def _status(self: Any) -> dict[str, Any]:
    return _recording(self).status()


_METHODS = {
    "load_model": _load_model,
    RPC_START: errors_as_data(_start),
    RPC_STOP: errors_as_data(_stop),
    RPC_DUMP: errors_as_data(_dump),
    RPC_STATUS: errors_as_data(_status),
}


def _install() -> None:
    from vllm.compilation import caching
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    clash = [name for name in _METHODS if name in vars(WorkerWrapperBase)]
    if clash:  # 0.32 defines none of them on the wrapper: a newer layout needs a new look
        raise AdapterError(
            f"moe-record-vllm: vLLM's WorkerWrapperBase already defines {clash}; refusing to replace them"
        )
    for name, fn in _METHODS.items():
        setattr(WorkerWrapperBase, name, fn)

    factors = caching.aot_compile_hash_factors

    def aot_compile_hash_factors(vllm_config: Any) -> list[str]:
        return [*factors(vllm_config), f"moe-record-vllm {__version__} tap"]

    caching.aot_compile_hash_factors = aot_compile_hash_factors
