"""
The PostgreSQL store's cluster side (L{transcoder.core.pgcluster}) on a real
database, with two store objects standing for two nodes: claims, leases,
fenced writes, cancels, the node table and the change feed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from transcoder.core.jobs import Job, JobChange, JobState, LostJob, NodeNameTaken, new_job_id
from transcoder.core.pgcluster import PostgresClusterStore


def make_job() -> Job:
    return Job(id=new_job_id(), profile="mux-avi", params={}, inputs=[], created_at=1.0)


@pytest_twisted.async_yield_fixture
async def two(pg_dsn: str) -> AsyncIterator[tuple[PostgresClusterStore, PostgresClusterStore]]:
    a = PostgresClusterStore(pg_dsn, reactor)
    b = PostgresClusterStore(pg_dsn, reactor)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


def expire(dsn: str, job_id: str) -> None:
    # As if the lease's holder had stopped renewing it long ago.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE jobs SET lease_expires_at = now() - interval '1 hour' WHERE id = %s",
            (job_id,),
        )


@pytest_twisted.ensureDeferred
async def test_each_job_is_claimed_once_in_fifo_order(
    two: tuple[PostgresClusterStore, PostgresClusterStore],
) -> None:
    """Twenty jobs inserted through either node get increasing seqs; two nodes claiming at the same time take each exactly once (attempt 1), and each node's claims come in FIFO order."""
    a, b = two
    ids = []
    for i in range(20):
        job = make_job()
        seq = await (a if i % 2 else b).insert(job)
        assert seq == job.seq
        ids.append(job.id)
    claimed: dict[str, list[Job]] = {"a": [], "b": []}

    async def drain(name: str, store: PostgresClusterStore) -> None:
        while (job := await store.claim(name, 30)) is not None:
            claimed[name].append(job)

    await DeferredList(
        [Deferred.fromCoroutine(drain("a", a)), Deferred.fromCoroutine(drain("b", b))],
        fireOnOneErrback=True,
    )
    every = claimed["a"] + claimed["b"]
    assert sorted(j.id for j in every) == sorted(ids)
    assert all(j.attempt == 1 and j.state is JobState.RUNNING for j in every)
    for name, jobs in claimed.items():
        assert all(j.node == name for j in jobs)
        assert [j.seq for j in jobs] == sorted(j.seq for j in jobs)
    assert [j.id for j in sorted(every, key=lambda j: j.seq)] == ids


@pytest_twisted.ensureDeferred
async def test_an_expired_lease_is_requeued_and_the_stale_node_is_fenced(
    pg_dsn: str, two: tuple[PostgresClusterStore, PostgresClusterStore]
) -> None:
    """A job whose lease expired goes back to the queue; the next claim is attempt 2; the first node's writes and renewals change nothing (LostJob), while the new holder's go through."""
    a, b = two
    job = make_job()
    await a.insert(job)
    first = await a.claim("a", 30)
    assert first is not None and first.attempt == 1
    assert await a.renew("a", {job.id: 1}, 30) == {job.id: False}
    expire(pg_dsn, job.id)
    assert await b.requeue_expired(3) == [job.id]
    stored = await b.get(job.id)
    assert stored is not None
    assert (stored[0].state, stored[0].node, stored[0].attempt) == (JobState.QUEUED, None, 1)
    second = await b.claim("b", 30)
    assert second is not None and (second.id, second.attempt, second.node) == (job.id, 2, "b")

    first.progress = 50.0
    with pytest.raises(LostJob):
        await a.save(first)
    assert await a.renew("a", {job.id: 1}, 30) == {}
    second.state = JobState.SUCCEEDED
    await b.save(second)
    stored = await a.get(job.id)
    assert stored is not None
    assert (stored[0].state, stored[0].node, stored[0].attempt) == (JobState.SUCCEEDED, "b", 2)
    assert stored[0].progress == 0.0


@pytest_twisted.ensureDeferred
async def test_a_job_fails_once_its_attempts_are_used_up(
    pg_dsn: str, two: tuple[PostgresClusterStore, PostgresClusterStore]
) -> None:
    """With at most two attempts, a job whose lease expired twice fails with a reason that says so, and is not claimed again."""
    a, b = two
    job = make_job()
    await a.insert(job)
    for attempt in (1, 2):
        claimed = await a.claim("a", 30)
        assert claimed is not None and claimed.attempt == attempt
        expire(pg_dsn, job.id)
        assert await b.requeue_expired(2) == [job.id]
    stored = await b.get(job.id)
    assert stored is not None
    assert stored[0].state is JobState.FAILED
    assert stored[0].error is not None and "2 attempts" in stored[0].error
    assert await a.claim("a", 30) is None


