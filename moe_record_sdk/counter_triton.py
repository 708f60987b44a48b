"""The tap as one Triton kernel, for CUDA: counts into striped counters, one launch per tap.

``Counter.record`` calls :func:`record` for CUDA ids when Triton imports; the torch path in
``counter.py`` stays the CPU path and the reference this kernel is tested against.

Why a kernel: SGLang's ``scatter_add_`` issues one global atomic per id, so all the tokens of a
pass contend on a few hundred addresses and the cost grows with tokens. Here the counters are
``STRIPES`` copies of the count rows (``Counter.stripes`` [G, R, S + 2]; readers sum them with
``Counter.total_counts``) and each program adds into stripe ``program_id % G``, so programs do
not queue on the same addresses. Up to ``ATOMICS_MAX`` ids (decode batches) one relaxed atomic
per id is cheapest. Past it each program loads one block of ids (``LAUNCH``: ids per thread and
warps grow with the batch) and counts them in a shared-memory histogram, one shared atomic per
id, then adds each nonzero bin to its stripe with one global atomic (:func:`_histogram_ptx`).
Triton has no shared-memory atomics, so that histogram is PTX through
``tl.inline_asm_elementwise``, emitted once per thread (``pack`` = the thread's ids) and launched
as every Triton kernel is. Where PTX cannot serve (Triton's interpreter, ROCm, more bins than
static shared memory holds) and under ``torch.compile`` (Inductor neither analyzes inline PTX
nor writes it into its generated module) the kernel adds one atomic per id: exact, slower past
a few thousand tokens. The same kernel writes the ``per_token`` ring. Everything the host would
have to read (``enabled``, ``token_enabled``, a tensor ``num_valid_tokens``, the ring cursor)
is loaded in-kernel: no sync, and one CUDA graph serves recording on and off.

Eager launches skip Triton's Python dispatcher: the compiled kernel is looked up once per
(counter, dtype, layout, alignment, launch shape) and launched through its launcher
(``Counter.tap_launches``, in :func:`record`); under ``torch.compile`` tracing the ordinary ``kernel[grid]`` call is
used, so Dynamo sees a user-defined Triton kernel.

Notes (E=256, k=8, int32 ids, in a CUDA graph, us per call; ``moe-record bench`` and
``tests/perf/tune_tap.py`` print these):

* NVIDIA H200, torch 2.11, Triton 3.6, 2026-11-29 (``moe-record bench --experts 256,64``,
  median of 30): stat 1.10 / 1.17 / 1.25 / 1.32 / 1.38 / 1.52 at T = 1 / 16 / 128 / 1024 / 4096 /
  16384 against a bare copy's 1.02 / 1.03 / 1.10 / 1.16 / 1.21 / 1.30, i.e. 1.07 / 1.14 / 1.14 /
  1.15 / 1.14 / 1.17x (E=64: 1.08-1.16x); ``scatter_add_`` takes 11.8x ours at T = 16384 (22.9x
  in a run of that T alone: its own time varies, 18-35 us). ``per_token`` 1.18 / 1.25 / 1.22 /
  1.24 / 1.36 / 1.42x the copy (1.37x at T = 16384 since, below); its ring write alone (the
  bench's ``ring``) 1.09-1.23x.
  ``per_token`` was 1.27-1.70x with the ring token-major and written after the counting; the
  ring became layer-major [R, N + 1, K] (a tap's writes side by side), its writes go out before
  the histogram's barriers (1.58 -> 1.50x at T = 16384), and a thread holding several ids writes
  them with one wide store where the block's slots do not wrap (1.50 -> 1.40x; with one id per
  thread that branch only cost, +0.08 us, so it is compiled in only for ITEMS > 1).
* The launch shapes, same card and day (``tune_tap.py``, stat / copy at T = 1 ... 16384): one
  atomic per id at every T 1.16 / 1.12 / 1.19 / 1.24 / 1.91 / 4.25 (its atomics' throughput);
  the histogram in 256-id programs (1 id per thread, 8 warps) 1.18 / 1.12 / 1.16 / 1.16 / 1.24 /
  1.72; 1024-id programs (2 x 16) 1.24 / 1.20 / 1.19 / 1.20 / 1.15 / 1.23; 2048-id programs
  (4 x 16) 1.38 / 1.27 / 1.24 / 1.25 / 1.21 / 1.20. Fewer, larger programs win at large T (fewer
  per-bin atomics), but each program zeroes and adds every bin, which small batches pay for.
  Zeroing the bins before the ids' load is issued (a separate asm) and a grid-stride loop over
  capped programs were each 0.03-0.05 us slower. ``per_token`` has no better shape either: the
  best of eight at each T was within 0.06x of the shipped one (2 x 8: 1.29x at T = 4096 against
  1.35x, but 1.54x at T = 16384 against 1.44x; 2026-11-29, before the pass ids went).
* Before the PTX histogram (H100 and H200, 2026-11-28), the histogram path used Triton's
  ``tl.histogram``, which lowers to ballots (one per bin bit, then per lane an AND chain and a
  popcount for each of its S/32 bins: ~90 instructions per id for 256 bins); a bare
  ``tl.histogram`` kernel alone took 1.36x / 1.57x the copy at T = 4096 / 16384 on the H100, and
  the tap 1.56x / 1.78x on the H200. A tensor-core histogram (one-hot ``tl.dot``) was 1.4-3x
  slower still. A CUDA C++ shared-memory histogram built with NVRTC reached 1.25x / 1.29x on the
  H100 but paid 0.14 us more per launch than Triton (its own launch path) and rested on a
  private torch API: the PTX here is that kernel's counting, launched by Triton.
* ``per_token`` adds ~0.1-0.3 us at small T (H200, ``tests/perf/per_token_cost.py``, 2026-11-28):
  ~0.17 us was its scalar loads (cursor, pass id, flag) feeding the ring writes, ~0.07 the
  writes. It does stat's work plus the ring's write, so it stays above 1.2x the copy. Two-byte
  ids changed nothing measurable (1.23-1.86 us at T = 1 ... 16384, as with four-byte ids the day
  before), nor did announcing from one program instead of all of them (1.44x the copy at T =
  16384, side by side). What did: the ring keeps no pass id per token (every layer's tap wrote
  the same 8 bytes per token; a pass's positions are its ``row_tokens`` span), 1.44 -> 1.37x at
  T = 16384 and 1.37 -> 1.26x at T = 4096, side by side on an H200 (2026-11-29, twice each;
  1.27-1.33x at T <= 1024, was 1.24-1.35x). The ring's write alone (counting off, the bench's
  ``ring``) is 1.09-1.18x the copy; the counting and that write together are the floor left. The
  ring's size N is a compile-time constant: ``cursor % N`` with N a runtime argument (a float64
  division) cost 0.33 us per call.
* Noise floor: two kernels with identical SASS timed 0.17 us apart at T=16 with differently
  placed buffers (L2's near and far partitions), so differences below ~0.15 us at T <= 1024 are
  not attributable to code.
* Scalar atomics are issued as one-lane block atomics (``_max_lane0``): Triton broadcasts a
  scalar atomic's result through shared memory and a barrier, which made every thread wait for
  its round trip (+0.5 us per atomic).
* End to end (``tests/perf/e2e_overhead.py``, H200, 2026-11-29, a Qwen3-MoE-like model of 8 MoE
  layers in a CUDA graph): stat +0.15 / +0.31 / -0.54% of a decode step at batch 1 / 8 / 64,
  per_token +4.5 / +1.1 / +0.5% (noise about 3% at batch 1).
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

# Launch shape, tuned on an H200 with tests/perf/tune_tap.py (figures in the module notes).
STRIPES = 16  # copies of the count rows on CUDA: programs add into stripe pid % STRIPES
# (up to this many ids, ids per thread, warps): one block of ids per program, so the block
# grows with the batch (fewer programs: fewer per-bin atomics) and stays one load per thread.
LAUNCH = ((8192, 1, 8), (32768, 2, 16), (None, 4, 16))
ATOMICS_MAX = 256  # up to this many ids (decode), one atomic per id: cheaper than a whole histogram
MAX_BINS = 12288  # the histogram's bins live in static shared memory (48 KiB at most)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernel can serve CUDA ids here (Triton imports and a GPU is present)."""
    return triton is not None and torch.cuda.is_available()


