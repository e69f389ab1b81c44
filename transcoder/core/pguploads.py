"""
Upload records in the cluster's PostgreSQL database (the C{uploads} table,
migration 4 of L{transcoder.core.postgres}), so that an upload begun on one
node can be continued, looked at or terminated on any other.

Unlike the SQLite store, nothing is kept in memory: another node may have
moved the offset, fixed the length or made the job since, so every C{get}
reads the row.  Statements run one at a time, in call order, on a thread and
a connection of their own (a creation followed at once by the PATCH that
carries its first bytes finds its row), never on the reactor thread.

C{finish} locks the row (C{SELECT ... FOR UPDATE}) and records the job id
only if none is there yet, so two nodes finishing one upload at once agree on
the first job id.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from transcoder.core.errors import Unavailable
from transcoder.core.jobs import StoreClosed, StoreUnavailable
from transcoder.core.postgres import _psycopg, column_text, migrate, oneline, redact_url
from transcoder.core.uploads import IUploadStore, Upload

_T = TypeVar("_T")
log = Logger()

_COLUMNS = "id, owner, length, upload_offset, created_at, expires_at, job_id, record"

# A retried creation (the connection broke after the row was written) finds its row.
_INSERT = f"""
INSERT INTO uploads ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (id) DO NOTHING
"""


class UploadDatabaseDown(Unavailable):
    """The upload database cannot be reached now (503)."""

    def __init__(self, why: str) -> None:
        super().__init__(
            "upload_store_unavailable",
            f"the upload database cannot be reached ({why}); try again",
            retry_after=5,
        )


class Connection:
    """
    One autocommit connection used on one thread: C{call(f)} runs
    C{f(connection)} there, after the calls asked for before it.  A
    connection the server dropped is made again; C{on_new} is told (on that
    thread) whenever a connection replaces a lost one, since the session's
    advisory locks went with it.

    @param retry: make a call that met a dropped connection once more, on a
        new one (for statements that may run twice).
    """

    def __init__(
        self,
        url: str,
        reactor: IReactorFromThreads,
        name: str,
        *,
        connect_timeout: float = 10,
        retry: bool = True,
        setup: tuple[str, ...] = (),
        on_new: Callable[[], None] = lambda: None,
    ) -> None:
        self._url = url
        self._reactor = reactor
        self._timeout = max(1, round(connect_timeout))
        self._retry = retry
        self._setup = setup
        self._on_new = on_new
        self._thread = ThreadPool(1, 1, name=name)
        self._conn: Any = None
        self._had_one = False
        self._closed = False

    def call(self, f: Callable[[Any], _T]) -> Deferred[_T]:
        if self._closed:
            return fail(StoreClosed("the upload database connection is closed"))
        if not self._thread.started:
            self._thread.start()
        return deferToThreadPool(self._reactor, self._thread, self._run, f)

    def close(self, last: Callable[[Any], None] | None = None) -> Deferred[None]:
        """Run C{last} (if connected), close the connection, stop the thread."""
        if self._closed:
            return succeed(None)
        if not self._thread.started:
            self._closed = True
            return succeed(None)

        def closing() -> None:
            import psycopg

            conn, self._conn = self._conn, None
            if conn is not None and not conn.closed:
                try:
                    if last is not None:
                        last(conn)
                except psycopg.Error:
                    pass  # a lost session holds nothing more to let go of
                finally:
                    conn.close()

        d = deferToThreadPool(self._reactor, self._thread, closing)
        self._closed = True

        def stop(result: Any) -> Any:
            self._thread.stop()
            return result

        return d.addBoth(stop)

    def _connect(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)
            for sql in self._setup:
                self._conn.execute(sql)
            if self._had_one:
                self._on_new()
            self._had_one = True
        return self._conn

    def _run(self, f: Callable[[Any], _T]) -> _T:
        import psycopg

        for again in (self._retry, False):
            try:
                conn = self._connect()
                return f(conn)
            except psycopg.Error as e:
                broken = self._conn is None or self._conn.broken or self._conn.closed
                if broken and self._conn is not None:
                    self._conn.close()
                    self._conn = None
                if broken and again:
                    continue
                if isinstance(e, psycopg.OperationalError):
                    raise UploadDatabaseDown(oneline(e)) from None
                raise
        raise AssertionError("unreachable")


def _record(u: Upload) -> str:
    # ASCII-only JSON: a text column takes NULs and lone surrogates escaped.
    return json.dumps(
        {"metadata": u.metadata, "filename": u.filename, "extra": u.extra}, separators=(",", ":")
    )


def _upload(row: tuple[Any, ...]) -> Upload:
    uid, owner, length, offset, created, expires, job_id, record = row
    r = json.loads(record)
    return Upload(
        uid, owner, None if length is None else int(length), int(offset), r["metadata"],
        float(created), float(expires), r["filename"], job_id, r.get("extra", {}),
    )  # fmt: skip


@implementer(IUploadStore)
class PostgresUploadStore:
    """
    L{IUploadStore} on PostgreSQL, shared by the nodes of a cluster.

    @raise StoreUnavailable: the database cannot be reached or migrated.
    """

    def __init__(
        self, url: str, reactor: IReactorFromThreads, *, connect_timeout: float = 10
    ) -> None:
        pg = _psycopg()
        self.path = redact_url(url)
        try:
            # The job store migrated it already when the node opened it; this
            # store alone (the tests) migrates it itself.
            with pg.connect(
                url, autocommit=True, connect_timeout=max(1, round(connect_timeout))
            ) as conn:
                migrate(conn)
        except pg.Error as e:
            raise StoreUnavailable(f"upload database {self.path}: {oneline(e)}") from None
        self._db = Connection(
            url, reactor, "upload-store postgresql", connect_timeout=connect_timeout
        )

    def create(self, upload: Upload) -> Deferred[None]:
        u = upload
        row = (u.id, column_text(u.owner), u.length, u.offset, u.created_at, u.expires_at,
               u.job_id, _record(u))  # fmt: skip

        def create(conn: Any) -> None:
            if conn.execute(_INSERT, row).rowcount != 1:
                found = conn.execute("SELECT record FROM uploads WHERE id = %s", (u.id,))
                existing = found.fetchone()
                # Our own insert, made twice over a dropped connection, is no conflict.
                if existing is None or existing[0] != row[-1]:
                    raise ValueError(f"upload {u.id} exists")

        return self._db.call(create)

    def get(self, upload_id: str) -> Deferred[Upload | None]:
        def get(conn: Any) -> Upload | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM uploads WHERE id = %s", (upload_id,)
            ).fetchone()
            return None if row is None else _upload(row)

        return self._db.call(get)

    def set_length(self, upload_id: str, length: int) -> Deferred[None]:
        return self._execute(
            "UPDATE uploads SET length = %s WHERE id = %s AND length IS NULL", (length, upload_id)
        )

    def update_offset(
        self, upload_id: str, expected: int, offset: int, expires_at: float
    ) -> Deferred[bool]:
        def update(conn: Any) -> bool:
            # Compare and set: a node that lost its lock mid-PATCH cannot move
            # back (or over) the offset that the node which took over wrote.
            # The second arm makes a retry over a dropped connection, whose
            # first try did commit, find its own write.
            rows: int = conn.execute(
                "UPDATE uploads SET upload_offset = %s, expires_at = %s WHERE id = %s"
                " AND (upload_offset = %s OR (upload_offset = %s AND expires_at = %s))",
                (offset, expires_at, upload_id, expected, offset, expires_at),
            ).rowcount
            return rows == 1

        return self._db.call(update)

    def finish(self, upload_id: str, job_id: str) -> Deferred[str]:
        def finish(conn: Any) -> str:
            with conn.transaction():
                # Waits for another node finishing it now, then sees its job id.
                row = conn.execute(
                    "SELECT job_id FROM uploads WHERE id = %s FOR UPDATE", (upload_id,)
                ).fetchone()
                if row is None:
                    return job_id
                if row[0]:
                    return str(row[0])
                conn.execute("UPDATE uploads SET job_id = %s WHERE id = %s", (job_id, upload_id))
                return job_id

        return self._db.call(finish)

    def terminate(self, upload_id: str) -> Deferred[None]:
        return self._execute("DELETE FROM uploads WHERE id = %s", (upload_id,))

    def expired(self, now: float) -> Deferred[list[Upload]]:
        def expired(conn: Any) -> list[Upload]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM uploads WHERE expires_at <= %s ORDER BY expires_at",
                (now,),
            ).fetchall()
            return [_upload(row) for row in rows]

        return self._db.call(expired)

    def close(self) -> Deferred[None]:
        return self._db.close()

    def _execute(self, sql: str, params: tuple[Any, ...]) -> Deferred[None]:
        def execute(conn: Any) -> None:
            conn.execute(sql, params)

        return self._db.call(execute)
