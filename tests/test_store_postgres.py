"""
What only the PostgreSQL job store (L{transcoder.core.postgres}) does: its
schema, migrated once under an advisory lock; start-up errors that name the
database without its password; writes that survive a dropped connection.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
import pytest_twisted
from pg import Cluster
from twisted.internet import reactor

from transcoder.core.jobs import Job, JobState, StoreUnavailable, new_job_id
from transcoder.core.postgres import MIGRATIONS, SCHEMA_LOCK, PostgresJobStore, redact_url


def make_job(seq: int) -> Job:
    return Job(id=new_job_id(), profile="avi-mpeg4", params={}, inputs=[], seq=seq)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest_twisted.ensureDeferred
async def test_schema_ready_for_claims(pg_dsn: str) -> None:
    """The jobs table has the columns claims, leases and cancels use, the queue's order index, and schema_version records each version once."""
    store = PostgresJobStore(pg_dsn, reactor)
    try:
        assert store.migrated == list(range(1, len(MIGRATIONS) + 1))
        job = make_job(3)
        job.owner = "alice"
        await store.save(job)
        with psycopg.connect(pg_dsn) as conn:
            columns = dict(
                conn.execute(
                    "SELECT column_name, data_type FROM information_schema.columns"
                    " WHERE table_name = 'jobs'"
                ).fetchall()
            )
            assert columns == {
                "id": "text",
                "seq": "bigint",
                "priority": "integer",
                "state": "text",
                "owner": "text",
                "created_at": "timestamp with time zone",
                "node": "text",
                "attempt": "integer",
                "lease_expires_at": "timestamp with time zone",
                "cancel_requested": "boolean",
                "record": "jsonb",
            }
            row = conn.execute(
                "SELECT seq, state, owner, node, attempt, lease_expires_at, record->>'profile'"
                " FROM jobs"
            ).fetchone()
            assert row == (3, "queued", "alice", None, 0, None, "avi-mpeg4")
            indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes").fetchall()}
            assert {"jobs_queue", "jobs_order", "jobs_leases"} <= indexes
            versions = conn.execute("SELECT version FROM schema_version").fetchall()
            assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]
    finally:
        await store.close()
    again = PostgresJobStore(pg_dsn, reactor)
    assert again.migrated == []
    await again.close()


@pytest_twisted.ensureDeferred
async def test_two_stores_starting_together_migrate_once(pg_dsn: str) -> None:
    """Two stores opening at once on an empty database both wait for the schema lock; one of them migrates, the other finds the schema done, and both work."""
    stores: dict[int, PostgresJobStore] = {}
    errors: list[BaseException] = []

    def open_store(i: int) -> None:
        try:
            stores[i] = PostgresJobStore(pg_dsn, reactor)
        except BaseException as e:
            errors.append(e)

    with psycopg.connect(pg_dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
        threads = [threading.Thread(target=open_store, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            ).fetchone()
            if row == (2,):
                break
            time.sleep(0.02)
        else:
            pytest.fail("the two stores never waited for the schema lock")
        assert all(t.is_alive() for t in threads)
        assert holder.execute("SELECT to_regclass('jobs')").fetchone() == (None,)
        holder.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        for t in threads:
            t.join(30)
    assert not errors
    try:
        assert sorted(s.migrated for s in stores.values()) == [
            [],
            list(range(1, len(MIGRATIONS) + 1)),
        ]
        await stores[0].save(job := make_job(1))
        assert stores[1].load() == [job]
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT version FROM schema_version").fetchall() == [
                (v,) for v in range(1, len(MIGRATIONS) + 1)
            ]
    finally:
        for s in stores.values():
            await s.close()


def test_unreachable_database_is_named_without_its_password() -> None:
    """A database nobody listens for fails the store's start with StoreUnavailable, naming the URL but not its password."""
    url = f"postgresql://transcoder:s3cret-pw@127.0.0.1:{_closed_port()}/jobs"
    with pytest.raises(StoreUnavailable) as e:
        PostgresJobStore(url, reactor, connect_timeout=2)
    message = str(e.value)
    assert redact_url(url) in message
    assert "postgresql://transcoder@127.0.0.1:" in message
    assert "s3cret-pw" not in message


def test_missing_database_is_a_start_up_error(postgres_cluster: Cluster) -> None:
    """A database that does not exist on a live server fails the start, saying so."""
    with pytest.raises(StoreUnavailable, match="does not exist"):
        PostgresJobStore(postgres_cluster.dsn("no_such_db"), reactor)


def test_a_newer_schema_is_refused(pg_dsn: str) -> None:
    """A database migrated by a newer transcoder (a higher schema version) is refused, not written to."""
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, applied_at timestamptz)"
        )
        conn.execute("INSERT INTO schema_version VALUES (%s, now())", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreUnavailable, match=f"version {len(MIGRATIONS) + 1}"):
        PostgresJobStore(pg_dsn, reactor)


@pytest_twisted.ensureDeferred
async def test_a_write_survives_a_dropped_connection(pg_dsn: str) -> None:
    """When the server drops the store's connections (a restart, an idle timeout), the next save succeeds on a new one: writes are idempotent, so the failed one is made again."""
    store = PostgresJobStore(pg_dsn, reactor)
    try:
        job = make_job(1)
        await store.save(job)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        job.state = JobState.SUCCEEDED
        await store.save(job)
        assert store.load() == [job]
    finally:
        await store.close()


def test_redact_url() -> None:
    """Passwords leave URLs, in the user part and as a parameter; the rest stays."""
    assert redact_url("postgresql://u:p@h:5432/db") == "postgresql://u@h:5432/db"
    assert redact_url("postgresql://u@h/db?sslmode=require&password=x") == (
        "postgresql://u@h/db?sslmode=require"
    )
    assert redact_url("postgresql://h1:1,h2:2/db") == "postgresql://h1:1,h2:2/db"
