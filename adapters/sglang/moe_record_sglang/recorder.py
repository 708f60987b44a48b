"""SGLang's recorder interface over our Recorder: the object SGLang's code talks to.

SGLang 0.5.23 reaches its expert-distribution recorder only through
``get_global_expert_distribution_recorder()``, looked up at every call. Every router
(``select_experts``, precomputed top-k, hash and mega gates, NPU top-k) calls
``.on_select_experts(topk_ids=...)`` with physical ids, padded rows already -1; the model's
decoder loop sets the layer with ``.with_current_layer(i)``; ``ModelRunner.forward`` brackets
each pass with ``.with_forward_pass(id, batch)``; the scheduler (behind the HTTP endpoints) and
``EPLBManager`` call ``.start_record()``, ``.stop_record()``, ``.dump_record()``. An object
with those methods replaces SGLang's recorder without touching any of those call sites.

Differences from SGLang's own recorder (on purpose):

* no host sync per pass in ``per_pass``/``per_token`` (device rings, bounded memory);
* a ``stat`` dump's ring rows are the passes recorded, in time order, not the whole
  zero-padded ring; with several ranks it is one cumulative row (rings may differ in length,
  so rows cannot be summed across ranks safely);
* ``per_token`` records carry the ids per layer, not ``input_ids``/``positions`` (those cost
  a host sync at every pass start).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
import torch

from moe_record_sdk import Dump, Recorder, Topology
from moe_record_sdk import env as moe_env
from moe_record_sdk.schema.sglang import sglang_file_name

log = logging.getLogger(__name__)


class SGLangRecorder:
    """Implements sglang 0.5.23's ``ExpertDistributionRecorder`` interface with our Recorder.

    Parameters
    ----------
    recorder:
        Our Recorder, sized for SGLang's layout: ``num_layers`` = ``num_hidden_layers``, slots =
        physical experts (``physical_to_logical_map`` from SGLang's expert location metadata).
    rank:
        SGLang's recorder rank (``moe_ep_rank``): names per-rank files and records.
    dump_dir:
        Where ``dump_record()`` writes; default ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``
        (``MOE_RECORD_DUMP_DIR`` wins), read at each dump as SGLang does.

    Example
    -------
    >>> rec = SGLangRecorder(Recorder(num_layers=2, num_experts=4, top_k=2, mode="per_pass"), rank=0)
    >>> rec.start_record()
    >>> with rec.with_forward_pass(7, None), rec.with_current_layer(1):
    ...     rec.on_select_experts(topk_ids=torch.tensor([[0, 3]]))
    >>> rec.recorder.dump().records[0].forward_pass_id
    7
    """

    def __init__(self, recorder: Recorder, rank: int = 0, *, dump_dir: str | None = None) -> None:
        self.recorder = recorder
        self.rank = rank
        self.dump_dir = dump_dir
        self.last_dump: Dump | None = None
        self.last_paths: list[str] = []
        self._layer: int | None = None
        self._disabled = False
        self._warned: set[str] = set()
        # SGLang's forward_pass_id of each pass recorded, by our pass index; host only. Passes
        # are recorded on the scheduler thread that also runs start/stop, so the host knows
        # exactly which steps the device counted.
        self._pass_index = 0
        self._pass_ids: deque[tuple[int, int]] = deque(maxlen=max(recorder.counter.ring_rows, 0) + 2)

    # -- context SGLang sets around the hooks ---------------------------------------------
    @contextmanager
    def with_current_layer(self, layer_idx: int | None) -> Iterator[None]:
        previous, self._layer = self._layer, layer_idx
        try:
            yield
        finally:
            self._layer = previous

    @contextmanager
    def with_debug_name(self, debug_name: str | None) -> Iterator[None]:
        yield

    @contextmanager
    def disable_this_region(self) -> Iterator[None]:
        """SGLang wraps MTP/NextN draft layers in this: their routing is not the model's."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    @contextmanager
    def with_forward_pass(self, forward_pass_id: int, forward_batch: Any) -> Iterator[dict[str, Any]]:
        outputs: dict[str, Any] = {}
        try:
            yield outputs
        finally:
            self.recorder.step()  # tensor ops only: commits the pass on the device
            if self.recorder.recording:  # the device counted this step exactly when this holds
                self._pass_ids.append((self._pass_index, forward_pass_id))
                self._pass_index += 1

    # -- the hooks ------------------------------------------------------------------------
    def on_select_experts(self, topk_ids: torch.Tensor) -> None:
        if self._disabled or self._layer is None:
            return
        # As SGLang: skip when idle, except while a CUDA graph captures (the tap must be in it).
        if not (self.recorder.recording or _capturing()):
            return
        rec = self.recorder
        if topk_ids.dim() != 2 or topk_ids.shape[1] != rec.top_k or self._layer not in rec.counter.row_of:
            self._warn_once(
                f"shape{tuple(topk_ids.shape)}-{self._layer}",
                f"moe-record: ignoring top-k ids of shape {tuple(topk_ids.shape)} at layer {self._layer} "
                f"(recorder sized for top_k={rec.top_k}, {rec.num_layers} layers)",
            )
            return
        rec.record(self._layer, topk_ids)

    def get_current_pass_count_buffer(self, layer_idx: int) -> None:
        """None: SGLang then takes the unfused path, which calls ``on_select_experts``."""
        return None

    def on_deepep_dispatch_normal(self, *args: Any, **kwargs: Any) -> None:
        """Counted at ``on_select_experts`` instead (SGLang's DeepEP-normal gatherer does the same)."""

    def on_deepep_dispatch_low_latency(self, *args: Any, **kwargs: Any) -> None:
        """Never installed where SGLang counts through this hook (see ``plugin.unsupported_reason``)."""

    # -- control --------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return self.recorder.recording

    def start_record(self) -> None:
        """Clear and record (SGLang: a second start warns and restarts)."""
        if self.recorder.recording:
            log.warning("moe-record: already recording expert ids; restarting the window (SGLang semantics)")
        self.recorder.start()
        self._pass_ids.clear()

    def stop_record(self) -> None:
        if not self.recorder.recording:
            log.warning("moe-record: stop_record while not recording")
        self.recorder.stop()

    def dump_record(self, output_mode: str = "file") -> dict[str, Any] | None:
        """Dump, then start a new window (SGLang semantics).

        ``file``: SGLang's files in the dump directory (stat: rank 0 only; per_pass/per_token:
        every rank). ``object``: SGLang's stat dict, for its ``EPLBManager``.
        """
        dump = self._with_sglang_pass_ids(self.recorder.dump())
        self._pass_ids.clear()
        if dump.window.mode == "stat":
            dump = _all_reduce_stat(dump, self.recorder.device)
        self.last_dump = dump
        if output_mode == "object":
            if dump.window.mode != "stat":
                raise ValueError("dump_record(output_mode='object') needs mode stat (as SGLang)")
            return {
                "rank": self.rank,
                "logical_count": dump.logical_count.to(self.recorder.device, torch.int32),
                "average_utilization_rate_over_window": None,
            }
        if output_mode != "file":
            raise NotImplementedError(f"output_mode {output_mode!r}")
        self.last_paths = []
        if dump.window.mode != "stat" or self.rank == 0:
            directory = self.dump_dir or moe_env.dump_dir("sglang")
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, sglang_file_name(dump))
            log.info("Write expert distribution to %s", path)
            dump.save(path)
            self.last_paths.append(path)
        return None

    def status(self) -> dict[str, Any]:
        """Our extension: ``Recorder.status()`` plus the files of the last dump."""
        return {**self.recorder.status().to_dict(), "rank": self.rank, "last_paths": list(self.last_paths)}

    # -- helpers --------------------------------------------------------------------------
    def _with_sglang_pass_ids(self, dump: Dump) -> Dump:
        ids = dict(self._pass_ids)
        for rec in dump.records:
            rec.forward_pass_id = ids.get(rec.forward_pass_id, rec.forward_pass_id)
        return dump

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _all_reduce_stat(dump: Dump, device: torch.device) -> Dump:
    """Sum a stat dump over the world, as SGLang's ``_StatAccumulator`` does (every rank must
    call: the scheduler fans the dump request out to all). One cumulative row, so ranks whose
    rings hold different numbers of passes still reduce tensors of one shape."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dump
    L = dump.model.num_layers
    w = dump.window
    total = dump.total_count()
    tokens = torch.tensor(w.num_tokens or [0] * L, dtype=torch.int64)
    discarded = torch.tensor(w.discarded or [0] * L, dtype=torch.int64)
    packed = torch.cat([total.flatten(), tokens, discarded]).to(device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed = packed.cpu()
    n = total.numel()
    return msgspec.structs.replace(
        dump,
        logical_count=packed[:n].view_as(total).unsqueeze(0).clone(),
        total_logical_count=None,
        physical_count=None,
        physical_to_logical_map=None,
        topology=Topology(world_size=1),  # the sum covers every rank
        window=msgspec.structs.replace(
            w,
            num_tokens=packed[n : n + L].tolist(),
            discarded=packed[n + L :].tolist(),
            buffer_size=0,
            num_passes=w.num_passes,
        ),
        model=msgspec.structs.replace(dump.model, num_physical_experts=None),
    )
