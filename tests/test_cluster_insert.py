"""
What an upload costs the shared PostgreSQL store (issue 16's target: at most
15 statements per job from upload to succeeded, measured by
bench/cluster_bench.py): the insert is one statement, and the record it
stores carries the seq drawn for the row, as every other node reads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import pytest_twisted
from twisted.internet import reactor

from transcoder.core.jobs import InputFile, Job, new_job_id
from transcoder.core.pgcluster import PostgresClusterStore


@pytest_twisted.async_yield_fixture
async def store(pg_dsn: str) -> AsyncIterator[PostgresClusterStore]:
    s = PostgresClusterStore(pg_dsn, reactor)
    try:
        yield s
    finally:
        await s.close()


class _Counting:
    """A pool whose connections count what is sent through them, BEGIN and COMMIT included."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.sent: list[str] = []

    @contextmanager
    def connection(self) -> Iterator[Any]:
        with self.pool.connection() as conn:
            sent = self.sent

            class Conn:
                def execute(self, query: str, *args: Any) -> Any:
                    sent.append(" ".join(query.split())[:40])
                    return conn.execute(query, *args)

                @contextmanager
                def transaction(self) -> Iterator[None]:
                    sent.append("BEGIN")
                    with conn.transaction():
                        yield
                    sent.append("COMMIT")

            yield Conn()


def _stored(dsn: str, job_id: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT seq, (record->>'seq')::bigint FROM jobs WHERE id = %s", (job_id,)
        )
        found = row.fetchone()
    assert found is not None
    return int(found[0]), int(found[1])


@pytest_twisted.ensureDeferred
async def test_an_upload_is_one_statement(store: PostgresClusterStore, pg_dsn: str) -> None:
    """Inserting a job sends one statement (no nextval, BEGIN or COMMIT of its own); the seq it returns is the row's and the stored record's, and grows from job to job."""
    counting = _Counting(store._pool)
    store._pool = counting  # type: ignore[assignment]
    seqs = []
    try:
        for _ in range(3):
            job = Job(id=new_job_id(), profile="mux-avi", params={}, inputs=[], created_at=1.0)
            counting.sent.clear()
            seq = await store.insert(job)
            assert len(counting.sent) == 1, counting.sent
            assert seq == job.seq
            assert _stored(pg_dsn, job.id) == (seq, seq)
            seqs.append(seq)
    finally:
        store._pool = counting.pool
    assert seqs == sorted(seqs) and len(set(seqs)) == 3


@pytest.mark.parametrize("filename", ["nul\x00.mp4", "surrogate\udcff.mp4"])
@pytest_twisted.ensureDeferred
async def test_a_record_jsonb_cannot_hold_keeps_its_seq(
    store: PostgresClusterStore, pg_dsn: str, filename: str
) -> None:
    """A job whose record jsonb cannot hold as it is (a NUL or a lone surrogate in a filename: stored as a JSON string) is still inserted with the seq drawn for it, which another node reads back with the exact filename."""
    job = Job(
        id=new_job_id(),
        profile="mux-avi",
        params={},
        inputs=[InputFile(name="video", filename=filename, size=1, sha256="0" * 64, path="v")],
        created_at=1.0,
    )
    seq = await store.insert(job)
    other = PostgresClusterStore(pg_dsn, reactor)
    try:
        found = await other.get(job.id)
    finally:
        await other.close()
    assert found is not None
    assert found[0].seq == seq and found[0].inputs[0].filename == filename
