"""The recorder: modes, the window, and start / stop / dump / status over a device Counter.

Dump semantics (what "one consistent snapshot" means here):

* counts: every increment the tap makes lands in exactly one dump. Counters are monotonic and a
  dump subtracts the previous reading, so a forward pass running on another thread or stream
  while ``dump()`` runs is never lost nor counted twice; a pass caught half-way has its first
  layers in this dump and the rest in the next (``total_logical_count`` then says so).
* rows and records (``per_pass``, ``per_token``): every completed pass appears in exactly one dump,
  unless the ring overwrote it first, in which case ``window.dropped_passes`` counts it.
* with a ring (``buffer_size``), windows begin and end at pass boundaries: a pass in progress when
  ``start()``, ``clear()`` or ``dump()`` runs (layers recorded, ``step()`` not yet called) goes
  whole to the new window, its earlier layers included. Without a ring a window is counts only
  and begins exactly at the call.
* per_token ids: every token's ids appear in at most one dump; the rest are counted in
  ``window.dropped_tokens``.
"""

from __future__ import annotations

import inspect
import logging
import operator
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import torch

from . import counter_triton
from ._version import __version__
from .counter import Counter, Reading
from .errors import RecorderError
from .schema.dump import Dump, EngineInfo, ModelInfo, Record, Topology, Window, row_sum
from .schema.io import save_dump
from .schema.names import MODES
from .schema.sglang import sglang_file_name
from .schema.validate import topology_problems

log = logging.getLogger(__name__)

DEFAULT_BUFFER_SIZE = 1000  # SGLang's effective default (eplb_rebalance_num_iterations)
DEFAULT_MAX_BYTES = 256 << 20


