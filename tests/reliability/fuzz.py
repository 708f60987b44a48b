"""The fuzz campaign: every reader and the validator against hostile files, in a process of its own.

    python -m tests.reliability.fuzz --mutations 8000 --examples 1000 --bomb-bytes 1073741824

prints a JSON report: cases run, outcomes, rejections by error and by reason, crashes (any
exception that is not a ``MoeRecordError``), unclear messages, the slowest case and the peak RSS.
Each case is one file, read by ``load_dump`` (from disk) and by ``decode`` (from bytes); what
loads is validated, and a dump that validates clean is re-encoded in every format and read back.

The process caps its address space (``--max-memory``) so that a defence that fails allocates
in vain rather than taking the machine down; a rejection caused by a failed allocation counts as
unclear, not as a defence. A watchdog ends the process if one case runs past ``--hang-seconds``.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from moe_record_sdk import MoeRecordError, load_dump, validate_dump
from moe_record_sdk.schema import MODES
from moe_record_sdk.schema.io import FORMATS, decode, encode

from . import hostile

ALLOCATION_FAILURE = re.compile(r"can't allocate|out of memory|DefaultCPUAllocator|MemoryError", re.I)


class CaseTimeout(BaseException):
    """Raised in a case that runs past the soft time limit (a hang, reported and survived)."""


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout("the case ran past the time limit")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Campaign:
    """Runs cases and keeps the figures."""

    def __init__(self, workdir: Path, hang_seconds: float, slow_seconds: float) -> None:
        self.workdir = workdir
        self.hang_seconds = hang_seconds
        self.slow_seconds = slow_seconds
        signal.signal(signal.SIGALRM, _alarm)
        self.cases = 0
        self.by_source: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.by_error: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.crashes: list[dict[str, Any]] = []
        self.unclear: list[dict[str, Any]] = []
        self.rss_jumps: list[dict[str, Any]] = []
        self.allocation_failures: list[str] = []
        self.refused_roundtrips: set[str] = set()
        self.max_seconds, self.slowest = 0.0, ""
        self.baseline_rss = _rss_mb()

    def run(self, source: str, kind: str, data: bytes, suffix: str) -> None:
        self.cases += 1
        self.by_source[source] += 1
        self.by_kind[kind.split(":")[0]] += 1
        path = self.workdir / f"case{suffix}"
        path.write_bytes(data)
        (self.workdir / "current.txt").write_text(f"{source} {kind} {len(data)} bytes\n")
        rss_before = _rss_mb()
        # A soft limit that Python code notices, and a hard one for code that never returns to Python.
        faulthandler.dump_traceback_later(self.hang_seconds, exit=True)
        signal.setitimer(signal.ITIMER_REAL, self.slow_seconds)
        start = time.perf_counter()
        try:
            self._read(kind, lambda: load_dump(path), str(path))
            self._read(kind, lambda: decode(data), "<bytes>")
        except CaseTimeout as e:
            self._crash(kind, "hang", e)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
        seconds = time.perf_counter() - start
        if seconds > self.max_seconds:
            self.max_seconds, self.slowest = seconds, f"{source} {kind} ({len(data)} bytes)"
        if _rss_mb() - rss_before > 128:
            self.rss_jumps.append({"kind": kind, "from_mb": rss_before, "to_mb": _rss_mb()})

    def _crash(self, kind: str, stage: str, e: BaseException) -> None:
        self.outcomes["crash"] += 1
        if len(self.crashes) < 40:
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            self.crashes.append(
                {
                    "kind": kind,
                    "stage": stage,
                    "error": f"{type(e).__name__}: {str(e)[:300]}",
                    "where": "".join(tb[-3:])[-1500:],
                }
            )

    def _read(self, kind: str, read, source: str) -> None:
        try:
            dump = read()
        except MoeRecordError as e:
            self._rejected(kind, e, source)
            return
        except BaseException as e:  # noqa: BLE001 - anything else escaping a reader is the bug we hunt
            if isinstance(e, (KeyboardInterrupt, CaseTimeout)):
                raise
            self._crash(kind, "read", e)
            return
        try:
            problems = validate_dump(dump)
            assert isinstance(problems, list) and all(
                isinstance(f, str) and isinstance(m, str) and m for f, m in problems
            ), f"validate_dump returned {problems!r:.200}"
        except Exception as e:
            self._crash(kind, "validate", e)
            return
        if problems:
            self.outcomes["loaded, invalid (validator lists problems)"] += 1
            return
        self.outcomes["loaded, valid"] += 1
        if dump.logical_count.numel() > 1 << 20:
            return  # the round trip of a big dump would measure our re-encoding, not the readers
        for fmt in FORMATS:  # a dump that validates clean must survive a round trip in every format
            try:
                again = decode(encode(dump, fmt), fmt)
                assert torch.equal(again.total_count(), dump.total_count()), f"{fmt}: counts changed"
            except MoeRecordError as e:
                self.outcomes[f"valid dump refused by encode({fmt}): {type(e).__name__}"] += 1
                self.refused_roundtrips.add(f"{fmt}: {str(e)[:160]}")
            except Exception as e:
                self._crash(kind, f"roundtrip-{fmt}", e)

    def _rejected(self, kind: str, e: MoeRecordError, source: str) -> None:
        self.outcomes["rejected"] += 1
        self.by_error[type(e).__name__] += 1
        message = str(e)
        reason = message.removeprefix(source).removeprefix(": ")
        reason = re.sub(r"\d+", "N", reason)
        reason = re.sub(r"'[^']*'|`[^`]*`|\"[^\"]*\"", "…", reason)[:70]
        self.by_reason[reason] += 1
        why = []
        if not message.startswith(source):
            why.append("does not name the file")
        if "\n" in message or len(message) > 600:
            why.append("not one short line")
        if ALLOCATION_FAILURE.search(message):
            # torch allocates a legacy pickle's storages (virtually) before it can check them; the
            # address-space cap of this process turns that into a failure. Reported apart.
            self.allocation_failures.append(kind)
        if why and len(self.unclear) < 40:
            self.unclear.append({"kind": kind, "why": why, "message": message[:400]})
        if why:
            self.outcomes["unclear rejection"] += 1

    def report(self, elapsed: float) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "reads": 2 * self.cases,
            "by_source": dict(self.by_source),
            "by_kind": dict(self.by_kind.most_common()),
            "outcomes": dict(self.outcomes),
            "rejections_by_error": dict(self.by_error),
            "rejections_by_reason": dict(self.by_reason.most_common(40)),
            "crashes": self.crashes,
            "unclear": self.unclear,
            "rss_jumps": self.rss_jumps,
            "rejected_by_failed_allocation": sorted(set(self.allocation_failures)),
            "refused_roundtrips": sorted(self.refused_roundtrips)[:20],
            "max_case_seconds": round(self.max_seconds, 3),
            "slowest_case": self.slowest,
            "baseline_rss_mb": round(self.baseline_rss, 1),
            "peak_rss_mb": round(_rss_mb(), 1),
            "elapsed_seconds": round(elapsed, 1),
        }


# -- hypothesis strategies -----------------------------------------------------------------------

INTS = st.one_of(st.integers(-2, 9), st.sampled_from(hostile.HOSTILE_INTS))
SMALL = st.integers(0, 4)
WIRE_DTYPES = {"int64": 8, "int32": 4, "int8": 1, "uint8": 1, "bool": 1, "float32": 4}


@st.composite
def wire_tensors(draw: st.DrawFn, json: bool = False) -> dict[str, Any]:
    """Mostly well-formed wire tensors of random dtype and shape; now and then a lying one."""
    if draw(st.integers(0, 9)) == 0:
        return hostile.hostile_wire_tensor(random.Random(draw(st.integers(0, 2**32))), json)
    dtype = draw(st.sampled_from(list(WIRE_DTYPES)))
    shape = draw(st.lists(SMALL, min_size=0, max_size=4))
    n = WIRE_DTYPES[dtype]
    for s in shape:
        n *= s
    data = draw(st.binary(min_size=n, max_size=n))
    return {"dtype": dtype, "shape": shape, "data": hostile._b64(data) if json else data}


def dump_trees(json: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    """Dump-shaped trees whose every field may be out of range, of the wrong type, or missing."""
    opt_ints = st.one_of(st.none(), INTS)
    int_lists = st.lists(INTS, max_size=5)
    model = st.fixed_dictionaries(
        {"num_layers": INTS, "moe_layer_ids": int_lists, "num_logical_experts": INTS},
        optional={"top_k": opt_ints, "num_physical_experts": opt_ints, "name": st.text(max_size=4)},
    )
    window = st.fixed_dictionaries(
        {"mode": st.sampled_from([*MODES, "bogus"])},
        optional={
            k: v
            for k, v in {
                "num_passes": INTS,
                "num_tokens": int_lists,
                "discarded": int_lists,
                "buffer_size": INTS,
                "dropped_passes": INTS,
                "dropped_tokens": INTS,
                "unobserved_layers": int_lists,
                "start_time": st.floats(allow_nan=False),
                "stop_time": st.floats(allow_nan=False),
            }.items()
        },
    )
    topology = st.fixed_dictionaries(
        {},
        optional={
            k: INTS
            for k in (
                "rank",
                "world_size",
                "tp_rank",
                "tp_size",
                "ep_rank",
                "ep_size",
                "token_shard",
                "num_token_shards",
            )
        },
    )
    record = st.fixed_dictionaries(
        {"forward_pass_id": INTS},
        optional={
            "rank": INTS,
            "gatherer_key": st.text(max_size=4),
            "topk_ids_of_layer": wire_tensors(json),
            "input_ids": int_lists,
        },
    )
    return st.fixed_dictionaries(
        {
            "schema_version": st.sampled_from([1, 1, 1, 1, 0, 2, "1", None]),
            "engine": st.fixed_dictionaries({"name": st.text(max_size=4)}),
            "model": model,
            "window": window,
            "logical_count": wire_tensors(json),
        },
        optional={
            "topology": topology,
            "total_logical_count": wire_tensors(json),
            "physical_count": wire_tensors(json),
            "physical_to_logical_map": wire_tensors(json),
            "records": st.lists(record, max_size=4),
            "average_utilization_rate_over_window": st.one_of(st.none(), st.floats(allow_nan=False)),
        },
    )


@st.composite
def count_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from([torch.int32, torch.int64, torch.int8, torch.uint8, torch.float32, torch.bool]))
    shape = draw(st.lists(SMALL, min_size=0, max_size=4))
    n = 1
    for s in shape:
        n *= s
    values = draw(st.lists(st.integers(-3, 100), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.int64).reshape(shape).to(dtype)


def sglang_dicts() -> st.SearchStrategy[dict[str, Any]]:
    """SGLang-shaped ``.pt`` dicts, with or without our metadata, with tensors of any shape and dtype."""
    meta = msgspec.to_builtins(load_dump(hostile.FIXTURES / "ours" / "per_pass.json"), enc_hook=lambda t: None)
    metas = st.one_of(st.none(), st.just(meta), st.builds(lambda v: {**meta, "schema_version": v}, INTS))
    record = st.fixed_dictionaries(
        {"forward_pass_id": INTS, "global_physical_count": count_tensors()},
        optional={"rank": INTS, "topk_ids_of_layer": count_tensors(), "input_ids": st.lists(INTS, max_size=4)},
    )
    stat = st.fixed_dictionaries({"logical_count": count_tensors()}, optional={"rank": INTS, "moe_record": metas})
    detail = st.fixed_dictionaries(
        {"records": st.lists(record, max_size=3), "last_physical_to_logical_map": count_tensors()},
        optional={"moe_record": metas},
    )
    return st.one_of(stat, detail)


CSV_LINES = st.lists(
    st.one_of(
        st.tuples(INTS, INTS, INTS).map(lambda t: ",".join(map(str, t))),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
    ),
    max_size=8,
)

PREFIXES = [b"PK\x03\x04", b"\x80\x02", b"{", b"[", b"\x8f", b"\xde\x00\x10", b"layer_id", b""]


def run_hypothesis(campaign: Campaign, examples: int, seed: int) -> None:
    def settle(f):
        return settings(
            max_examples=examples,
            database=None,
            deadline=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )(f)

    @settle
    @given(dump_trees(json=False))
    def msgpack_trees(tree: dict[str, Any]) -> None:
        campaign.run("hypothesis", "hyp-msgpack-tree", msgspec.msgpack.encode(tree), ".msgpack")

    @settle
    @given(dump_trees(json=True))
    def json_trees(tree: dict[str, Any]) -> None:
        try:
            data = msgspec.json.encode(tree)
        except (OverflowError, msgspec.EncodeError):
            return
        campaign.run("hypothesis", "hyp-json-tree", data, ".json")

    @settle
    @given(sglang_dicts())
    def pt_dicts(obj: dict[str, Any]) -> None:
        campaign.run("hypothesis", "hyp-pt-dict", hostile._pt(obj), ".pt")

    @settle
    @given(CSV_LINES)
    def csv_files(lines: list[str]) -> None:
        data = "\n".join(["layer_id,expert_id,count", *lines]).encode("utf-8", "surrogatepass")
        campaign.run("hypothesis", "hyp-csv", data, ".csv")

    @settle
    @given(st.sampled_from(PREFIXES), st.binary(max_size=256), st.sampled_from([".pt", ".msgpack", ".json", ".csv"]))
    def raw_bytes(prefix: bytes, body: bytes, suffix: str) -> None:
        campaign.run("hypothesis", "hyp-bytes", prefix + body, suffix)

    for test in (msgpack_trees, json_trees, pt_dicts, csv_files, raw_bytes):
        test()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutations", type=int, default=500, help="mutations of the golden files")
    parser.add_argument("--examples", type=int, default=50, help="hypothesis examples per strategy (5 strategies)")
    parser.add_argument("--bomb-bytes", type=int, default=32 << 20, help="what the zip bomb expands to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow-seconds", type=float, default=10.0, help="a case running longer is a hang (reported)")
    parser.add_argument("--hang-seconds", type=float, default=60.0, help="end the process if one case runs longer")
    parser.add_argument("--max-memory", type=int, default=4 << 30, help="address-space cap in bytes (0: none)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="moe-record-fuzz-") as tmp:
        workdir = Path(tmp)
        bomb = workdir / "bomb.pt"
        # Built by another process: building it takes twice the memory it would blow up.
        subprocess.run(
            [sys.executable, "-m", "tests.reliability.hostile", "zip-bomb", str(bomb), str(args.bomb_bytes)],
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        if args.max_memory:
            resource.setrlimit(resource.RLIMIT_AS, (args.max_memory, args.max_memory))
        campaign = Campaign(workdir, args.hang_seconds, args.slow_seconds)
        start = time.perf_counter()
        campaign.run("crafted", f"zip-bomb:{args.bomb_bytes}", bomb.read_bytes(), ".pt")
        for kind, data, suffix in hostile.crafted():
            campaign.run("crafted", kind, data, suffix)
        rng = random.Random(args.seed)
        golden = sorted(hostile.seeds().items())
        for i in range(args.mutations):
            name, data = golden[i % len(golden)]
            kind, out, suffix = hostile.mutate_seed(name, data, rng)
            campaign.run("mutation", f"{kind}:{name}", out, suffix)
        run_hypothesis(campaign, args.examples, args.seed)
        return campaign.report(time.perf_counter() - start)


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
