"""
Upload records in the SQLite file of the jobs (a table of their own).

One node owns the file, so the records are also kept in memory: reads are
answered from there at once (a HEAD never waits on SQLite) and every change
is written through on one writer thread, in call order, as the job store's
are.  A PATCH's offset is recorded before it is answered.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from transcoder.core.jobs import StoreClosed
from transcoder.core.uploads import IUploadStore, Upload

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    owner TEXT,
    length INTEGER,
    offset INTEGER NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    job_id TEXT,
    record TEXT NOT NULL
);
"""

_INSERT = """
INSERT INTO uploads (id, owner, length, offset, created_at, expires_at, job_id, record)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""


def _record(u: Upload) -> str:
    return json.dumps(
        {"metadata": u.metadata, "filename": u.filename, "extra": u.extra}, separators=(",", ":")
    )


@implementer(IUploadStore)
class SQLiteUploadStore:
    """L{IUploadStore} on a SQLite file (by default the jobs' C{jobs.sqlite3})."""

    def __init__(self, path: Path, reactor: IReactorFromThreads) -> None:
        self.path = Path(path)
        self._reactor = reactor
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            # The job store writes to the same file from its own connection.
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._conn.executescript(_SCHEMA)
            rows = self._conn.execute(
                "SELECT id, owner, length, offset, created_at, expires_at, job_id, record"
                " FROM uploads"
            ).fetchall()
        self._uploads: dict[str, Upload] = {}
        for uid, owner, length, offset, created, expires, job_id, record in rows:
            r = json.loads(record)
            self._uploads[uid] = Upload(
                uid, owner, length, offset, r["metadata"], created, expires, r["filename"],
                job_id, r.get("extra", {}),
            )  # fmt: skip
        self._pool = ThreadPool(1, 1, name=f"upload-store {self.path.name}")
        self._closed = False

    def create(self, upload: Upload) -> Deferred[None]:
        if upload.id in self._uploads:
            return fail(ValueError(f"upload {upload.id} exists"))
        self._uploads[upload.id] = replace(upload, metadata=dict(upload.metadata))
        u = upload
        row = (u.id, u.owner, u.length, u.offset, u.created_at, u.expires_at, u.job_id, _record(u))
        return self._write(_INSERT, row)

    def get(self, upload_id: str) -> Deferred[Upload | None]:
        u = self._uploads.get(upload_id)
        return succeed(replace(u, metadata=dict(u.metadata)) if u is not None else None)

    def set_length(self, upload_id: str, length: int) -> Deferred[None]:
        u = self._uploads.get(upload_id)
        if u is None or u.length is not None:
            return succeed(None)
        u.length = length
        return self._write(
            "UPDATE uploads SET length = ? WHERE id = ? AND length IS NULL", (length, upload_id)
        )

    def update_offset(
        self, upload_id: str, expected: int, offset: int, expires_at: float
    ) -> Deferred[bool]:
        # One node: the records in memory are the truth, checked here; the
        # statement's condition only keeps the file in step with them.
        u = self._uploads.get(upload_id)
        if u is None or u.offset != expected:
            return succeed(u is not None and (u.offset, u.expires_at) == (offset, expires_at))
        u.offset, u.expires_at = offset, expires_at
        return self._write(
            "UPDATE uploads SET offset = ?, expires_at = ? WHERE id = ? AND offset = ?",
            (offset, expires_at, upload_id, expected),
        ).addCallback(lambda _: True)

    def finish(self, upload_id: str, job_id: str) -> Deferred[str]:
        u = self._uploads.get(upload_id)
        if u is None:
            return succeed(job_id)
        if u.job_id:
            return succeed(u.job_id)
        u.job_id = job_id
        d = self._write("UPDATE uploads SET job_id = ? WHERE id = ?", (job_id, upload_id))
        return d.addCallback(lambda _: job_id)

    def terminate(self, upload_id: str) -> Deferred[None]:
        if self._uploads.pop(upload_id, None) is None:
            return succeed(None)
        return self._write("DELETE FROM uploads WHERE id = ?", (upload_id,))

    def expired(self, now: float) -> Deferred[list[Upload]]:
        return succeed([replace(u) for u in self._uploads.values() if u.expires_at <= now])

    def close(self) -> Deferred[None]:
        if self._closed:
            return succeed(None)
        d = self._write(None, ())
        self._closed = True

        def stop_pool(result: object) -> object:
            self._pool.stop()
            return result

        d.addBoth(stop_pool)
        return d

    def _write(self, sql: str | None, params: tuple[Any, ...]) -> Deferred[None]:
        if self._closed:
            return fail(StoreClosed(f"{self.path} is closed"))
        if not self._pool.started:
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, self._execute, sql, params)

    def _execute(self, sql: str | None, params: tuple[Any, ...]) -> None:
        with self._lock:
            if sql is None:
                self._conn.close()
            else:
                self._conn.execute(sql, params)
