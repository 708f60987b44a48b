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
* with several ranks, a ``stat`` dump merges the ranks by their ``Topology``
  (``moe_record_sdk.merge.merge_distributed``) instead of summing the world: ranks that routed
  the same tokens (tensor-parallel replicas, see :mod:`moe_record_sglang.topology`) count
  once, so rank 0's file and ``EPLBManager``'s counts are the true counts;
* ``per_token`` records carry the ids per layer, not ``input_ids``/``positions`` (those cost
  a host sync at every pass start).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import msgspec
import torch

from moe_record_sdk import Dump, Recorder
from moe_record_sdk import env as moe_env
from moe_record_sdk.errors import MergeError, RecorderError
from moe_record_sdk.merge import merge_distributed
from moe_record_sdk.schema import MODES
from moe_record_sdk.schema.sglang import sglang_counts, sglang_file_name

from .topology import across_replicas, with_topology

log = logging.getLogger(__name__)

#: Pass ids kept beyond the ring's rows: passes SGLang completes while a side server's dump
#: copies the ring (they must not push the dumped passes' ids out). Host tuples, a few KB.
ID_SLACK = 4096

#: True inside a speculative-decoding draft model's ``ModelRunner.forward`` (set by the plugin's
#: wrap of it). The draft runner numbers its passes from 1 too and brackets them with the same
#: global recorder: its passes are not the served model's, so they make no pass and count nothing.
IN_DRAFT_RUNNER: ContextVar[bool] = ContextVar("moe_record_in_draft_runner", default=False)


