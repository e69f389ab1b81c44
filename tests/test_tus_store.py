"""The upload stores (memory, SQLite, PostgreSQL) and the one-node upload lock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from transcoder.core.sqliteuploads import SQLiteUploadStore
from transcoder.core.uploads import (
    InProcessUploadLocks,
    IUploadLock,
    IUploadLocks,
    IUploadStore,
    MemoryUploadStore,
    Upload,
    UploadLocked,
    is_upload_id,
    new_upload_id,
)
from transcoder.core.uploadsweep import UploadSweeper


def upload(uid: str | None = None, length: int | None = 100, expires: float = 50.0) -> Upload:
    return Upload(
        id=uid or new_upload_id(),
        owner="alice",
        length=length,
        offset=0,
        metadata={"profile": "mp4-h264", "filename": "a.flv", "empty": ""},
        created_at=1.0,
        expires_at=expires,
        filename="input-file.flv",
    )


T = TypeVar("T")


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IUploadStore]:
    s: IUploadStore
    if request.param == "memory":
        s = MemoryUploadStore()
    elif request.param == "sqlite":
        s = SQLiteUploadStore(tmp_path / "jobs.sqlite3", reactor)
    else:
        from transcoder.core.pguploads import PostgresUploadStore

        s = PostgresUploadStore(request.getfixturevalue("pg_dsn"), reactor)
    yield s
    if request.param != "memory":
        pytest_twisted.blockon(s.close())


def test_upload_ids_are_long_random_capabilities() -> None:
    """Upload ids carry 160 random bits (40 hex digits) and never repeat."""
    ids = {new_upload_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(is_upload_id(i) and len(i) == 40 for i in ids)
    assert not is_upload_id("../" + "a" * 37)


@pytest_twisted.ensureDeferred
async def test_store_provides_its_interface_and_keeps_records(store: IUploadStore) -> None:
    """Each store provides IUploadStore; create/get/set_length/update_offset/finish/terminate/expired behave alike."""
    verifyObject(IUploadStore, store)
    u = upload(length=None)
    await store.create(u)
    got = await store.get(u.id)
    assert got is not None and got.metadata == u.metadata and got.length is None
    await store.set_length(u.id, 10)
    await store.set_length(u.id, 20)  # fixed once
    assert await store.update_offset(u.id, 0, 7, 99.0) is True
    got = await store.get(u.id)
    assert got is not None and (got.length, got.offset, got.expires_at) == (10, 7, 99.0)
    assert await store.finish(u.id, "job1") == "job1"
    assert await store.finish(u.id, "job2") == "job1"
    got = await store.get(u.id)
    assert got is not None and got.job_id == "job1"
    # An input kept for POST /jobs is finished with "" first, then with its job.
    waiting = upload()
    await store.create(waiting)
    assert await store.finish(waiting.id, "") == ""
    assert await store.finish(waiting.id, "job3") == "job3"
    assert await store.finish(waiting.id, "") == "job3"
    await store.terminate(waiting.id)
    assert [x.id for x in await store.expired(100.0)] == [u.id]
    assert await store.expired(98.0) == []
    await store.terminate(u.id)
    assert await store.get(u.id) is None
    assert await store.get(new_upload_id()) is None


@pytest_twisted.ensureDeferred
async def test_update_offset_is_a_compare_and_set(store: IUploadStore) -> None:
    """update_offset writes only over the offset the writer expects: a stale writer (a node that lost its lock while another took the upload on) gets False and moves the offset neither back nor forward; the same write again is harmless; a removed upload gets False."""
    u = upload()
    await store.create(u)
    assert await store.update_offset(u.id, 0, 30, 60.0) is True
    # The writer that took over wrote 30; a stale one that started at 0 ends at 20, or 40.
    assert await store.update_offset(u.id, 0, 20, 61.0) is False
    assert await store.update_offset(u.id, 0, 40, 61.0) is False
    got = await store.get(u.id)
    assert got is not None and (got.offset, got.expires_at) == (30, 60.0)
    # A retried statement (its first try committed) finds its own write.
    assert await store.update_offset(u.id, 0, 30, 60.0) is True
    assert await store.update_offset(u.id, 30, 45, 62.0) is True
    got = await store.get(u.id)
    assert got is not None and (got.offset, got.expires_at) == (45, 62.0)
    await store.terminate(u.id)
    assert await store.update_offset(u.id, 45, 50, 63.0) is False
    assert await store.get(u.id) is None


@pytest_twisted.ensureDeferred
async def test_sqlite_store_keeps_uploads_across_restarts(tmp_path: Path) -> None:
    """A reopened SQLite store has the records, offsets and job ids written before it closed."""
    path = tmp_path / "jobs.sqlite3"
    s = SQLiteUploadStore(path, reactor)
    u = upload()
    await s.create(u)
    assert await s.update_offset(u.id, 0, 42, 77.0) is True
    assert await s.update_offset(u.id, 0, 10, 78.0) is False
    await s.close()
    s2 = SQLiteUploadStore(path, reactor)
    got = await s2.get(u.id)
    await s2.close()
    assert got is not None
    assert (got.offset, got.expires_at, got.length, got.owner) == (42, 77.0, 100, "alice")
    assert got.metadata["empty"] == "" and got.filename == "input-file.flv"


def fired(d: Deferred[T]) -> T:
    """The result of a Deferred that has fired already."""
    out: list[T] = []
    d.addCallback(out.append)
    assert out, "not fired"
    return out[0]


def test_lock_is_free_then_held_then_handed_over() -> None:
    """A second request asks the holder to stop and gets the upload once the holder lets go."""
    clock = Clock()
    locks = InProcessUploadLocks(clock, timeout=5)
    verifyObject(IUploadLocks, locks)
    stops: list[str] = []
    first = fired(locks.acquire("u", lambda: stops.append("first")))
    verifyObject(IUploadLock, first)
    assert locks.held("u")
    second = locks.acquire("u", lambda: stops.append("second"))
    assert stops == ["first"] and not second.called
    first.release()
    assert second.called
    got = fired(second)
    assert got.upload_id == "u"
    got.release()
    assert not locks.held("u")


def test_lock_times_out_when_the_holder_never_lets_go() -> None:
    """A holder that does not let go within the timeout makes the waiter fail with UploadLocked."""
    clock = Clock()
    locks = InProcessUploadLocks(clock, timeout=5)
    fired(locks.acquire("u", lambda: None))
    waiting = locks.acquire("u", lambda: None)
    failures: list[object] = []
    waiting.addErrback(lambda f: failures.append(f.trap(UploadLocked)))
    clock.advance(4.9)
    assert failures == []
    clock.advance(0.2)
    assert failures == [UploadLocked]


def test_lock_newest_waiter_wins() -> None:
    """Of two waiters, the older fails at once: only the newest request is the live client."""
    locks = InProcessUploadLocks(Clock(), timeout=5)
    held = fired(locks.acquire("u", lambda: None))
    older = locks.acquire("u", lambda: None)
    failed: list[object] = []
    older.addErrback(lambda f: failed.append(f.trap(UploadLocked)))
    newer = locks.acquire("u", lambda: None)
    assert failed == [UploadLocked]
    held.release()
    assert newer.called


def test_sweeper_removes_expired_uploads_and_orphan_files(tmp_path: Path) -> None:
    """The sweeper removes expired uploads' files and records (not those held), and directories no record owns."""
    clock = Clock()
    store = MemoryUploadStore()
    locks = InProcessUploadLocks(clock)
    tus = tmp_path / "tus"
    old, held, fresh, orphan = (new_upload_id() for _ in range(4))
    for uid, expires in ((old, 10.0), (held, 10.0), (fresh, 1000.0)):
        fired(store.create(upload(uid, expires=expires)))
        (tus / uid).mkdir(parents=True)
        (tus / uid / "input-file.flv").write_bytes(b"x")
    (tus / orphan).mkdir()
    lock = fired(locks.acquire(held, lambda: None))
    expired: list[str] = []
    sweeper = UploadSweeper(clock, store, locks, tus, expired.append, interval=60)
    clock.advance(5)
    sweeper.start()
    assert expired == [] and (tus / old).exists()
    assert not (tus / orphan).exists()
    clock.advance(60)
    assert expired == [old]
    assert not (tus / old).exists() and old not in store.uploads
    assert (tus / held).exists() and (tus / fresh).exists()
    lock.release()
    clock.advance(60)
    assert expired == [old, held]
    sweeper.stop()
    assert store.closed


