"""
Which job store to open: C{--store sqlite:PATH} (one node) or C{--store
postgresql://user@host:port/db} (the database several nodes will share).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from twisted.internet.interfaces import IReactorFromThreads

from transcoder.core.jobs import IJobStore
from transcoder.core.postgres import redact_url

SQLITE = "sqlite:"
POSTGRES_SCHEMES = ("postgresql", "postgres")


class BadStoreURL(ValueError):
    """A C{--store} value that names no store this service can open."""


@dataclass(frozen=True)
class StoreURL:
    """
    A parsed C{--store} value.

    @ivar target: the file's path for SQLite; the whole URL for PostgreSQL.
    """

    kind: Literal["sqlite", "postgresql"]
    target: str

    def __str__(self) -> str:
        """For messages and logs: never the password."""
        return SQLITE + self.target if self.kind == "sqlite" else redact_url(self.target)


def parse_store_url(text: str) -> StoreURL:
    """
    C{sqlite:PATH} or C{postgresql://...} (C{postgres://} too, as libpq has it).

    @raise BadStoreURL: neither, a PostgreSQL URL libpq cannot parse, or one
        given without psycopg installed.
    """
    if text.startswith(SQLITE):
        path = text[len(SQLITE) :]
        if not path.strip():
            raise BadStoreURL(f"{text!r} names no file: try sqlite:./data/jobs.sqlite3")
        return StoreURL("sqlite", path)
    scheme = text.partition(":")[0].lower()
    if scheme not in POSTGRES_SCHEMES or not text[len(scheme) :].startswith("://"):
        raise BadStoreURL(
            f"{redact_url(text)!r} is neither sqlite:PATH nor postgresql://user@host:port/db"
        )
    parts = urlsplit(text)
    password = unquote(parts.password or "")

    def bad(why: str) -> BadStoreURL:
        if password:
            why = why.replace(password, "***")
        return BadStoreURL(f"{redact_url(text)!r}: {why}")

    # libpq's parser takes any port text and fails only when connecting.
    for host in parts.netloc.rpartition("@")[2].split(","):
        port = host.partition("]")[2] if host.startswith("[") else host
        port = port.rpartition(":")[2] if ":" in port else ""
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise bad(f"port {port!r} is not a number from 1 to 65535")
    try:
        import psycopg.conninfo
    except ImportError:
        raise bad("PostgreSQL needs psycopg: pip install 'transcoder[postgres]'") from None
    try:
        # libpq's own parser: what it refuses, a connection would refuse too.
        psycopg.conninfo.conninfo_to_dict(text)
    except psycopg.Error as e:
        raise bad(" ".join(str(e).split())) from None
    return StoreURL("postgresql", text)


def open_store(url: StoreURL, reactor: IReactorFromThreads) -> IJobStore:
    """
    Open (and for PostgreSQL, migrate) the store C{url} names.

    @raise transcoder.core.jobs.StoreUnavailable: its database cannot be used.
    """
    if url.kind == "sqlite":
        from transcoder.core.sqlite import SQLiteJobStore

        return SQLiteJobStore(Path(url.target), reactor)
    from transcoder.core.pgcluster import PostgresClusterStore

    return PostgresClusterStore(url.target, reactor)