class SGLangRecorder:
    """Implements sglang 0.5.23's ``ExpertDistributionRecorder`` interface with our Recorder.

    Parameters
    ----------
    recorder:
        Our Recorder, sized for SGLang's layout: ``num_layers`` = ``num_hidden_layers``, slots =
        physical experts (``physical_to_logical_map`` from SGLang's expert location metadata).
    rank:
        SGLang's recorder rank (``moe_ep_rank``), echoed in ``dump_record(output_mode="object")``.
        Files and records are named by the world rank of ``recorder.topology``.
    dump_dir:
        Where ``dump_record()`` writes; default ``SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR``
        (``MOE_RECORD_DUMP_DIR`` wins), read at each dump as SGLang does.
    live_map:
        SGLang's ``physical_to_logical_map_cpu``, which EPLB rewrites in place: each dump maps
        physical slots to experts with its current value, as SGLang's dump does (``recorder``
        must then have a ``physical_to_logical_map`` of the same shape).
    eplb:
        SGLang's ``EPLBManager`` reads this recorder (``--enable-eplb``): it needs mode ``stat``
        at every rebalance, so :meth:`start_record` refuses other modes.
    frozen:
        SGLang captures the forward (CUDA graphs, torch.compile): :meth:`start_record` refuses a
        mode the recorder's buffers cannot hold (a new buffer would be outside the capture).

    Example
    -------
    >>> rec = SGLangRecorder(Recorder(num_layers=2, num_experts=4, top_k=2, mode="per_pass"), rank=0)
    >>> rec.start_record()
    >>> with rec.with_forward_pass(7, None), rec.with_current_layer(1):
    ...     rec.on_select_experts(topk_ids=torch.tensor([[0, 3]]))
    >>> rec.recorder.dump().records[0].forward_pass_id
    7
    """

    def __init__(
        self,
        recorder: Recorder,
        rank: int = 0,
        *,
        dump_dir: str | None = None,
        live_map: torch.Tensor | None = None,
        eplb: bool = False,
        frozen: bool = False,
    ) -> None:
        if live_map is not None and (recorder.mapping is None or recorder.mapping.shape != live_map.shape):
            raise ValueError("live_map: needs a recorder with a physical_to_logical_map of the same shape")
        self.recorder = recorder
        self.frozen = frozen
        self.live_map = live_map
        self.eplb = eplb
        self.rank = rank
        self.dump_dir = dump_dir
        self.last_dump: Dump | None = None
        self.last_paths: list[str] = []
        self._layer: int | None = None
        # The layers whose router called the hook: SGLang sizes its recorder by every decoder
        # layer, dense ones (DeepSeek's first_k_dense_replace) included, which never route.
        self._routed: set[int] = set()
        self._disabled = False
        self._warned: set[str] = set()
        # SGLang's forward_pass_id of each pass recorded, by our pass index (the counter's
        # pass number); host only, no sync. The lock makes "step, then was it counted?" atomic
        # against start/stop, which a side server (``side_server``) calls from its own thread;
        # uncontended on SGLang's path, where the scheduler thread does both.
        self._pass_lock = threading.Lock()
        self._pass_index = 0
        self._pass_ids: deque[tuple[int, int]] = deque(maxlen=recorder.counter.ring_rows + ID_SLACK)

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
        if IN_DRAFT_RUNNER.get():
            yield outputs
            return
        try:
            yield outputs
        finally:
            with self._pass_lock:
                self.recorder.step()  # tensor ops only: commits the pass on the device
                if self.recorder.recording:  # the device counted this step exactly when this holds
                    self._pass_ids.append((self._pass_index, forward_pass_id))
                    self._pass_index += 1

    # -- the hooks ------------------------------------------------------------------------
    def on_select_experts(self, topk_ids: torch.Tensor) -> None:
        if self._disabled or self._layer is None or IN_DRAFT_RUNNER.get():
            return
        # As SGLang: skip when idle, except while a CUDA graph captures (the tap must be in it).
        if not (self.recorder.recording or _capturing()):
            return
        rec = self.recorder
        if topk_ids.dim() != 2 or topk_ids.shape[1] != rec.top_k or self._layer not in rec.counter.row_of:
            self._warn_once(
                # Once per width and layer: the token count changes with every batch.
                f"shape{tuple(topk_ids.shape[1:])}-{self._layer}",
                f"moe-record: ignoring top-k ids of shape {tuple(topk_ids.shape)} at layer {self._layer} "
                f"(recorder sized for top_k={rec.top_k}, {rec.num_layers} layers)",
            )
            return
        self._routed.add(self._layer)  # host only: at capture, or each eager pass
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

    def start_record(self, mode: str | None = None) -> None:
        """Clear and record (SGLang: a second start warns and restarts); ``mode``: ours, for the
        side server (default: the current mode)."""
        if self.eplb and mode not in (None, "stat"):
            # EPLBManager's next rebalance calls dump_record(output_mode="object"), which needs
            # stat: switching would take the scheduler down there, not here.
            raise RecorderError(f"mode {mode!r}: SGLang's EPLB (--enable-eplb) reads these counts in mode stat only")
        if mode and mode != self.recorder.mode and self.frozen and not self.recorder.supports(mode):
            # A new mode's buffers would be new tensors, which the CUDA graphs (or the compiled
            # forward) SGLang captured never write: its passes would read as empty.
            raise RecorderError(
                f"mode {mode!r}: SGLang captured the forward (CUDA graphs or torch.compile) with mode "
                f"{self.recorder.mode!r}'s buffers; launch it with --expert-distribution-recorder-mode {mode} "
                "(per_token's buffers serve every mode), or --disable-cuda-graph"
            )
        if self.recorder.recording:
            log.warning("moe-record: already recording expert ids; restarting the window (SGLang semantics)")
        with self._pass_lock:
            self.recorder.start(mode)
            # A new mode may bring a new counter, numbering passes from 0: follow it (start
            # has read the device already, this costs no extra sync).
            self._pass_index = int(self.recorder.counter.passes)
            self._pass_ids = deque(maxlen=self.recorder.counter.ring_rows + ID_SLACK)  # the ring's passes

    def stop_record(self) -> None:
        if not self.recorder.recording:
            log.warning("moe-record: stop_record while not recording")
        with self._pass_lock:
            self.recorder.stop()

    def dump_local(self) -> Dump:
        """This rank's dump of the window (forward pass ids SGLang's), then a new window; no
        collective: what the side server serves. Passes keep running meanwhile."""
        if self.live_map is not None:  # __init__ checked the recorder has a map of its shape
            self.recorder.mapping.copy_(self.live_map)  # EPLB's placement now (copy_: aliases too)
        dump = self.recorder.dump()
        with self._pass_lock:  # after the dump: every pass it holds has its id by now
            ids = dict(self._pass_ids)
        for rec in dump.records:
            rec.forward_pass_id = ids.get(rec.forward_pass_id, rec.forward_pass_id)
        # Once a pass has run, the MoE layers are those that routed (dense ones would read as dead).
        if self._routed:
            moe = [layer for layer in dump.model.moe_layer_ids if layer in self._routed]
            dump.model = msgspec.structs.replace(dump.model, moe_layer_ids=moe)
        return dump

    def dump_record(self, output_mode: str = "file") -> dict[str, Any] | None:
        """Dump, then start a new window (SGLang semantics). Every rank must call it (SGLang's
        scheduler fans the request out to all): a ``stat`` dump is merged across ranks.

        ``file``: SGLang's files in the dump directory (stat: the merge, written by world rank
        0 only; per_pass/per_token: every rank its own, topology inside for ``moe-record
        merge``). ``object``: SGLang's stat dict, the merge on every rank, for its ``EPLBManager``.
        """
        if output_mode not in ("file", "object"):
            raise NotImplementedError(f"output_mode {output_mode!r}")
        if output_mode == "object" and self.recorder.mode != "stat":
            raise ValueError("dump_record(output_mode='object') needs mode stat (as SGLang)")
        dump: Dump | None = self.dump_local()
        alone = output_mode == "file" and not _same_mode_everywhere(dump.window.mode)
        if alone:
            log.error(
                "moe-record: the ranks dump in different modes (a side server's ?mode= reached only some of "
                "them); each rank writes its own file, named by its rank, unmerged"
            )
        elif dump.window.mode == "stat":
            dump = _merge_stat(dump, everywhere=output_mode == "object")
        self.last_dump = dump
        if output_mode == "object":
            assert dump is not None
            return {
                "rank": self.rank,
                "logical_count": sglang_counts(dump.logical_count).to(self.recorder.device),
                "average_utilization_rate_over_window": None,
            }
        self.last_paths = []
        if dump is not None and (alone or dump.window.mode != "stat" or self.recorder.topology.rank == 0):
            # Named and placed among every --dp-size replica's ranks: replicas share the directory.
            dump = with_topology(dump, across_replicas(dump.topology))
            directory = self.dump_dir or moe_env.dump_dir("sglang")
            path = _save(dump, directory, sglang_file_name(dump, per_rank=True if alone else None))
            self.last_paths += [path] if path else []
        return None

    def status(self) -> dict[str, Any]:
        """Our extension: ``Recorder.status()`` plus the files of the last dump."""
        return {**self.recorder.status().to_dict(), "rank": self.rank, "last_paths": list(self.last_paths)}

    # -- helpers --------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def _save(dump: Dump, directory: str, name: str) -> str | None:
    """Write ``dump`` as ``directory/name`` or, where that fails (a full disk, a folder that is a
    file), into a new temporary folder; the path written, or None (then it is only ``last_dump``).

    Never raises: SGLang's scheduler calls ``dump_record`` unguarded, so an exception would take
    the server down, and the window, already cleared, with it."""
    path = os.path.join(directory, name)
    try:
        os.makedirs(directory, exist_ok=True)
        dump.save(path)
        log.info("Write expert distribution to %s", path)
        return path
    except Exception as e:  # noqa: BLE001 - see above
        log.error("moe-record: cannot write the expert distribution to %s (%s)", path, e)
    try:
        rescue = os.path.join(tempfile.mkdtemp(prefix="moe-record-"), name)
        dump.save(rescue)
    except Exception as e:  # noqa: BLE001
        log.error("moe-record: nor into a temporary folder (%s): the dump is only in memory (last_dump)", e)
        return None
    log.error("moe-record: wrote it to %s instead", rescue)
    return rescue


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _world() -> tuple[int, Any]:
    """(world size, the group to merge over): SGLang's gloo world group where its launcher
    built one (no device memory, no NCCL object collectives), else the default group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1, None
    from .topology import _parallel

    coordinator = _parallel("world_group", None)
    group = getattr(coordinator, "cpu_group", None)
    return dist.get_world_size(group), group


def _same_mode_everywhere(mode: str) -> bool:
    """Whether every rank dumps in ``mode`` (the same answer on every rank). A stat merge waits
    for every rank: ranks a side server moved to another mode would leave the others hanging."""
    world, group = _world()
    if world == 1:
        return True
    import torch.distributed as dist

    mine = torch.tensor([MODES.index(mode)])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return all(int(t) == int(mine) for t in every)


def _merge_stat(dump: Dump, *, everywhere: bool) -> Dump | None:
    """The ranks' stat dumps merged by topology (``merge_distributed``: replicas once, shards
    summed); None on ranks other than world rank 0 unless ``everywhere``. Each rank sends
    one cumulative row: rings may hold different passes, and the rows stay small."""
    world, group = _world()
    if world == 1:
        return dump
    mine = _one_row(dump)
    try:
        return merge_distributed(mine, group, dst=None if everywhere else 0)
    except MergeError as e:
        # Ranks marked as replicas disagree: a topology this adapter misread. Never take the
        # engine down over it. Every rank that merged hit the same error: with ``everywhere``
        # that is all of them, so all can fall back to SGLang's sum together.
        log.error("moe-record: cannot merge the ranks' stat dumps (%s)", e)
        if not everywhere:
            log.error("moe-record: no stat file written; per_pass dumps keep every rank's counts")
            return None
        import torch.distributed as dist

        log.error("moe-record: EPLB gets SGLang's world sum instead, which counts replicas once per rank")
        total = mine.total_count().to(torch.int64)
        dist.all_reduce(total, group=group)
        return msgspec.structs.replace(mine, logical_count=total.unsqueeze(0), physical_count=None)


def _one_row(dump: Dump) -> Dump:
    if dump.logical_count.shape[0] == 1 and dump.total_logical_count is None:
        return dump
    phys = None
    if dump.physical_count is not None and dump.total_logical_count is None:  # rows hold every pass
        phys = dump.physical_count.sum(0, keepdim=True)
    return msgspec.structs.replace(
        dump,
        logical_count=dump.total_count().unsqueeze(0),
        total_logical_count=None,
        physical_count=phys,
        physical_to_logical_map=dump.physical_to_logical_map if phys is not None else None,
        model=dump.model if phys is not None else msgspec.structs.replace(dump.model, num_physical_experts=None),
        window=msgspec.structs.replace(dump.window, buffer_size=0),
    )
