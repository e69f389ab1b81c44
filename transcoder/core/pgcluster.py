"""
The PostgreSQL store for several nodes: claims, leases, fenced writes, nodes
and a feed of changes (L{IClusterStore}).

A queued job is claimed with C{SELECT ... FOR UPDATE SKIP LOCKED}, so two
nodes never take the same row and neither waits for the other.  The claim
records the node, the attempt and a lease, which the node renews; a job whose
lease expired is put back in the queue by whichever node notices, and fails
once it has used up its attempts (a job that kills its node every time must
not loop forever).  Every write a node makes about a job it runs is
conditioned on its node and attempt: a node that wakes from a long pause
changes nothing and learns that it lost the job (L{LostJob}).

Writes for one job keep the writer thread of L{PostgresJobStore}; claims,
renewals and node bookkeeping run on a second thread, reads for the
registry's copy of the table on a third (in the order asked, so a later read
is never applied before an earlier one), and LISTEN on a dedicated thread.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from transcoder.core.jobs import (
    IClusterStore,
    IJobStore,
    Job,
    JobChange,
    JobState,
    LostJob,
    NodeNameTaken,
    StoreClosed,
)
from transcoder.core.pglisten import Listener
from transcoder.core.postgres import (
    PostgresJobStore,
    column_text,
    parse_record,
    record_json,
    unwrap_record,
)

_log = Logger()
_P = ParamSpec("_P")
_T = TypeVar("_T")

CHANNEL = "transcoder_jobs"

_COLUMNS = "record::text, node, attempt, cancel_requested"

_FENCED_SAVE = """
UPDATE jobs SET state = %(state)s, owner = %(owner)s, record = %(record)s::jsonb,
    node = CASE WHEN %(state)s = 'queued' THEN NULL ELSE node END,
    lease_expires_at = CASE WHEN %(state)s = 'running' THEN lease_expires_at END
WHERE id = %(id)s AND node = %(node)s AND attempt = %(attempt)s
"""

# A clean stop is not an attempt: the next claim takes the same number again,
# so that restarts never count toward --max-attempts.
_RELEASE = """
UPDATE jobs SET state = 'queued', node = NULL, attempt = attempt - 1, lease_expires_at = NULL,
    record = %(record)s::jsonb
