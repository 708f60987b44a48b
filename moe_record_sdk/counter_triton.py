"""The tap as one Triton kernel, for CUDA: counts into striped counters, one launch per tap.

``Counter.record`` calls :func:`record` for CUDA ids when Triton imports; the torch path in
``counter.py`` stays the CPU path and the reference this kernel is tested against.

Why a kernel: SGLang's ``scatter_add_`` issues one global atomic per id, so all the tokens of a
pass contend on a few hundred addresses and the cost grows with tokens. Here the counters are
``STRIPES`` copies of the count rows (``Counter.stripes`` [G, R, S + 2]; readers sum them with
``Counter.total_counts``) and each program adds into stripe ``program_id % G``, so programs do
not queue on the same addresses. Below ``DIRECT_MAX`` ids (decode batches) one relaxed atomic
per id is cheaper than any histogram; past it each program histograms its ids on chip
(``tl.histogram``), optionally sends a share of them (``ATOMIC_BLOCK`` per iteration) straight to
the counters with per-id atomics so the ALU (ballots) and the memory pipe (atomics) work at
once, and issues one atomic per nonzero bin. The same kernel writes the ``per_token`` ring.
Everything the host would have to read (``enabled``, ``token_enabled``, a tensor
``num_valid_tokens``, the ring cursor) is loaded in-kernel: no sync, and one CUDA graph serves
recording on and off.

Eager launches skip Triton's Python dispatcher: the compiled kernel is looked up once per
(counter, dtype, layout, alignment, launch shape) and launched through its launcher
(:func:`_fast_launch`); under ``torch.compile`` tracing the ordinary ``kernel[grid]`` call is
used, so Dynamo sees a user-defined Triton kernel.

Notes (H100 80GB HBM3, torch 2.11, Triton 3.6, E=256, k=8, int32 ids, in a CUDA graph, us per
call; ``moe-record bench`` and ``tests/perf/tune_tap.py`` print these):

* Floor: an empty Triton kernel costs 0.98 us per graph node, a bare copy of the ids 1.10 (T=1)
  to 1.39 (T=16384). The direct path sits at 1.23-1.33 up to T=128.
* ``tl.histogram`` lowers to ballots: one ballot per bin bit, then per lane an AND chain and a
  popcount for each of its S/32 bins, about 90 instructions per id per lane for 256 bins
  (~0.4 us per 1024 ids on one SM), plus a shared-memory merge and two barriers.
* Unstriped (G=1), the cross-program atomics (one per bin per program, 128 programs deep per
  address) cost ~0.85 us at T=16384: the histogram path took 2.0-2.4 us for T=1024-4096 and 3.4
  at T=16384 (1.65-2.45x the copy). 16 stripes: 2.0 / 2.1 / 2.5 us at T=1024 / 4096 / 16384
  (64 stripes: the same), so past T=4096 the histogram itself is the cost.
* With the stripes, one atomic per id (128-id programs of one warp) beats the histogram up to
  T=4096 (k=8: 32768 ids): 1.46 us at T=1024 (1.2x the copy), 1.88 at T=4096 (1.4x); at T=16384
  it is 3.8 us (the atomics' throughput), so the histogram stays past ``DIRECT_MAX``. Wider
  direct programs (512 ids, 4 warps) and a histogram/atomics split per block (``ATOMIC_BLOCK``)
  were slower; 4 warps per histogram program too (2.75 us at T=16384).
* ``per_token`` adds ~0.25 us (its flag, cursor and pass loads, the ring index, the writes). The
  ring's size N is a compile-time constant: with N a runtime argument, ``cursor % N`` (done as a
  float64 division) cost 0.33 us per call (per_token / copy 1.65-1.81 at T = 1-4096, now
  1.36-1.55; 2026-11-28).
* Two programs per SM (``MAX_PROGRAMS`` 264, 512-id blocks) beat one (132, 1024-id blocks) by
  ~3% at T = 16384 (2.48 vs 2.55 us); bigger programs (2048-4096 ids, 16 warps) were slower
  (2.7-4.4 us): the histogram's ballots, not the per-bin atomics, set the cost there. 64 stripes
  took T = 4096 from 1.41x to 1.32x the copy (direct path), but 4x the counters' memory and a
  4x larger sum in every ``per_pass`` step: not taken.
* A CUDA C++ tap (NVRTC, loaded through the driver with ctypes: a shared-memory histogram with one
  shared atomic per id and one global atomic per nonzero bin, or one global atomic per id below
  1024 ids) was measured against this kernel in the same runs (2026-11-28): 1.53 / 2.24 / 2.28 /
  2.49 us at T = 1 / 1024 / 4096 / 16384 against this kernel's 1.27 / 1.46 / 1.94 / 2.54, and with
  both its shared and its global atomics removed (loads and barriers only) it still took 2.20 /
  2.43 us at T = 1024 / 16384: at large T the histogram is not where the time goes, and this
  kernel is within 5% of a kernel that only reads the ids. Not adopted.
* Where the histogram path's cost lies (2026-11-28, same runs; ``tune_tap.py --floor`` prints the
  bare kernel): a bare ``tl.histogram`` kernel (same launch shape, no flags, no padding or discard
  bins) already takes 1.36x / 1.57x the copy at T = 4096 / 16384 (1.32x / 1.47x without its
  per-bin atomics), so no tap built on ``tl.histogram`` reaches 1.2x there. The rest of this
  kernel adds 0.25-0.3 us at T=16384: the branch on the enabled flag ~0.1 (computing the
  histogram unconditionally saves it, but an idle recorder would then pay the whole histogram)
  and the discard bin's block reduction ~0.15 (deferring it to read time saved <= 0.05 with the
  other extras present). Neither was taken.
* A histogram on tensor cores (two one-hot factors of the id, hi x lo, multiplied by ``tl.dot``,
  fp16 or int8) was 1.4-3x slower than ``tl.histogram`` at every T: building and converting the
  one-hot operands costs more than the ballots.
* A shared-memory histogram in CUDA C++ (``tests/perf/smem_histogram.py``: NVRTC through torch's
  private ``torch.cuda._compile_kernel``, 4 ids per thread, one shared atomic per id, one global
  atomic per nonzero bin) measured against this kernel in the same runs (2026-11-28): 1.63 / 1.65
  / 1.70 / 1.81 us at T = 1 / 1024 / 4096 / 16384 (512 threads) against 1.28 / 1.47 / 1.87 / 2.49,
  i.e. 1.25x / 1.29x the copy at T = 4096 / 16384 against 1.39x / 1.77x. Its launch path alone
  costs 0.14 us more than Triton's (empty kernels: 1.13 vs 0.99 us), so it loses below T = 4096.
  Not adopted: it still misses 1.2x; it rests on a private torch API and NVRTC at run time; its
  ctypes launch builds the argument array in Python on every eager call (prefill, where large T
  occurs, mostly runs eagerly); and what it saves, ~0.7 us per layer at T = 16384, is small next
  to that layer's expert GEMMs over 16384 tokens (milliseconds for a DeepSeek-V3 layer: an
  estimate, not measured here).
* Noise floor of these figures: two kernels with identical SASS timed 0.17 us apart at T=16 with
  differently placed buffers (the latency of L2's near and far partitions), so differences below
  ~0.15 us at T <= 1024 are not attributable to code. Reading the four per_token scalars in one
  load (a packed [4] tensor) measured 0.00-0.08 us faster, inside that noise: not taken.
* Where ``per_token``'s extra goes (H200, Triton 3.6, 2026-11-28, ``tests/perf/per_token_cost.py``:
  the kernel with one part removed at a time, same run): at T = 1 stat 1.16, per_token 1.40, copy
  0.94 us. Without its three scalar loads (cursor, pass id, flag as constants) per_token takes
  1.23; without any one of its three writes (the pass-token announce, the pass-id store, the id
  store) 1.32-1.34. So ~0.17 us is the loads' latency feeding the ring writes and ~0.07 the
  writes; stat itself is 1.2x the copy, and per_token does stat's work plus a copy's, so
  per_token <= 1.2x the copy cannot hold at small T. On a Qwen3-MoE-like model (8 layers, CUDA
  graph, ``tests/perf/e2e_overhead.py``) per_token costs +5.0% of a batch-1 decode step, +0.8% at
  batch 8, +1.0% at 64; stat +0.7 / -0.1 / +0.2% (noise ~4% at batch 1).
* Scalar atomics are issued as one-lane block atomics (``_add_lane0``): Triton broadcasts a
  scalar atomic's result through shared memory and a barrier, which made every thread wait for
  its round trip (+0.5 us per atomic).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path serves
    triton = None

if TYPE_CHECKING:
    from .counter import Counter

# Launch shape, tuned on an H100 with tests/perf/tune_tap.py (figures in the module notes).
STRIPES = 16  # copies of the count rows on CUDA: programs add into stripe pid % STRIPES
DIRECT_MAX = 32768  # up to this many ids: one atomic per id into the stripes, no histogram ...
DIRECT_BLOCK = 128  # ... in programs of this many ids
DIRECT_WARPS = 1
HIST_BLOCKS = (512,)  # more ids: the smallest block whose grid fits MAX_PROGRAMS, else the last
ATOMIC_BLOCK = 0  # ids per iteration sent to per-id atomics next to each histogram block (0: none)
MAX_PROGRAMS = 264  # a grid-stride loop beyond this many programs (each adds up to S atomics)
NUM_WARPS = 8


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel can serve CUDA ids here (Triton imports and a GPU is present)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:
    # Sizes, strides and the row vary from call to call: not specializing on them (== 1, % 16)
    # keeps one compiled kernel per (dtype, layout, mode) instead of dozens.
    @triton.jit(do_not_specialize=["stride_t", "stride_k", "T", "nv_int", "row"])
    def _tap_kernel(
        ids_ptr,  # [T, K] int32 or int64, any strides
        stride_t,
        stride_k,
        T,
        nv_ptr,  # num_valid_tokens as a device scalar (NV_PTR) ...
        nv_int,  # ... or as an int (T when None)
        row,  # the layer's row in the counters
        enabled_ptr,  # int64 scalar: 0 = count nothing
        counts_ptr,  # int64 [G, R, S + 2]: Counter.stripes
        stripe_stride,  # R * (S + 2)
        tok_ids_ptr,  # int32 [N + 1, R, K]: Counter.token_ids
        tok_pass_ptr,  # int64 [N + 1]
        R,
        token_enabled_ptr,  # int64 scalar
        cursor_ptr,  # int64 scalar: ring position of this pass's first token
        pass_tokens_ptr,  # int64 scalar: tokens this pass announced so far
        passes_ptr,  # int64 scalar: this pass's id
        N: tl.constexpr,  # token slots in the ring: a constant, so % N is a multiply, not a division
        S: tl.constexpr,  # expert slots; S is the discard bin, S + 1 the padding bin
        K: tl.constexpr,
        G: tl.constexpr,  # stripes
        NB: tl.constexpr,  # histogram bins: next power of two >= S (>= 32)
        BLOCK: tl.constexpr,
        ABLOCK: tl.constexpr,  # histogram path: ids per iteration counted by per-id atomics
        DIRECT: tl.constexpr,  # one block per program, one atomic per id
        CONTIG: tl.constexpr,  # ids are one dense [T * K] run: plain offsets, wide loads
        NV_PTR: tl.constexpr,
        TOKENS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        counts_ptr += (pid % G) * stripe_stride + row * (S + 2)
        numel = T * K
        CHUNK: tl.constexpr = BLOCK + ABLOCK
        # The first block's ids are loaded before the flags are known, so the two loads overlap:
        # the longest chain is one load, the counting, then the atomics (as a copy: load, store).
        lane = tl.arange(0, BLOCK)
        e = pid * CHUNK + lane
        x = _load_ids(ids_ptr, e, numel, stride_t, stride_k, K, CONTIG)
        on = tl.load(enabled_ptr) != 0
        if NV_PTR:
            nv = tl.minimum(tl.load(nv_ptr).to(tl.int64), T).to(tl.int32)
        else:
            nv = tl.minimum(nv_int, T)
        valid_el = tl.maximum(nv, 0) * K  # ids in rows < num_valid_tokens: [0, valid_el)
        active = on
        if TOKENS:
            tok_on = tl.load(token_enabled_ptr) != 0
            active = on | tok_on
            cursor = tl.load(cursor_ptr)
            pass_id = tl.load(passes_ptr)
            tok_ids_ptr += row * K
            base = (cursor % N).to(tl.int32)  # the cursor only grows from 0
            # Announce the pass's tokens before writing any: a dump that re-reads pass_tokens
            # after copying the ring knows which slots these writes may have overwritten. The
            # copy is a DMA no fence orders against this kernel, so this is ordering in time:
            # issued before the writes, re-read after the copy completed. (acq_rel here cost
            # 0.5 us per layer on an H100 and would not order the DMA either.)
            _max_lane0(pass_tokens_ptr, nv.to(tl.int64), tok_on & (nv > 0), lane)
        if DIRECT:
            # Few ids (decode): one relaxed atomic per counted id beats any histogram.
            ok = (x >= 0) & (x < S)
            tl.atomic_add(counts_ptr + tl.where(ok, x, S), 1, mask=on & (e < valid_el), sem="relaxed")
            lo = pid * BLOCK
            hi = tl.minimum(lo + BLOCK, numel)
            pad = hi - tl.maximum(lo, tl.minimum(valid_el, hi))
            _add_lane0(counts_ptr + S + 1, pad.to(tl.int64), on & (pad > 0), lane)
            if TOKENS:
                _store_tokens(tok_ids_ptr, tok_pass_ptr, x, ok, e, valid_el, nv, base, pass_id, tok_on, N, R, K)
        elif active:  # disabled: no program reads more than its first block
            hist = tl.zeros([NB], dtype=tl.int32)
            in_rows = 0  # ids the histogram saw in rows < num_valid_tokens
            padding = 0
            if ABLOCK > 0:
                alane = tl.arange(0, ABLOCK)
                ea = pid * CHUNK + BLOCK + alane
                y = _load_ids(ids_ptr, ea, numel, stride_t, stride_k, K, CONTIG)
            for b in range(pid, tl.cdiv(numel, CHUNK), nprog):
                # Load the next chunk while this one is counted.
                e_next = e + nprog * CHUNK
                x_next = _load_ids(ids_ptr, e_next, numel, stride_t, stride_k, K, CONTIG)
                if ABLOCK > 0:
                    ea_next = ea + nprog * CHUNK
                    y_next = _load_ids(ids_ptr, ea_next, numel, stride_t, stride_k, K, CONTIG)
                    # This share goes straight to the counters (invalid ids to the discard bin).
                    ok_a = (y >= 0) & (y < S)
                    tl.atomic_add(counts_ptr + tl.where(ok_a, y, S), 1, mask=on & (ea < valid_el), sem="relaxed")
                    if TOKENS:
                        _store_tokens(
                            tok_ids_ptr, tok_pass_ptr, y, ok_a, ea, valid_el, nv, base, pass_id, tok_on, N, R, K
                        )
                    ea = ea_next
                    y = y_next
                ok = (x >= 0) & (x < S)
                counted = (e < valid_el) & ok
                hist += tl.histogram(tl.where(counted, x, 0).to(tl.int32), NB, mask=counted)
                lo = b * CHUNK
                hi_h = tl.minimum(lo + BLOCK, numel)
                hi = tl.minimum(lo + CHUNK, numel)
                in_rows += tl.maximum(tl.minimum(valid_el, hi_h) - lo, 0)
                padding += hi - tl.maximum(tl.minimum(valid_el, hi), lo)
                if TOKENS:
                    _store_tokens(tok_ids_ptr, tok_pass_ptr, x, ok, e, valid_el, nv, base, pass_id, tok_on, N, R, K)
                e = e_next
                x = x_next
            bins = tl.arange(0, NB)
            tl.atomic_add(counts_ptr + bins, hist.to(tl.int64), mask=on & (bins < S) & (hist > 0), sem="relaxed")
            # Invalid ids are the rows' ids the histogram did not count: one reduction, not two.
            discard = in_rows - tl.sum(hist, axis=0)
            _add_lane0(counts_ptr + S, discard.to(tl.int64), on & (discard > 0), lane)
            _add_lane0(counts_ptr + S + 1, padding.to(tl.int64), on & (padding > 0), lane)

    # Scalar atomics, issued as block-shaped ones with a single live lane: Triton gives a scalar
    # atomic's result to every thread through shared memory and a barrier, so all of them would
    # wait for its round trip (0.5 us on an H100); these results go unused, so nothing waits.
    @triton.jit
    def _add_lane0(ptr, value, mask, lane):
        tl.atomic_add(ptr + lane * 0, value, mask=mask & (lane == 0), sem="relaxed")

    @triton.jit
    def _max_lane0(ptr, value, mask, lane):
        tl.atomic_max(ptr + lane * 0, value, mask=mask & (lane == 0), sem="relaxed")

    @triton.jit
    def _load_ids(ids_ptr, e, numel, stride_t, stride_k, K: tl.constexpr, CONTIG: tl.constexpr):
        if CONTIG:
            off = e
        else:
            off = (e // K) * stride_t + (e % K) * stride_k
        return tl.load(ids_ptr + off, mask=e < numel, other=-1)

    @triton.jit
    def _store_tokens(
        tok_ids_ptr, tok_pass_ptr, x, ok, e, valid_el, nv, base, pass_id, tok_on, N: tl.constexpr, R, K: tl.constexpr
    ):
        t = e // K
        # Only the pass's last N valid tokens fit in the ring; earlier ones would collide.
        keep = (e < valid_el) & (t >= nv - N) & tok_on
        slot = (base + t) % N
        tl.store(tok_ids_ptr + slot.to(tl.int64) * (R * K) + e % K, tl.where(ok, x, -1).to(tl.int32), mask=keep)
        tl.store(tok_pass_ptr + slot, pass_id, mask=keep & (e % K == 0))


def stripes_for(device: torch.device) -> int:
    """How many copies of the count rows a counter on ``device`` keeps (1 off CUDA)."""
    return STRIPES if device.type == "cuda" and available() else 1


def _shape(n: int) -> tuple[bool, int, int, int, int]:
    """(direct, block, atomic block, warps, programs) for ``n`` ids: few compiled variants."""
    if n <= DIRECT_MAX:
        return True, DIRECT_BLOCK, 0, DIRECT_WARPS, triton.cdiv(n, DIRECT_BLOCK)
    block = next((b for b in HIST_BLOCKS if triton.cdiv(n, b + ATOMIC_BLOCK) <= MAX_PROGRAMS), HIST_BLOCKS[-1])
    return False, block, ATOMIC_BLOCK, NUM_WARPS, min(triton.cdiv(n, block + ATOMIC_BLOCK), MAX_PROGRAMS)


def record(counter: Counter, row: int, ids: torch.Tensor, num_valid: int | torch.Tensor | None) -> None:
    """Count ``ids`` [T, k] into ``counter.stripes[:, row]`` (and its token ring): one launch.

    Same contract and same results as the torch path in ``Counter.record``.
    """
    T, K = ids.shape
    if T == 0:
        return  # nothing to count; the torch path's updates are all no-ops too
    if T * K >= 2**31 or (T - 1) * ids.stride(0) + (K - 1) * ids.stride(1) >= 2**31:
        raise ValueError(f"topk_ids: {T} x {K} ids (strides {ids.stride()}) exceed the kernel's int32 indexing")
    dev = ids.device
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():  # Triton launches on the current device
        with torch.cuda.device(dev):
            return record(counter, row, ids, num_valid)
    if isinstance(num_valid, torch.Tensor) and num_valid.device != dev:
        # A host scalar is read as an int (no device sync); another GPU's is copied over.
        num_valid = num_valid.to(dev) if num_valid.is_cuda else int(num_valid)
    nv_is_ptr = isinstance(num_valid, torch.Tensor)
    nv_ptr, nv_int = (num_valid, 0) if nv_is_ptr else (counter.enabled, T)
    if isinstance(num_valid, int):
        nv_int = max(min(num_valid, T), -1)  # clamped so Triton's int specialization stays small
    direct, block, ablock, warps, programs = _shape(T * K)
    contig = ids.is_contiguous()
    fixed = counter.tap_args  # the counter's buffers and sizes, in the kernel's order
    args = (ids, ids.stride(0), ids.stride(1), T, nv_ptr, nv_int, row, *fixed)
    # Under torch.compile the ordinary launch is traced (Dynamo knows user-defined Triton kernels).
    compiling = torch.compiler.is_compiling()
    if not compiling:
        # Everything Triton specializes a compiled kernel on that can change from call to call.
        key = (ids.dtype, contig, ids.data_ptr() % 16 == 0, nv_ptr.dtype, nv_ptr.data_ptr() % 16 == 0, nv_is_ptr)
        key += (direct, block, ablock, warps, dev.index)
        launch = counter.tap_launches.get(key)
        if launch is not None:
            kernel, constexprs = launch
            try:
                kernel[(programs, 1, 1)](*args, *constexprs, stream=_stream(dev))
                return
            except TypeError:  # a Triton whose launcher takes other arguments: its dispatcher only
                _disable_fast(counter)
    constexprs = dict(  # in the kernel's signature order: the fast launch passes them by position
        N=counter.token_slots if counter.token_ids is not None else 1,
        S=counter.num_slots,
        K=K,
        G=counter.stripes.shape[0],
        NB=max(32, triton.next_power_of_2(counter.num_slots)),
        BLOCK=block,
        ABLOCK=ablock,
        DIRECT=direct,
        CONTIG=contig,
        NV_PTR=nv_is_ptr,
        TOKENS=counter.token_ids is not None,
    )
    kernel = _tap_kernel[(programs,)](*args, **constexprs, num_warps=warps)
    if _FAST and not compiling and dev.type == "cuda" and hasattr(kernel, "run"):
        counter.tap_launches[key] = (kernel, tuple(constexprs.values()))


def tap_args(counter: Counter) -> tuple:
    """The kernel arguments that stay fixed for a counter (its buffers never move)."""
    tokens = counter.token_ids is not None
    if tokens:
        tok_ids, tok_pass = counter.token_ids, counter.token_pass
    else:  # unused pointers: any int64 tensor
        tok_ids, tok_pass = counter.enabled, counter.enabled
    stripes = counter.stripes
    return (
        counter.enabled,
        stripes,
        stripes.stride(0),
        tok_ids,
        tok_pass,
        len(counter.layer_ids),
        counter.token_enabled,
        counter.token_cursor,
        counter.pass_tokens,
        counter.passes,
    )


def _triton_version() -> tuple[int, int]:
    if triton is None:
        return (0, 0)
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


# Eager launches through the compiled kernel's own launcher (``CompiledKernel[grid](*args)``),
# which takes every bound argument, constexprs included, from Triton 3.3 on.
_FAST = _triton_version() >= (3, 3)


def _disable_fast(counter: Counter) -> None:
    global _FAST
    _FAST = False
    counter.tap_launches.clear()


try:
    from torch._C import _cuda_getCurrentRawStream as _raw_stream
except ImportError:  # pragma: no cover - torch builds without CUDA
    _raw_stream = None


def _stream(device: torch.device) -> int:
    if _raw_stream is not None:
        return _raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream
