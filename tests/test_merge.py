"""Merge rules: replicas once, shards summed, stages filled in, incompatible inputs refused by name."""

from __future__ import annotations

import glob
from pathlib import Path

import msgspec
import pytest
import torch

from moe_record_sdk import MergeError, Recorder, Topology, load_dump, validate_dump
from moe_record_sdk.cli import main
from moe_record_sdk.merge import merge_distributed, merge_dumps, reduce_dump

from .dumps import random_dump

L, E, K = 4, 8, 2


def tokens(seed: int, passes: int = 3, rows: int = 5) -> list[torch.Tensor]:
    """The routing of ``passes`` passes of a token shard: ids per pass, the same on every layer's seed."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-1, E, (rows, K), generator=g) for _ in range(passes)]


def record(
    seed: int,
    topology: Topology,
    *,
    layers=(0, 1, 2, 3),
    mode: str = "stat",
    name: str = "m",
    experts: int = E,
    top_k: int = K,
    **kw,
):
    """A real Recorder fed the routing of token shard ``seed`` on ``layers`` (ids differ per layer)."""
    rec = Recorder(
        num_layers=L,
        num_experts=experts,
        top_k=top_k,
        layer_ids=list(layers),
        mode=mode,
        topology=topology,
        model_name=name,
        **kw,
    )
    rec.start()
    for ids in tokens(seed):
        for layer in layers:
            rec.record(layer, (ids[:, :top_k] + layer) % experts, num_valid_tokens=4)
        rec.step()
    return rec.dump()


def one_process(seeds: list[int], mode: str = "stat", **kw):
    """What one process seeing every token shard would have recorded (no topology)."""
    rec = Recorder(num_layers=L, num_experts=E, top_k=K, mode=mode, model_name="m", **kw)
    rec.start()
    for seed in seeds:
        for ids in tokens(seed):
            for layer in range(L):
                rec.record(layer, (ids + layer) % E, num_valid_tokens=4)
            rec.step()
    return rec.dump()


def same_counts(merged, single) -> None:
    assert validate_dump(merged) == []
    assert torch.equal(merged.total_count(), single.total_count())
    assert merged.window.num_tokens == single.window.num_tokens
    assert merged.window.discarded == single.window.discarded
    assert merged.window.num_passes == single.window.num_passes


def tp(rank: int, size: int = 2, **kw) -> Topology:
    return Topology(rank=rank, world_size=size, tp_rank=rank, tp_size=size, **kw)


def test_tensor_parallel_replicas_count_once() -> None:
    dumps = [record(1, tp(r, 4)) for r in range(4)]
    merged = merge_dumps(dumps)
    same_counts(merged, one_process([1]))
    assert merged.topology.world_size == 1 and merged.topology.tp_size == 4
    assert torch.equal(merged.total_count() * 4, torch.stack([d.total_count() for d in dumps]).sum(0))


def test_data_parallel_shards_are_summed() -> None:
    dumps = [
        record(s, Topology(rank=s, world_size=3, dp_rank=s, dp_size=3, token_shard=s, num_token_shards=3))
        for s in range(3)
    ]
    same_counts(merge_dumps(dumps), one_process([0, 1, 2]))


def test_replicas_times_shards_with_pipeline_stages() -> None:
    """8 ranks: 2 token shards x 2 TP replicas x 2 pipeline stages (layers 0-1 and 2-3)."""
    dumps = []
    for rank in range(8):
        shard, rest = divmod(rank, 4)
        stage, _tp_rank = divmod(rest, 2)
        topo = Topology(
            rank=rank,
            world_size=8,
            tp_size=2,
            pp_size=2,
            dp_size=2,
            pp_rank=stage,
            dp_rank=shard,
            token_shard=shard,
            num_token_shards=2,
        )
        dumps.append(record(shard, topo, layers=(0, 1) if stage == 0 else (2, 3)))
    merged = merge_dumps(dumps[::-1])  # order does not matter
    same_counts(merged, one_process([0, 1]))
    assert merged.model.moe_layer_ids == [0, 1, 2, 3]


def test_per_token_replicas_and_stages_keep_ids() -> None:
    stage0 = record(1, tp(0), layers=(0, 1), mode="per_token", buffer_size=8)
    stage1 = record(1, tp(1), layers=(2, 3), mode="per_token", buffer_size=8)
    merged = merge_dumps([stage0, stage1])
    single = one_process([1], mode="per_token", buffer_size=8)
    same_counts(merged, single)
    assert merged.mode == "per_token" and len(merged.records) == 3
    for got, want in zip(merged.records, single.records):
        assert torch.equal(got.topk_ids_of_layer, want.topk_ids_of_layer)


def test_per_pass_shards_concatenate_records() -> None:
    a = record(1, Topology(rank=0, world_size=2, token_shard=0, num_token_shards=2), mode="per_pass", buffer_size=8)
    b = record(2, Topology(rank=1, world_size=2, token_shard=1, num_token_shards=2), mode="per_pass", buffer_size=8)
    merged = merge_dumps([a, b])
    same_counts(merged, one_process([1, 2], mode="per_pass", buffer_size=8))
    assert [(r.rank, r.forward_pass_id) for r in merged.records] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert torch.equal(merged.logical_count, torch.cat([a.logical_count, b.logical_count]))


def test_replicas_that_disagree_are_refused() -> None:
    a = record(1, tp(0))
    b = record(2, tp(1))  # other tokens under the same token_shard
    with pytest.raises(MergeError, match=r"ranks 0 \(a.pt\) and 1 \(b.pt\) disagree on layer 0"):
        merge_dumps([a, b], sources=["a.pt", "b.pt"])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"experts": 16}, "num_logical_experts"),
        ({"top_k": 1}, "top_k"),
        ({"name": "other"}, "name"),
    ],
)
def test_incompatible_dumps_are_refused_by_name(change: dict, field: str) -> None:
    a = record(1, Topology())
    b = record(2, Topology(), **change)
    with pytest.raises(MergeError, match=rf"y.pt: model\.{field} is .* but x.pt has"):
        merge_dumps([a, b], sources=["x.pt", "y.pt"])
    other_layers = random_dump(1, num_layers=5, num_experts=E)
    with pytest.raises(MergeError, match="model.num_layers is 5"):
        merge_dumps([a, other_layers])


def test_missing_shards_and_stages_are_refused_unless_partial() -> None:
    a = record(1, Topology(rank=0, world_size=2, token_shard=0, num_token_shards=2))
    with pytest.raises(MergeError, match=r"token shards \[1\] are missing"):
        merge_dumps([a])
    assert torch.equal(merge_dumps([a], allow_partial=True).total_count(), a.total_count())

    def stage(shard: int, layers) -> object:
        pp_rank = int(layers[0] > 1)
        topo = Topology(
            rank=2 * shard + pp_rank, world_size=4, pp_rank=pp_rank, pp_size=2, token_shard=shard, num_token_shards=2
        )
        return record(shard, topo, layers=layers)

    with pytest.raises(MergeError, match=r"observed layers \[0, 1\], but .* observed \[0, 1, 2, 3\]"):
        merge_dumps([stage(0, (0, 1)), stage(0, (2, 3)), stage(1, (0, 1))])
    # A stage missing from every shard: the shards agree with each other, and still lack its layers.
    first_stage = [stage(0, (0, 1)), stage(1, (0, 1))]
    with pytest.raises(MergeError, match=r"pipeline stages \[1\] of 2 are missing"):
        merge_dumps(first_stage)
    assert merge_dumps(first_stage, allow_partial=True).model.moe_layer_ids == [0, 1]


def test_runs_ranks_and_engines() -> None:
    # Two per-rank files of one rank: two engines' files mixed up.
    with pytest.raises(MergeError, match="both hold rank 1 of a 2-rank"):
        merge_dumps([record(1, tp(0)), record(1, tp(1)), record(2, tp(1))], sources=["a0", "a1", "b1"])
    # Whole-run dumps of several engines (world_size 1) saw different tokens: summed.
    engines = [record(s, Topology()) for s in (1, 2, 3)]
    same_counts(merge_dumps(engines), one_process([1, 2, 3]))
    # Engine A merged per rank, then with engine B.
    a = merge_dumps([record(1, tp(0)), record(1, tp(1))])
    b = merge_dumps([record(2, tp(0)), record(2, tp(1))])
    same_counts(merge_dumps([a, b]), one_process([1, 2]))


def test_mixed_modes_reduce_to_what_all_hold() -> None:
    t = record(1, Topology(), mode="per_token", buffer_size=8)
    p = record(2, Topology(), mode="per_pass", buffer_size=8)
    s = record(3, Topology())
    tp_ = merge_dumps([t, p])
    assert tp_.mode == "per_pass" and all(r.topk_ids_of_layer is None for r in tp_.records)
    same_counts(tp_, one_process([1, 2]))
    everything = merge_dumps([t, p, s])
    assert everything.mode == "stat" and everything.logical_count.shape[0] == 1 and everything.records == []
    same_counts(everything, one_process([1, 2, 3]))
    assert validate_dump(reduce_dump(t, "stat")) == [] and validate_dump(reduce_dump(t, "per_pass")) == []


def test_stat_rings_merge_row_by_row_when_aligned() -> None:
    a = record(1, Topology(rank=0, world_size=2, token_shard=0, num_token_shards=2), buffer_size=2)
    b = record(2, Topology(rank=1, world_size=2, token_shard=1, num_token_shards=2), buffer_size=2)
    merged = merge_dumps([a, b])
    assert merged.logical_count.shape[0] == 2 and torch.equal(merged.logical_count, a.logical_count + b.logical_count)
    assert torch.equal(merged.total_count(), a.total_count() + b.total_count())  # ring rows dropped: totals kept
    assert validate_dump(merged) == []


def test_physical_counts_kept_only_with_one_map() -> None:
    a = msgspec.structs.replace(
        random_dump(1, replicas=3), topology=Topology(rank=0, world_size=2, token_shard=0, num_token_shards=2)
    )
    b = msgspec.structs.replace(
        random_dump(1, replicas=3), topology=Topology(rank=1, world_size=2, token_shard=1, num_token_shards=2)
    )
    merged = merge_dumps([a, b])
    assert torch.equal(merged.physical_count, a.physical_count + b.physical_count) and validate_dump(merged) == []
    c = msgspec.structs.replace(random_dump(2, replicas=3), topology=b.topology)  # another map
    merged = merge_dumps([a, c])
    assert merged.physical_count is None and merged.physical_to_logical_map is None
    assert torch.equal(merged.total_count(), a.total_count() + c.total_count()) and validate_dump(merged) == []


def test_a_huge_shard_or_stage_count_from_a_file_is_refused_without_taking_memory() -> None:
    """A few bytes claiming 2**40 token shards or pipeline stages: refused naming the first missing
    ones (the merge used to build the whole range, and ran out of memory)."""
    huge = 2**40
    shards = msgspec.structs.replace(random_dump(1), topology=Topology(rank=0, world_size=2, num_token_shards=huge))
    with pytest.raises(MergeError, match=r"token shards \[1, 2, 3, 4, 5, 6, 7, 8, \.\.\.\] \(1099511627775 in all\)"):
        merge_dumps([shards])
    stages = msgspec.structs.replace(random_dump(1), topology=Topology(rank=0, world_size=2, pp_size=huge))
    with pytest.raises(MergeError, match=r"pipeline stages \[1, 2, .*\] \(1099511627775 in all\) of 1099511627776"):
        merge_dumps([stages])


def test_an_idle_sglang_engine_merges_as_zeros(tmp_path, capsys) -> None:
    """SGLang's files do not list their layers: an engine idle in the window (all-zero counts) read
    as observing every layer, dense ones included, and the merge refused the folder ("a pipeline
    stage's dump is missing?"). It adds zeros; the layers are the busy engine's."""
    busy = torch.randint(1, 50, (4, 3, 8), dtype=torch.int32, generator=torch.Generator().manual_seed(5))
    busy[:, 0] = 0  # layer 0 is dense (DeepSeek's first_k_dense_replace): no counts
    paths = []
    for name, counts in (("a", busy), ("b", torch.zeros_like(busy))):
        folder = tmp_path / name
        folder.mkdir()
        paths.append(str(folder / "expert_distribution_recorder_1700000000.0.pt"))
        torch.save({"rank": 0, "logical_count": counts}, paths[-1])
    out = tmp_path / "merged.msgpack"
    assert main(["merge", *paths, "-o", str(out)]) == 0, capsys.readouterr().err
    merged = load_dump(out)
    assert list(merged.model.moe_layer_ids) == [1, 2] and validate_dump(merged) == []
    assert torch.equal(merged.total_count(), busy.sum(0).to(torch.int64))


def test_eplb_and_summary_take_allow_partial_as_their_error_says(tmp_path, capsys) -> None:
    """A merge with a shard missing suggests --allow-partial: eplb and summary --merge take it
    now (it was "unrecognized arguments" there, so such a folder could not be planned from)."""
    paths = [
        record(s, Topology(rank=s, world_size=3, token_shard=s, num_token_shards=3)).save(str(tmp_path / f"r{s}.pt"))
        for s in (0, 2)
    ]
    for command in (["eplb", *paths, "--replicas", "16", "--gpus", "4"], ["summary", "--merge", *paths]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "token shards [1] are missing" in err and "(--allow-partial)" in err, err
        assert main([*command, "--allow-partial"]) == 0, capsys.readouterr().err
        capsys.readouterr()


def test_cli_merge(tmp_path, capsys) -> None:
    paths = []
    for s in range(2):
        d = record(s, Topology(rank=s, world_size=2, token_shard=s, num_token_shards=2))
        paths.append(d.save(str(tmp_path / f"rank{s}.pt")))
    out = tmp_path / "merged.msgpack"
    assert main(["merge", *paths, "-o", str(out)]) == 0
    assert "merged 2 dumps" in capsys.readouterr().out
    same_counts(load_dump(out), one_process([0, 1]))
    # A folder works too; a missing shard is refused, then allowed.
    assert main(["merge", str(tmp_path / "rank0.pt"), "-o", str(tmp_path / "x.pt")]) == 2
    assert "token shards [1] are missing" in capsys.readouterr().err
    assert main(["merge", "--allow-partial", str(tmp_path / "rank0.pt"), "-o", str(tmp_path / "x.pt")]) == 0
    other = record(1, Topology(), experts=16).save(str(tmp_path / "other.json"))
    assert main(["merge", paths[0], other, "-o", str(tmp_path / "y.pt")]) == 2
    assert "model.num_logical_experts is 16" in capsys.readouterr().err
    raw = msgspec.json.decode(Path(other).read_bytes())
    raw["schema_version"] = 99
    (tmp_path / "v99.json").write_bytes(msgspec.json.encode(raw))
    assert main(["merge", paths[0], str(tmp_path / "v99.json"), "-o", str(tmp_path / "z.pt")]) == 2
    assert "schema_version: 99" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "nope.pt"), "-o", str(tmp_path / "z.pt")]) == 2
    # A file named twice (here: inside a folder also named) would count twice: refused by name.
    assert main(["merge", str(tmp_path), paths[0], "-o", str(tmp_path / "z.pt")]) == 2
    assert "rank0.pt is given twice" in capsys.readouterr().err


def test_cli_merge_refuses_records_merge_beside_its_engines(tmp_path, capsys) -> None:
    """``record --out run`` writes engine-* dumps and merged.pt; ``merge run/*.pt`` would count each engine twice."""
    engines = [record(s, Topology()).save(str(tmp_path / f"engine-{s}-127.0.0.1_{30000 + s}.pt")) for s in range(2)]
    assert main(["merge", *engines, "-o", str(tmp_path / "merged.pt")]) == 0
    capsys.readouterr()
    run = sorted(glob.glob(str(tmp_path / "*.pt")))
    assert main(["merge", *run, "-o", str(tmp_path / "m2.pt")]) == 2
    assert "merged.pt is `moe-record record`'s merge" in capsys.readouterr().err
    assert not (tmp_path / "m2.pt").exists()
    # The folder itself, given to merge, is merged from its engines' dumps (merged.pt left out).
    out = tmp_path.parent / f"{tmp_path.name}-again.pt"
    assert main(["merge", str(tmp_path), "-o", str(out)]) == 0
    assert "merged 2 dumps" in capsys.readouterr().out
    assert torch.equal(load_dump(str(out)).total_count(), load_dump(str(tmp_path / "merged.pt")).total_count())
    # summary --merge and eplb merge their inputs the same way: they refuse it too (they doubled every count)
    for args in (["summary", *run, "--merge"], ["eplb", *run, "--replicas", str(E), "--gpus", "1"]):
        assert main(args) == 2, args
        assert "merged.pt is `moe-record record`'s merge" in capsys.readouterr().err


def test_cli_merge_refuses_what_validate_refuses_its_own_inputs_and_sums_past_int64(tmp_path, capsys) -> None:
    d = record(0, Topology())
    good = d.save(str(tmp_path / "good.json"))
    negative = msgspec.structs.replace(d, logical_count=-d.logical_count).save(str(tmp_path / "neg.json"))
    assert main(["merge", good, negative, "-o", str(tmp_path / "m.json")]) == 2
    assert "neg.json: not a valid dump: logical_count: negative count" in capsys.readouterr().err
    # The output may not replace an input, nor land in a folder read as input (read back next time).
    (tmp_path / "run").mkdir()
    a, b = (record(s, Topology()).save(str(tmp_path / "run" / f"engine-{s}.pt")) for s in range(2))
    before = Path(a).read_bytes()
    assert main(["merge", a, b, "-o", a]) == 2
    assert "is also an input" in capsys.readouterr().err and Path(a).read_bytes() == before
    assert main(["merge", str(tmp_path / "run"), "-o", str(tmp_path / "run" / "total.msgpack")]) == 2
    assert "a folder read as input" in capsys.readouterr().err and not (tmp_path / "run" / "total.msgpack").exists()
    # Each input is valid, but their sum does not fit int64: refused, not wrapped negative.
    counts = torch.zeros_like(d.logical_count)
    counts[0, 0, 0] = 2**62
    window = msgspec.structs.replace(d.window, num_tokens=None, discarded=None)
    huge = [  # two engines' dumps (their own start times), not one copied
        msgspec.structs.replace(d, logical_count=counts, window=msgspec.structs.replace(window, start_time=t))
        for t in (1.0, 2.0)
    ]
    paths = [h.save(str(tmp_path / f"huge{i}.msgpack")) for i, h in enumerate(huge)]
    assert all(validate_dump(load_dump(p)) == [] for p in paths)
    assert main(["merge", *paths, "-o", str(tmp_path / "h.msgpack")]) == 2
    assert "the sum of the inputs exceeds int64" in capsys.readouterr().err


SGLANG_PER_PASS = (
    Path(__file__).parent.parent / "spec/fixtures/sglang/per_pass/expert_distribution_recorder_1700000001.5_0.pt"
)
SGLANG_STAT = Path(__file__).parent.parent / "spec/fixtures/sglang/stat/expert_distribution_recorder_1700000000.25.pt"


def test_sglang_per_rank_files_merge_as_one_run(tmp_path, capsys) -> None:
    """SGLang writes one per_pass file per rank and names only the rank: given together they are
    one run. Ranks routing their own tokens (expert parallel) are summed, and a missing rank is a
    missing shard. Ranks holding the same passes with the same counts routed the same tokens
    (tensor-parallel or DP-attention ranks without an all-to-all): counted once. Summed as
    SGLang's own reader sums them, they read as world-size times the tokens routed."""
    obj = torch.load(SGLANG_PER_PASS, weights_only=True, map_location="cpu")
    one = load_dump(SGLANG_PER_PASS)
    assert (one.topology.ep_size, one.topology.world_size) == (1, 1)  # no guessed expert-parallel size

    def write(folder: Path, rank: int, shift: int) -> None:
        records = [dict(r, rank=rank) for r in obj["records"]]
        for r in records:  # another rank's own tokens: the same total, other experts
            r["global_physical_count"] = r["global_physical_count"].roll(shift, dims=-1)
        torch.save(dict(obj, records=records), folder / f"expert_distribution_recorder_1700000001.5_{rank}.pt")

    for name, shifts, times in (("replicas", (0, 0, 0), 1), ("shards", (0, 1, 2), 3)):
        ranks = tmp_path / name
        ranks.mkdir()
        for rank, shift in enumerate(shifts):
            write(ranks, rank, shift)
        assert main(["merge", str(ranks), "-o", str(tmp_path / f"{name}.msgpack")]) == 0, name
        capsys.readouterr()
        merged = load_dump(tmp_path / f"{name}.msgpack")
        assert int(merged.total_count().sum()) == times * int(one.total_count().sum()), name
        assert merged.engine.sdk_version  # ours now
    assert torch.equal(load_dump(tmp_path / "replicas.msgpack").total_count(), one.total_count())
    (tmp_path / "shards" / "expert_distribution_recorder_1700000001.5_1.pt").unlink()
    assert main(["merge", str(tmp_path / "shards"), "-o", str(tmp_path / "m2.msgpack")]) == 2
    assert "moe-record merge: token shards [1] are missing (present: [0, 2])" in capsys.readouterr().err


def test_stock_sglang_files_where_every_rank_is_rank_0_count_each_token_once(tmp_path, capsys) -> None:
    """SGLang names its files by expert-parallel rank, not by process: with plain --tp N (expert-
    parallel size 1) every rank writes a "rank 0" per_pass file, and every one writes the stat
    file. Our merge summed them: x4 for --tp 4's per_pass files, x16 for its stat files (each
    already SGLang's all-reduce); pipeline stages were refused as a missing stage. Files of one
    rank that agree are one recording: counted once; stages fill each other's layers in."""
    obj = torch.load(SGLANG_PER_PASS, weights_only=True, map_location="cpu")
    one = load_dump(SGLANG_PER_PASS)

    def write(folder: Path, name: str, keep_layers: list[int] | None = None) -> None:
        records = [dict(r) for r in obj["records"]]
        for r in records:
            if keep_layers is not None:  # a pipeline stage: only its layers routed here
                count = torch.zeros_like(r["global_physical_count"])
                count[keep_layers] = r["global_physical_count"][keep_layers]
                r["global_physical_count"] = count
        torch.save(dict(obj, records=records), folder / f"expert_distribution_recorder_{name}_0.pt")

    tp = tmp_path / "tp4"
    tp.mkdir()
    for t in range(4):  # four tensor-parallel ranks, a few ms apart, each "rank 0"
        write(tp, f"1700000001.50{t}")
    stat = torch.load(SGLANG_STAT, weights_only=True, map_location="cpu")
    for t in range(4):  # and each wrote the stat file, the same all-reduce
        torch.save(stat, tp / f"expert_distribution_recorder_1700000002.00{t}.pt")
    per_pass = sorted(str(p) for p in tp.glob("*_0.pt"))
    assert main(["merge", *per_pass, "-o", str(tmp_path / "pp.msgpack")]) == 0, capsys.readouterr().err
    merged = load_dump(tmp_path / "pp.msgpack")
    assert torch.equal(merged.total_count(), one.total_count()) and merged.window.num_passes == len(obj["records"])
    stats = sorted(set(map(str, tp.glob("*.pt"))) - set(per_pass))
    assert main(["merge", *stats, "-o", str(tmp_path / "stat.msgpack")]) == 0, capsys.readouterr().err
    assert torch.equal(load_dump(tmp_path / "stat.msgpack").total_count(), load_dump(SGLANG_STAT).total_count())

    stages = tmp_path / "pp2xtp2"  # two pipeline stages of two tensor-parallel ranks: all "rank 0"
    stages.mkdir()
    for t, layers in enumerate(([1], [1], [2, 3], [2, 3])):
        write(stages, f"1700000001.50{t}", layers)
    assert main(["merge", str(stages), "-o", str(tmp_path / "stages.msgpack")]) == 0, capsys.readouterr().err
    assert torch.equal(load_dump(tmp_path / "stages.msgpack").total_count(), one.total_count())

    # Files of another rank that hold different recordings: which go together is not known.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for t, rank in enumerate((0, 1, 1)):
        records = [dict(r, rank=rank, forward_pass_id=r["forward_pass_id"] + 100 * t) for r in obj["records"]]
        torch.save(dict(obj, records=records), mixed / f"expert_distribution_recorder_1700000001.5{t}_{rank}.pt")
    assert main(["merge", str(mixed), "-o", str(tmp_path / "mixed.msgpack")]) == 2
    assert "are both SGLang's rank 1 but hold different recordings" in capsys.readouterr().err


def test_merge_distributed_in_a_one_process_gloo_group(tmp_path) -> None:
    import torch.distributed as dist

    dump = record(1, Topology())
    with pytest.raises(MergeError, match="not initialized"):
        merge_distributed(dump)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        merged = merge_distributed(dump, dst=None)
    finally:
        dist.destroy_process_group()
    same_counts(merged, dump)


def _dp_recorder(rank: int, **options) -> Recorder:
    topo = Topology(rank=rank, world_size=2, dp_rank=rank, dp_size=2, token_shard=rank, num_token_shards=2)
    return Recorder(num_layers=1, num_experts=4, top_k=1, topology=topo, **options)


@pytest.mark.parametrize("ring", [None, 2])
def test_per_token_ids_are_logical_when_physical_counts_are_dropped(ring) -> None:
    """EPLB replicas of expert 0 in slots 4 and 5. With a ring that overwrote a pass (or maps
    that differ) the merge keeps logical counts only: its per_token ids must be logical too."""
    mapping = torch.tensor([[0, 1, 2, 3, 0, 0]])
    dumps = []
    for rank in (0, 1):
        rec = _dp_recorder(rank, mode="per_token", buffer_size=ring, physical_to_logical_map=mapping)
        rec.start()
        for _ in range(3):
            rec.record(0, torch.tensor([[4], [5], [1]]))
            rec.step()
        dumps.append(rec.dump())
    merged = merge_dumps(dumps)
    want = [0, 0, 1] if merged.physical_to_logical_map is None else [4, 5, 1]  # logical, or slots with their map
    assert [r.topk_ids_of_layer[0].flatten().tolist() for r in merged.records] == [want] * len(merged.records)
    assert validate_dump(merged) == []
    if ring:
        assert merged.physical_to_logical_map is None


def test_merging_a_merged_dump_keeps_its_record_ranks_apart() -> None:
    """Two engines of two data-parallel ranks each, each engine's ranks merged (as an engine's
    endpoint answers), then the engines merged (as a Fleet does): passes stay one per rank."""

    def engine():
        dumps = []
        for rank in (0, 1):
            rec = _dp_recorder(rank, mode="per_pass")
            rec.start()
            for _ in range(2):
                rec.record(0, torch.tensor([[rank], [3]]))
                rec.step()
            dumps.append(rec.dump())
        return merge_dumps(dumps)

    one = engine()
    for merged in (merge_dumps([one]), merge_dumps([engine(), engine()])):
        assert validate_dump(merged) == []
        pairs = [(r.rank, r.forward_pass_id) for r in merged.records]
        assert len(set(pairs)) == len(pairs) == merged.logical_count.shape[0]
    assert sorted({r.rank for r in merge_dumps([engine(), engine()]).records}) == [0, 1, 2, 3]


def test_a_rings_last_pass_is_not_summed_into_a_cumulative_row() -> None:
    """A stat dump with a 1-row ring (its row: the last pass) and one without (its row: every
    pass): the rows mean different things, so the merge keeps the exact totals as one
    cumulative row instead of summing them and calling that cumulative."""
    ring, plain = Recorder(1, 4, 1, buffer_size=1), Recorder(1, 4, 1)
    for rec in (ring, plain):
        rec.start()
        for e in (0, 1, 2):
            rec.record(0, torch.tensor([[e]]))
            rec.step()
    a, b = ring.dump(), plain.dump()
    merged = merge_dumps([a, b])
    assert merged.window.buffer_size == 0 and merged.logical_count.shape[0] == 1
    assert merged.logical_count[0, 0].tolist() == [2, 2, 2, 0] == merged.total_count()[0].tolist()
    alone = merge_dumps([a])  # one ring: its row stays its last pass, labelled as a ring
    assert alone.window.buffer_size == 1 and alone.logical_count[0, 0].tolist() == [0, 0, 1, 0]


def test_compatibility_does_not_depend_on_the_order() -> None:
    """A dump that does not say its top_k (SGLang's own files) first: the others still disagree."""

    def with_top_k(dump, top_k):
        return msgspec.structs.replace(dump, model=msgspec.structs.replace(dump.model, top_k=top_k))

    unknown, two, four = (
        with_top_k(record(1, Topology()), None),
        record(2, Topology()),
        with_top_k(record(3, Topology()), 4),
    )
    for order in ([unknown, two, four], [two, unknown, four], [four, two, unknown]):
        with pytest.raises(MergeError, match="model.top_k is"):
            merge_dumps(order)


def test_a_copy_of_a_dump_is_refused_not_counted_twice(tmp_path, capsys) -> None:
    """A dump copied (``cp``, or downloaded twice) is another file with the same contents: merging
    both would double its counts. Two engines with equal counts differ in their start times."""
    d = record(0, Topology())
    with pytest.raises(MergeError, match=r"dump\[1\] is a copy of dump\[0\]"):
        merge_dumps([d, d])
    a = d.save(str(tmp_path / "a.pt"))
    b = tmp_path / "b.pt"
    b.write_bytes(Path(a).read_bytes())
    assert main(["merge", a, str(b), "-o", str(tmp_path / "m.pt")]) == 2
    assert "b.pt is a copy of" in capsys.readouterr().err and not (tmp_path / "m.pt").exists()
    twin = msgspec.structs.replace(d, window=msgspec.structs.replace(d.window, start_time=d.window.start_time + 1e-6))
    assert torch.equal(merge_dumps([d, twin]).total_count(), 2 * d.total_count())
    # A merged dump given again with its own merge is a copy too.
    merged = merge_dumps([d, twin])
    with pytest.raises(MergeError, match="is a copy of"):
        merge_dumps([merged, twin, merged])


def test_per_token_stages_whose_rings_overflowed_unequally_merge() -> None:
    """Two pipeline stages, 1 and 3 layers, with the same max_bytes: stage 1's token ring holds
    fewer tokens (5 of 12, stage 0's all) and overwrites passes stage 0 still holds. Each pass's ids are aligned on
    its last tokens (what an overflowing ring keeps); the rest read -1, and the drops are reported."""
    dumps = [
        record(
            s,
            Topology(rank=s, world_size=2, pp_rank=s, pp_size=2),
            layers=lay,
            mode="per_token",
            max_bytes=2600,
            buffer_size=10,
        )
        for s, lay in ((0, (0,)), (1, (1, 2, 3)))
    ]
    stage0, stage1 = dumps
    assert stage0.window.dropped_tokens < stage1.window.dropped_tokens  # unequal rings
    merged = merge_dumps(dumps)
    assert merged.window.dropped_tokens == stage1.window.dropped_tokens  # tokens missing some layer's ids
    assert torch.equal(merged.total_count(), stage0.total_count() + stage1.total_count())
    for r, r0, r1 in zip(merged.records, stage0.records, stage1.records):
        ids, n0, n1 = r.topk_ids_of_layer, r0.topk_ids_of_layer.shape[1], r1.topk_ids_of_layer.shape[1]
        assert ids.shape[1] == max(n0, n1)
        assert torch.equal(ids[0, ids.shape[1] - n0 :], r0.topk_ids_of_layer[0])
        assert torch.equal(ids[1:, ids.shape[1] - n1 :], r1.topk_ids_of_layer[1:])
        assert (ids[1:, : ids.shape[1] - n1] == -1).all()
    # Without drops, a different number of tokens is a different pass: refused, naming it.
    whole = [msgspec.structs.replace(d, window=msgspec.structs.replace(d.window, dropped_tokens=0)) for d in dumps]
    with pytest.raises(MergeError, match="its ring dropped none: they routed different tokens"):
        merge_dumps(whole)
