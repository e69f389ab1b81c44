"""
What only the SQLite job store (L{transcoder.core.sqlite}) does; the
L{IJobStore} contract it shares with the PostgreSQL store is checked in
test_store_contract.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from transcoder.core.sqlite import SQLiteJobStore, StoreClosed


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest_twisted.async_yield_fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteJobStore]:
    s = SQLiteJobStore(db_path, reactor)
    yield s
    if not s._closed:
        await s.close()


def test_path_and_directory(store: SQLiteJobStore, db_path: Path) -> None:
    """The store's path is its file, whose missing directories it made."""
    assert store.path == db_path
    assert db_path.is_file()


def test_wal_mode(store: SQLiteJobStore, db_path: Path) -> None:
    """The database is in WAL mode, so readers never block the writer."""
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_store_closed_is_still_importable_from_here() -> None:
    """StoreClosed, now shared by every store in core/jobs.py, is still the one core/sqlite.py names."""
    from transcoder.core.jobs import StoreClosed as Shared

    assert StoreClosed is Shared
