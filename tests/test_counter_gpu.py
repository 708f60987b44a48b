"""The tap on a CUDA GPU: the Triton kernel equals the torch path, never syncs, and serves a
CUDA graph captured once while recording is switched on and off. Skips cleanly without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_record_sdk import Recorder, counter_triton
from moe_record_sdk.counter import Counter

pytestmark = pytest.mark.gpu

MODES = ["stat", "per_pass", "per_token"]


def _state(c: Counter) -> list[torch.Tensor]:
    """Everything the tap and step write, minus the token ring's trash row."""
    out = [c.total_counts(), c.passes, c.token_cursor, c.layer_tokens]
    if c.rows is not None:
        out += [c.rows, c.row_pass]
    if c.token_ids is not None:
        out += [c.token_ids[:, : c.token_slots]]
    return [t.cpu() for t in out]


def _random_ids(gen: torch.Generator, T: int, k: int, S: int, dtype: torch.dtype, contiguous: bool) -> torch.Tensor:
    ids = torch.randint(-3, S + 3, (T, k + 3), generator=gen, dtype=torch.int64)
    ids[torch.rand(T, k + 3, generator=gen) < 0.05] = -1  # padding ids, as routers emit them
    ids = ids.to(dtype).cuda()
    return ids[:, :k].contiguous() if contiguous else ids[:, 1 : k + 1]


def test_kernel_is_chosen_on_cuda():
    pytest.importorskip("triton")
    c = Counter([0], 8, 2, "cuda")
    assert c.kernel == "triton" and Counter([0], 8, 2, "cpu").kernel == "torch"
    # On NVIDIA the counting is the PTX shared-memory histogram, not one atomic per id.
    hist, _ = counter_triton._histogram(c, torch.device("cuda"), 1 << 20, 4, 16)
    assert "red.shared.add.u32" in hist and torch.version.hip is None


def test_more_bins_than_shared_memory_holds_are_counted_with_atomics():
    """Past MAX_BINS expert slots the histogram does not fit: one atomic per id, still exact."""
    pytest.importorskip("triton")
    S = counter_triton.MAX_BINS
    c = Counter([0], S, 4, "cuda")
    assert counter_triton._histogram(c, torch.device("cuda"), 1 << 20, 4, 16) == ("", "")
    c.set_enabled(True, False)
    ids = torch.randint(-1, S + 1, (5000, 4), generator=torch.Generator().manual_seed(9)).cuda()
    c.record(0, ids, 4000)
    head = ids[:4000].flatten().cpu()
    ok = (head >= 0) & (head < S)
    ref = torch.bincount(torch.where(ok, head, S), minlength=S + 2)
    ref[S + 1] = 1000 * 4
    assert torch.equal(c.total_counts()[0].cpu(), ref)