@functools.cache
def _histogram_ptx(items: int, bins: int, threads: int) -> str:
    """The block's histogram, as PTX for ``tl.inline_asm_elementwise`` (``pack=items``: each
    thread's ``items`` bins in operands ``$items..``, the counters' address in ``$2*items``; its
    outputs, ``$0..``, are dummies). Zero ``bins`` shared counters, one shared atomic per id
    (bin -1: none), then one global atomic per nonzero bin, each thread its ``bin % threads``.

    Triton has no shared-memory atomics (``tl.histogram`` lowers to ballots, ~90 instructions per
    id for 256 bins): this is what a CUDA C++ kernel would do, launched as Triton launches."""
    ptr = f"${2 * items}"
    asm = ["{", f".shared .align 4 .u32 bins[{bins}];", ".reg .pred p;", ".reg .u32 t, a, v, hb;", ".reg .u64 g, w;"]
    asm += ["mov.u32 t, %tid.x;", "mov.u32 hb, bins;", "mad.lo.u32 a, t, 4, hb;"]
    for j in range(0, bins, threads):
        asm += [f"setp.lt.u32 p, t, {bins - j};", f"@p st.shared.u32 [a+{4 * j}], 0;"]
    asm += ["bar.sync 0;"]
    for i in range(items):
        asm += [
            f"setp.ge.s32 p, ${items + i}, 0;",
            f"mad.lo.u32 a, ${items + i}, 4, hb;",
            "@p red.shared.add.u32 [a], 1;",
        ]
    asm += ["bar.sync 0;", "mad.lo.u32 a, t, 4, hb;", "mul.wide.u32 g, t, 8;", f"add.u64 g, g, {ptr};"]
    for j in range(0, bins, threads):
        asm += [f"setp.lt.u32 p, t, {bins - j};", "mov.u32 v, 0;", f"@p ld.shared.u32 v, [a+{4 * j}];"]
        asm += ["setp.ne.u32 p, v, 0;", "cvt.u64.u32 w, v;", f"@p red.global.add.u64 [g+{8 * j}], w;"]
    asm += [f"mov.u32 ${i}, 0;" for i in range(items)] + ["}"]
    return "\n".join(asm)


