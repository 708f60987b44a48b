"""HTTP control figures for issue 5: fleet fan-out and dump transfer over loopback.

1. **Fan-out.** ``--engines`` engines (each a real Recorder of a DeepSeek-V3-sized model, 61
   layers x 256 experts, top-8, behind the real endpoint app on uvicorn), hosted by ``--hosts``
   processes: by default one process per engine, as a fleet's engines are separate processes
   (or machines). Fewer hosts put several engines on one event loop, where their work queues
   behind each other: that measures the host, not the fan-out; it needs fewer processes where
   CPUs are few. For start, stop, dump (bytes collected) and status: the median time of one
   ``AsyncFleet`` call over all engines, next to the slowest engine's median single call (each
   engine called alone). Target: fleet <= 1.5x the slowest single call. The client's CPU per
   request bounds this (one event loop sends every request), so it is printed too (the client
   process's CPU time in fleet calls over their requests: steadier than wall times on a busy
   host); so do the host's CPUs, which the engine processes and the client share here: with
   fewer cores than engines they take turns.
2. **Transfer.** One engine holding a full stat ring of 1000 passes (``[1000, 61, 256]``, SGLang's
   default buffer for that model: 62.5 MB as int32, in SGLang's ``.pt`` layout and in our msgpack
   alike). Times a dump collected over HTTP, end to end (server reads the recorder, encodes,
   sends; client receives and decodes), per format. Target: >= 200 MB/s.

``--engine-latency-ms X`` adds X ms inside each engine's handling (what a real engine's
scheduler round trip costs, e.g. SGLang's tokenizer manager -> scheduler -> ranks), labelled as
such: it shows the fan-out overlaps engine time, which the loopback engines here have little of.

    python tests/perf/bench_http.py [--engines 32] [--hosts 32] [--repeat 15] [--skip-transfer]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from moe_record_sdk import AsyncFleet, Recorder
from moe_record_sdk.server import LocalBackend, make_app

L, E, K = 61, 256, 8
MB = 1e6


class _LatencyBackend(LocalBackend):
    """Adds a fixed delay to every control call: an engine's internal round trip (simulated)."""

    def __init__(self, recorder: Recorder, delay: float) -> None:
        super().__init__(recorder)
        self.delay = delay

    async def start(self, mode: str | None) -> None:
        await asyncio.sleep(self.delay)
        await super().start(mode)

    async def stop(self) -> None:
        await asyncio.sleep(self.delay)
        await super().stop()

    async def dump(self) -> Any:
        await asyncio.sleep(self.delay)
        return await super().dump()

    async def status(self) -> Any:
        await asyncio.sleep(self.delay)
        return await super().status()