def test_triton_equals_torch_path(request):
    """Thousands of random batches: every dtype, layout, T (0 included), valid-token form."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(3)
    rng = np.random.default_rng(3)
    configs = 1000 if request.config.getoption("--full") else 300
    batches = 0
    for _ in range(configs):
        # Two models only: each (S, k) compiles its own kernels, and compiling dominates.
        S, k = [(7, 3), (256, 8)][int(rng.integers(2))]
        tokens = int(rng.choice([0, 1, 3, 64, 1000])) if rng.random() < 0.4 else 0
        pair = []
        for kernel in ("torch", "triton"):
            c = Counter([0, 1, 2], S, k, "cuda", ring_rows=2, token_slots=tokens)
            c.kernel = kernel
            pair.append(c)
        on = rng.random() < 0.85
        for c in pair:
            c.set_enabled(on, tokens > 0)
        for _ in range(int(rng.integers(1, 4))):  # passes
            for row in range(3):
                T = int(rng.choice([0, 1, 2, 5, 16, 17, 129, 1000, 5000]))
                ids = _random_ids(gen, T, k, S, [torch.int32, torch.int64][int(rng.integers(2))], rng.random() < 0.5)
                form = int(rng.integers(4))
                nv = [None, int(rng.integers(-1, T + 3)), None, None][form]
                if form >= 2:
                    nv = torch.tensor(int(rng.integers(0, T + 3)), dtype=[torch.int32, torch.int64][form - 2]).cuda()
                for c in pair:
                    c.record(row, ids, nv)
                batches += 1
            for c in pair:
                c.step()
        for a, b in zip(_state(pair[0]), _state(pair[1])):
            assert torch.equal(a, b), f"S={S} k={k} tokens={tokens} on={on}"
    assert batches >= 1000, batches
    if counter_triton._FAST:  # the later launches went through the cached compiled kernels
        assert pair[1].tap_launches


# Launch shapes the tuner compares (tests/perf/tune_tap.py): each must count exactly. One-warp
# programs zero and flush more bins than they have threads; the atomics shape is the path of
# decode batches and of GPUs where the PTX histogram cannot serve.
SHAPES = {
    "stripes": {"STRIPES": 5, "ATOMICS_MAX": 0, "LAUNCH": ((64, 1, 1), (4096, 2, 4), (None, 4, 16))},
    "one_warp": {"STRIPES": 3, "ATOMICS_MAX": 0, "LAUNCH": ((None, 4, 1),)},
    "one_stripe": {"STRIPES": 1, "ATOMICS_MAX": 0, "LAUNCH": ((None, 8, 8),)},
    "atomics": {"STRIPES": 4, "ATOMICS_MAX": 1 << 62},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_launch_shapes_equal_torch_path(shape, monkeypatch):
    pytest.importorskip("triton")
    for knob, value in SHAPES[shape].items():
        monkeypatch.setattr(counter_triton, knob, value)
    gen = torch.Generator().manual_seed(7)
    rng = np.random.default_rng(7)
    S, k = 256, 8
    for tokens in (0, 300):
        ref = Counter([0, 1], S, k, "cuda", ring_rows=3, token_slots=tokens)
        ref.kernel = "torch"
        tri = Counter([0, 1], S, k, "cuda", ring_rows=3, token_slots=tokens)
        assert tri.stripes.shape[0] == SHAPES[shape].get("STRIPES", 1) and tri.kernel == "triton"
        for c in (ref, tri):
            c.set_enabled(True, tokens > 0)
        for _ in range(3):
            for row in (0, 1):
                T = int(rng.choice([1, 7, 100, 1000, 5000]))
                ids = _random_ids(gen, T, k, S, torch.int32, rng.random() < 0.5)
                form = int(rng.integers(3))
                nv = [None, int(rng.integers(0, T + 2)), torch.tensor(int(rng.integers(0, T + 2))).cuda()][form]
                for c in (ref, tri):
                    c.record(row, ids, nv)
            for c in (ref, tri):
                c.step()
        for a, b in zip(_state(ref), _state(tri)):
            assert torch.equal(a, b), shape


def test_counts_equal_numpy_on_gpu():
    """Independent of both paths: numpy over the same ids."""
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(5)
    S, k = 256, 8
    c = Counter([0], S, k, "cuda")
    c.set_enabled(True, False)
    ref = np.zeros(S + 2, dtype=np.int64)
    for T in [1, 16, 128, 1024, 4096, 16384, 3, 0]:
        ids = _random_ids(gen, T, k, S, torch.int32, True)
        valid = T - T // 4
        c.record(0, ids, valid)
        a = ids.cpu().numpy()
        head, tail = a[:valid].reshape(-1), a[valid:].reshape(-1)
        ok = (head >= 0) & (head < S)
        np.add.at(ref, head[ok], 1)
        ref[S] += int((~ok).sum())
        ref[S + 1] += tail.size
    assert c.total_counts()[0].cpu().numpy().tolist() == ref.tolist()


@pytest.mark.parametrize("kernel", ["triton", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_no_host_sync_while_recording(mode, kernel):
    if kernel == "triton":
        pytest.importorskip("triton")
    rec = Recorder(num_layers=2, num_experts=64, top_k=8, device="cuda", mode=mode, max_bytes=8 << 20)
    rec.counter.kernel = kernel
    rec.start()
    ids = torch.randint(-1, 64, (33, 8), device="cuda", dtype=torch.int32)
    nv = torch.tensor(20, device="cuda")

    def one_pass() -> None:
        rec.record(0, ids, nv)
        rec.record(1, ids.long()[:, :8], 7)
        rec.record(0, ids[:0])
        rec.record(1, ids)
        rec.step()

    one_pass()  # compiles the kernels: a warm-up may sync, recording may not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            one_pass()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    dump = rec.dump()
    assert dump.window.num_passes == 4
    valid = ((ids >= 0) & (ids < 64)).sum(1).cpu()  # valid ids per row
    want = [4 * int(valid[:20].sum()), 4 * int(valid[:7].sum() + valid.sum())]
    assert dump.total_count().sum(1).tolist() == want


def _buffers(rec: Recorder) -> list[int]:
    c = rec.counter
    names = ["enabled", "token_enabled", "stripes", "passes", "rows", "row_pass", "last_counts"]
    names += ["token_ids", "token_cursor", "layer_tokens"]
    return [getattr(c, n).data_ptr() for n in names if getattr(c, n) is not None]


@pytest.mark.parametrize("mode", MODES)
def test_cuda_graph_replays_exactly_with_recording_toggled(mode, request):
    """Capture record + step for 4 layers once; replay with fresh ids, switching recording on and
    off between replays (start / stop flip device flags only); counts stay exact."""
    L, E, k, T = 4, 64, 8, 48
    rec = Recorder(num_layers=L, num_experts=E, top_k=k, device="cuda", mode=mode, buffer_size=4096, max_bytes=64 << 20)
    counter = rec.counter
    ids = torch.zeros(L, T, k, dtype=torch.int32, device="cuda")
    nv = torch.zeros((), dtype=torch.int64, device="cuda")
    rec.start()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream (compiles the kernel)
        for layer in range(L):
            rec.record(layer, ids[layer], nv)
        rec.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(L):
            rec.record(layer, ids[layer], nv)
        rec.step()
    buffers = _buffers(rec)

    gen = torch.Generator().manual_seed(11)
    rng = np.random.default_rng(11)
    raw_before = counter.total_counts().cpu().numpy().copy()
    expect_raw = np.zeros((L, E + 2), dtype=np.int64)  # every on-replay since the capture
    window: list[tuple[np.ndarray, int]] = []  # (ids, valid) of the on-replays since the last start
    recording = True
    rec.start()
    replays = 300 if request.config.getoption("--full") else 120
    for _ in range(replays):
        if rng.random() < 0.15:  # toggle between replays, never recapture
            if recording:
                rec.stop()
            else:
                rec.start()
                window = []
            recording = not recording
            assert rec.counter is counter and _buffers(rec) == buffers
        fresh = torch.randint(-2, E + 2, (L, T, k), generator=gen, dtype=torch.int32)
        valid = int(rng.integers(0, T + 1))
        ids.copy_(fresh)
        nv.fill_(valid)
        graph.replay()
        if recording:
            a = fresh.numpy()
            window.append((a, valid))
            for layer in range(L):
                flat = a[layer, :valid].reshape(-1)
                ok = (flat >= 0) & (flat < E)
                np.add.at(expect_raw[layer], flat[ok], 1)
                expect_raw[layer, E] += int((~ok).sum())
                expect_raw[layer, E + 1] += (T - valid) * k
    torch.cuda.synchronize()
    assert np.array_equal(counter.total_counts().cpu().numpy() - raw_before, expect_raw)

    dump = rec.dump()
    assert dump.window.num_passes == len(window)
    per_pass = np.zeros((len(window), L, E), dtype=np.int64)
    for p, (a, valid) in enumerate(window):
        for layer in range(L):
            flat = a[layer, :valid].reshape(-1)
            np.add.at(per_pass[p, layer], flat[(flat >= 0) & (flat < E)], 1)
    assert dump.total_count().numpy().tolist() == per_pass.sum(0).tolist()
    if mode != "stat":
        assert dump.logical_count.numpy().tolist() == per_pass.tolist()
    if mode == "per_token":
        assert len(dump.records) == len(window)
        for rec_, (a, valid) in zip(dump.records, window):
            want = np.where((a >= 0) & (a < E), a, -1)[:, :valid]
            assert rec_.topk_ids_of_layer.numpy().tolist() == want.tolist()


def test_tap_compiles_with_cuda_kernel():
    """torch.compile(fullgraph=True) traces the Triton launch (user-defined kernel support)."""
    pytest.importorskip("triton")
    rec = Recorder(num_layers=2, num_experts=16, top_k=2, device="cuda", mode="per_token", max_bytes=1 << 20)
    eager = Recorder(num_layers=2, num_experts=16, top_k=2, device="cuda", mode="per_token", max_bytes=1 << 20)

    def forward(r: Recorder, ids: torch.Tensor, nv: torch.Tensor) -> None:
        r.record(0, ids, nv)
        r.record(1, ids * 2, None)
        r.step()

    compiled = torch.compile(forward, fullgraph=True)
    rec.start()
    eager.start()
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        ids = torch.randint(-1, 18, (10, 2), generator=gen, dtype=torch.int32).cuda()
        nv = torch.tensor(7, device="cuda")
        compiled(rec, ids, nv)
        forward(eager, ids, nv)
    for a, b in zip(_state(rec.counter), _state(eager.counter)):
        assert torch.equal(a, b)
