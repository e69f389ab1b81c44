"""
One connection to the cluster's PostgreSQL database, on a thread of its own,
for the services around the registry (webhooks, retention, metrics), so that
their statements never queue behind the registry's writes and claims.

Advisory locks taken through L{SideDatabase.try_lock} belong to this
connection's session: when the connection is lost, so are its locks, and
the database frees them for another node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from transcoder.core.jobs import StoreClosed

_T = TypeVar("_T")

# The advisory lock held by the node sweeping old jobs (retention).
RETENTION_LOCK = 0x7472616E_7265_7465  # "tran" "re" "te"


class SideDatabase:
    """
    Runs C{f(connection)} calls, one at a time, on an autocommit connection
    opened at the first call and again after it was lost.
    """

    def __init__(
        self, url: str, reactor: IReactorFromThreads, *, connect_timeout: float = 10
    ) -> None:
        self._url = url
        self._reactor = reactor
        self._timeout = max(1, round(connect_timeout))
        self._thread = ThreadPool(1, 1, name="cluster services")
        self._conn: Any = None
        self._closed = False

    def call(self, f: Callable[[Any], _T]) -> Deferred[_T]:
        """C{f(connection)} on this database's thread."""
        if self._closed:
            return fail(StoreClosed("the cluster services' connection is closed"))
        if not self._thread.started:
            self._thread.start()
        return deferToThreadPool(self._reactor, self._thread, self._run, f)

    def try_lock(self, key: int) -> Deferred[bool]:
        """Take the session advisory lock C{key} if no other session holds it."""
        return self.call(lambda c: bool(_one(c, "SELECT pg_try_advisory_lock(%s)", (key,))))

    def unlock(self, key: int) -> Deferred[bool]:
        """Release the advisory lock C{key}: false when this session no longer held it."""
        return self.call(lambda c: bool(_one(c, "SELECT pg_advisory_unlock(%s)", (key,))))

    def close(self) -> Deferred[None]:
        if self._closed or not self._thread.started:
            self._closed = True
            return succeed(None)
        d = self.call(lambda _: self._drop())
        self._closed = True

        def stop(result: Any) -> Any:
            self._thread.stop()
            return result

        return d.addBoth(stop)

    def _run(self, f: Callable[[Any], _T]) -> _T:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)
        try:
            return f(self._conn)
        except psycopg.Error:
            if self._conn.broken:
                self._drop()
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _one(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else row[0]
