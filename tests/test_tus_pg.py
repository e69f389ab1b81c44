"""
The upload store and lock for several nodes, against a real PostgreSQL
(tests/pg.py): two stores or two lock sets on one database stand for two
nodes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import DeferredList, gatherResults
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from transcoder.core.pguploadlocks import PostgresUploadLocks, lock_key
from transcoder.core.pguploads import PostgresUploadStore
from transcoder.core.uploads import (
    IUploadLock,
    IUploadLocks,
    IUploadStore,
    Upload,
    UploadLocked,
    new_upload_id,
)
from transcoder.core.uploadsweep import UploadSweeper


def upload(expires: float = 50.0) -> Upload:
    return Upload(
        id=new_upload_id(),
        owner="alice",
        length=100,
        offset=0,
        metadata={"profile": "mp4-h264", "odd": "nul\0 and \udcff"},
        created_at=1.0,
        expires_at=expires,
        filename="input-file.flv",
    )


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


async def until(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        await sleep(0.05)
    return True


@pytest_twisted.async_yield_fixture
async def nodes(pg_dsn: str) -> AsyncIterator[tuple[PostgresUploadLocks, PostgresUploadLocks]]:
    """Two nodes' locks on one database, listening, with a 2 s timeout."""
    a = PostgresUploadLocks(pg_dsn, reactor, timeout=2.0)
    b = PostgresUploadLocks(pg_dsn, reactor, timeout=2.0)
    a.start()
    b.start()
    yield a, b
    await a.close()
    await b.close()


