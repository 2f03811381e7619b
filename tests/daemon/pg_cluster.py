"""A PostgreSQL server a test controls (tests only): a throwaway cluster made the way .ci/with-postgres
makes one (initdb and pg_ctl from the Debian packages, as the ``postgres`` user when root), on a free
loopback port, so that a test can restart it under running daemons.

Without the PostgreSQL programs the test skips, or fails when CI=true (the rule of the store tests'
fixtures in tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import _pg_unavailable

__all__ = ["PgCluster", "pg_cluster"]


def _bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name)
                   if p.parent.parent.name.isdigit() else 0)
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One cluster in a temporary folder; ``url`` is a superuser's SQLAlchemy URL to its ``postgres`` database."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_pg: list[str] = []
        # /tmp, not pytest's tmp_path: as root the server runs as 'postgres', which cannot enter
        # root's 0700 pytest folders.
        self.dir = Path(tempfile.mkdtemp(prefix="infinitetalkd-pg."))
        os.chmod(self.dir, 0o755)
        if os.geteuid() == 0:
            if subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
                subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
            shutil.chown(self.dir, "postgres")
            self.as_pg = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self.port = _free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.as_pg, *args], capture_output=True, text=True, timeout=timeout)

    def _options(self) -> str:
        # fsync off: the data is thrown away, and no test crashes the machine. Commits stay synchronous,
        # so an immediate stop loses nothing a client was told is committed.
        return (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off "
                "-c full_page_writes=off -c max_connections=200 -c shared_buffers=32MB")

    def init(self) -> None:
        done = self._pg(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        self.start()

    def _ctl(self, *args: str) -> None:
        done = self._pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), *args)
        if done.returncode != 0:
            server_log = self.dir / "server.log"
            log = server_log.read_text(errors="replace")[-3000:] if server_log.exists() else ""
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed: {done.stdout}{done.stderr}\n{log}")

    def start(self) -> None:
        self._ctl("-l", str(self.dir / "server.log"), "-o", self._options(), "-w", "-t", "60", "start")

    def restart(self, mode: str = "immediate", down_s: float = 0.0) -> None:
        """Stop the server (``immediate``: every connection cut at once, as in a crash), leave it down
        for ``down_s`` seconds, and start it again on the same port."""
        self._ctl("-m", mode, "-w", "-t", "60", "stop")
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pg(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A running cluster of this test's own, removed afterwards."""
    bindir = _bindir()
    if bindir is None:
        _pg_unavailable("the PostgreSQL server programs (initdb, pg_ctl) are not installed")
        raise AssertionError("unreachable")
    cluster = PgCluster(bindir)
    try:
        cluster.init()
        yield cluster
    finally:
        cluster.close()