@pytest_twisted.ensureDeferred
async def test_cancel_of_a_queued_and_of_a_running_job(
    two: tuple[PostgresClusterStore, PostgresClusterStore],
) -> None:
    """A queued job is cancelled at once; for a running one the cancel is asked for, the holder's next renewal says so, and a later expiry ends it as cancelled, not queued."""
    a, b = two
    queued, running = make_job(), make_job()
    await a.insert(running)
    await a.insert(queued)
    assert (await a.claim("a", 30)) is not None
    assert await b.cancel(queued.id, 5.0) == "cancelled"
    assert await b.cancel(running.id, 5.0) == "requested"
    assert await a.renew("a", {running.id: 1}, 30) == {running.id: True}
    assert await b.cancel(new_job_id(), 5.0) == "missing"
    stored = await b.get(queued.id)
    assert stored is not None and stored[0].state is JobState.CANCELLED
    assert await a.claim("a", 30) is None


@pytest_twisted.ensureDeferred
async def test_a_live_node_name_is_refused(
    two: tuple[PostgresClusterStore, PostgresClusterStore],
) -> None:
    """A second node under a live node's name is refused; once the first unregisters, the name is free, and the live nodes are listed with their workers and running jobs."""
    a, b = two
    await a.register_node("n1", 2, 30)
    with pytest.raises(NodeNameTaken, match="n1"):
        await b.register_node("n1", 1, 30)
    job = make_job()
    await a.insert(job)
    await a.claim("n1", 30)
    [node] = await b.nodes(30)
    assert (node["name"], node["workers"], node["running"]) == ("n1", 2, 1)
    await a.unregister_node("n1")
    await b.register_node("n1", 1, 30)


class Heard:
    """What a listener was told, with a way to wait until it was told enough."""

    def __init__(self) -> None:
        self.changes: list[JobChange | None] = []
        self._waiting: list[tuple[int, Deferred[None]]] = []

    def __call__(self, change: JobChange | None) -> None:
        self.changes.append(change)
        for n, d in list(self._waiting):
            if len(self.changes) >= n:
                self._waiting.remove((n, d))
                d.callback(None)

    def at_least(self, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.changes) >= n:
            d.callback(None)
        else:
            self._waiting.append((n, d))
        return d


@pytest_twisted.ensureDeferred
async def test_changes_are_fed_to_listeners(
    two: tuple[PostgresClusterStore, PostgresClusterStore],
) -> None:
    """A listener hears None once connected (re-read everything), then each job inserted or changed on another node, in commit order and with the row as it was committed (state, node, attempt, cancel); a lease renewal alone says nothing."""
    a, b = two
    heard = Heard()
    stop = a.listen(heard)
    try:
        await heard.at_least(1)
        job = make_job()
        await b.insert(job)
        claimed = await b.claim("b", 30)
        assert claimed is not None
        await b.renew("b", {job.id: 1}, 30)
        claimed.state = JobState.SUCCEEDED
        await b.save(claimed)
        await heard.at_least(4)
        assert heard.changes[0] is None
        changes = [c for c in heard.changes[1:] if c is not None]
        assert [c.job_id for c in changes] == [job.id] * 3
        assert all(c.carried and c.found is not None for c in changes)
        rows = [c.found for c in changes if c.found is not None]
        assert [(j.state, j.node, j.attempt, cancel) for j, cancel in rows] == [
            (JobState.QUEUED, None, 0, False),
            (JobState.RUNNING, "b", 1, False),
            (JobState.SUCCEEDED, "b", 1, False),
        ]
        assert rows[2][0].to_record() == (await b.get(job.id) or (make_job(), False))[0].to_record()
    finally:
        stop()


@pytest_twisted.ensureDeferred
async def test_a_row_too_big_for_a_notification_sends_its_id(
    two: tuple[PostgresClusterStore, PostgresClusterStore],
) -> None:
    """A job whose row would not fit in NOTIFY's 8000 bytes (a long error) is announced by id alone, to be read; its deletion is announced as carried with no row."""
    a, b = two
    heard = Heard()
    stop = a.listen(heard)
    try:
        await heard.at_least(1)
        job = make_job()
        job.error = "x" * 9000
        await b.insert(job)
        await heard.at_least(2)
        big = heard.changes[1]
        assert big is not None
        assert (big.job_id, big.carried, big.found) == (job.id, False, None)
        await b.delete(job.id)
        await heard.at_least(3)
        gone = heard.changes[2]
        assert gone is not None
        assert (gone.job_id, gone.carried, gone.found) == (job.id, True, None)
    finally:
        stop()
