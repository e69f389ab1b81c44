"""
A job store in one SQLite file.

Each job is one row: its whole record as JSON, plus the few columns a query
might filter on.  Writes run on one dedicated thread, so the reactor never
waits on SQLite and the writes for a job land in the order they were made.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from transcoder.core.jobs import IJobStore, Job, StoreClosed

__all__ = ["SQLiteJobStore", "StoreClosed"]

_P = ParamSpec("_P")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    owner TEXT,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_seq ON jobs (seq);
CREATE TABLE IF NOT EXISTS heartbeat (id INTEGER PRIMARY KEY CHECK (id = 1), at REAL NOT NULL);
"""

_UPSERT = """
INSERT INTO jobs (id, seq, state, created_at, owner, record) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    seq = excluded.seq, state = excluded.state, created_at = excluded.created_at,
    owner = excluded.owner, record = excluded.record
"""


@implementer(IJobStore)
class SQLiteJobStore:
    """
    L{IJobStore} on a SQLite file in WAL mode.

    L{save} serializes the job when it is called, so later changes to the
    in-memory job never leak into an earlier write.
    """

    def __init__(self, path: Path, reactor: IReactorFromThreads) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, shared by the caller's thread (load) and the writer
        # thread; the lock keeps them from ever using it at the same time.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL is durable across application crashes; only a
            # power loss can roll back the last commits.
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(_SCHEMA)
        # Exactly one thread: writes stay in call order.
        self._pool = ThreadPool(1, 1, name=f"job-store {self.path.name}")
        self._closed = False

    def load(self) -> list[Job]:
        with self._lock:
            rows = self._conn.execute("SELECT record FROM jobs ORDER BY seq, created_at").fetchall()
        return [Job.from_record(json.loads(record)) for (record,) in rows]

    def save(self, job: Job) -> Deferred[None]:
        record = job.to_record()
        row = (
            job.id,
            job.seq,
            job.state.value,
            job.created_at,
            job.owner,
            json.dumps(record, separators=(",", ":")),
        )
        return self._write(self._execute, _UPSERT, row)

    def delete(self, job_id: str) -> Deferred[None]:
        return self._write(self._execute, "DELETE FROM jobs WHERE id = ?", (job_id,))

    def check(self) -> Deferred[None]:
        # A real write: on a full disk a read succeeds while every save fails.
        return self._write(
            self._execute, "INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, ?)", (time.time(),)
        )

    def close(self) -> Deferred[None]:
        """Wait for the writes already asked for, then close the file and the thread."""
        if self._closed:
            return fail(StoreClosed(f"{self.path} is already closed"))
        d = self._write(self._close_connection)
        self._closed = True

        def stop_pool(result: Failure | None) -> Failure | None:
            # The pool's only thread is idle now, so this join is immediate.
            self._pool.stop()
            return result

        d.addBoth(stop_pool)
        return d

    def _write(self, f: Callable[_P, None], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[None]:
        if self._closed:
            return fail(StoreClosed(f"{self.path} is closed"))
        if not self._pool.started:
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, f, *args, **kwargs)

    def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.execute(sql, params)

    def _close_connection(self) -> None:
        with self._lock:
            self._conn.close()
