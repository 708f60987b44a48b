"""The Fleet under faults, against real local servers: each fault is one engine's error, the other
engines' dumps are kept and merged exactly once, and a restarted engine's lost recording is
reported, not merged as if complete."""

from __future__ import annotations

import asyncio
import socket
import threading

import torch

from moe_record_sdk import Fleet, Recorder
from moe_record_sdk.server import LocalBackend, ServerThread, make_app
from moe_record_sdk.server.protocol import START_PATH, START_TEXT, STOP_PATH, STOP_TEXT

L, E, K = 3, 8, 2


def _feed(rec: Recorder, reference: torch.Tensor, seed: int, passes: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(passes):
        for layer in range(L):
            ids = torch.randint(0, E, (5, K), generator=g)
            rec.record(layer, ids)
            reference[layer] += torch.bincount(ids.flatten(), minlength=E)
        rec.step()


def _fault_app(kind: str, seen: list[str]):
    """An engine whose start and stop answer like SGLang but whose dump fails in one way."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(scope["path"])
        status, headers, body = 200, [(b"content-type", b"text/plain; charset=utf-8")], b""
        if scope["path"] in (START_PATH, STOP_PATH):
            body = (START_TEXT if scope["path"] == START_PATH else STOP_TEXT).encode()
        elif kind == "500":
            status, body = 500, b"Internal Server Error"
        elif kind == "timeout":
            await asyncio.sleep(3)  # longer than the fleet's timeout
            body = b"too late"
        elif kind == "garbage":
            headers = [(b"content-type", b"application/x-msgpack"), (b"x-moe-record-format", b"msgpack")]
            body = b"\x85\xa4not a dump" + bytes(range(256))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class DroppingServer:
    """A raw HTTP server: answers start/stop, and on a dump sends the head and part of the body,
    then closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.dumps = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                path = head.split(b" ", 2)[1].split(b"?")[0].decode() if head else ""
                if path == "/dump_expert_distribution_record":
                    self.dumps += 1
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\ncontent-type: application/x-msgpack\r\n"
                        b"x-moe-record-format: msgpack\r\ncontent-length: 100000\r\n\r\n" + b"\x00" * 1000
                    )
                    continue  # closed mid-body
                text = (START_TEXT if path == START_PATH else STOP_TEXT).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                    + f"content-length: {len(text)}\r\n\r\n".encode()
                    + text
                )

    def close(self) -> None:
        self.sock.close()


def _refused_url() -> str:
    with socket.socket() as s:  # bound, never listening, then closed: connections are refused
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_each_fault_is_one_engines_error_and_the_rest_merge_once(tmp_path):
    d = str(tmp_path)
    recs = [Recorder(num_layers=L, num_experts=E, top_k=K) for _ in range(2)]
    refs = [torch.zeros(L, E, dtype=torch.int64) for _ in range(2)]
    restarted_rec = Recorder(num_layers=L, num_experts=E, top_k=K)
    good = [ServerThread(make_app(LocalBackend(r), dump_dir=d)).start() for r in recs]
    before_restart = ServerThread(make_app(LocalBackend(restarted_rec), dump_dir=d)).start()
    seen: dict[str, list[str]] = {k: [] for k in ("500", "timeout", "garbage")}
    faulty = {k: ServerThread(_fault_app(k, seen[k])).start() for k in seen}
    dropper = DroppingServer()
    urls = {
        "good0": good[0].url,
        "good1": good[1].url,
        "refused": _refused_url(),
        "timeout": faulty["timeout"].url,
        "500": faulty["500"].url,
        "garbage": faulty["garbage"].url,
        "dropped": dropper.url,
        "restarted": before_restart.url,
    }
    after_restart = None
    try:
        with Fleet(list(urls.values()), timeout=1.0, retries=2, backoff=0.01, api_key="") as fleet:
            started = fleet.start()
            assert {r.engine for r in started.failed} == {urls["refused"]}
            for i, (rec, ref) in enumerate(zip(recs, refs)):
                _feed(rec, ref, seed=i, passes=40)
            _feed(restarted_rec, torch.zeros(L, E, dtype=torch.int64), seed=9, passes=40)

            # The engine restarts on the same port: a new process, a new (empty, then fed) recorder.
            port = before_restart.port
            before_restart.stop()
            fresh = Recorder(num_layers=L, num_experts=E, top_k=K)
            fresh.start()
            _feed(fresh, torch.zeros(L, E, dtype=torch.int64), seed=10, passes=7)
            after_restart = ServerThread(make_app(LocalBackend(fresh), dump_dir=d), port=port).start()

            result = fleet.dump()
            by = {name: result[url] for name, url in urls.items()}
            assert by["good0"].ok and by["good1"].ok
            expected_kinds = {
                "refused": {"not_started"},  # its start failed: the dump leaves it alone
                "timeout": {"timeout"},
                "500": {"http"},
                "garbage": {"bad_dump"},
                "dropped": {"connection", "protocol", "bad_dump"},
                "restarted": {"restarted"},
            }
            for name, kinds in expected_kinds.items():
                r = by[name]
                assert not r.ok and r.error_kind in kinds and r.error, (name, r.error_kind, r.error)
            assert "restarted" in by["restarted"].error and "lost" in by["restarted"].error
            print("\n" + "\n".join(r.describe() for r in result))

            # The merge holds exactly the two good engines, each once.
            assert result.merged is not None and result.merge_error is None
            assert set(result.dumps) == {urls["good0"], urls["good1"]}
            assert torch.equal(result.merged.total_count(), refs[0] + refs[1])
            # A dump reached the dropping engine once: it is not retried (it would clear a window twice).
            assert dropper.dumps == 1 and by["dropped"].attempts == 1
            assert seen["timeout"].count("/dump_expert_distribution_record") == 1

            # A second dump finds the good engines' windows empty: nothing comes back twice.
            again = fleet.dump()
            assert int(again.merged.total_count().sum()) == 0
    finally:
        for s in [*good, *faulty.values(), before_restart, after_restart]:
            if s is not None:
                s.stop()
        dropper.close()
