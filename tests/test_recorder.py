"""The recorder counts exactly, in every mode, against an independent numpy reference."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from moe_record_sdk import Recorder, RecorderError, Topology, validate_dump
from moe_record_sdk.counter import Counter

MODES = ["stat", "per_pass", "per_token"]


class Reference:
    """Counts with numpy, from the same ids the tap sees."""

    def __init__(self, num_layers: int, num_slots: int) -> None:
        self.counts = np.zeros((num_layers, num_slots), dtype=np.int64)
        self.tokens = np.zeros(num_layers, dtype=np.int64)
        self.discarded = np.zeros(num_layers, dtype=np.int64)

    def add(self, layer: int, ids: np.ndarray, valid: int | None) -> np.ndarray:
        rows = ids if valid is None else ids[:valid]
        flat = rows.reshape(-1)
        ok = (flat >= 0) & (flat < self.counts.shape[1])
        np.add.at(self.counts[layer], flat[ok], 1)
        self.tokens[layer] += rows.shape[0]
        self.discarded[layer] += int((~ok).sum())
        return np.where((rows >= 0) & (rows < self.counts.shape[1]), rows, -1)


def random_batch(rng: np.random.Generator, E: int, k: int, dtype) -> tuple[torch.Tensor, int | None]:
    T = int(rng.choice([0, 1, 2, 5, 17]))
    ids = rng.integers(-3, E + 3, size=(T, k + 1))
    t = torch.from_numpy(ids).to(dtype)[:, :k]  # non-contiguous view
    valid = None if rng.random() < 0.3 else int(rng.integers(0, T + 1))
    if valid is not None and rng.random() < 0.5:
        valid = torch.tensor(valid)
    return t, valid


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_counts_equal_numpy_reference(mode, dtype):
    rng = np.random.default_rng(1234 + MODES.index(mode))
    L, E, k = 4, 11, 3
    ring = None if mode == "stat" else 4096
    rec = Recorder(
        num_layers=L, num_experts=E, top_k=k, mode=mode, layer_ids=[0, 2, 3], buffer_size=ring, max_bytes=8 << 20
    )
    rec.start()
    ref = Reference(L, E)
    tokens_in_order: list[list[np.ndarray]] = []  # per pass, per layer row, the valid ids
    for _ in range(400):
        seen = {}
        for layer in rec.layer_ids:
            ids, valid = random_batch(rng, E, k, dtype)
            v = None if valid is None else int(valid)
            seen[layer] = ref.add(layer, ids.numpy(), v)
            rec.record(layer, ids, num_valid_tokens=valid)
        tokens_in_order.append(seen)
        rec.step()
    dump = rec.dump()
    assert validate_dump(dump) == []
    assert np.array_equal(dump.total_count().numpy(), ref.counts)
    assert dump.window.num_tokens == [int(t) for t in ref.tokens]
    assert dump.window.discarded == [int(d) for d in ref.discarded]
    assert dump.window.num_passes == 400
    if mode == "stat":
        assert dump.logical_count.shape == (1, L, E)
        return
    assert [r.forward_pass_id for r in dump.records] == list(range(400))
    for p, rec_ in enumerate(dump.records):
        row = np.zeros((L, E), dtype=np.int64)
        for layer, ids in tokens_in_order[p].items():
            np.add.at(row[layer], ids[ids >= 0], 1)
        assert np.array_equal(dump.logical_count[p].numpy(), row)
        if mode == "per_token":
            # Ids read back equal the ids recorded, in order; a layer seeing fewer rows pads with -1.
            got = rec_.topk_ids_of_layer
            for layer, ids in tokens_in_order[p].items():
                assert np.array_equal(got[layer, : ids.shape[0]].numpy(), ids)
                assert bool((got[layer, ids.shape[0] :] == -1).all())
            assert bool((got[1] == -1).all())  # layer 1 is not a MoE layer


def test_thousands_of_batches_in_one_window_stat():
    rng = np.random.default_rng(7)
    rec = Recorder(num_layers=2, num_experts=64, top_k=8)
    rec.start()
    ref = Reference(2, 64)
    for _ in range(3000):
        layer = int(rng.integers(0, 2))
        ids, valid = random_batch(rng, 64, 8, torch.int64)
        ref.add(layer, ids.numpy(), None if valid is None else int(valid))
        rec.record(layer, ids, valid)
    assert np.array_equal(rec.dump().total_count().numpy(), ref.counts)


def test_dump_clears_and_stop_keeps():
    rec = Recorder(num_layers=1, num_experts=4, top_k=1)
    rec.start()
    rec.record(0, torch.tensor([[1], [1]]))
    rec.stop()
    rec.record(0, torch.tensor([[2]]))  # not recording: not counted
    first, second = rec.dump(), rec.dump()
    assert first.total_count().tolist() == [[0, 2, 0, 0]]
    assert second.total_count().tolist() == [[0, 0, 0, 0]]  # the dump cleared
    # The idle window the first dump opened is empty and ends where it begins, after the first.
    assert second.window.start_time == second.window.stop_time >= first.window.stop_time
    assert validate_dump(first) == [] and validate_dump(second) == []
    rec.start()
    rec.record(0, torch.tensor([[3]]))
    rec.start()  # start clears, as SGLang's does
    rec.record(0, torch.tensor([[0]]))
    assert rec.dump().total_count().tolist() == [[1, 0, 0, 0]]


def test_empty_batch_and_all_padding():
    rec = Recorder(num_layers=1, num_experts=4, top_k=2, mode="per_token", max_bytes=1 << 16)
    rec.start()
    rec.record(0, torch.zeros(0, 2, dtype=torch.int32))
    rec.record(0, torch.tensor([[1, 2]]), num_valid_tokens=0)
    rec.step()
    d = rec.dump()
    assert d.total_count().sum() == 0 and d.window.num_tokens == [0]
    assert d.records[0].topk_ids_of_layer.shape == (1, 0, 2)


def test_physical_ids_fold_into_logical():
    mapping = torch.tensor([[0, 1, 2, 0, 0]])  # expert 0 has three replicas
    rec = Recorder(num_layers=1, num_experts=3, top_k=2, physical_to_logical_map=mapping, mode="per_pass")
    rec.start()
    rec.record(0, torch.tensor([[0, 3], [4, 1], [2, 5]]))  # 5 is out of range: discarded
    rec.step()
    d = rec.dump()
    assert validate_dump(d) == []
    assert d.physical_count[0].tolist() == [[1, 1, 1, 1, 1]]
    assert d.logical_count[0].tolist() == [[3, 1, 1]]
    assert d.window.discarded == [1]


def test_bad_inputs_are_named():
    rec = Recorder(num_layers=2, num_experts=4, top_k=2, layer_ids=[1])
    with pytest.raises(RecorderError, match="layer_id 0"):
        rec.record(0, torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(RecorderError, match="top_k=2"):
        rec.record(1, torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(RecorderError, match="int32 or int64"):
        rec.record(1, torch.zeros(1, 2))
    with pytest.raises(RecorderError, match="mode"):
        rec.start("sometimes")
    with pytest.raises(RecorderError, match="max_bytes"):
        Recorder(num_layers=2, num_experts=4, top_k=2, mode="per_token", max_bytes=100)
    with pytest.raises(RecorderError, match="physical_to_logical_map"):
        Recorder(num_layers=1, num_experts=4, top_k=2, physical_to_logical_map=torch.tensor([[0, 9, 1, 2]]))
    with pytest.raises(RecorderError, match="physical_to_logical_map: expected an integer tensor"):
        Recorder(num_layers=1, num_experts=4, top_k=2, physical_to_logical_map=torch.tensor([[0.0, 1.7, 2, 3]]))
    with pytest.raises(RecorderError, match="num_experts: expected an int, got float 8.0"):
        Recorder(num_layers=2, num_experts=8.0, top_k=2)
    for layer in (True, 1.0):  # True == 1.0 == 1 as a key: not a layer id
        with pytest.raises(RecorderError, match=f"layer_id {layer} \\({type(layer).__name__}\\)"):
            rec.record(layer, torch.zeros(1, 2, dtype=torch.int64))
    with pytest.raises(RecorderError, match="topk_ids: expected a tensor .* got list"):
        rec.record(1, [[0, 1]])
    with pytest.raises(RecorderError, match=r"layer_id tensor\(1\) \(Tensor\)"):
        rec.record(torch.tensor(1), torch.zeros(1, 2, dtype=torch.int64))
    # Settings that would make every dump invalid are refused up front, by name.
    with pytest.raises(RecorderError, match=r"topology.rank: 3 is outside \[0, world_size=2\)"):
        Recorder(num_layers=2, num_experts=4, top_k=2, topology=Topology(rank=3, world_size=2))
    for unobserved in ([5], [1]):  # out of range; or a layer that is recorded
        with pytest.raises(RecorderError, match="unobserved_layers"):
            Recorder(num_layers=2, num_experts=4, top_k=2, layer_ids=[1], unobserved_layers=unobserved)
    # num_valid_tokens: a row count, so an integer (a float would split counts and ids).
    ids = torch.zeros(3, 2, dtype=torch.int64)
    for bad in (1.5, True, torch.tensor(1.5), torch.tensor([1, 2]), "2"):
        with pytest.raises(RecorderError, match="num_valid_tokens"):
            rec.record(1, ids, bad)
    for good in (2, np.int64(2), torch.tensor(2, dtype=torch.int32), torch.tensor([2])):
        rec.record(1, ids, good)
    # ids on another device than the counters: named (was torch's index_add_ error)
    with pytest.raises(RecorderError, match="topk_ids: on meta, but the recorder counts on cpu"):
        rec.record(1, torch.zeros(1, 2, dtype=torch.int64, device="meta"))
    with pytest.raises(RecorderError, match="mode: '' is not one of"):  # was taken as the current mode
        rec.start("")


def test_a_recorder_built_under_inference_mode_works_outside_it():
    """Engines build models, and often the recorder, under torch.inference_mode(); start, stop and
    the tap then run outside it (a control thread). Inference tensors cannot be updated in place
    there: start() raised torch's "Inplace update to inference tensor" in every mode."""
    for mode in ("stat", "per_pass", "per_token"):
        with torch.inference_mode():
            rec = Recorder(num_layers=1, num_experts=4, top_k=2, mode=mode, max_bytes=1 << 20)
        rec.start()
        rec.record(0, torch.tensor([[1, 2]]))
        rec.step()
        with torch.inference_mode():  # and inside it, as a forward runs
            rec.record(0, torch.tensor([[1, 3]]))
            rec.step()
        assert rec.dump().total_count()[0].tolist() == [0, 2, 1, 1], mode


