"""A second instance on ports another process holds stops with one line naming the port and the
setting that chose it, exit code 1, no traceback — before it loads anything."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service.launch import free_port

from .conftest import ROOT


def _serve(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    exe = Path(sys.executable).parent / "metalora"
    full = {k: v for k, v in os.environ.items() if not k.startswith("METALORA_")} | (env or {})
    return subprocess.run([str(exe), "serve", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=full)


@pytest.mark.parametrize("which", ["http", "grpc", "both"])
def test_a_taken_port_is_one_line_and_exit_1(which):
    holders, ports = [], {"http": free_port(), "grpc": free_port()}
    try:
        for name in (["http", "grpc"] if which == "both" else [which]):
            s = socket.socket()
            s.bind(("127.0.0.1", ports[name]))
            s.listen()
            holders.append(s)
        r = _serve("--port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), env={"METALORA_BACKEND": "torch", "METALORA_DEVICE": "cpu"})
    finally:
        for s in holders:
            s.close()
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == (2 if which == "both" else 1), r.stderr
    if which in ("http", "both"):
        assert any(f"127.0.0.1:{ports['http']}" in ln and "METALORA_PORT" in ln for ln in lines), lines
    if which in ("grpc", "both"):
        assert any(f"127.0.0.1:{ports['grpc']}" in ln and "METALORA_GRPC_PORT" in ln for ln in lines), lines
