"""
A long-poll (C{GET /jobs/<id>?wait=}) whose job goes while it waits: on a node
of several, the job may finish and be removed by another node's retention
before this node hears of either, so the waiting request learns of the removal
alone.  It answers what a new request would: 410 C{expired} when retention
removed the job, 404 when it was deleted.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from test_cluster_behaviour import COPY
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater

from transcoder.core.cluster import ClusterRegistry
from transcoder.core.jobs import InputFile, Job, JobState, new_job_id
from transcoder.core.pgcluster import PostgresClusterStore
from transcoder.core.tombstones import Tombstones
from transcoder.http.resources import build_root
from transcoder.http.site import TranscoderSite
from transcoder.testing import FakeExecutor


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        await deferLater(reactor, 0.02, lambda: None)


@pytest_twisted.async_yield_fixture
async def ingest(tmp_path: Path, pg_dsn: str) -> AsyncIterator[tuple[str, ClusterRegistry]]:
    """Node "a" of a cluster, with no workers (its jobs stay queued), served on loopback."""
    store = PostgresClusterStore(pg_dsn, reactor)
    registry = ClusterRegistry(
        reactor, store, tmp_path, {"copy": COPY}, workers=0, executor=FakeExecutor(),
        node="a", lease=2.0, max_attempts=3,
    )  # fmt: skip
    registry.register(0)
    registry.start()
    root = build_root(
        reactor, registry, {"copy": COPY}, tmp_path, 1 << 20,
        tombstones=Tombstones(tmp_path / "expired"),
    )  # fmt: skip
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        TranscoderSite(root, reactor=reactor, idle_timeout=10)
    )
    try:
        yield f"http://127.0.0.1:{port.getHost().port}", registry
    finally:
        await port.stopListening()
        await registry.stop()


@pytest.mark.parametrize("how", ["retention", "delete"])
@pytest_twisted.ensureDeferred
async def test_a_long_poll_on_a_job_removed_meanwhile_says_why(
    ingest: tuple[str, ClusterRegistry], tmp_path: Path, pg_dsn: str, how: str
) -> None:
    """A long-poll waiting on a queued job that another node removes (its row deleted by SQL, as that node's sweep or DELETE does) answers 410 expired, the message naming --keep-results, when the other node's retention left a tombstone first, and 404 not_found when it was a plain delete: not 404 for both."""
    import psycopg

    url, registry = ingest
    job = Job(new_job_id(), "copy", {}, [InputFile("file", "in.avi", 1, "00" * 32, "in.avi")])
    registry.job_dir(job.id).mkdir(parents=True)
    await registry.add(job)
    polled = treq.get(f"{url}/jobs/{job.id}?wait=30")
    # The request waits on the job's next change.
    await _until(lambda: job.id in registry._events.waiters)
    if how == "retention":
        # The other node's sweep: the tombstone first, in the shared data dir, then the row.
        gone = Job.from_record(job.to_record())
        gone.state, gone.finished_at = JobState.SUCCEEDED, time.time() - 2
        Tombstones(tmp_path / "expired").bury(gone, time.time(), 1.0)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM jobs WHERE id = %s", (job.id,))
    response = await polled
    body = json.loads(await response.content())
    if how == "retention":
        assert response.code == 410, body
        assert body["error"]["code"] == "expired"
        assert "--keep-results" in body["error"]["message"]
    else:
        assert (response.code, body["error"]["code"]) == (404, "not_found")
