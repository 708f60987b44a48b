"""The tap's cost per MoE layer, side by side with SGLang's ``scatter_add_`` and a bare copy.

For each expert count E and token count T, the same top-k ids (int32, as routers emit them) go
through, in one run and interleaved:

* ``ours``: ``Recorder.record`` in ``stat`` mode (the Triton kernel on CUDA, torch ops on CPU);
* ``torch``: the same tap through the torch path (``Counter.kernel = "torch"``): the reference
  the kernel replaces, on CUDA; on CPU it is ``ours``;
* ``per_token``: ``Recorder.record`` in ``per_token`` mode (counts and the token ring);
* ``ring``: the same ``per_token`` tap with counting switched off on the device: the ring write
  alone, what ``per_token`` adds to ``stat`` (its flag, cursor and pass-id loads, then the ids);
* ``stopped``: ``Recorder.record`` after ``stop()``: what an attached, idle recorder costs;
* ``sglang``: SGLang's ``stat`` tap (flatten, mask, ``scatter_add_`` of ones into int32 [L, E]);
* ``scatter``: the ``scatter_add_`` kernel alone, on a ready index;
* ``copy``: a bare device copy of the ids, the floor any tap that reads them pays.

Eager timings include the host's launch cost (that is what an eager engine pays). In a CUDA
graph, ``taps`` calls (cycling over 8 layers and 8 id buffers, like a model's layers) are
captured once and the replays are timed with CUDA events. Every figure is the median of
``trials`` timings, in microseconds per call.

Example
-------
>>> rows = run_bench("cpu", tokens=[16], experts=[8], top_k=2, trials=3, taps=4)
>>> sorted(rows[0])[:3]
['E', 'T', 'copy']
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .recorder import Recorder

TOKENS = (1, 16, 128, 1024, 4096, 16384)
EXPERTS = (64, 256)
LAYERS = 8  # layers (and id buffers) the taps cycle over
METHODS = ("ours", "torch", "per_token", "ring", "stopped", "sglang", "scatter", "copy")


def _sglang_tap(counts: torch.Tensor, num_experts: int) -> Callable[[int, torch.Tensor], None]:
    """SGLang 0.5.23's ``stat`` gatherer, re-expressed: one +1 atomic per valid id."""

    def tap(layer: int, ids: torch.Tensor) -> None:
        flat = ids.flatten()
        valid = (flat >= 0) & (flat < num_experts)
        counts[layer].scatter_add_(0, flat.masked_fill(~valid, 0).long(), valid.int())

    return tap


def _methods(device: torch.device, E: int, T: int, k: int, dtype: torch.dtype) -> tuple[dict, dict]:
    """The callables, each taking a call index, and the recorders they feed, by name."""
    gen = torch.Generator().manual_seed(T * 1000 + E)
    ids = [torch.randint(0, E, (T, k), generator=gen, dtype=dtype).to(device) for _ in range(LAYERS)]
    stat = Recorder(LAYERS, E, k, device, "stat")
    per_token = Recorder(LAYERS, E, k, device, "per_token")
    ring = Recorder(LAYERS, E, k, device, "per_token")
    stopped = Recorder(LAYERS, E, k, device, "stat")
    reference = Recorder(LAYERS, E, k, device, "stat")
    reference.counter.kernel = "torch"
    stat.start()
    per_token.start()
    ring.start()
    ring.counter.enabled.zero_()  # the tap's counting flag: off, its token ring still on
    reference.start()
    sglang = _sglang_tap(torch.zeros(LAYERS, E, dtype=torch.int32, device=device), E)
    scatter_counts = torch.zeros(LAYERS, E, dtype=torch.int32, device=device)
    index = [i.flatten().long() for i in ids]
    ones = torch.ones(T * k, dtype=torch.int32, device=device)
    out = torch.empty_like(ids[0])
    fns = {
        "ours": lambda i: stat.record(i % LAYERS, ids[i % LAYERS]),
        "torch": lambda i: reference.record(i % LAYERS, ids[i % LAYERS]),
        "per_token": lambda i: per_token.record(i % LAYERS, ids[i % LAYERS]),
        "ring": lambda i: ring.record(i % LAYERS, ids[i % LAYERS]),
        "stopped": lambda i: stopped.record(i % LAYERS, ids[i % LAYERS]),
        "sglang": lambda i: sglang(i % LAYERS, ids[i % LAYERS]),
        "scatter": lambda i: scatter_counts[i % LAYERS].scatter_add_(0, index[i % LAYERS], ones),
        "copy": lambda i: out.copy_(ids[i % LAYERS]),
    }
    return fns, {"stat": stat, "stopped": stopped, "ring": ring}