@dataclass
class Status:
    """What ``Recorder.status()`` reports."""

    recording: bool
    mode: str
    passes: int
    tokens: int
    bytes_used: int
    dropped_passes: int
    dropped_tokens: int
    unobserved_layers: list[int] = field(default_factory=list)
    # As the dump's topology: ranks of one token shard (tensor-parallel replicas, pipeline
    # stages) saw the same tokens and passes, which a fleet's totals count once.
    token_shard: int = 0
    num_token_shards: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Recorder:
    """Records tokens per expert per MoE layer on the device, without host syncs.

    Parameters
    ----------
    num_layers, num_experts, top_k:
        The model: decoder layers (dense ones included), routed (logical) experts, experts per token.
    device:
        Where the counters live: the device of the ``topk_ids`` the tap receives.
    mode:
        ``stat`` (counts), ``per_pass`` (one count row per forward pass) or ``per_token`` (ids of
        every token). The buffers for this mode are allocated now, once.
    layer_ids:
        The MoE layers (decoder indices) to record; default every layer.
    buffer_size:
        Rows of the per-pass ring (``stat``: 0 keeps one cumulative row; SGLang's buffer).
    max_bytes:
        ``per_token``: bound on the ring and token buffers together; older tokens are overwritten
        and counted as dropped. A token takes ``2 * len(layer_ids) * top_k + 8`` bytes (ids kept in two
        bytes while ``num_experts`` <= 32767, four past that). A window also keeps at most
        ``buffer_size`` passes (default 1000): at decode, 1000 passes of batch 64 are 64,000
        tokens, however many ``max_bytes`` holds, so raise ``buffer_size`` with it (each pass row
        costs ``len(layer_ids) * num_experts * 4`` bytes of ``max_bytes`` too).
    physical_to_logical_map:
        int [L, P]: when the engine replicates experts, ids are physical slots and are summed into
        logical experts at dump; physical counts are kept too.

    Example
    -------
    >>> rec = Recorder(num_layers=2, num_experts=8, top_k=2, device="cpu")
    >>> rec.start()
    >>> rec.record(0, torch.tensor([[1, 2], [3, -1]]))
    >>> rec.step()
    >>> rec.dump().logical_count[0, 0].tolist()
    [0, 1, 1, 1, 0, 0, 0, 0]
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        device: torch.device | str = "cpu",
        mode: str = "stat",
        *,
        layer_ids: Sequence[int] | None = None,
        buffer_size: int | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        physical_to_logical_map: torch.Tensor | None = None,
        engine: EngineInfo | None = None,
        topology: Topology | None = None,
        model_name: str | None = None,
        unobserved_layers: Sequence[int] = (),
    ) -> None:
        _check_mode(mode)
        num_layers, num_experts, top_k, max_bytes = (
            _as_int(name, v)
            for name, v in (
                ("num_layers", num_layers),
                ("num_experts", num_experts),
                ("top_k", top_k),
                ("max_bytes", max_bytes),
            )
        )
        buffer_size = None if buffer_size is None else _as_int("buffer_size", buffer_size)
        if layer_ids is not None:
            layer_ids = [_as_int(f"layer_ids[{i}]", v) for i, v in enumerate(layer_ids)]
        unobserved_layers = [_as_int(f"unobserved_layers[{i}]", v) for i, v in enumerate(unobserved_layers)]
        for name, value, kind in (
            ("physical_to_logical_map", physical_to_logical_map, torch.Tensor),
            ("engine", engine, EngineInfo),
            ("topology", topology, Topology),
            ("model_name", model_name, str),
        ):
            if value is not None and not isinstance(value, kind):
                raise RecorderError(f"{name}: expected {kind.__name__} or None, got {type(value).__name__} {value!r}")
        if num_layers < 1 or num_experts < 1 or not 1 <= top_k <= num_experts:
            raise RecorderError(
                f"num_layers={num_layers}, num_experts={num_experts}, top_k={top_k}: need layers >= 1, "
                "experts >= 1 and 1 <= top_k <= experts"
            )
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.layer_ids = list(range(num_layers)) if layer_ids is None else sorted(set(layer_ids))
        if not self.layer_ids or not all(0 <= i < num_layers for i in self.layer_ids):
            raise RecorderError(f"layer_ids: {list(layer_ids or [])} must be non-empty and within [0, {num_layers})")
        self.mapping = None
        if physical_to_logical_map is not None:
            if physical_to_logical_map.dtype.is_floating_point or physical_to_logical_map.dtype == torch.bool:
                raise RecorderError(
                    f"physical_to_logical_map: expected an integer tensor, got {physical_to_logical_map.dtype}"
                )
            m = physical_to_logical_map.to("cpu", torch.int64)
            if m.dim() != 2 or m.shape[0] != num_layers or m.numel() == 0:
                raise RecorderError(
                    f"physical_to_logical_map: expected [num_layers={num_layers}, P], got {list(m.shape)}"
                )
            if int(m.min()) < 0 or int(m.max()) >= num_experts or m.shape[1] < num_experts:
                raise RecorderError(
                    "physical_to_logical_map: entries must be in [0, num_experts) with P >= num_experts"
                )
            self.mapping = m
        self.num_slots = num_experts if self.mapping is None else self.mapping.shape[1]
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise RecorderError(f"device: {device!r} is not a device ({str(e).splitlines()[0]})") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():  # else a bare AssertionError later
            raise RecorderError(f"device: {device!r}, but this torch ({torch.__version__}) sees no CUDA GPU")
        self.engine = engine or EngineInfo(name="torch", version=str(torch.__version__))
        if self.engine.sdk_version is None:
            self.engine = msgspec.structs.replace(self.engine, sdk_version=__version__)
        self.topology = topology or Topology()
        for name, problem in topology_problems(self.topology):
            raise RecorderError(f"{name}: {problem}")
        self.model_name = model_name
        self.unobserved_layers = sorted(set(unobserved_layers))
        bad = [i for i in self.unobserved_layers if not 0 <= i < num_layers or i in self.layer_ids]
        if bad:
            raise RecorderError(
                f"unobserved_layers: {bad} must be within [0, {num_layers}) and not among the recorded layer_ids"
            )
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._mode = mode
        self._recording = False
        self._buffer_size = buffer_size
        self.counter = self._make_counter(mode, buffer_size)
        self._reset_window()

    # -- buffers ----------------------------------------------------------------------------
    def _ring_rows(self, mode: str, buffer_size: int | None) -> int:
        if mode == "stat":
            return buffer_size or 0
        return DEFAULT_BUFFER_SIZE if buffer_size is None else buffer_size

    def _make_counter(self, mode: str, buffer_size: int | None) -> Counter:
        ring = self._ring_rows(mode, buffer_size)
        if ring < 0:
            raise RecorderError(f"buffer_size: must be >= 0, got {buffer_size}")
        if mode != "stat" and ring < 1:
            raise RecorderError(f"buffer_size: mode {mode!r} needs at least one row, got {buffer_size}")
        tokens = 0
        R = len(self.layer_ids)
        if mode == "per_token":
            fixed = Counter.fixed_bytes(R, self.num_slots, counter_triton.stripes_for(self.device))
            room = self.max_bytes - Counter.ring_bytes(ring, R, self.num_slots, tokens=True) - fixed
            tokens = room // Counter.token_slot_bytes(R, self.top_k, self.num_slots) - 1
            if tokens < 1:
                raise RecorderError(
                    f"max_bytes: {self.max_bytes} bytes cannot hold a {ring}-pass ring and one token of "
                    f"{R} layers x top_k={self.top_k}; raise max_bytes or lower buffer_size"
                )
        # Never inference tensors, even when built inside an engine's torch.inference_mode(): those
        # could not be updated in place by a start, a stop or a tap outside it.
        with torch.inference_mode(False):
            return Counter(self.layer_ids, self.num_slots, self.top_k, self.device, ring_rows=ring, token_slots=tokens)

    def _window_ring(self) -> int:
        """Passes the current window keeps rows of: the counter's ring, except in ``stat`` mode
        without a buffer (a ring another mode allocated earlier does not turn it on)."""
        unbuffered = self._mode == "stat" and not self._ring_rows("stat", self._buffer_size)
        return 0 if unbuffered else self.counter.ring_rows

    def supports(self, mode: str) -> bool:
        """Whether ``start(mode)`` can run on the buffers allocated now (no reallocation, so a
        captured CUDA graph or a traced forward keeps recording)."""
        c = self.counter
        return mode == "stat" or (c.ring_rows > 0 and (mode == "per_pass" or c.token_slots > 0))

    # -- the tap ----------------------------------------------------------------------------
    def record(self, layer_id: int, topk_ids: torch.Tensor, num_valid_tokens: int | torch.Tensor | None = None) -> None:
        """Count one MoE layer's top-k ids [T, k]; rows past ``num_valid_tokens`` are padding.

        Tensor ops only, on the ids' device: safe in CUDA graphs and under ``torch.compile``.
        """
        self.counter.record(layer_id, topk_ids, num_valid_tokens)

    def step(self) -> None:
        """Mark the end of one forward pass (tensor ops only)."""
        self.counter.step()

    # -- control ----------------------------------------------------------------------------
    @property
    def recording(self) -> bool:
        return self._recording

    @property
    def mode(self) -> str:
        return self._mode

    def start(self, mode: str | None = None) -> None:
        """Clear and start recording (SGLang: start while recording restarts the window)."""
        with self._lock:
            mode = self._mode if mode is None else mode
            _check_mode(mode)
            if not self.supports(mode):
                # New buffers: a CUDA graph captured before must be captured again.
                log.warning("mode %s needs buffers this recorder did not allocate; allocating them now", mode)
                passes = int(self.counter.passes)
                self.counter = self._make_counter(mode, self._buffer_size)
                self.counter.passes.fill_(passes)  # pass ids go on, not from 0 again
            self._mode = mode
            self.counter.set_enabled(False, False)
            self._reset_window()
            self.counter.set_enabled(True, mode == "per_token")
            self._recording = True

    def stop(self) -> None:
        """Stop recording; what was recorded stays until the next dump or start."""
        with self._lock:
            self.counter.set_enabled(False, False)
            if self._recording:  # a second stop does not move the window's end
                self._stop_time = time.time()
            self._recording = False

    def clear(self) -> None:
        """Forget what was recorded so far, recording or not."""
        with self._lock:
            self._reset_window()

    def _reset_window(self) -> None:
        self._begin_window(self.counter.read(rows=False, settled=self._window_ring() > 0), token_base=None)

    def _begin_window(self, base: Reading, token_base: int | None) -> None:
        """Count from ``base`` on: the reading the window subtracts, and the token position where
        its passes begin (``base.tokens`` when nothing else is known)."""
        self._base = base
        self._token_base = base.tokens if token_base is None else token_base
        self._start_time = time.time()
        # A window opened while idle records nothing: it ends where it begins. (It kept the
        # last stop's time, before its own start, and a second dump after stop was invalid.)
        self._stop_time = None if self._recording else self._start_time

    def status(self) -> Status:
        """Recording?, mode, passes, tokens, bytes used, drops (reads a few device scalars)."""
        with self._lock:
            passes = int(self.counter.passes) - self._base.passes
            tokens = self._tokens_per_layer(self._window_counts(self.counter.total_counts().to("cpu")))
            dropped_passes, dropped_tokens = self._pending_drops()
            return Status(
                recording=self._recording,
                mode=self._mode,
                passes=passes,
                tokens=max(tokens, default=0),
                bytes_used=self.counter.nbytes(),
                dropped_passes=dropped_passes,
                dropped_tokens=dropped_tokens,
                unobserved_layers=list(self.unobserved_layers),
                token_shard=self.topology.token_shard,
                num_token_shards=self.topology.num_token_shards,
            )

    def _pending_drops(self) -> tuple[int, int]:
        """Passes and tokens the next dump would report dropped, as ``_build`` counts them."""
        c, base, ring = self.counter, self._base, self._window_ring()
        dp = max(0, int(c.passes) - base.passes - ring) if ring else 0
        dt = 0
        if self._mode == "per_token" and c.row_tokens is not None:
            kept_from = self._token_base  # where the oldest pass still in the ring begins
            if dp:
                kept_from = int(c.row_tokens[(base.passes + dp) % (c.ring_rows + 1), 0])
            dt = max(0, max(kept_from, int(c.token_cursor) - c.token_slots) - self._token_base)
        return dp, dt

    def _window_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Monotonic counts read now, less the window's base: what the window recorded."""
        return counts - self._base.counts

    def _tokens_per_layer(self, delta: torch.Tensor) -> list[int]:
        """Valid tokens per observed layer: every token fills top_k slots, counted or discarded."""
        return [int(v) // self.top_k for v in delta[:, : self.num_slots + 1].sum(1)]

    def peek(self, *, physical: bool = False) -> torch.Tensor:
        """The window's counts so far, int64 [L, E] (``physical``: [L, P] slots), without ending
        the window: what live metrics read between dumps."""
        with self._lock:
            delta = self._window_counts(self.counter.total_counts().to("cpu"))
            slots = self._expand(delta[:, : self.num_slots])
            return slots if physical else self._to_logical(slots)

    def dump(self, destination: str | None = None, *, per_rank: bool | None = None) -> Dump:
        """Snapshot the window into a Dump, optionally write it, then start a new window.

        ``destination``: a file path (format by suffix) or a directory (SGLang's file name;
        ``per_rank=True`` names a stat file by rank too, as for one rank's own counts).
        If writing fails, the window is kept so the dump can be retried.
        """
        with self._lock:
            ring = self._window_ring() > 0
            reading = self.counter.read(rows=ring, settled=ring)
            dump, token_end = self._build(reading)
            if destination is not None:
                is_dir = os.path.isdir(destination)
                path = os.path.join(destination, sglang_file_name(dump, per_rank=per_rank)) if is_dir else destination
                save_dump(dump, path)
            self._begin_window(reading, token_base=token_end)
            return dump

    # -- building the dump ------------------------------------------------------------------
    def _expand(self, per_row: torch.Tensor) -> torch.Tensor:
        """[..., R, S] over observed layers -> [..., num_layers, S], zeros for other layers.

        The dtype stays: the per-pass ring's int32 rows are not widened (62 MB for SGLang's
        default ring on a DeepSeek-V3-sized model, 125 MB as int64); totals are int64 already.
        """
        if len(self.layer_ids) == self.num_layers:  # every layer observed: rows already in layer order
            return per_row.contiguous()
        out = torch.zeros(*per_row.shape[:-2], self.num_layers, per_row.shape[-1], dtype=per_row.dtype)
        out[..., self.layer_ids, :] = per_row
        return out

    def _to_logical(self, physical: torch.Tensor) -> torch.Tensor:
        if self.mapping is None:
            return physical
        index = self.mapping.expand(*physical.shape[:-2], *self.mapping.shape)
        out = torch.zeros(*physical.shape[:-1], self.num_experts, dtype=physical.dtype)
        return out.scatter_add_(-1, index, physical)

    def _build(self, r: Reading) -> tuple[Dump, int]:
        """The window as of reading ``r``, and the token position the next window begins at."""
        base, token_end = self._base, r.tokens
        S, c = self.num_slots, self.counter
        delta = self._window_counts(r.counts)
        total_phys = self._expand(delta[:, :S])
        discarded = self._expand(delta[:, S : S + 1])[:, 0].tolist()
        num_tokens = self._tokens_per_layer(delta)
        tokens_full = [0] * self.num_layers
        for row, layer in enumerate(self.layer_ids):
            tokens_full[layer] = num_tokens[row]

        records: list[Record] = []
        phys_rows: torch.Tensor
        dropped_passes = dropped_tokens = 0
        mode, ring = self._mode, self._window_ring()
        if ring:
            assert r.rows is not None and r.row_pass is not None
            # Passes a concurrent step may have overwritten while we copied are not taken; passes
            # completed after the reading belong to the next window, dropped or not.
            first = min(r.passes, max(base.passes, r.passes_after - ring))
            taken = list(range(first, r.passes))
            dropped_passes = first - base.passes
            slots = [p % (c.ring_rows + 1) for p in taken]
            phys_rows = self._expand(r.rows[slots]) if taken else torch.zeros(0, self.num_layers, S, dtype=r.rows.dtype)
            if mode != "stat":
                records = [Record(forward_pass_id=p, rank=self.topology.rank) for p in taken]
            if mode == "per_token":
                dropped_tokens, token_end = self._attach_tokens(r, records, taken)
        else:
            phys_rows = total_phys.unsqueeze(0)
        logical_rows = self._to_logical(phys_rows)
        total_logical = self._to_logical(total_phys)
        now = time.time()
        dump = Dump(
            engine=self.engine,
            model=ModelInfo(
                num_layers=self.num_layers,
                moe_layer_ids=list(self.layer_ids),
                num_logical_experts=self.num_experts,
                top_k=self.top_k,
                num_physical_experts=None if self.mapping is None else S,
                name=self.model_name,
            ),
            topology=self.topology,
            window=Window(
                mode=mode,  # type: ignore[arg-type]
                start_time=self._start_time,
                stop_time=self._stop_time if not self._recording and self._stop_time is not None else now,
                num_passes=r.passes - base.passes,
                num_tokens=tokens_full,
                discarded=discarded,
                buffer_size=ring,
                dropped_passes=dropped_passes,
                dropped_tokens=dropped_tokens,
                unobserved_layers=list(self.unobserved_layers),
            ),
            logical_count=logical_rows,
            total_logical_count=None if torch.equal(row_sum(logical_rows), total_logical) else total_logical,
            physical_count=None if self.mapping is None else phys_rows,
            physical_to_logical_map=None if self.mapping is None else self.mapping.clone(),
            records=records,
        )
        return dump, token_end

    def _attach_tokens(self, r: Reading, records: list[Record], taken: list[int]) -> tuple[int, int]:
        """Give each record its tokens' ids; return how many of the window's tokens have none,
        and the token position after the last pass taken.

        The tokens taken are those of the passes taken (their spans are in the ring), so a pass
        that completes while the dump reads is left whole to the next dump.
        """
        assert r.row_tokens is not None
        N, B1 = self.counter.token_slots, self.counter.ring_rows + 1
        # The window's passes end at the reading's position, taken or dropped: the tokens of
        # dropped passes are this window's drops, not the next one's.
        start = end = r.tokens
        if taken:
            start, end = int(r.row_tokens[taken[0] % B1, 0]), int(r.row_tokens[taken[-1] % B1, 1])
        first = max(start, end - N)  # the ring holds at most the last N positions
        # ids [R, n, k] as the ring holds them (two-byte ids stay two bytes until each record
        # widens its own): the dump's peak is its records plus one copy of these slots.
        ids, after = self.counter.read_tokens(first, end)
        lo = max(first, after - N)  # positions a concurrent pass may have overwritten during the copy
        ids = ids[:, lo - first :]
        assert r.row_layer_tokens is not None and r.row_layer_ids is not None
        kept = overwritten = 0
        for rec in records:
            # A pass's tokens are the positions of its span (spans are disjoint, in pass order).
            slot = rec.forward_pass_id % B1
            a, b = (int(v) for v in r.row_tokens[slot])
            mine = ids[:, max(a, lo) - lo : max(b, lo) - lo]  # [R, T, k], tokens in position order
            # Slots past a layer's own tokens hold what an older pass left there: no id (-1).
            t = torch.arange(max(a, lo), max(b, lo)) - a
            mine[t.unsqueeze(0) >= r.row_layer_ids[slot].unsqueeze(1)] = -1
            full = torch.full((self.num_layers, mine.shape[1], self.top_k), -1, dtype=torch.int32)
            full[self.layer_ids] = mine.to(torch.int32)
            rec.topk_ids_of_layer = full
            kept += mine.shape[1]
            # A layer called twice in the pass (micro-batches) counted both calls, but its later
            # call's ids took the earlier's positions: those tokens' ids are lost, so dropped.
            overwritten += int((r.row_layer_tokens[slot] - r.row_layer_ids[slot]).clamp(min=0).max())
        # The window's tokens end at the reading's position: past the last pass taken only by a
        # pass cut short by stop() (recorded, then stepped while off: counted here, no record).
        return (r.tokens - self._token_base) - kept + overwritten, r.tokens


RECORDER_OPTIONS = frozenset(inspect.signature(Recorder).parameters)
"""The arguments ``Recorder`` takes: what an adapter that builds one accepts as options."""


def _as_int(name: str, value: Any) -> int:
    """``value`` as an int (numpy and 0-d tensor ints too), or a RecorderError naming ``name``."""
    try:
        if not isinstance(value, bool):
            return operator.index(value)
    except TypeError:
        pass
    raise RecorderError(f"{name}: expected an int, got {type(value).__name__} {value!r}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise RecorderError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
