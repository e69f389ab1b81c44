"""
A throwaway PostgreSQL cluster for the tests (a pytest plugin, loaded by conftest.py).

C{postgres_cluster} (session) initdb's a cluster in a temp dir and starts it on a
free loopback port, with its socket in that dir and fsync off; C{pg_dsn} gives
each test a database of its own; C{private_postgres} is a cluster of one
test's own, which it may stop and start.  initdb and postgres refuse to run as root, so
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
from contextlib import contextmanager
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


class Server:
    """
    A cluster in C{top}, initdb'd at once; L{start} and L{stop} it at will
    (a test of losing the database stops it under the nodes and starts it
    again on the same port).
    """

    def __init__(self, bindir: Path, top: Path, *, crashes: bool = False) -> None:
        self.bindir = bindir
        # A cluster that is stopped as if it crashed keeps every commit:
        # synchronous_commit=off could lose the last ones (the schema itself).
        # fsync stays off, as the machine does not crash.
        self.commit = "on" if crashes else "off"
        self.top = top
        self.data, self.log = top / "data", top / "log"
        self.port: int | None = None
        _run([str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
              "-E", "UTF8", "--locale", "C.UTF-8", "--no-sync"])  # fmt: skip

    def start(self) -> None:
        """Start it: on a free port the first time, on the same port after that."""
        for attempt in itertools.count():
            # The port is free when picked, but another process may take it first.
            port = self.port or _free_port()
            opts = (
                f"-p {port} -k {self.top} -c listen_addresses=127.0.0.1 -c fsync=off "
                f"-c synchronous_commit={self.commit} -c full_page_writes=off "
                "-c max_connections=200"
            )
            try:
                _run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                      "-w", "-t", "60", "-o", opts, "start"], self.log)  # fmt: skip
                self.port = port
                return
            except RuntimeError:
                if attempt == 2 or self.port is not None:
                    raise

    def stop(self, mode: str = "immediate") -> None:
        """Stop it (C{immediate}: as if it crashed, every connection cut)."""
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode,
                              "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )  # fmt: skip

    def cluster(self, started: float) -> Cluster:
        assert self.port is not None
        return Cluster("127.0.0.1", self.port, self.top, time.monotonic() - started)


def _server(*, crashes: bool = False) -> Server:
    bindir = _bindir()
    if bindir is None:
        pytest.skip(f"no PostgreSQL server ({_BINDIRS}/initdb): `make test` installs it")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: `make test` installs the postgres extra")
    # Short and outside pytest's kept temp dirs: the socket path has a 107-byte limit,
    # and a cluster's 40 MB should not outlive the session.
    top = Path(tempfile.mkdtemp(prefix="transcoder-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(top, pw.pw_uid, pw.pw_gid)
    try:
        return Server(bindir, top, crashes=crashes)
    except BaseException:
        shutil.rmtree(top, ignore_errors=True)
        raise


@contextmanager
def _running(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.top, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster for the whole session, stopped and removed at its end."""
    started = time.monotonic()
    with _running(_server()) as server:
        yield server.cluster(started)


@pytest.fixture
def private_postgres() -> Iterator[Server]:
    """A cluster of the test's own, which it may stop and start (database C{postgres})."""
    with _running(_server(crashes=True)) as server:
        yield server


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