def test_a_mode_that_allocates_new_buffers_goes_on_numbering_passes():
    """forward_pass_id is the recorder's pass count: a start in a mode needing new buffers used to
    number passes from 0 again, so later dumps reused ids of earlier ones."""
    rec = Recorder(num_layers=1, num_experts=4, top_k=1)
    rec.start()
    for _ in range(3):
        rec.record(0, torch.tensor([[1]]))
        rec.step()
    rec.dump()
    rec.start("per_pass")  # a new counter, with a ring
    for _ in range(2):
        rec.record(0, torch.tensor([[2]]))
        rec.step()
    assert [r.forward_pass_id for r in rec.dump().records] == [3, 4]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("buffer_size", "8", "buffer_size: expected an int, got str '8'"),
        ("max_bytes", 1.5e6, "max_bytes: expected an int, got float"),
        ("layer_ids", [0, 1.0], r"layer_ids\[1\]: expected an int, got float 1.0"),
        ("unobserved_layers", [True], r"unobserved_layers\[0\]: expected an int, got bool"),
        ("device", "gpu0", "device: 'gpu0' is not a device"),
        ("topology", {"rank": 0}, "topology: expected Topology or None, got dict"),
        ("engine", "vllm", "engine: expected EngineInfo or None, got str"),
        ("physical_to_logical_map", [[0, 1, 2, 3]], "physical_to_logical_map: expected Tensor or None, got list"),
    ],
)
def test_bad_constructor_options_are_named(option, value, message):
    # Each would otherwise fail later, far from the mistake (a TypeError at start, an
    # AttributeError at dump) or, for max_bytes, not at all until per_token was asked for.
    with pytest.raises(RecorderError, match=message):
        Recorder(num_layers=2, num_experts=4, top_k=2, **{option: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA (as CI is)")
def test_cuda_without_a_gpu_is_named():
    with pytest.raises(RecorderError, match="device: 'cuda', but this torch .* sees no CUDA GPU"):
        Recorder(num_layers=2, num_experts=4, top_k=2, device="cuda")


def test_integer_like_options_are_taken_as_ints():
    rec = Recorder(num_layers=np.int64(2), num_experts=4, top_k=2, layer_ids=torch.tensor([1]), buffer_size=np.int32(3))
    assert rec.layer_ids == [1] and type(rec.layer_ids[0]) is int and type(rec.num_layers) is int
    rec.start()
    rec.record(1, torch.tensor([[0, 3]]))
    rec.step()
    assert rec.counter.ring_rows == 3
    assert rec.dump().logical_count[:, 1].tolist() == [[1, 0, 0, 1]]


@pytest.mark.parametrize("max_bytes", [4096, 20_000, 1 << 20])
def test_per_token_memory_bound_and_drops(max_bytes):
    L, E, k = 3, 16, 4
    rec = Recorder(num_layers=L, num_experts=E, top_k=k, mode="per_token", buffer_size=8, max_bytes=max_bytes)
    assert rec.counter.nbytes() <= max_bytes
    # The token ring takes all the room the rest leaves: the accounting matches what is allocated.
    assert max_bytes - rec.counter.nbytes() < Counter.token_slot_bytes(L, k, E)
    rec.start()
    g = torch.Generator().manual_seed(0)
    total = 0
    for _ in range(50):
        ids = torch.randint(0, E, (13, k), generator=g)
        for layer in range(L):
            rec.record(layer, ids)
        rec.step()
        total += 13
    assert rec.counter.nbytes() <= max_bytes
    status = rec.status()
    d = rec.dump()
    kept = sum(r.topk_ids_of_layer.shape[1] for r in d.records)
    assert kept + d.window.dropped_tokens == total
    assert d.window.dropped_passes == 42 and status.dropped_passes == 42
    assert status.dropped_tokens == d.window.dropped_tokens  # status foretells the dump's drops
    assert d.total_count().sum() == total * k * L  # the stat counts stay exact regardless
    assert validate_dump(d) == []


@pytest.mark.parametrize("E", [32767, 32768, 70000])
def test_per_token_ids_read_back_exactly_either_side_of_the_two_byte_ring(E):
    """The token ring keeps ids in two bytes while every id fits (E <= 32767), four past that."""
    rec = Recorder(num_layers=1, num_experts=E, top_k=3, mode="per_token", buffer_size=2, max_bytes=4 << 20)
    rec.start()
    ids = torch.tensor([[E - 1, 0, E], [-1, E // 2, E - 2]])
    rec.record(0, ids)
    rec.step()
    d = rec.dump()
    assert d.records[0].topk_ids_of_layer[0].tolist() == [[E - 1, 0, -1], [-1, E // 2, E - 2]]
    assert d.records[0].topk_ids_of_layer.dtype == torch.int32


def test_per_token_ring_holds_twice_the_tokens_in_max_bytes_with_two_byte_ids():
    L, E, k, B, mb = 8, 256, 8, 4, 4 << 20
    rec = Recorder(num_layers=L, num_experts=E, top_k=k, mode="per_token", buffer_size=B, max_bytes=mb)
    room = mb - Counter.fixed_bytes(L, E) - Counter.ring_bytes(B, L, E, tokens=True)
    four_byte_ids = room // (L * k * 4 + 16) - 1  # what int32 ids held
    assert rec.counter.token_slots >= 1.8 * four_byte_ids
    assert rec.counter.nbytes() <= mb


def test_status():
    rec = Recorder(num_layers=2, num_experts=4, top_k=2, mode="per_pass", buffer_size=3)
    assert rec.status().recording is False
    rec.start()
    for _ in range(5):
        rec.record(0, torch.tensor([[0, 1], [2, 3]]))
        rec.step()
    s = rec.status()
    assert (s.recording, s.mode, s.passes, s.tokens, s.dropped_passes) == (True, "per_pass", 5, 10, 2)
    assert s.bytes_used == rec.counter.nbytes() > 0


def test_dump_mid_pass_leaves_the_pass_whole_to_the_next():
    """A dump between two layers of a pass (another thread's, in an engine) takes neither the
    pass's row nor its counts so far: both go to the next dump, so each dump's totals cover its
    rows and both dumps validate."""
    for mode in ("per_pass", "per_token"):
        rec = Recorder(num_layers=2, num_experts=4, top_k=1, mode=mode, buffer_size=8, max_bytes=1 << 16)
        rec.start()
        rec.record(0, torch.tensor([[1]]))
        first = rec.dump()
        rec.record(1, torch.tensor([[2]]))
        rec.step()
        second = rec.dump()
        assert first.window.num_passes == 0 and first.total_count().sum() == 0
        assert second.window.num_passes == 1 and second.total_count().tolist() == [[0, 1, 0, 0], [0, 0, 1, 0]]
        assert second.logical_count.tolist() == [[[0, 1, 0, 0], [0, 0, 1, 0]]]
        assert validate_dump(first) == [] and validate_dump(second) == []


def test_a_pass_in_progress_at_start_goes_whole_to_the_new_window_with_a_ring():
    """start() with a ring begins at a pass boundary, as dump() does: the rows and the totals
    both hold the whole pass. Without a ring the window begins at the call."""
    for mode, buffer_size, want in (
        ("per_pass", 4, [[0, 1, 0, 0], [0, 0, 1, 0]]),
        ("stat", None, [[0] * 4, [0, 0, 1, 0]]),
    ):
        rec = Recorder(num_layers=2, num_experts=4, top_k=1, mode=mode, buffer_size=buffer_size)
        rec.start()
        rec.record(0, torch.tensor([[3]]))
        rec.step()
        rec.record(0, torch.tensor([[1]]))  # the pass in progress ...
        rec.start()
        assert rec.status().tokens == (1 if buffer_size else 0)
        rec.record(1, torch.tensor([[2]]))  # ... ends after start()
        rec.step()
        d = rec.dump()
        assert d.total_count().tolist() == want and d.window.num_passes == 1
        assert d.logical_count.sum(0).tolist() == want and validate_dump(d) == []


@pytest.mark.parametrize("mode", ["per_pass", "per_token"])
def test_passes_completed_while_a_dump_copies_belong_to_the_next_dump(mode):
    """More passes than the ring holds complete between the dump's reading and its re-read of
    the pass counter (a fault forced here by running them right after the reading): the dump
    drops only its own passes; the others are the next dump's, taken or dropped there."""
    rec = Recorder(num_layers=1, num_experts=4, top_k=1, mode=mode, buffer_size=2, max_bytes=1 << 16)
    rec.start()
    c = rec.counter

    def one_pass():
        c.record(0, torch.tensor([[1]]))
        c.step()

    one_pass()
    settled = c._settled

    def settled_then_five_passes(*args, **kwargs):
        out = settled(*args, **kwargs)
        for _ in range(5):
            one_pass()
        return out

    c._settled = settled_then_five_passes
    first = rec.dump()
    c._settled = settled
    second = rec.dump()
    assert (first.window.num_passes, first.window.dropped_passes, first.records) == (1, 1, [])
    assert (second.window.num_passes, second.window.dropped_passes) == (5, 3)
    assert [r.forward_pass_id for r in second.records] == ([4, 5] if mode != "stat" else [])
    if mode == "per_token":  # each dump's dropped tokens are its own passes' tokens
        assert (first.window.dropped_tokens, second.window.dropped_tokens) == (1, 3)
    assert validate_dump(first) == [] and validate_dump(second) == []


def test_a_second_stop_keeps_the_window_s_end():
    rec = Recorder(num_layers=1, num_experts=4, top_k=1)
    rec.start()
    rec.stop()
    stopped = rec._stop_time
    time.sleep(0.01)
    rec.stop()
    assert rec.dump().window.stop_time == stopped
    rec.stop()  # idle: the new window still ends where it begins
    idle = rec.dump().window
    assert idle.stop_time == idle.start_time


@pytest.mark.parametrize("mode", MODES)
def test_num_valid_tokens_of_one_element_in_any_shape_is_a_row_count(mode):
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]])
    want = None
    for nv in (2, torch.tensor(2), torch.tensor([2]), torch.tensor([[2]])):
        rec = Recorder(num_layers=1, num_experts=4, top_k=2, mode=mode, max_bytes=1 << 16)
        rec.start()
        rec.record(0, ids, nv)  # [[n]] against T = top_k rows would mask columns if broadcast
        rec.step()
        d = rec.dump()
        got = (d.total_count().tolist(), d.logical_count.tolist(), [r.topk_ids_of_layer for r in d.records])
        assert got[0] == [[1, 1, 1, 1]]
        want = want or got
        assert got[:2] == want[:2]
        if mode == "per_token":
            assert [r.tolist() for r in got[2]] == [[[[0, 1], [2, 3]]]]


def test_stat_without_a_buffer_ignores_a_ring_an_earlier_mode_allocated():
    rec = Recorder(num_layers=1, num_experts=4, top_k=1)  # stat, one cumulative row
    rec.start("per_pass")  # allocates a ring of passes
    rec.start("stat")
    for p in range(5):
        rec.record(0, torch.tensor([[p % 4]]))
        rec.step()
    d = rec.dump()
    assert d.logical_count.tolist() == [[[2, 1, 1, 1]]]
    assert (d.window.buffer_size, d.window.dropped_passes, d.total_logical_count) == (0, 0, None)
    assert rec.status().dropped_passes == 0
    # Without rows, the window ends at the call, as on a recorder that never had a ring (its
    # counts waited for the next step(): a caller that never steps dumped nothing).
    rec.record(0, torch.tensor([[3]]))
    assert rec.dump().logical_count.tolist() == [[[0, 0, 0, 1]]]


def test_recording_flag_is_a_device_flag_and_buffers_stay_put():
    rec = Recorder(num_layers=1, num_experts=4, top_k=1, mode="per_token", max_bytes=1 << 16)
    ptrs = [t.data_ptr() for t in (rec.counter.counts, rec.counter.token_ids, rec.counter.rows)]
    rec.start()
    rec.stop()
    rec.start("per_pass")
    rec.start("stat")
    assert ptrs == [t.data_ptr() for t in (rec.counter.counts, rec.counter.token_ids, rec.counter.rows)]


def test_tap_compiles_fullgraph_without_graph_breaks():
    import torch._dynamo

    rec = Recorder(num_layers=2, num_experts=8, top_k=2, mode="per_token", buffer_size=4, max_bytes=1 << 16)

    def forward(ids, n):
        rec.record(0, ids, n)
        rec.record(1, ids, n)
        rec.step()
        return ids + 1

    explained = torch._dynamo.explain(forward)(torch.zeros(4, 2, dtype=torch.int32), 3)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(forward, fullgraph=True)
    rec.start()
    ids = torch.tensor([[1, 2], [3, 4], [5, 9], [0, 0]], dtype=torch.int32)
    for _ in range(3):
        compiled(ids, 3)
    d = rec.dump()
    assert d.total_count()[0].tolist() == [0, 3, 3, 3, 3, 3, 0, 0]
    assert d.window.discarded == [3, 3]
    assert torch.equal(d.records[2].topk_ids_of_layer[0], torch.tensor([[1, 2], [3, 4], [5, -1]], dtype=torch.int32))


@pytest.mark.parametrize("mode", MODES)
def test_concurrent_dumps_lose_nothing_and_count_nothing_twice(mode):
    """Passes run on one thread while another dumps: the dumps add up to exactly what was recorded."""
    L, E, k = 3, 8, 2
    rec = Recorder(num_layers=L, num_experts=E, top_k=k, mode=mode, buffer_size=4096, max_bytes=8 << 20)
    rec.start()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(-1, E, (7, k), generator=g) for _ in range(16)]
    ref = Reference(L, E)
    passes = 600
    for p in range(passes):
        for layer in range(L):
            ref.add(layer, batches[(p + layer) % 16].numpy(), None)
    dumps = []
    done = threading.Event()

    def run_passes():
        for p in range(passes):
            for layer in range(L):
                rec.record(layer, batches[(p + layer) % 16])
            rec.step()
        done.set()

    worker = threading.Thread(target=run_passes)
    worker.start()
    while not done.is_set():
        dumps.append(rec.dump())
    worker.join()
    dumps.append(rec.dump())
    total = sum(d.total_count() for d in dumps)
    assert np.array_equal(total.numpy(), ref.counts)
    assert sum(d.window.num_passes for d in dumps) == passes
    assert [p for d in dumps for p in validate_dump(d)] == []  # each dump consistent on its own
    if mode != "stat":
        ids = [r.forward_pass_id for d in dumps for r in d.records]
        assert ids == list(range(passes))  # every completed pass exactly once, in order
        rows = sum(d.logical_count.sum(0) for d in dumps if d.logical_count.shape[0])
        assert np.array_equal(rows.numpy(), ref.counts)
    if mode == "per_token":
        kept = sum(r.topk_ids_of_layer.shape[1] for d in dumps for r in d.records)
        assert kept == passes * 7
    assert len(dumps) > 2


def test_per_token_dump_copies_only_the_window_s_token_slots():
    """A dump reads the token ring's slots of its own passes, not the whole ring (256 MiB by
    default): its cost follows the window, not max_bytes."""
    rec = Recorder(num_layers=2, num_experts=8, top_k=2, mode="per_token")
    spans = []
    read_tokens = rec.counter.read_tokens
    rec.counter.read_tokens = lambda lo, hi: spans.append((lo, hi)) or read_tokens(lo, hi)
    rec.start()
    for p in range(3):
        for layer in range(2):
            rec.record(layer, torch.full((5, 2), p))
        rec.step()
    d = rec.dump()
    assert spans == [(0, 15)] and rec.counter.token_slots > 1000
    assert [r.topk_ids_of_layer[0, :, 0].tolist() for r in d.records] == [[0] * 5, [1] * 5, [2] * 5]


def test_per_token_layers_with_fewer_tokens_than_the_pass_read_no_stale_ids():
    """Layers of one pass may route different token counts (padding told per layer): a layer's
    slots past its own tokens hold an older pass's ids, which the dump must not report."""
    rec = Recorder(num_layers=2, num_experts=8, top_k=1, mode="per_token", buffer_size=2, max_bytes=1000)
    rec.start()
    N = rec.counter.token_slots
    for _ in range(3):  # wrap the ring with 7s
        for layer in range(2):
            rec.record(layer, torch.full((N, 1), 7))
        rec.step()
    rec.dump()
    rec.record(0, torch.tensor([[1], [5], [5]]), num_valid_tokens=1)
    rec.record(1, torch.tensor([[2]] * 4))
    rec.step()
    d = rec.dump()
    assert d.records[0].topk_ids_of_layer[:, :, 0].tolist() == [[1, -1, -1, -1], [2, 2, 2, 2]]
    assert validate_dump(d) == [] and d.window.dropped_tokens == 0


def test_a_layer_called_twice_in_a_pass_shows_no_stale_ids_and_its_lost_ids_are_dropped():
    """Micro-batches (SGLang's two-batch overlap) call a layer twice in one pass: its later call's
    ids take the earlier's positions (as SGLang's gatherer), its counts hold both. The dump
    masked the layer's positions by the sum of its calls, so with the ring wrapped a position no
    call of this pass wrote showed an older pass's id; and the lost ids were not dropped, so the
    recorder's own dump failed validation."""
    N = 4  # a ring of 4 positions: pass 1 reuses pass 0's slots
    mb = (
        Counter.fixed_bytes(2, 8)
        + Counter.ring_bytes(4, 2, 8, tokens=True)
        + (N + 1) * Counter.token_slot_bytes(2, 1, 8)
    )
    rec = Recorder(num_layers=2, num_experts=8, top_k=1, mode="per_token", buffer_size=4, max_bytes=mb)
    assert rec.counter.token_slots == N
    rec.start()
    rec.record(0, torch.zeros(4, 1, dtype=torch.int64))
    rec.record(1, torch.full((4, 1), 7))
    rec.step()
    rec.record(0, torch.ones(4, 1, dtype=torch.int64))
    rec.record(1, torch.tensor([[2], [2]]))  # micro-batch 1
    rec.record(1, torch.tensor([[3]]))  # micro-batch 2: its id over micro-batch 1's first
    rec.step()
    d = rec.dump()
    assert d.records[1].topk_ids_of_layer[1, :, 0].tolist() == [3, 2, -1, -1]  # was [3, 2, 7, -1]
    assert d.logical_count[1, 1].tolist() == [0, 0, 2, 1, 0, 0, 0, 0]
    # pass 0's 4 tokens (the ring holds 4 positions, pass 1's), and micro-batch 1's first token
    assert d.window.dropped_tokens == 4 + 1
    assert validate_dump(d) == []


def test_a_pass_cut_by_stop_has_its_tokens_dropped_in_the_window_that_counts_them():
    """A pass recorded, then stopped before its step: its counts go to the next dump, which holds
    no record of it; its tokens are that dump's drops. They showed up in the dump after, which
    had counted no token."""
    rec = Recorder(1, 4, 1, mode="per_token", buffer_size=8)
    rec.start()
    rec.record(0, torch.tensor([[0], [1], [2]]))
    rec.step()
    rec.record(0, torch.tensor([[3]]))  # a pass in progress...
    rec.stop()
    rec.step()  # ...cut short
    first, second = rec.dump(), rec.dump()
    assert first.window.num_tokens == [4] and [r.topk_ids_of_layer.shape[1] for r in first.records] == [3]
    assert first.window.dropped_tokens == 1 and validate_dump(first) == []
    assert second.window.num_tokens == [0] and second.window.dropped_tokens == 0  # was 1


def test_a_token_ring_without_a_pass_ring_is_refused():
    """A pass's tokens are found by its ring row's span: a token ring alone could not be read."""
    with pytest.raises(ValueError, match="token_slots: a token ring needs ring_rows"):
        Counter([0, 1], 8, 2, "cpu", token_slots=16)
