"""
A throwaway PostgreSQL cluster for the tests (a pytest plugin, loaded by conftest.py).

C{postgres_cluster} (session) initdb's a cluster in a temp dir and starts it on a
free loopback port, with its socket in that dir and fsync off; C{pg_dsn} gives
each test a database of its own.  initdb and postgres refuse to run as root, so
as root both run as the C{postgres} user through runuser (Debian's util-linux
has it; no sudo needed).  Debian's C{postgresql} package (which C{make test}
installs) provides the binaries; without them the tests that need PostgreSQL
are skipped, saying so.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

_BINDIRS = "/usr/lib/postgresql/*/bin"


@dataclass(frozen=True)
class Cluster:
    """A running cluster: its superuser DSN (database C{postgres}) and where it lives."""

    host: str
    port: int
    socket_dir: Path
    started_in: float

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"


def _bindir() -> Path | None:
    found = sorted(glob.glob(_BINDIRS + "/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_postgres(argv: list[str]) -> list[str]:
    # Not root: the binaries run as whoever runs the tests.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(argv: list[str], log: Path | None = None) -> None:
    result = subprocess.run(
        _as_postgres(argv), capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        detail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
        raise RuntimeError(
            f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}{result.stderr}{detail}"
        )


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster for the whole session, stopped and removed at its end."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip(f"no PostgreSQL server ({_BINDIRS}/initdb): `make test` installs it")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: `make test` installs the postgres extra")
    started = time.monotonic()
    # Short and outside pytest's kept temp dirs: the socket path has a 107-byte limit,
    # and a cluster's 40 MB should not outlive the session.
    top = Path(tempfile.mkdtemp(prefix="transcoder-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(top, pw.pw_uid, pw.pw_gid)
    data, log = top / "data", top / "log"
    try:
        _run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
              "-E", "UTF8", "--locale", "C.UTF-8", "--no-sync"])  # fmt: skip
        for attempt in itertools.count():
            # The port is free when picked, but another process may take it first.
            port = _free_port()
            opts = (
                f"-p {port} -k {top} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            )
            try:
                _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                      "-t", "60", "-o", opts, "start"], log)  # fmt: skip
                break
            except RuntimeError:
                if attempt == 2:
                    raise
        yield Cluster("127.0.0.1", port, top, time.monotonic() - started)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(
                _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(top, ignore_errors=True)


_databases = itertools.count(1)


@pytest.fixture
def pg_dsn(postgres_cluster: Cluster) -> Iterator[str]:
    """A fresh, empty database on the session's cluster, dropped after the test."""
    import psycopg

    name = f"test_{next(_databases)}"
    with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_cluster.dsn(name)
    finally:
        with psycopg.connect(postgres_cluster.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