def fill(rec: Recorder, passes: int, tokens: int, seed: int) -> None:
    """Record ``passes`` passes of ``tokens`` random tokens on every layer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, rec.num_experts, (passes, tokens, rec.top_k), generator=g)
    for p in range(passes):
        for layer in rec.layer_ids:
            rec.record(layer, ids[p])
        rec.step()


# -- engine host (a subprocess) ----------------------------------------------------------------
async def _host(count: int, latency_ms: float, ring: int, dump_dir: str) -> None:
    import uvicorn

    from moe_record_sdk.server.threaded import bind

    torch.set_num_threads(1)
    servers, socks, recs = [], [], []
    for i in range(count):
        rec = Recorder(L, E, K, buffer_size=ring or None)
        backend = _LatencyBackend(rec, latency_ms / 1000) if latency_ms else LocalBackend(rec)
        app = make_app(backend, dump_dir=os.path.join(dump_dir, str(i)))
        sock = bind()
        socks.append(sock)
        recs.append(rec)
        servers.append(uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)))
    tasks = [asyncio.create_task(s.serve(sockets=[k])) for s, k in zip(servers, socks)]
    while not all(s.started for s in servers):
        await asyncio.sleep(0.01)
    print(json.dumps([f"http://127.0.0.1:{k.getsockname()[1]}" for k in socks]), flush=True)
    if ring:  # transfer host: keep the window's ring full (status shows the progress)
        tasks.append(asyncio.create_task(asyncio.to_thread(_keep_full, recs[0], ring)))
    await asyncio.gather(*tasks)


def _keep_full(rec: Recorder, ring: int) -> None:
    rec.start()
    seed = 0
    while True:
        missing = ring - rec.status().passes
        if missing > 0:
            seed += 1
            fill(rec, missing, 1, seed)
        else:
            time.sleep(0.02)


def spawn_hosts(
    counts: list[int], latency_ms: float, ring: int, dump_dir: str
) -> tuple[list[subprocess.Popen], list[str]]:
    procs, urls = [], []
    for i, n in enumerate(counts):
        cmd = [
            sys.executable,
            __file__,
            "_host",
            str(n),
            str(latency_ms),
            str(ring),
            os.path.join(dump_dir, f"host{i}"),
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True))
    for p in procs:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError("an engine host failed to start")
        urls += json.loads(line)
    return procs, urls


def stop_hosts(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()


# -- 1. fan-out --------------------------------------------------------------------------------
async def _cycle(fleet: AsyncFleet, cpu: dict[str, float] | None = None) -> dict[str, float]:
    """One start, stop, dump (collected), status; seconds each, failures raised. ``cpu``: adds
    each call's CPU seconds of this (the client's) process."""
    out = {}
    for action in ("start", "stop", "dump", "status"):
        c0, t0 = time.process_time(), time.perf_counter()
        result = await (fleet.dump(merge=False) if action == "dump" else getattr(fleet, action)())
        out[action] = time.perf_counter() - t0
        if cpu is not None:
            cpu[action] += time.process_time() - c0
        result.raise_for_errors()
    return out


async def fan_out(urls: list[str], repeat: int) -> dict[str, Any]:
    singles = [AsyncFleet([u], api_key="", retries=0) for u in urls]
    fleet = AsyncFleet(urls, api_key="", retries=0)
    try:
        for f in [*singles, fleet]:  # warm up: connections open, code paths hot
            await _cycle(f)
        per_engine: list[dict[str, list[float]]] = [{a: [] for a in ("start", "stop", "dump", "status")} for _ in urls]
        together: dict[str, list[float]] = {a: [] for a in ("start", "stop", "dump", "status")}
        cpu = dict.fromkeys(together, 0.0)  # the client's CPU in fleet calls: what bounds the fan-out
        for _ in range(repeat):  # interleaved: every round measures each single engine, then the fleet
            for i, f in enumerate(singles):
                for a, s in (await _cycle(f)).items():
                    per_engine[i][a].append(s)
            for a, s in (await _cycle(fleet, cpu)).items():
                together[a].append(s)
    finally:
        for f in [*singles, fleet]:
            await f.aclose()
    rows = {}
    for a in together:
        medians = [statistics.median(e[a]) for e in per_engine]
        slowest = max(medians)
        rows[a] = {
            "fleet_ms": statistics.median(together[a]) * 1000,
            "slowest_single_ms": slowest * 1000,
            "median_single_ms": statistics.median(medians) * 1000,
            "sum_single_ms": sum(medians) * 1000,
            "ratio": statistics.median(together[a]) / slowest,
            "client_cpu_us_per_request": cpu[a] / (repeat * len(urls)) * 1e6,
        }
    return rows


# -- 2. transfer -------------------------------------------------------------------------------
async def transfer(url: str, repeat: int, ring: int) -> dict[str, Any]:
    from moe_record_sdk.schema import decode, encode

    rows: dict[str, Any] = {}
    async with AsyncFleet([url], api_key="", timeout=300, retries=0) as fleet:
        for fmt in ("pt", "msgpack"):
            totals, moves, reads, sizes, encodes, decodes = [], [], [], [], [], []
            for _ in range(repeat):
                await _wait_full(fleet, ring)
                t0 = time.perf_counter()
                result = await fleet.dump(format=fmt, merge=False)
                total = time.perf_counter() - t0
                result.raise_for_errors()
                dump = result[0].dump
                assert tuple(dump.logical_count.shape) == (ring, L, E), dump.logical_count.shape
                read = result[0].server_timing["dump"] / 1000  # the recorder's own dump, before any HTTP
                totals.append(total)
                reads.append(read)
                moves.append(total - read)
                encodes.append(result[0].server_timing["encode"] / 1000)
                blob = encode(dump, fmt)
                sizes.append(len(blob))
                t0 = time.perf_counter()
                decode(blob, fmt)
                decodes.append(time.perf_counter() - t0)
                await fleet.start()  # the host keeps filling; a new window
            size, move = statistics.median(sizes), statistics.median(moves)
            rows[fmt] = {
                "bytes": size,
                "end_to_end_s": statistics.median(totals),
                "recorder_dump_s": statistics.median(reads),
                "http_s": move,
                "MB_per_s": size / move / MB,
                "int32_MB_per_s": ring * L * E * 4 / move / MB,
                "end_to_end_int32_MB_per_s": ring * L * E * 4 / statistics.median(totals) / MB,
                "server_encode_s": statistics.median(encodes),
                "client_decode_s": statistics.median(decodes),
            }
            rows[fmt]["wire_s"] = move - rows[fmt]["server_encode_s"] - rows[fmt]["client_decode_s"]
    return rows


async def _wait_full(fleet: AsyncFleet, ring: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = await fleet.status()
        passes = st[0].info["ranks"][0]["passes"] if st.ok else 0
        if passes >= ring:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the transfer host recorded {passes} of {ring} passes")
        await asyncio.sleep(0.2)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_host":
        count, latency, ring, dump_dir = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        asyncio.run(_host(count, latency, ring, dump_dir))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", type=int, default=32)
    p.add_argument(
        "--hosts", type=int, default=None, help="processes hosting the engines, split evenly (default: one per engine)"
    )
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--engine-latency-ms", type=float, default=0.0, help="simulated engine round trip per call")
    p.add_argument("--ring", type=int, default=1000, help="transfer: passes in the stat ring")
    p.add_argument("--transfer-repeat", type=int, default=3)
    p.add_argument("--skip-fanout", action="store_true")
    p.add_argument("--skip-transfer", action="store_true")
    p.add_argument("--dump-dir", default="/tmp/moe-record-bench-http")
    p.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = p.parse_args()
    report: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}"
    }
    print(report["machine"])
    if not args.skip_fanout:
        h = max(1, min(args.hosts or args.engines, args.engines))
        counts = [args.engines // h + (i < args.engines % h) for i in range(h)]
        procs, urls = spawn_hosts(counts, args.engine_latency_ms, 0, args.dump_dir)
        try:
            rows = asyncio.run(fan_out(urls, args.repeat))
        finally:
            stop_hosts(procs)
        lat = f", simulated engine latency {args.engine_latency_ms:g} ms" if args.engine_latency_ms else ""
        print(
            f"\nfan-out: {args.engines} engines in {h} host processes ({L}x{E} top-{K} stat recorders{lat}), median of {args.repeat}"
        )
        print(
            f"{'action':8} {'fleet ms':>9} {'slowest 1':>10} {'median 1':>9} {'sum of 1':>9} {'fleet/slowest':>14}"
            f" {'client CPU us/req':>18}"
        )
        for a, r in rows.items():
            print(
                f"{a:8} {r['fleet_ms']:9.2f} {r['slowest_single_ms']:10.2f} {r['median_single_ms']:9.2f} {r['sum_single_ms']:9.1f} {r['ratio']:13.2f}x"
                f" {r['client_cpu_us_per_request']:18.0f}"
            )
        report["fan_out"] = {"engines": args.engines, "hosts": h, "latency_ms": args.engine_latency_ms, "rows": rows}
    if not args.skip_transfer:
        procs, (url,) = spawn_hosts([1], 0.0, args.ring, args.dump_dir)
        try:
            rows = asyncio.run(transfer(url, args.transfer_repeat, args.ring))
        finally:
            stop_hosts(procs)
        print(
            f"\ntransfer: stat dump [{args.ring}, {L}, {E}] collected over loopback, median of {args.transfer_repeat}"
        )
        print("(http = encode + send + receive + decode; the recorder's own dump is timed apart, from Server-Timing)")
        for fmt, r in rows.items():
            print(
                f"{fmt:8} {r['bytes'] / MB:6.1f} MB: http {r['http_s'] * 1000:5.0f} ms = {r['MB_per_s']:5.0f} MB/s "
                f"({r['int32_MB_per_s']:.0f} MB/s of int32 counts); recorder dump {r['recorder_dump_s'] * 1000:.0f} ms; "
                f"end to end {r['end_to_end_s'] * 1000:.0f} ms ({r['end_to_end_int32_MB_per_s']:.0f} MB/s)"
            )
            print(
                f"{'':8} http = encode {r['server_encode_s'] * 1000:.0f} ms + wire {r['wire_s'] * 1000:.0f} ms "
                f"({r['bytes'] / r['wire_s'] / MB:.0f} MB/s) + decode {r['client_decode_s'] * 1000:.0f} ms"
            )
        report["transfer"] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