if triton is not None:
    # Sizes, strides and the row vary from call to call: not specializing on them (== 1, % 16)
    # keeps one compiled kernel per (dtype, layout, mode, launch shape) instead of dozens.
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
        tok_ids_ptr,  # int16 or int32 [R, N + 1, K]: Counter.token_ids
        token_enabled_ptr,  # int64 scalar
        cursor_ptr,  # int64 scalar: ring position of this pass's first token
        layer_tokens_ptr,  # int64 [R]: per layer, the most tokens one call of this pass announced
        N: tl.constexpr,  # token slots in the ring: a constant, so % N is a multiply, not a division
        S: tl.constexpr,  # expert slots; S is the discard bin, S + 1 the padding bin
        K: tl.constexpr,
        G: tl.constexpr,  # stripes
        BLOCK: tl.constexpr,  # ids per program: ITEMS per thread
        ITEMS: tl.constexpr,
        HIST: tl.constexpr,  # _histogram_ptx's PTX, or "" for one atomic per id
        HIST_ARGS: tl.constexpr,  # its operands' constraints
        CONTIG: tl.constexpr,  # ids are one dense [T * K] run: plain offsets, wide loads
        NV_PTR: tl.constexpr,
        TOKENS: tl.constexpr,
    ):
        pid = tl.program_id(0)
        counts_ptr += (pid % G) * stripe_stride + row * (S + 2)
        numel = T * K
        # The ids are loaded before the flags are known, so the loads overlap: the longest chain
        # is one load, the counting, then the atomics (as a copy's is a load, then a store).
        lane = tl.arange(0, BLOCK)
        e = pid * BLOCK + lane
        x = _load_ids(ids_ptr, e, numel, stride_t, stride_k, K, CONTIG)
        on = tl.load(enabled_ptr) != 0
        if NV_PTR:
            nv = tl.minimum(tl.load(nv_ptr).to(tl.int64), T).to(tl.int32)
        else:
            nv = tl.minimum(nv_int, T)
        valid_el = tl.maximum(nv, 0) * K  # ids in rows < num_valid_tokens: [0, valid_el)
        ok = (x >= 0) & (x < S)
        if TOKENS:
            tok_on = tl.load(token_enabled_ptr) != 0
            cursor = tl.load(cursor_ptr)
            tok_ids_ptr += tl.cast(row, tl.int64) * ((N + 1) * K)  # the layer's ring: [N + 1, K]
            base = (cursor % N).to(tl.int32)  # the cursor only grows from 0
            # Announce the pass's tokens before writing any: a dump that re-reads layer_tokens
            # after copying the ring knows which slots these writes may have overwritten. The
            # copy is a DMA no fence orders against this kernel, so this is ordering in time:
            # issued before the writes, re-read after the copy completed. (acq_rel here cost
            # 0.5 us per layer on an H100 and would not order the DMA either.)
            _max_lane0(layer_tokens_ptr + row, nv.to(tl.int64), tok_on & (nv > 0), lane)
            # The ring writes go out before the counting, so they overlap its barriers.
            _store_tokens(tok_ids_ptr, x, ok, e, valid_el, nv, base, tok_on, N, K, ITEMS)
        if on:  # the same for every thread: the histogram's barriers see all of them
            # Each id's bin: its expert, the discard bin S (invalid id), the padding bin S + 1
            # (a row past num_valid_tokens), or none (-1: past the batch).
            b = tl.where(e < valid_el, tl.where(ok, x, S), S + 1)
            b = tl.where(e < numel, b, -1).to(tl.int32)
            if HIST != "":
                tl.inline_asm_elementwise(
                    HIST, HIST_ARGS, [b, counts_ptr + lane * 0], dtype=tl.int32, is_pure=False, pack=ITEMS
                )
            else:
                tl.atomic_add(counts_ptr + b, 1, mask=b >= 0, sem="relaxed")

    # Scalar atomics, issued as block-shaped ones with a single live lane: Triton gives a scalar
    # atomic's result to every thread through shared memory and a barrier, so all of them would
    # wait for its round trip (0.5 us on an H100); these results go unused, so nothing waits.
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
        tok_ids_ptr,
        x,
        ok,
        e,
        valid_el,
        nv,
        base,
        tok_on,
        N: tl.constexpr,
        K: tl.constexpr,
        ITEMS: tl.constexpr,
    ):
        t = e // K
        # Only the pass's last N valid tokens fit in the ring; earlier ones would collide.
        keep = (e < valid_el) & (t >= nv - N) & tok_on
        ids = tl.where(ok, x, -1).to(tok_ids_ptr.dtype.element_ty)
        last = (tl.program_id(0) * e.shape[0] + e.shape[0] - 1) // K  # the block's last token
        # Where a thread holds several ids and the block's slots do not wrap, its ids go to one
        # contiguous run: one wide store each (the % N addresses defeat that). With one id per
        # thread there is nothing to widen, and the branch would only cost.
        if ITEMS > 1 and base + last < N:
            tl.store(tok_ids_ptr + base.to(tl.int64) * K + e, ids, mask=keep)
        else:
            slot = (base + t) % N
            tl.store(tok_ids_ptr + slot.to(tl.int64) * K + e % K, ids, mask=keep)