# The advisory locks held in the test's database.
ADVISORY = (
    "FROM pg_locks WHERE locktype = 'advisory'"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


def _sql(dsn: str, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


@pytest_twisted.ensureDeferred
async def test_another_node_sees_every_change(pg_dsn: str) -> None:
    """A record written through one node's store is read as it now is through another's (no copy kept), odd metadata included."""
    a = PostgresUploadStore(pg_dsn, reactor)
    b = PostgresUploadStore(pg_dsn, reactor)
    try:
        verifyObject(IUploadStore, a)
        u = upload()
        await a.create(u)
        got = await b.get(u.id)
        assert got is not None and got.metadata == u.metadata and got.offset == 0
        assert await b.update_offset(u.id, 0, 60, 123.5)
        got = await a.get(u.id)
        assert got is not None and (got.offset, got.expires_at) == (60, 123.5)
        assert await b.finish(u.id, "job-b") == "job-b"
        assert await a.finish(u.id, "job-a") == "job-b"
        await a.terminate(u.id)
        assert await b.get(u.id) is None
    finally:
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_two_nodes_finishing_at_once_agree_on_one_job(pg_dsn: str) -> None:
    """Two nodes finishing one upload at the same moment (both waiting on its row) record one job id, and both are told that one."""
    import psycopg

    a = PostgresUploadStore(pg_dsn, reactor)
    b = PostgresUploadStore(pg_dsn, reactor)
    u = upload()
    await a.create(u)
    blocker = await threads.deferToThread(psycopg.connect, pg_dsn)
    try:
        # Hold the row, so that both finishes are under way before either runs.
        await threads.deferToThread(
            blocker.execute, "SELECT 1 FROM uploads WHERE id = %s FOR UPDATE", (u.id,)
        )
        first, second = a.finish(u.id, "job-a"), b.finish(u.id, "job-b")

        def waiting() -> int:
            rows = _sql(
                pg_dsn,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%%FOR UPDATE%%' AND datname = current_database()",
            )
            return int(rows[0][0])  # type: ignore[call-overload]

        deadline = time.monotonic() + 10
        while await threads.deferToThread(waiting) < 2:
            assert time.monotonic() < deadline, "the finishes never waited on the row"
            await sleep(0.05)
        await threads.deferToThread(blocker.commit)
        results = await gatherResults([first, second])
        assert results[0] == results[1] and results[0] in ("job-a", "job-b")
        got = await b.get(u.id)
        assert got is not None and got.job_id == results[0]
    finally:
        blocker.close()
        await a.close()
        await b.close()


@pytest_twisted.ensureDeferred
async def test_another_nodes_request_asks_the_holder_to_stop_and_takes_over(
    nodes: tuple[PostgresUploadLocks, PostgresUploadLocks],
) -> None:
    """A request on node B for an upload node A holds reaches A's holder (NOTIFY), which lets go; B then has it, and A cannot take it meanwhile."""
    a, b = nodes
    verifyObject(IUploadLocks, a)
    uid = new_upload_id()
    box: list[IUploadLock] = []
    stops: list[str] = []

    def stop() -> None:
        stops.append("a")
        box[0].release()

    box.append(await a.acquire(uid, stop))
    verifyObject(IUploadLock, box[0])
    assert a.held(uid) and not b.held(uid)
    got = await b.acquire(uid, lambda: None)
    assert stops == ["a"] and got.upload_id == uid and b.held(uid) and not a.held(uid)
    assert await a.try_acquire(uid) is None
    got.release()
    # B lets go of the advisory lock on its lock thread, soon after.
    again = None
    for _ in range(100):
        again = await a.try_acquire(uid)
        if again is not None:
            break
        await sleep(0.05)
    assert again is not None
    again.release()


@pytest_twisted.ensureDeferred
async def test_a_holder_that_never_lets_go_makes_the_other_node_wait_then_fail(
    nodes: tuple[PostgresUploadLocks, PostgresUploadLocks],
) -> None:
    """A holder that ignores the request to stop keeps the upload: the other node's request fails with UploadLocked after the timeout (2 s here), having asked more than once."""
    a, b = nodes
    uid = new_upload_id()
    asked: list[float] = []
    held = await a.acquire(uid, lambda: asked.append(time.monotonic()))
    started = time.monotonic()
    with pytest.raises(UploadLocked):
        await b.acquire(uid, lambda: None)
    assert time.monotonic() - started >= 1.9
    assert len(asked) >= 2
    held.release()
    got = await b.acquire(uid, lambda: None)
    got.release()


@pytest_twisted.ensureDeferred
async def test_requests_of_one_node_queue_without_releasing_the_advisory_lock(
    nodes: tuple[PostgresUploadLocks, PostgresUploadLocks], pg_dsn: str
) -> None:
    """Two requests on one node hand the upload over in-process (the first asked to stop), and the other node cannot slip in between."""
    a, b = nodes
    uid = new_upload_id()
    stops: list[str] = []
    first = await a.acquire(uid, lambda: stops.append("first"))
    second_d = a.acquire(uid, lambda: None)
    assert await until(lambda: stops == ["first"])
    first.release()
    second = await second_d
    assert await b.try_acquire(uid) is None
    assert _sql(pg_dsn, f"SELECT count(*) {ADVISORY}") == [(1,)]
    second.release()
    assert await until(lambda: not _sql(pg_dsn, f"SELECT 1 {ADVISORY}"))


@pytest_twisted.ensureDeferred
async def test_a_dead_sessions_locks_are_free_and_its_holders_are_stopped(
    nodes: tuple[PostgresUploadLocks, PostgresUploadLocks], pg_dsn: str
) -> None:
    """When a node's lock session ends (its process died, or the connection was cut), another node takes the upload at once; the node itself notices within a few seconds and stops its holder."""
    a, b = nodes
    uid = new_upload_id()
    stops: list[str] = []
    held = await a.acquire(uid, lambda: stops.append("a"))
    # The only advisory lock in this database: A's, on its lock session.
    assert len(_sql(pg_dsn, f"SELECT pid {ADVISORY}")) == 1
    _sql(pg_dsn, f"SELECT pg_terminate_backend(pid) {ADVISORY}")
    got = await b.acquire(uid, lambda: None)
    assert got.upload_id == uid
    assert await until(lambda: stops == ["a"], timeout=15)
    held.release()
    got.release()
    # A's next request makes a new session and holds the upload again.
    again = await a.acquire(uid, lambda: None)
    again.release()


@pytest_twisted.ensureDeferred
async def test_sweepers_of_two_nodes_remove_each_upload_once(tmp_path: Path, pg_dsn: str) -> None:
    """Two nodes' sweepers over one database and directory at once: each expired upload is removed once (one node counts it), held or renewed ones stay."""
    stores = [PostgresUploadStore(pg_dsn, reactor) for _ in range(2)]
    locks = [PostgresUploadLocks(pg_dsn, reactor) for _ in range(2)]
    tus = tmp_path / "tus"
    expired: list[str] = []
    old = [upload(expires=10.0) for _ in range(5)]
    held = upload(expires=10.0)
    for u in [*old, held]:
        await stores[0].create(u)
        (tus / u.id).mkdir(parents=True)
        (tus / u.id / u.filename).write_bytes(b"x")
    lock = await locks[1].acquire(held.id, lambda: None)
    sweepers = [UploadSweeper(reactor, s, lk, tus, expired.append, interval=3600)
                for s, lk in zip(stores, locks, strict=True)]  # fmt: skip
    try:
        await DeferredList([s.sweep() for s in sweepers])
        assert sorted(expired) == sorted(u.id for u in old)
        assert [p.name for p in tus.iterdir()] == [held.id]
        assert await stores[1].get(held.id) is not None
    finally:
        lock.release()
        for s in sweepers:
            await s.stop()


def test_lock_keys_are_signed_64_bit_values_of_the_id() -> None:
    """An upload's advisory key is its id's first 64 bits as a signed bigint (what PostgreSQL takes)."""
    assert lock_key("f" * 40) == -1
    assert lock_key("7" + "f" * 39) == (1 << 63) - 1
    assert lock_key("0" * 16 + "f" * 24) == 0