WHERE id = %(id)s AND node = %(node)s AND attempt = %(attempt)s AND state = 'running'
"""


# An upload's one statement (not nextval, then INSERT, in a transaction: four
# round trips): the row and its record get the seq drawn here.
_INSERT = """
WITH s AS (SELECT nextval('jobs_seq') AS seq)
INSERT INTO jobs (id, seq, state, owner, created_at, record)
SELECT %s, s.seq, %s, %s, to_timestamp(%s), jsonb_set(%s::jsonb, '{seq}', to_jsonb(s.seq))
FROM s RETURNING seq
"""


def host_name() -> str:
    return socket.gethostname()


@implementer(IJobStore, IClusterStore)
class PostgresClusterStore(PostgresJobStore):
    """L{PostgresJobStore} for several nodes sharing one database."""

    # The writer's, the claimer's, the reader's and load()'s.
    POOL_SIZE = 4

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._claimer = ThreadPool(1, 1, name="job-store claims")
        self._reader = ThreadPool(1, 1, name="job-store reads")
        self._listeners: list[Listener] = []
        self._host = host_name()

    # -- IJobStore ---------------------------------------------------------

    def save(self, job: Job) -> Deferred[None]:
        if job.node is None:
            return super().save(job)
        params = {
            "id": job.id,
            "state": job.state.value,
            "owner": column_text(job.owner),
            "record": record_json(job),
            "node": job.node,
            "attempt": job.attempt,
        }

        def fenced() -> None:
            with self._pool.connection() as conn:
                if conn.execute(_FENCED_SAVE, params).rowcount != 1:
                    raise LostJob(f"job {job.id} attempt {job.attempt} is no longer {job.node}'s")

        return self._write(fenced)

    def close(self) -> Deferred[None]:
        # Not waited for: a listener delivers nothing once stopped, and its
        # thread, on a connection of its own, ends within a poll.
        for listener in self._listeners:
            listener.stop()
        self._listeners.clear()

        def stop_threads(result: Any) -> Any:
            for pool in (self._claimer, self._reader):
                if pool.started:
                    pool.stop()
            return result

        return super().close().addBoth(stop_threads)

    # -- IClusterStore -----------------------------------------------------

    def insert(self, job: Job) -> Deferred[int]:
        def insert() -> int:
            record = record_json(job)
            with self._pool.connection() as conn:
                if "seq" in json.loads(record):
                    row = conn.execute(
                        _INSERT,
                        (job.id, job.state.value, column_text(job.owner), job.created_at, record),
                    ).fetchone()
                    assert row is not None
                    job.seq = int(row[0])
                    return job.seq
                # A record stored as a JSON string (see record_json) gets its seq before.
                row = conn.execute("SELECT nextval('jobs_seq')").fetchone()
                assert row is not None
                job.seq = int(row[0])
                conn.execute(
                    "INSERT INTO jobs (id, seq, state, owner, created_at, record)"
                    " VALUES (%s, %s, %s, %s, to_timestamp(%s), %s::jsonb)",
                    (job.id, job.seq, job.state.value, column_text(job.owner), job.created_at,
                     record_json(job)),
                )  # fmt: skip
            return job.seq

        return self._write(insert)

    def claim(self, node: str, lease: float) -> Deferred[Job | None]:
        def claim() -> Job | None:
            with self._pool.connection() as conn, conn.transaction():
                row = conn.execute(
                    "SELECT record::text, attempt FROM jobs WHERE state = 'queued'"
                    " ORDER BY priority DESC, seq FOR UPDATE SKIP LOCKED LIMIT 1"
                ).fetchone()
                if row is None:
                    return None
                job = Job.from_record(parse_record(row[0]))
                _reset(job)
                job.state = JobState.RUNNING
                job.started_at = time.time()
                job.node = node
                job.attempt = int(row[1]) + 1
                conn.execute(
                    "UPDATE jobs SET state = 'running', node = %s, attempt = %s,"
                    " lease_expires_at = now() + make_interval(secs => %s), record = %s::jsonb"
                    " WHERE id = %s",
                    (node, job.attempt, lease, record_json(job), job.id),
                )
                return job

        return self._call(self._claimer, claim)

    def renew(self, node: str, running: dict[str, int], lease: float) -> Deferred[dict[str, bool]]:
        ids = list(running)

        def renew() -> dict[str, bool]:
            with self._pool.connection() as conn:
                conn.execute(
                    "UPDATE nodes SET heartbeat_at = now() WHERE name = %s AND host = %s"
                    " AND pid = %s",
                    (node, self._host, os.getpid()),
                )
                if not ids:
                    return {}
                rows = conn.execute(
                    "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => %s)"
                    " WHERE node = %s AND state = 'running' AND id = ANY(%s)"
                    " RETURNING id, attempt, cancel_requested",
                    (lease, node, ids),
                ).fetchall()
            return {i: bool(c) for i, a, c in rows if running[i] == a}

        return self._call(self._claimer, renew)

    def release(self, job: Job) -> Deferred[None]:
        params = {"id": job.id, "record": record_json(job), "node": job.node,
                  "attempt": job.attempt}  # fmt: skip

        def release() -> None:
            with self._pool.connection() as conn:
                if conn.execute(_RELEASE, params).rowcount != 1:
                    raise LostJob(f"job {job.id} attempt {job.attempt} is no longer {job.node}'s")

        # On the writer's thread: after this job's earlier writes.
        return self._write(release)

    def requeue_expired(self, max_attempts: int) -> Deferred[list[str]]:
        def requeue() -> list[str]:
            done = []
            with self._pool.connection() as conn, conn.transaction():
                rows = conn.execute(
                    "SELECT record::text, node, attempt, cancel_requested FROM jobs"
                    " WHERE state = 'running' AND lease_expires_at < now()"
                    " FOR UPDATE SKIP LOCKED"
                ).fetchall()
                for text, node, attempt, cancel_requested in rows:
                    job = Job.from_record(parse_record(text))
                    now = time.time()
                    if cancel_requested:
                        _end(job, JobState.CANCELLED, now, None)
                    elif attempt >= max_attempts:
                        _end(job, JobState.FAILED, now,
                             f"the job's node stopped answering (its lease expired) on each of "
                             f"its {attempt} attempts; the most is {max_attempts}")  # fmt: skip
                    else:
                        _reset(job)
                    job.node = node if job.state.finished else None
                    job.attempt = attempt
                    _log.warn(
                        "job {job_id}: the lease of {node} (attempt {attempt}) expired: {state}",
                        job_id=job.id,
                        node=node,
                        attempt=attempt,
                        state=job.state.value,
                    )
                    conn.execute(
                        "UPDATE jobs SET state = %s, node = %s, lease_expires_at = NULL,"
                        " record = %s::jsonb WHERE id = %s",
                        (job.state.value, job.node, record_json(job), job.id),
                    )
                    done.append(job.id)
            return done

        return self._call(self._claimer, requeue)

    def cancel(self, job_id: str, now: float) -> Deferred[str]:
        def cancel() -> str:
            with self._pool.connection() as conn, conn.transaction():
                # FOR UPDATE without SKIP LOCKED: a claim under way finishes first.
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE id = %s FOR UPDATE", (job_id,)
                ).fetchone()
                if row is None:
                    return "missing"
                job = _job(row)
                if job.state is JobState.QUEUED:
                    _end(job, JobState.CANCELLED, now, None)
                    conn.execute(
                        "UPDATE jobs SET state = 'cancelled', record = %s::jsonb WHERE id = %s",
                        (record_json(job), job_id),
                    )
                    return "cancelled"
                if job.state is JobState.RUNNING:
                    conn.execute("UPDATE jobs SET cancel_requested = true WHERE id = %s", (job_id,))
                    return "requested"
                return "finished"

        return self._call(self._claimer, cancel)

    def get(self, job_id: str) -> Deferred[tuple[Job, bool] | None]:
        def get() -> tuple[Job, bool] | None:
            with self._pool.connection() as conn:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE id = %s", (job_id,)
                ).fetchone()
            return None if row is None else (_job(row), bool(row[3]))

        return self._call(self._reader, get)

    def snapshot(self) -> Deferred[list[tuple[Job, bool]]]:
        return self._call(self._reader, self.snapshot_now)

    def snapshot_now(self) -> list[tuple[Job, bool]]:
        """L{snapshot}, on the calling thread (at start-up, before the reactor runs)."""
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY seq").fetchall()
        return [(_job(row), bool(row[3])) for row in rows]

    def register_node(self, node: str, workers: int, lease: float) -> Deferred[None]:
        return self._call(self._claimer, self.register_node_now, node, workers, lease)

    def register_node_now(self, node: str, workers: int, lease: float) -> None:
        """L{register_node}, on the calling thread."""
        with self._pool.connection() as conn, conn.transaction():
            row = conn.execute(
                "SELECT host, pid, heartbeat_at > now() - make_interval(secs => %s)"
                " FROM nodes WHERE name = %s FOR UPDATE",
                (lease, node),
            ).fetchone()
            if row is not None and row[2]:
                host, pid = row[0], int(row[1])
                # A node on this host whose process is gone died without unregistering
                # (kill -9): its name is free, though its heartbeat is recent.
                if host != self._host or Path(f"/proc/{pid}").exists():
                    raise NodeNameTaken(
                        f"a live node named {node!r} (pid {pid} on {host}) already uses this "
                        f"database: give this one another --node-name"
                    )
            conn.execute(
                "INSERT INTO nodes (name, host, pid, workers) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
                " workers = excluded.workers, started_at = now(), heartbeat_at = now()",
                (node, self._host, os.getpid(), workers),
            )

    def unregister_node(self, node: str) -> Deferred[None]:
        def unregister() -> None:
            with self._pool.connection() as conn:
                conn.execute(
                    "DELETE FROM nodes WHERE name = %s AND host = %s AND pid = %s",
                    (node, self._host, os.getpid()),
                )

        return self._call(self._claimer, unregister)

    def nodes(self, lease: float) -> Deferred[list[dict[str, Any]]]:
        def nodes() -> list[dict[str, Any]]:
            with self._pool.connection() as conn:
                rows = conn.execute(
                    "SELECT n.name, n.workers, n.started_at, n.heartbeat_at,"
                    " (SELECT count(*) FROM jobs j WHERE j.node = n.name AND j.state = 'running')"
                    " FROM nodes n WHERE n.heartbeat_at > now() - make_interval(secs => %s)"
                    " ORDER BY n.name",
                    (lease,),
                ).fetchall()
            return [
                {
                    "name": name,
                    "workers": workers,
                    "running": int(running),
                    "started_at": started.timestamp(),
                    "heartbeat_at": heartbeat.timestamp(),
                }
                for name, workers, started, heartbeat, running in rows
            ]

        return self._call(self._reader, nodes)

    def listen(self, on_change: Callable[[JobChange | None], None]) -> Callable[[], None]:
        """
        Each notification, as a L{JobChange}, goes to C{on_change} on the
        reactor thread; after every (re)connection C{on_change(None)} says that
        notifications may have been missed, so the whole table must be read again.
        """
        listener = Listener(
            self._url,
            self._connect_timeout,
            self._reactor,
            CHANNEL,
            lambda payload: on_change(job_change(payload)),
            name="job-store LISTEN",
            log=_log,
            lost="lost the job-change feed ({error}); reconnecting",
            regained="listening for job changes again",
            on_connect=lambda: on_change(None),
        )
        self._listeners.append(listener)
        listener.start()

        def stop() -> None:
            listener.stop()

        return stop

    # -- helpers -----------------------------------------------------------

    def _call(
        self, pool: ThreadPool, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs
    ) -> Deferred[_T]:
        if self._closed:
            return fail(StoreClosed(f"{self.path} is closed"))
        if not pool.started:
            pool.start()
        return deferToThreadPool(self._reactor, pool, f, *args, **kwargs)


def job_change(payload: str) -> JobChange:
    """The L{JobChange} that a notification's payload (see migration 3) describes."""
    body: dict[str, Any] = json.loads(payload)
    job_id = str(body["id"])
    if body.get("deleted"):
        return JobChange(job_id, carried=True, found=None)
    if "record" not in body:
        return JobChange(job_id, carried=False)
    job = Job.from_record(unwrap_record(body["record"]))
    job.node = body["node"]
    job.attempt = int(body["attempt"])
    return JobChange(job_id, carried=True, found=(job, bool(body["cancel"])))


def _job(row: tuple[Any, ...]) -> Job:
    # The columns, not the record, say who holds the job: a requeue by
    # another node rewrites them.
    job = Job.from_record(parse_record(row[0]))
    job.node = row[1]
    job.attempt = int(row[2])
    return job


def _reset(job: Job) -> None:
    job.state = JobState.QUEUED
    job.progress = 0.0
    job.started_at = None
    job.finished_at = None
    job.output = None
    job.exit_code = None
    job.error = None
    job.log_tail = None
    job.pid = None


def _end(job: Job, state: JobState, now: float, error: str | None) -> None:
    job.state = state
    job.finished_at = now
    job.error = error
    job.pid = None
