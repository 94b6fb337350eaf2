"""Start a real `metalora serve` in a subprocess on a free loopback port and wait until it is ready.

Shared by the load test, the HTTP benchmarks and the tests, so they all start the server one way.
"""

from __future__ import annotations

import os
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


class ServerProcess:
    """`metalora serve` configured through METALORA_* environment variables; a context manager.

    HTTP gets a free loopback port, and so does gRPC unless `grpc_port` is given (0 turns it off):
    several servers at once never fight over the default 8001."""

    def __init__(self, store: Path, log: Path | None = None, device: str = "cpu", **settings):
        self.store = Path(store)
        self.log_path = Path(log) if log else self.store.parent / f"server-{os.getpid()}-{id(self)}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("METALORA_")}
        env.update({"METALORA_STORE": str(store), "METALORA_HOST": "127.0.0.1", "METALORA_DEVICE": device})
        env.update({f"METALORA_{k.upper()}": str(v) for k, v in settings.items()})
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.url = ""
        self._grpc_port = settings.get("grpc_port")  # None: a free one at launch; 0: gRPC off
        self.grpc_port = 0
        self.grpc_url = ""

    def start(self, timeout_s: float = 300) -> "ServerProcess":
        return self.launch().wait_ready(timeout_s)

    def launch(self) -> "ServerProcess":
        """Start the process without waiting (start several, then `wait_ready` on each)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_port = free_port() if self._grpc_port is None else int(self._grpc_port)
        self.env["METALORA_GRPC_PORT"] = str(self.grpc_port)
        self.grpc_url = f"127.0.0.1:{self.grpc_port}" if self.grpc_port else ""
        cli = Path(sys.executable).parent / "metalora"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([str(cli), "serve", "--port", str(self.port)], env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout_s: float = 300) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.log()[-3000:]}")

    def metric_sum(self, name: str) -> float:
        """Sum of every sample of one Prometheus metric (e.g. `metalora_batch_size_sum`)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._log.close()
            self.proc = None

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
