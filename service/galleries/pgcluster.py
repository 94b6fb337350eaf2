"""A private, throw-away PostgreSQL server for tests and benchmarks (Debian's `postgresql` package).

`initdb` a cluster in a temporary directory and `pg_ctl` it on a free loopback port with trust
authentication; nothing is shared with a system cluster. As root (CI containers) the server runs
as the `postgres` user through `runuser`, because PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from service.launch import free_port


def find_bindir() -> Path | None:
    """The directory holding initdb/pg_ctl/postgres, newest Debian version first; None when absent."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0, reverse=True)
    for d in cands:
        if (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists():
            return Path(d)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(os.path.realpath(initdb)).parent
    return None


class PostgresCluster:
    """`with PostgresCluster() as pg: pg.dsn` — a running server; `stop()`/`start()` to cut it off."""

    def __init__(self, bindir: Path | None = None, root: Path | None = None):
        self.bindir = bindir or find_bindir()
        if self.bindir is None:
            raise FileNotFoundError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self._tmp = None if root else tempfile.TemporaryDirectory(prefix="metalora-pg-")
        self.root = Path(root or self._tmp.name)
        self.data = self.root / "data"
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            os.chmod(self.root, 0o777)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *args], check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> "PostgresCluster":
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
        return self

    def start(self) -> "PostgresCluster":
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c max_connections=50 -c shared_buffers=64MB"
        r = self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", opts, "-w", "-t", "60", "start", check=False)
        if r.returncode:
            raise RuntimeError(f"pg_ctl start failed: {r.stderr}\n{self.log()[-2000:]}")
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (mode fast: disconnect clients, immediate: like a crash)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop", check=False)

    def log(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "PostgresCluster":
        return self.init().start()

    def __exit__(self, *exc) -> None:
        self.stop("immediate")
        if self._tmp is not None:
            self._tmp.cleanup()
