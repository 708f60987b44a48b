"""Device-side counting: preallocated buffers, tensor-only tap, no host sync while recording.

Every buffer is allocated once and only ever written by the tap (``record``) and the pass
boundary (``step``), so a CUDA graph captured once keeps serving, and recording on/off is a
device flag. Counters are monotonic: the host never zeroes them. A dump reads them and
subtracts the previous reading, so each increment lands in exactly one dump even when forward
passes run concurrently with the dump (see ``Counter.read``).

Column layout of the counts [R, S + 2]: S expert slots, then the discard bin (invalid ids:
-1 padding, negative, >= S), then the padding bin (rows past ``num_valid_tokens``), which is
never reported. On CUDA the tap adds into ``stripes`` [G, R, S + 2], G copies of those rows, so
that its programs do not contend on the same addresses; ``total_counts()`` sums them (G = 1
elsewhere, where it is a view).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import counter_triton
from .errors import RecorderError


@dataclass
class Reading:
    """One host copy of the counters, as of a dump. With a ring, ``counts``, ``passes`` and
    ``tokens`` are as of the last step (see ``Counter.read``)."""

    counts: torch.Tensor  # int64 [R, S + 2], monotonic
    passes: int  # passes completed (while enabled)
    rows: torch.Tensor | None  # int32 [B + 1, R, S] per-pass ring
    row_pass: torch.Tensor | None  # int64 [B + 1] pass id held by each ring slot
    row_tokens: torch.Tensor | None  # int64 [B + 1, 2] token positions [start, end) of each slot's pass
    row_layer_tokens: torch.Tensor | None  # int64 [B + 1, R] valid tokens each layer counted in that pass
    row_layer_ids: torch.Tensor | None  # int64 [B + 1, R] of those, the positions its ids fill (its longest call)
    passes_after: int  # passes counter re-read after the copy: what a concurrent step overwrote
    tokens: int  # token positions committed


class Counter:
    """The device buffers and the tap for ``R`` observed layers of ``S`` expert slots.

    ``ring_rows`` > 0 keeps the last ``ring_rows`` passes' counts; ``token_slots`` > 0 keeps the
    top-k ids of the last ``token_slots`` tokens per layer, and needs the pass ring: each row's
    ``row_tokens`` span says which positions are its pass's (the tap writes no pass ids).
    """

    def __init__(
        self,
        layer_ids: Sequence[int],
        num_slots: int,
        top_k: int,
        device: torch.device | str,
        *,
        ring_rows: int = 0,
        token_slots: int = 0,
        stripes: int | None = None,
    ) -> None:
        if token_slots and not ring_rows:
            raise ValueError("token_slots: a token ring needs ring_rows >= 1 (a pass's tokens are its row's span)")
        self.device = torch.device(device)
        self.layer_ids = list(layer_ids)
        self.row_of = {layer: row for row, layer in enumerate(self.layer_ids)}
        self.num_slots = S = num_slots
        self.top_k = top_k
        R = len(self.layer_ids)
        dev = self.device
        self.enabled = torch.zeros((), dtype=torch.int64, device=dev)
        self.token_enabled = torch.zeros((), dtype=torch.int64, device=dev)
        G = counter_triton.stripes_for(dev) if stripes is None else stripes
        self.stripes = torch.zeros(G, R, S + 2, dtype=torch.int64, device=dev)
        self.passes = torch.zeros((), dtype=torch.int64, device=dev)
        self.ring_rows = ring_rows
        self.rows: torch.Tensor | None = None
        self.row_pass: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None
        self.step_seq = torch.zeros((), dtype=torch.int64, device=dev)  # odd while a step writes the ring
        if ring_rows:
            # One spare slot: the slot a concurrent step may be writing holds a pass older
            # than the ``ring_rows`` a dump takes, so a dump never reads a torn row.
            self.rows = torch.zeros(ring_rows + 1, R, S, dtype=torch.int32, device=dev)
            self.row_pass = torch.full((ring_rows + 1,), -1, dtype=torch.int64, device=dev)
            self.last_counts = torch.zeros(R, S + 2, dtype=torch.int64, device=dev)
        self.row_tokens: torch.Tensor | None = None
        self.row_layer_tokens: torch.Tensor | None = None
        self.row_layer_ids: torch.Tensor | None = None
        if ring_rows and token_slots:
            self.row_tokens = torch.zeros(ring_rows + 1, 2, dtype=torch.int64, device=dev)
            self.row_layer_tokens = torch.zeros(ring_rows + 1, R, dtype=torch.int64, device=dev)
            # A layer that routed fewer tokens than the pass's longest did not write the rest of
            # the pass's slots: a dump must not take what older passes left there for its ids.
            # A layer called twice in a pass (micro-batches) wrote its longest call's positions.
            self.row_layer_ids = torch.zeros(ring_rows + 1, R, dtype=torch.int64, device=dev)
        self.token_slots = N = token_slots
        self.token_ids: torch.Tensor | None = None
        self.token_cursor = torch.zeros((), dtype=torch.int64, device=dev)
        # Per layer, the most tokens one of its calls wrote in this pass (the pass's positions:
        # their max); announced by the tap before it writes them.
        self.layer_tokens = torch.zeros(R, dtype=torch.int64, device=dev)
        self.layer_index = torch.arange(R, device=dev)
        # The tap's implementation: one Triton kernel on CUDA when Triton imports, else torch ops
        # (also the reference the kernel is tested against; set to "torch" to force it).
        self.kernel = "triton" if dev.type == "cuda" and counter_triton.available() else "torch"
        if token_slots:
            # Row N is the trash row for padding, disabled and overflowing writes.
            # Layer-major: a tap's tokens land side by side (coalesced writes); slot N is the trash.
            self.token_ids = torch.full((R, N + 1, top_k), -1, dtype=self.token_dtype(S), device=dev)
            self.token_arange = torch.arange(N + 1, device=dev)
        self.tap_args = counter_triton.tap_args(self)  # the kernel's fixed arguments
        self.tap_launches: dict = {}  # compiled kernels, for launches without Triton's dispatcher

    # -- sizes ------------------------------------------------------------------------------
    @staticmethod
    def token_dtype(num_slots: int) -> torch.dtype:
        """The token ring's id type: int16 while the ids fit (every MoE model so far), so the ring
        holds twice the tokens in ``max_bytes`` and the tap writes half the bytes."""
        return torch.int16 if num_slots <= torch.iinfo(torch.int16).max else torch.int32

    @staticmethod
    def token_slot_bytes(num_rows: int, top_k: int, num_slots: int) -> int:
        ids = num_rows * top_k * Counter.token_dtype(num_slots).itemsize
        return ids + 8  # ids, position (the torch path's arange)

    @staticmethod
    def fixed_bytes(num_rows: int, num_slots: int, stripes: int = 1) -> int:
        return stripes * num_rows * (num_slots + 2) * 8 + 5 * 8 + 2 * num_rows * 8

    @staticmethod
    def ring_bytes(ring_rows: int, num_rows: int, num_slots: int, tokens: bool = False) -> int:
        per_row = num_rows * num_slots * 4 + 8 + (16 + 16 * num_rows if tokens else 0)  # counts, pass id, tokens
        return (ring_rows + 1) * per_row + num_rows * (num_slots + 2) * 8

    def nbytes(self) -> int:
        tensors = [self.enabled, self.token_enabled, self.stripes, self.passes, self.token_cursor, self.layer_tokens]
        tensors += [self.step_seq, self.layer_index]
        tensors += [
            t
            for t in (self.rows, self.row_pass, self.row_tokens, self.row_layer_tokens, self.row_layer_ids)
            + (self.last_counts,)
            + (self.token_ids,)
            if t is not None
        ]
        if self.token_slots:
            tensors.append(self.token_arange)
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- the counts -------------------------------------------------------------------------
    def total_counts(self) -> torch.Tensor:
        """int64 [R, S + 2], monotonic: the stripes summed (a view of the only one when G = 1)."""
        return self.stripes[0] if self.stripes.shape[0] == 1 else self.stripes.sum(0)

    @property
    def counts(self) -> torch.Tensor:
        """Read-only alias of :meth:`total_counts` (writes go to ``stripes``)."""
        return self.total_counts()

    # -- the tap ----------------------------------------------------------------------------
    def record(self, layer_id: int, topk_ids: torch.Tensor, num_valid_tokens: int | torch.Tensor | None = None) -> None:
        """Count one layer's routing. Tensor ops only: no sync, no data-dependent shapes."""
        row = None if isinstance(layer_id, (bool, float)) else self.row_of.get(layer_id)  # True == 1.0 == 1
        if row is None:
            raise RecorderError(
                f"layer_id {layer_id!r} ({type(layer_id).__name__}) is not one of the recorder's layers {self.layer_ids}"
            )
        if not isinstance(topk_ids, torch.Tensor):
            raise RecorderError(
                f"topk_ids: expected a tensor [tokens, top_k={self.top_k}], got {type(topk_ids).__name__}"
            )
        if topk_ids.dim() != 2 or topk_ids.shape[1] != self.top_k:
            raise RecorderError(f"topk_ids: expected shape [tokens, top_k={self.top_k}], got {list(topk_ids.shape)}")
        if topk_ids.dtype not in (torch.int32, torch.int64):
            raise RecorderError(f"topk_ids: expected int32 or int64, got {topk_ids.dtype}")
        got, want = topk_ids.device, self.device
        if got.type != want.type or None not in (got.index, want.index) and got.index != want.index:
            raise RecorderError(
                f"topk_ids: on {got}, but the recorder counts on {want} (its device=): copy them there, or build it there"
            )
        if num_valid_tokens is not None:
            _check_num_valid(num_valid_tokens)
            if isinstance(num_valid_tokens, torch.Tensor) and num_valid_tokens.dim():
                num_valid_tokens = num_valid_tokens.reshape(())  # [1] or [[n]] would broadcast over ids
        if self.kernel == "triton":
            counter_triton.record(self, row, topk_ids, num_valid_tokens)
            return
        T, k, S = topk_ids.shape[0], self.top_k, self.num_slots
        ids = topk_ids.to(torch.int64)
        invalid = (ids < 0) | (ids >= S)
        slot = torch.where(invalid, S, ids)
        if num_valid_tokens is not None:
            row_ok = torch.arange(T, device=ids.device) < num_valid_tokens
            slot = torch.where(row_ok.unsqueeze(1), slot, S + 1)
        self.stripes[0, row].index_add_(0, slot.reshape(-1), self.enabled.expand(T * k))
        if self.token_ids is not None:
            self._record_tokens(row, ids, invalid, T, num_valid_tokens)

    def _record_tokens(
        self, row: int, ids: torch.Tensor, invalid: torch.Tensor, T: int, num_valid: int | torch.Tensor | None
    ) -> None:
        assert self.token_ids is not None
        N = self.token_slots
        t = self.token_arange[:T] if T <= N + 1 else torch.arange(T, device=ids.device)
        if isinstance(num_valid, torch.Tensor):
            valid = torch.clamp(num_valid.to(ids.device), max=T).to(torch.int64)
        else:  # a fill, not as_tensor: copying a host int to a GPU would sync
            valid = torch.full(
                (), T if num_valid is None else min(int(num_valid), T), dtype=torch.int64, device=ids.device
            )
        # Announce the pass's tokens before writing them: a dump that reads layer_tokens after its
        # copy then knows which older slots these writes may have overwritten.
        mine = torch.where(self.layer_index == row, valid * self.token_enabled, 0)
        torch.maximum(self.layer_tokens, mine, out=self.layer_tokens)
        # Only the last N valid tokens of a pass fit; earlier ones would collide in the ring.
        keep = (t < valid) & (t >= valid - N) & (self.token_enabled > 0)
        slot = torch.where(keep, (self.token_cursor + t) % N, N)
        # Indexed on the whole ring, not through a view of its layer: under torch.compile a write
        # into a view of a graph input copied the whole ring (max_bytes) every pass.
        at = (torch.full_like(slot, row), slot)
        self.token_ids.index_put_(at, torch.where(invalid, -1, ids).to(self.token_ids.dtype))

    def step(self) -> None:
        """End of one forward pass: commit its ring row and tokens. Tensor ops only."""
        on = self.enabled > 0
        # The pass's token positions: its longest layer's (one reduction, for the span and the cursor).
        pass_tokens = self.layer_tokens.max() if self.token_ids is not None else None
        if self.rows is not None:
            assert self.row_pass is not None and self.last_counts is not None
            self.step_seq.add_(1)  # odd until the pass is committed: ``read`` waits it out
            slot = (self.passes % (self.ring_rows + 1)).view(1)
            counts = self.total_counts()
            delta = (counts[:, : self.num_slots] - self.last_counts[:, : self.num_slots]).to(torch.int32)
            # When off, rewrite the slot with what it holds: it may be the oldest live row.
            self.rows.index_copy_(0, slot, torch.where(on, delta.unsqueeze(0), self.rows.index_select(0, slot)))
            self.row_pass.index_copy_(
                0, slot, torch.where(on, self.passes.view(1), self.row_pass.index_select(0, slot))
            )
            if self.row_tokens is not None:
                # Where this pass's tokens lie: a dump then takes exactly the tokens of the passes
                # it takes, however the cursor moved while it read.
                span = torch.stack([self.token_cursor, self.token_cursor + pass_tokens]).view(1, 2)
                self.row_tokens.index_copy_(0, slot, torch.where(on, span, self.row_tokens.index_select(0, slot)))
                assert self.row_layer_tokens is not None and self.row_layer_ids is not None
                # Each valid token adds top_k ids to its layer's experts or discard bin.
                per_layer = (counts[:, : self.num_slots + 1] - self.last_counts[:, : self.num_slots + 1]).sum(1)
                held = self.row_layer_tokens.index_select(0, slot)
                self.row_layer_tokens.index_copy_(0, slot, torch.where(on, (per_layer // self.top_k).view(1, -1), held))
                held = self.row_layer_ids.index_select(0, slot)
                self.row_layer_ids.index_copy_(0, slot, torch.where(on, self.layer_tokens.view(1, -1), held))
            self.last_counts.copy_(counts)
        if pass_tokens is not None:
            self.token_cursor.add_(pass_tokens)
            self.layer_tokens.zero_()
        self.passes.add_(self.enabled)
        if self.rows is not None:
            self.step_seq.add_(1)

    # -- control (host side, may sync) ------------------------------------------------------
    def set_enabled(self, on: bool, tokens: bool) -> None:
        self.enabled.fill_(int(on))
        self.token_enabled.fill_(int(on and tokens))

    def read(self, *, rows: bool = True, settled: bool = True) -> Reading:
        """Copy the counters to the host. Scalars are read before and after the big copies so
        a concurrent pass can only make the reading drop rows it names, never tear one.

        With a ring, the counts are those of the last step, so that a window's totals and its
        rows end at the same pass: counts of a pass in progress go to the next reading, whole.
        ``rows``: whether to copy the pass ring. The token ring is read by ``read_tokens``, only
        the slots a window takes. ``settled=False``: the live counts even with a ring (a window
        that keeps no rows ends at the call, not at the last step).
        """
        if self.rows is None or not settled:
            passes = int(self.passes)
            position = int(self.token_cursor)
            counts = self.total_counts().to("cpu", copy=True)
        else:
            counts, passes, position = self._settled()

        def host(t: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
            return t.to("cpu", copy=True) if t is not None and wanted else None

        ring, row_pass, row_tokens = host(self.rows, rows), host(self.row_pass, rows), host(self.row_tokens, rows)
        row_layer_tokens, row_layer_ids = host(self.row_layer_tokens, rows), host(self.row_layer_ids, rows)
        passes_after = int(self.passes)
        return Reading(
            counts, passes, ring, row_pass, row_tokens, row_layer_tokens, row_layer_ids, passes_after, position
        )

    def read_tokens(self, lo: int, hi: int) -> tuple[torch.Tensor, int]:
        """A host copy of the token ring's ids at positions [lo, hi) (n <= ``token_slots``), as the
        ring holds them ([R, n, k], its dtype: one copy, never widened here), and the positions
        written or being written after the copy: a slot whose position is below that less
        ``token_slots`` may have been overwritten during it. Which pass a position belongs to is
        in ``row_tokens`` (each pass's span), not in the ring."""
        assert self.token_ids is not None
        N = self.token_slots
        assert 0 <= hi - lo <= N, (lo, hi, N)
        first, n = lo % N, hi - lo
        spans = [(first, min(n, N - first))] + ([(0, first + n - N)] if first + n > N else [])
        parts = [self.token_ids[:, a : a + m].to("cpu", copy=True) for a, m in spans]
        ids = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        after = int(self.token_cursor) + int(self.layer_tokens.max())
        return ids, after

    def _settled(self, timeout: float = 1.0) -> tuple[torch.Tensor, int, int]:
        """``last_counts`` with the passes and token position it covers, read between steps (a
        step writes them one after another; ``step_seq`` is odd meanwhile, and changes)."""
        assert self.last_counts is not None
        deadline = time.monotonic() + timeout
        while True:
            seq = int(self.step_seq)
            if seq % 2 == 0:
                counts = self.last_counts.to("cpu", copy=True)
                passes, tokens = int(self.passes), int(self.token_cursor)
                if int(self.step_seq) == seq:
                    return counts, passes, tokens
            if time.monotonic() > deadline:
                raise RecorderError(f"counter: a step() has not finished after {timeout} s; cannot read a whole pass")
            time.sleep(0)  # let the stepping thread finish


def _check_num_valid(n: object) -> None:
    """``num_valid_tokens``: an integer, or an integer tensor of one element (host metadata only:
    no sync)."""
    if isinstance(n, torch.Tensor):
        if n.numel() != 1 or n.dtype == torch.bool or n.dtype.is_floating_point or n.dtype.is_complex:
            raise RecorderError(
                f"num_valid_tokens: expected an integer tensor of one element, got {n.dtype} of shape {list(n.shape)}"
            )
    elif isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)):
        raise RecorderError(f"num_valid_tokens: expected an int or an integer tensor, got {type(n).__name__} {n!r}")
