"""
The L{IJobStore} contract, held by every store: SQLite (core/sqlite.py) and
PostgreSQL (core/postgres.py, on the throwaway cluster of tests/pg.py).

Each test gets an C{opener}: it opens a store on the same database every time
it is called, so a test can close a store and reopen what it wrote.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyObject

from transcoder.core.jobs import (
    IJobStore,
    InputFile,
    Job,
    JobState,
    OutputFile,
    StoreClosed,
    new_job_id,
)
from transcoder.core.postgres import PostgresJobStore
from transcoder.core.sqlite import SQLiteJobStore

Store = SQLiteJobStore | PostgresJobStore


def make_job(seq: int, **kw: Any) -> Job:
    fields: dict[str, Any] = {
        "profile": "avi-mpeg4",
        "params": {"vbitrate": 1500, "abitrate": 128},
        "inputs": [InputFile("file", "holiday.mov", 1234, "ab" * 32, "input/file")],
        "created_at": 1_700_000_000.0 + seq,
    }
    return Job(id=new_job_id(), seq=seq, **(fields | kw))


class Opener:
    """Opens stores on one database and closes, at the end, those the test left open."""

    def __init__(self, open_one: Callable[[], Store]) -> None:
        self._open_one = open_one
        self.opened: list[Store] = []

    def __call__(self) -> Store:
        store = self._open_one()
        self.opened.append(store)
        return store


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    if request.param == "sqlite":
        path = tmp_path / "state" / "jobs.sqlite3"
        yield Opener(lambda: SQLiteJobStore(path, reactor))
    else:
        dsn: str = request.getfixturevalue("pg_dsn")
        yield Opener(lambda: PostgresJobStore(dsn, reactor))


@pytest_twisted.async_yield_fixture
async def store(opener: Opener) -> AsyncIterator[Store]:
    yield opener()
    for s in opener.opened:
        if not s._closed:
            await s.close()


@pytest_twisted.async_yield_fixture
async def opened(opener: Opener) -> AsyncIterator[Opener]:
    """The opener, with every store it opened closed after the test."""
    yield opener
    for s in opener.opened:
        if not s._closed:
            await s.close()


def test_provides_interface(store: Store) -> None:
    """Every store provides L{IJobStore}, with a path (or URL) that says where it lives."""
    assert verifyObject(IJobStore, store)
    assert str(store.path)


def test_empty_store_loads_nothing(store: Store) -> None:
    """A new store holds no job."""
    assert store.load() == []


@pytest_twisted.ensureDeferred
async def test_round_trip_after_reopen(opened: Opener) -> None:
    """Every field of a saved job comes back from a new store on the same database."""
    job = make_job(
        7,
        state=JobState.SUCCEEDED,
        progress=100.0,
        started_at=1_700_000_010.5,
        finished_at=1_700_000_020.25,
        output=OutputFile(99, "cd" * 32, "video/x-msvideo", "result.avi", duration=12.5),
        exit_code=0,
        log_tail="done\n",
        pid=4242,
        owner="alice",
        callback_url="http://example.invalid/hook",
        extra={"note": ["x", 1], "ratio": 0.1 + 0.2, "tiny": 5e-05, "nested": {"a": None}},
    )
    store = opened()
    await store.save(job)
    await store.close()

    reopened = opened()
    [loaded] = reopened.load()
    assert loaded == job
    assert type(loaded.extra["ratio"]) is float and loaded.extra["ratio"] == 0.1 + 0.2


@pytest_twisted.ensureDeferred
async def test_unicode_and_what_jsonb_refuses(opened: Opener) -> None:
    """Non-ASCII text, NUL characters, a lone surrogate (a filename decoded with surrogateescape) and a NaN parameter are all kept exactly."""
    weird = make_job(
        1,
        inputs=[InputFile("file", "vacances d'été 🎬 \udcff.mov", 1, "ab" * 32, "input/file")],
        log_tail="frame=1\x00\x01 ünïcödé\n",
        owner="bob\x00",
        error="fehler: “quoted” \u2028 line",
        params={"q": float("nan"), "name": "日本語"},
    )
    plain = make_job(2, log_tail="ação ✓")
    store = opened()
    await gatherResults([store.save(weird), store.save(plain)])
    await store.close()

    [w, p] = opened().load()
    assert p == plain
    assert w.inputs == weird.inputs
    assert w.log_tail == weird.log_tail
    assert w.owner == "bob\x00"
    assert w.error == weird.error
    assert w.params["name"] == "日本語"
    assert w.params["q"] != w.params["q"]  # NaN


@pytest_twisted.ensureDeferred
async def test_big_record(opened: Opener) -> None:
    """A job with a 4 MiB log tail and 10,000 extra entries is saved and loaded whole."""
    job = make_job(
        1, log_tail="x" * (4 << 20), extra={f"k{i}": [i, str(i), i / 3] for i in range(10_000)}
    )
    store = opened()
    await store.save(job)
    await store.close()
    assert opened().load() == [job]


@pytest_twisted.ensureDeferred
async def test_load_oldest_first(store: Store) -> None:
    """load() orders jobs by sequence number, whatever order they were saved in."""
    jobs = [make_job(seq) for seq in (5, 1, 9, 3)]
    await gatherResults([store.save(j) for j in jobs])
    assert [j.seq for j in store.load()] == [1, 3, 5, 9]


@pytest_twisted.ensureDeferred
async def test_writes_keep_call_order(store: Store) -> None:
    """Many saves of one job made without waiting land in order: the last one wins."""
    job = make_job(1)
    pending = []
    for i in range(200):
        job.progress = float(i)
        job.state = JobState.RUNNING if i < 199 else JobState.SUCCEEDED
        pending.append(store.save(job))
    await gatherResults(pending)
    [loaded] = store.load()
    assert loaded.progress == 199.0
    assert loaded.state is JobState.SUCCEEDED


@pytest_twisted.ensureDeferred
async def test_save_then_delete_in_call_order(store: Store) -> None:
    """A delete asked for after saves (not waited for) of the same job removes it: it does not overtake them."""
    job = make_job(1)
    pending = [store.save(job) for _ in range(20)]
    pending.append(store.delete(job.id))
    await gatherResults(pending)
    assert store.load() == []


@pytest_twisted.ensureDeferred
async def test_save_snapshots_the_job(store: Store) -> None:
    """A change made to a job after save() was called is not written by that save."""
    job = make_job(1, progress=10.0)
    d = store.save(job)
    job.progress = 90.0
    await d
    assert store.load()[0].progress == 10.0


@pytest_twisted.ensureDeferred
async def test_save_replaces(store: Store) -> None:
    """Saving a job again replaces its record, including the columns a query filters on."""
    job = make_job(1, owner="alice")
    await store.save(job)
    job.state = JobState.FAILED
    job.owner = "bob"
    job.error = "boom"
    await store.save(job)
    assert store.load() == [job]


@pytest_twisted.ensureDeferred
async def test_delete(store: Store) -> None:
    """A deleted job is no longer loaded; the others stay; deleting an unknown id is no error."""
    keep, drop = make_job(1), make_job(2)
    await gatherResults([store.save(keep), store.save(drop)])
    await store.delete(drop.id)
    await store.delete(new_job_id())
    assert store.load() == [keep]
    await store.save(drop)
    assert store.load() == [keep, drop]


@pytest_twisted.ensureDeferred
async def test_check_writes(store: Store) -> None:
    """check() succeeds on a healthy store, again and again, and leaves the jobs alone."""
    job = make_job(1)
    await store.save(job)
    for _ in range(3):
        await store.check()
    assert store.load() == [job]


@pytest_twisted.ensureDeferred
async def test_writes_off_the_reactor_thread(store: Store) -> None:
    """Writes run on another thread than the reactor's."""
    threads: list[threading.Thread] = []
    real = store._execute

    def spy(sql: str, params: tuple[Any, ...]) -> None:
        threads.append(threading.current_thread())
        real(sql, params)

    store._execute = spy  # type: ignore[method-assign]
    job = make_job(1)
    await store.save(job)
    await store.delete(job.id)
    await store.check()
    assert len(threads) == 3
    assert threading.main_thread() not in threads


@pytest_twisted.ensureDeferred
async def test_close_finishes_pending_writes(opened: Opener) -> None:
    """close() waits for the saves already asked for; every later use fails with StoreClosed."""
    store = opened()
    jobs = [make_job(i) for i in range(50)]
    for j in jobs:
        store.save(j)
    await store.close()
    with pytest.raises(StoreClosed):
        await store.save(jobs[0])
    with pytest.raises(StoreClosed):
        await store.delete(jobs[0].id)
    with pytest.raises(StoreClosed):
        await store.check()
    with pytest.raises(StoreClosed):
        await store.close()
    assert opened().load() == jobs
