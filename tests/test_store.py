"""Tests for L{transcoder.core.sqlite}: the SQLite job store."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from transcoder.core.jobs import IJobStore, InputFile, Job, JobState, OutputFile, new_job_id
from transcoder.core.sqlite import SQLiteJobStore, StoreClosed


def make_job(seq: int, **kw: Any) -> Job:
    return Job(
        id=new_job_id(),
        profile="avi-mpeg4",
        params={"vbitrate": 1500, "abitrate": 128},
        inputs=[InputFile("file", "holiday.mov", 1234, "ab" * 32, "input/file")],
        seq=seq,
        created_at=1_700_000_000.0 + seq,
        **kw,
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest_twisted.async_yield_fixture
async def store(db_path: Path) -> AsyncIterator[SQLiteJobStore]:
    s = SQLiteJobStore(db_path, reactor)
    yield s
    if not s._closed:
        await s.close()


def test_provides_interface(store: SQLiteJobStore, db_path: Path) -> None:
    """The store provides L{IJobStore} and says where it lives."""
    assert verifyObject(IJobStore, store)
    assert store.path == db_path


def test_wal_mode(store: SQLiteJobStore, db_path: Path) -> None:
    """The database is in WAL mode, so readers never block the writer."""
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


@pytest_twisted.ensureDeferred
async def test_round_trip_after_reopen(db_path: Path) -> None:
    """Every field of a saved job comes back from a new store on the same file."""
    job = make_job(
        7,
        state=JobState.SUCCEEDED,
        progress=100.0,
        started_at=1_700_000_010.5,
        finished_at=1_700_000_020.25,
        output=OutputFile(99, "cd" * 32, "video/x-msvideo", "result.avi", duration=12.5),
        exit_code=0,
        log_tail="done\n",
        owner="alice",
        callback_url="http://example.invalid/hook",
        extra={"note": ["x", 1]},
    )
    store = SQLiteJobStore(db_path, reactor)
    await store.save(job)
    await store.close()

    reopened = SQLiteJobStore(db_path, reactor)
    try:
        assert reopened.load() == [job]
    finally:
        await reopened.close()


@pytest_twisted.ensureDeferred
async def test_load_oldest_first(store: SQLiteJobStore) -> None:
    """load() orders jobs by sequence number, whatever order they were saved in."""
    jobs = [make_job(seq) for seq in (5, 1, 9, 3)]
    await gatherResults([store.save(j) for j in jobs])
    assert [j.seq for j in store.load()] == [1, 3, 5, 9]


@pytest_twisted.ensureDeferred
async def test_writes_keep_call_order(store: SQLiteJobStore) -> None:
    """Many saves of one job made without waiting land in order: the last one wins."""
    job = make_job(1)
    pending = []
    for i in range(200):
        job.progress = float(i)
        pending.append(store.save(job))
    await gatherResults(pending)
    [loaded] = store.load()
    assert loaded.progress == 199.0


@pytest_twisted.ensureDeferred
async def test_save_snapshots_the_job(store: SQLiteJobStore) -> None:
    """A change made to a job after save() was called is not written by that save."""
    job = make_job(1, progress=10.0)
    d = store.save(job)
    job.progress = 90.0
    await d
    assert store.load()[0].progress == 10.0


@pytest_twisted.ensureDeferred
async def test_delete(store: SQLiteJobStore) -> None:
    """A deleted job is no longer loaded; the others stay."""
    keep, drop = make_job(1), make_job(2)
    await gatherResults([store.save(keep), store.save(drop)])
    await store.delete(drop.id)
    assert store.load() == [keep]


@pytest_twisted.ensureDeferred
async def test_writes_off_the_reactor_thread(store: SQLiteJobStore) -> None:
    """SQLite writes run on another thread than the reactor's."""
    threads: list[threading.Thread] = []
    real = store._execute

    def spy(sql: str, params: tuple[Any, ...]) -> None:
        threads.append(threading.current_thread())
        real(sql, params)

    store._execute = spy  # type: ignore[method-assign]
    job = make_job(1)
    await store.save(job)
    await store.delete(job.id)
    assert len(threads) == 2
    assert threading.main_thread() not in threads


@pytest_twisted.ensureDeferred
async def test_close_finishes_pending_writes(db_path: Path) -> None:
    """close() waits for the saves already asked for; later use fails."""
    store = SQLiteJobStore(db_path, reactor)
    jobs = [make_job(i) for i in range(50)]
    for j in jobs:
        store.save(j)
    await store.close()
    with pytest.raises(StoreClosed):
        await store.save(jobs[0])
    with pytest.raises(StoreClosed):
        await store.close()
    reopened = SQLiteJobStore(db_path, reactor)
    try:
        assert reopened.load() == jobs
    finally:
        await reopened.close()