def _eager_timer(fn: Callable[[int], Any], device: torch.device, taps: int) -> Callable[[], float]:
    def once() -> float:
        if device.type != "cuda":
            t0 = time.perf_counter()
            for i in range(taps):
                fn(i)
            return (time.perf_counter() - t0) * 1e6 / taps
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(taps):
            fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / taps

    return once


def _graph_timer(fn: Callable[[int], Any], taps: int, replays: int) -> Callable[[], float]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for i in range(LAYERS):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(taps):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()

    def once() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3 / (taps * replays)

    return once


def run_bench(
    device: str | torch.device | None = None,
    *,
    tokens: Sequence[int] = TOKENS,
    experts: Sequence[int] = EXPERTS,
    top_k: int = 8,
    dtype: torch.dtype = torch.int32,
    graph: bool | None = None,
    trials: int = 30,
    taps: int = 64,
    replays: int = 5,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every method at every (E, T); return one row per (E, T, where).

    Parameters
    ----------
    device:
        ``cuda`` (default when available) or ``cpu``.
    tokens, experts, top_k, dtype:
        The shapes and id dtype timed.
    graph:
        Also time inside a CUDA graph (default: on CUDA).
    trials, taps, replays:
        Medians over ``trials``; each trial times ``taps`` calls (eager), or ``replays`` replays
        of a graph of ``taps`` calls.

    Each row: ``E``, ``T``, ``where`` (``eager`` / ``graph``) and microseconds per call for each
    name in ``METHODS``.

    Example
    -------
    >>> rows = run_bench("cpu", tokens=[4], experts=[8], top_k=2, trials=3, taps=4)
    >>> rows[0]["where"], rows[0]["ours"] > 0
    ('eager', True)
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    graph = device.type == "cuda" if graph is None else graph
    rows = []
    for E in experts:
        for T in tokens:
            if progress:
                progress(f"E={E} T={T}")
            fns, recorders = _methods(device, E, T, top_k, dtype)
            timers: dict[str, dict[str, Callable[[], float]]] = {}
            for fn in fns.values():
                for i in range(LAYERS):  # warm-up: compile the kernels, load the modules
                    fn(i)
            recorders["stopped"].start()
            recorders["stopped"].stop()
            timers["eager"] = {name: _eager_timer(fn, device, taps) for name, fn in fns.items()}
            if graph:
                timers["graph"] = {name: _graph_timer(fn, taps, replays) for name, fn in fns.items()}
            for where, by_name in timers.items():
                samples: dict[str, list[float]] = {name: [] for name in by_name}
                for _ in range(trials):  # interleaved, so drifts hit every method alike
                    for name, once in by_name.items():
                        samples[name].append(once())
                rows.append({"E": E, "T": T, "where": where} | {n: statistics.median(s) for n, s in samples.items()})
            if T:
                _check_counts(**recorders)
            del timers, fns, recorders
    return rows


def _check_counts(stat: Recorder, stopped: Recorder, ring: Recorder) -> None:
    """The timed taps counted something, the stopped one nothing, and the ring-only tap wrote ids
    but counted none: the timing is of the work it names."""
    assert ring.counter.token_ids is not None
    if stat.counter.total_counts().sum().item() == 0 or stopped.counter.total_counts().sum().item() != 0:
        raise AssertionError("benchmark sanity: the recording tap counted nothing or the stopped one counted")
    if ring.counter.total_counts().sum().item() != 0 or (ring.counter.token_ids < 0).all().item():
        raise AssertionError("benchmark sanity: the ring-only tap counted, or wrote no id")


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """Card, library versions and the tap's implementation, for the report."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        import platform

        info["card"] = platform.processor() or platform.machine()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    from .counter import Counter

    counter = Counter([0], 2, 1, device)
    info["kernel"] = counter.kernel
    info["stripes"] = counter.stripes.shape[0]
    return info