def test_try_acquire_takes_a_free_upload_and_never_asks_a_holder_to_stop() -> None:
    """try_acquire (the sweeper's) gets a free upload at once and gives None for a held one, without calling the holder's stop."""
    locks = InProcessUploadLocks(Clock(), timeout=5)
    stops: list[str] = []
    held = fired(locks.acquire("u", lambda: stops.append("holder")))
    assert fired(locks.try_acquire("u")) is None and stops == []
    held.release()
    got = fired(locks.try_acquire("u"))
    assert got is not None and locks.held("u")
    got.release()
    assert not locks.held("u")


class _RenewedMeanwhile(MemoryUploadStore):
    """Lists an upload as expired, then (as another node's PATCH would) renews it."""

    def expired(self, now: float) -> Deferred[list[Upload]]:
        d = super().expired(now)
        for u in self.uploads.values():
            u.expires_at = now + 1000
        return d


def test_sweeper_leaves_an_upload_renewed_meanwhile_and_young_orphans(tmp_path: Path) -> None:
    """The sweeper reads an expired upload again under its lock and leaves it if its expiry moved; with an orphan grace, a directory without a record is left until it is that old."""
    clock = Clock()
    clock.advance(time.time())
    store = _RenewedMeanwhile()
    tus = tmp_path / "tus"
    renewed, orphan = new_upload_id(), new_upload_id()
    fired(store.create(upload(renewed, expires=10.0)))
    (tus / renewed).mkdir(parents=True)
    (tus / orphan).mkdir()
    expired: list[str] = []
    locks = InProcessUploadLocks(clock)
    sweeper = UploadSweeper(clock, store, locks, tus, expired.append, orphan_grace=600)
    fired(sweeper.sweep())
    assert expired == [] and renewed in store.uploads
    assert (tus / renewed).exists() and (tus / orphan).exists()
    assert not locks.held(renewed) and not locks.held(orphan)
    clock.advance(601)
    fired(sweeper.sweep())
    assert (tus / renewed).exists() and not (tus / orphan).exists()
