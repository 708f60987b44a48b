"""How low can a Python client take a fan-out? Raw sockets against the real engines, next to the Fleet.

Starts ``--engines`` engine processes as ``bench_http.py`` does, then times the same control call
(``stop`` and ``status``) over all of them, median of ``--repeat``:

* ``single``: each engine alone over a raw keep-alive socket; the slowest engine's median is the
  denominator of every ratio;
* ``raw-1``: one thread, requests written to every socket, answers read through one ``epoll``;
* ``raw-W``: the engines split over W threads, each doing ``raw-1`` on its share (system calls
  release the GIL, so their kernel time overlaps);
* ``fleet``: ``Fleet`` (what the CLI runs), also against the slowest one-engine ``Fleet`` call.

    python tests/perf/fanout_floor.py [--engines 32] [--repeat 30]

Figures (32 engines, ratios to the slowest single call): on a 16-CPU host raw-1 took 2.7-3.3x
and the Fleet 1.4-1.5x that. On a 32-CPU host (one core per engine, 2026-11-28) raw-1 still took
2.76x (stop, 0.69 ms against 0.25) and 1.88x (status), more threads were slower (raw-8: 4-8x),
and the Fleet took 3.1-5.4x: the single client thread's per-request cost, not the engines' cores,
sets the floor when an engine answers in well under a millisecond.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_http import spawn_hosts, stop_hosts  # noqa: E402

from moe_record_sdk import Fleet  # noqa: E402
from moe_record_sdk.server.protocol import PATHS  # noqa: E402


class Raw:
    """Keep-alive sockets to some engines, driven without asyncio."""

    def __init__(self, urls: list[str], action: str) -> None:
        self.socks, self.data = [], {}
        for u in urls:
            host, port = u.split("//")[1].split(":")
            s = socket.create_connection((host, int(port)))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            self.socks.append(s)
            self.data[s.fileno()] = (
                f"POST {PATHS[action]} HTTP/1.1\r\nhost: {host}:{port}\r\naccept: application/json\r\n"
                "content-length: 0\r\n\r\n"
            ).encode()
        self.by_fd = {s.fileno(): s for s in self.socks}
        self.ep = select.epoll()
        for s in self.socks:
            self.ep.register(s.fileno(), select.EPOLLIN)
        self.buf = bytearray(1 << 16)

    def fan(self) -> None:
        for s in self.socks:
            s.send(self.data[s.fileno()])
        got: dict[int, bytes] = {}
        left = len(self.socks)
        while left:
            for fd, _ in self.ep.poll():
                n = self.by_fd[fd].recv_into(self.buf)
                b = got.get(fd, b"") + bytes(self.buf[:n])
                got[fd] = b
                end = b.find(b"\r\n\r\n")
                if end >= 0:
                    head = b[:end].lower()
                    at = head.find(b"content-length:") + 15
                    length = int(head[at : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else len(head)])
                    if len(b) >= end + 4 + length:
                        left -= 1
                        got[fd] = b""


def timed(fn, repeat: int) -> float:
    for _ in range(5):
        fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out) * 1e3


def threaded(urls: list[str], action: str, workers: int):
    shares = [urls[i::workers] for i in range(workers)]
    raws = [Raw(s, action) for s in shares]

    def fan() -> None:
        threads = [threading.Thread(target=r.fan) for r in raws[1:]]
        for t in threads:
            t.start()
        raws[0].fan()
        for t in threads:
            t.join()

    return fan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", type=int, default=32)
    p.add_argument("--repeat", type=int, default=30)
    a = p.parse_args()
    procs, urls = spawn_hosts([1] * a.engines, 0.0, 0, "/tmp/moe-record-fanout-floor")
    try:
        print(f"{os.cpu_count()} CPUs, {a.engines} engines, median of {a.repeat} (ms; ratio to the slowest single)")
        for action in ("stop", "status"):
            singles = [Raw([u], action) for u in urls]
            slowest = max(timed(r.fan, a.repeat) for r in singles)
            row = {"raw-1": timed(Raw(urls, action).fan, a.repeat)}
            for w in (2, 4, 8):
                row[f"raw-{w}"] = timed(threaded(urls, action, w), a.repeat)
            with Fleet(urls, api_key="", retries=0) as fleet:
                row["fleet"] = timed(getattr(fleet, action), a.repeat)
            fleet_slowest = 0.0
            for u in urls:
                with Fleet([u], api_key="", retries=0) as one:
                    fleet_slowest = max(fleet_slowest, timed(getattr(one, action), a.repeat))
            cells = "  ".join(f"{k} {v:.2f} ({v / slowest:.2f}x)" for k, v in row.items())
            print(f"{action:6} single(slowest) {slowest:.2f}  {cells}", flush=True)
            print(
                f"{'':6} one-engine Fleet(slowest) {fleet_slowest:.2f}: fleet {row['fleet'] / fleet_slowest:.2f}x",
                flush=True,
            )
    finally:
        stop_hosts(procs)


if __name__ == "__main__":
    main()