def stripes_for(device: torch.device) -> int:
    """How many copies of the count rows a counter on ``device`` keeps (1 off CUDA)."""
    return STRIPES if device.type == "cuda" and available() else 1


def _shape(n: int) -> tuple[int, int, int]:
    """(ids per thread, warps, programs) for ``n`` ids: ``LAUNCH``'s first row that holds them."""
    items, warps = next((i, w) for most, i, w in LAUNCH if most is None or n <= most)
    return items, warps, triton.cdiv(n, items * 32 * warps)


def _histogram(counter: Counter, device: torch.device, n: int, items: int, warps: int) -> tuple[str, str]:
    """The PTX histogram and its constraints for this launch of ``n`` ids, or ("", "") for one
    atomic per id: up to ``ATOMICS_MAX`` ids, off NVIDIA (Triton's interpreter, ROCm), or with
    more bins than shared memory holds."""
    bins = counter.num_slots + 2
    if n <= ATOMICS_MAX or device.type != "cuda" or torch.version.hip is not None or bins > MAX_BINS:
        return "", ""
    return _histogram_ptx(items, bins, 32 * warps), ",".join(["=r"] * items + ["r"] * items + ["l"] * items)


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
    items, warps, programs = _shape(T * K)
    contig = ids.is_contiguous()
    fixed = counter.tap_args  # the counter's buffers and sizes, in the kernel's order
    args = (ids, ids.stride(0), ids.stride(1), T, nv_ptr, nv_int, row, *fixed)
    # Under torch.compile the ordinary launch is traced (Dynamo knows user-defined Triton kernels).
    compiling = torch.compiler.is_compiling()
    if not compiling:
        # Everything Triton specializes a compiled kernel on that can change from call to call.
        key = (ids.dtype, contig, ids.data_ptr() % 16 == 0, nv_ptr.dtype, nv_ptr.data_ptr() % 16 == 0, nv_is_ptr)
        key += (items, warps, T * K <= ATOMICS_MAX, dev.index)
        launch = counter.tap_launches.get(key)
        if launch is not None:
            kernel, constexprs = launch
            try:
                kernel[(programs, 1, 1)](*args, *constexprs, stream=_stream(dev))
                return
            except TypeError:  # a Triton whose launcher takes other arguments: its dispatcher only
                _disable_fast(counter)
    # Traced by torch.compile, one atomic per id: Inductor cannot analyze inline PTX (it would
    # warn at every compile) nor write its lines into the module it generates.
    hist, hist_args = ("", "") if compiling else _histogram(counter, dev, T * K, items, warps)
    constexprs = dict(  # in the kernel's signature order: the fast launch passes them by position
        N=counter.token_slots if counter.token_ids is not None else 1,
        S=counter.num_slots,
        K=K,
        G=counter.stripes.shape[0],
        BLOCK=items * 32 * warps,
        ITEMS=items,
        HIST=hist,
        HIST_ARGS=hist_args,
        CONTIG=contig,
        NV_PTR=nv_is_ptr,
        TOKENS=counter.token_ids is not None,
    )
    kernel = _tap_kernel[(programs,)](*args, **constexprs, num_warps=warps)
    if _FAST and not compiling and dev.type == "cuda" and hasattr(kernel, "run"):
        counter.tap_launches[key] = (kernel, tuple(constexprs.values()))


def tap_args(counter: Counter) -> tuple:
    """The kernel arguments that stay fixed for a counter (its buffers never move)."""
    tok_ids = counter.token_ids if counter.token_ids is not None else counter.enabled  # unused: any tensor
    stripes = counter.stripes
    return (
        counter.enabled,
        stripes,
        stripes.stride(0),
        tok_ids,
        counter.token_enabled,
        counter.token_cursor,
        counter.layer_tokens,
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
