"""
A job store in PostgreSQL: the database that several nodes will share.

Each job is one row: its whole record as jsonb, plus the columns that claims,
leases and fencing will use (state, priority and seq for FIFO order, node,
attempt, lease expiry).  As in the SQLite store, writes run on one dedicated
thread, so the reactor never waits on the database and the writes for a job
land in the order they were made.

The schema is created and migrated when a store opens, under an advisory lock
and a C{schema_version} table, so nodes starting together migrate it once.

psycopg is imported only when a store opens: an install without the
C{postgres} extra still imports L{transcoder.core}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from transcoder.core.jobs import IJobStore, Job, StoreClosed, StoreUnavailable

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

_P = ParamSpec("_P")
_T = TypeVar("_T")

# pg_advisory_lock key for migrations: "transcod" as a big-endian int64.
SCHEMA_LOCK = 0x7472616E73636F64

# Version N is MIGRATIONS[N - 1]; each runs once, in a transaction, under SCHEMA_LOCK.
# Append, never edit: a database records which versions it has.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id text PRIMARY KEY,
        seq bigint NOT NULL,
        -- Claims will take the highest priority first, then FIFO by seq.
        priority integer NOT NULL DEFAULT 0,
        state text NOT NULL,
        owner text,
        created_at timestamptz NOT NULL,
        -- Set by the node running the job; writes will be fenced on (node, attempt).
        node text,
        attempt integer NOT NULL DEFAULT 0,
        lease_expires_at timestamptz,
        record jsonb NOT NULL
    );
    CREATE INDEX jobs_order ON jobs (seq);
    CREATE INDEX jobs_queue ON jobs (priority DESC, seq) WHERE state = 'queued';
    CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'running';
    CREATE TABLE store_check (id integer PRIMARY KEY CHECK (id = 1), at timestamptz NOT NULL);
    """,
    # 2: several nodes.  seq comes from a sequence, since any node creates jobs; a
    # cancel asked on one node reaches the one running the job through
    # cancel_requested; nodes record who is alive; every change that a client
    # could see NOTIFYs its job id (a lease renewal is not one).
    """
    CREATE SEQUENCE jobs_seq;
    SELECT setval('jobs_seq', (SELECT coalesce(max(seq), 0) + 1 FROM jobs), false);
    ALTER TABLE jobs ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
    CREATE INDEX jobs_node ON jobs (node) WHERE state = 'running';
    CREATE TABLE nodes (
        name text PRIMARY KEY,
        host text NOT NULL,
        pid integer NOT NULL,
        workers integer NOT NULL,
        started_at timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('transcoder_jobs', OLD.id);
        ELSE
            PERFORM pg_notify('transcoder_jobs', NEW.id);
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER jobs_notify_rows AFTER INSERT OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION jobs_notify();
    CREATE TRIGGER jobs_notify_changes AFTER UPDATE ON jobs FOR EACH ROW
        WHEN (OLD.record IS DISTINCT FROM NEW.record OR OLD.state IS DISTINCT FROM NEW.state
              OR OLD.node IS DISTINCT FROM NEW.node OR OLD.attempt IS DISTINCT FROM NEW.attempt
              OR OLD.cancel_requested IS DISTINCT FROM NEW.cancel_requested)
        EXECUTE FUNCTION jobs_notify();
    """,
    # 3: a notification carries the changed row (record, node, attempt, cancel),
    # so that no node reads it back: with N nodes, a re-read per change per node
    # was most of the statements a job costs.  A row too big for NOTIFY's 8000
    # bytes still sends only its id, which the listener then reads.
    """
    CREATE OR REPLACE FUNCTION jobs_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        payload text;
    BEGIN
        IF TG_OP = 'DELETE' THEN
            payload := json_build_object('id', OLD.id, 'deleted', true)::text;
        ELSE
            payload := json_build_object(
                'id', NEW.id, 'record', NEW.record, 'node', NEW.node,
                'attempt', NEW.attempt, 'cancel', NEW.cancel_requested)::text;
            IF octet_length(payload) > 7900 THEN
                payload := json_build_object('id', NEW.id)::text;
            END IF;
        END IF;
        PERFORM pg_notify('transcoder_jobs', payload);
        RETURN NULL;
    END $$;
    """,
    # 4: resumable (tus) uploads, which any node may continue (core/pguploads.py).
    # Times are POSIX seconds as the nodes' clocks give them, like the records'.
    # The record (metadata, file name, checks) is JSON text, not jsonb: metadata
    # may hold NULs or lone surrogates, which jsonb refuses.
    """
    CREATE TABLE uploads (
        id text PRIMARY KEY,
        owner text,
        length bigint,
        upload_offset bigint NOT NULL,
        created_at double precision NOT NULL,
        expires_at double precision NOT NULL,
        job_id text,
        record text NOT NULL
    );
    CREATE INDEX uploads_expiry ON uploads (expires_at);
    """,
)

# node, attempt and the lease are not written: they will belong to claims.
_UPSERT = """
INSERT INTO jobs (id, seq, state, owner, created_at, record)
VALUES (%s, %s, %s, %s, to_timestamp(%s), %s::jsonb)
ON CONFLICT (id) DO UPDATE SET
    seq = excluded.seq, state = excluded.state, owner = excluded.owner,
    created_at = excluded.created_at, record = excluded.record
"""

# A record that jsonb cannot hold (below) is stored as {"$json": "<its JSON text>"}.
_WRAPPED = "$json"


def redact_url(url: str) -> str:
    """C{url} without its password (in the user part or a C{password=} parameter), for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{hosts}"
    query = "&".join(
        p for p in parts.query.split("&") if p and not p.lower().startswith("password=")
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _psycopg() -> Any:
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as e:
        raise StoreUnavailable(
            f"a PostgreSQL store needs psycopg ({e}): pip install 'transcoder[postgres]'"
        ) from None
    return psycopg


def record_json(job: Job) -> str:
    """
    C{job}'s record as JSON text that a jsonb column takes.

    jsonb refuses NUL characters, lone surrogates (a filename decoded with
    surrogateescape) and NaN or infinities, all of which the SQLite store
    keeps; such a record is stored as a JSON string inside a one-key object
    instead, so that it still round-trips exactly.
    """
    record = job.to_record()
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        text = ""
    if not text or "\\u0000" in text:
        return json.dumps({_WRAPPED: json.dumps(record, separators=(",", ":"))})
    return text


def parse_record(text: str) -> dict[str, Any]:
    return unwrap_record(json.loads(text))


def unwrap_record(record: dict[str, Any]) -> dict[str, Any]:
    """A stored record as the job wrote it (see L{record_json})."""
    if len(record) == 1 and _WRAPPED in record:
        unwrapped: dict[str, Any] = json.loads(record[_WRAPPED])
        return unwrapped
    return record


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """
    Bring the schema up to date on C{conn} (in autocommit mode), under the
    advisory lock, so that stores opening together wait for each other.

    @return: the versions this call applied (none when another got there first).
    """
    conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK,))
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        current = int(row[0]) if row else 0
        if current > len(MIGRATIONS):
            raise StoreUnavailable(
                f"the database's schema is version {current}; this transcoder knows up to "
                f"{len(MIGRATIONS)}: upgrade it"
            )
        applied = []
        for version in range(current + 1, len(MIGRATIONS) + 1):
            with conn.transaction():
                conn.execute(MIGRATIONS[version - 1])
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
            applied.append(version)
        return applied
    finally:
        try:
            conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK,))
        except Exception:
            pass  # a session that was lost holds no locks


@implementer(IJobStore)
class PostgresJobStore:
    """
    L{IJobStore} on a PostgreSQL database, opened (and migrated) at once.

    L{save} serializes the job when it is called, so later changes to the
    in-memory job never leak into an earlier write.

    @ivar path: the URL without its password, for logs and messages.
    @ivar migrated: the schema versions this store applied when it opened.
    @raise StoreUnavailable: the database cannot be reached, refuses us, has
        no UTF-8 encoding or a schema newer than this code.
    """

    # The writer thread's and load()'s connections.
    POOL_SIZE = 2

    def __init__(
        self, url: str, reactor: IReactorFromThreads, *, connect_timeout: float = 10
    ) -> None:
        pg = _psycopg()
        from psycopg_pool import ConnectionPool

        self.path = redact_url(url)
        self._url = url
        self._connect_timeout = connect_timeout
        self._reactor = reactor
        try:
            with pg.connect(
                url, autocommit=True, connect_timeout=max(1, round(connect_timeout))
            ) as conn:
                encoding = conn.execute("SHOW server_encoding").fetchone()[0]
                if encoding != "UTF8":
                    raise StoreUnavailable(f"it is encoded in {encoding}: it must be UTF8")
                self.migrated = migrate(conn)
        except pg.Error as e:
            raise StoreUnavailable(f"job database {self.path}: {oneline(e)}") from None
        except StoreUnavailable as e:
            raise StoreUnavailable(f"job database {self.path}: {e}") from None
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=self.POOL_SIZE,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(connect_timeout))},
            open=False,
            # A database that went away fails a write within this, not the default 30 s.
            timeout=connect_timeout,
            name="job-store",
        )
        try:
            self._pool.open(wait=True, timeout=connect_timeout)
        except pg.Error as e:
            self._pool.close()
            raise StoreUnavailable(f"job database {self.path}: {oneline(e)}") from None
        # Exactly one thread: writes stay in call order.
        self._writer = ThreadPool(1, 1, name="job-store postgresql")
        self._closed = False

    def load(self) -> list[Job]:
        with self._pool.connection() as conn:
            rows = conn.execute("SELECT record::text FROM jobs ORDER BY seq, created_at").fetchall()
        return [Job.from_record(parse_record(text)) for (text,) in rows]

    def save(self, job: Job) -> Deferred[None]:
        row = (
            job.id,
            job.seq,
            job.state.value,
            column_text(job.owner),
            job.created_at,
            record_json(job),
        )
        return self._write(self._execute, _UPSERT, row)

    def delete(self, job_id: str) -> Deferred[None]:
        return self._write(self._execute, "DELETE FROM jobs WHERE id = %s", (job_id,))

    def check(self) -> Deferred[None]:
        # A real write: a database that is read-only or out of disk still answers reads.
        return self._write(
            self._execute,
            "INSERT INTO store_check (id, at) VALUES (1, now())"
            " ON CONFLICT (id) DO UPDATE SET at = excluded.at",
            (),
        )

    def close(self) -> Deferred[None]:
        """Wait for the writes already asked for, then close the connections and the thread."""
        if self._closed:
            return fail(StoreClosed(f"{self.path} is already closed"))
        d = self._write(self._pool.close)
        self._closed = True

        def stop_writer(result: Failure | None) -> Failure | None:
            # The writer's only thread is idle now, so this join is immediate.
            self._writer.stop()
            return result

        d.addBoth(stop_writer)
        return d

    def _write(self, f: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        if self._closed:
            return fail(StoreClosed(f"{self.path} is closed"))
        if not self._writer.started:
            self._writer.start()
        return deferToThreadPool(self._reactor, self._writer, f, *args, **kwargs)

    def _execute(self, sql: str, params: tuple[Any, ...]) -> None:
        import psycopg

        for last in (False, True):
            with self._pool.connection() as conn:
                try:
                    conn.execute(sql, params)
                    return
                except psycopg.OperationalError:
                    # A connection the server dropped (a restart, an idle timeout) fails
                    # its next statement; every write here is idempotent, so it is made
                    # once more on a new connection.  The pool discards the broken one.
                    if last or not conn.broken:
                        raise


def column_text(value: str | None) -> str | None:
    # A text column holds neither NUL nor lone surrogates; the record keeps the exact value.
    if value is None:
        return None
    return value.replace("\0", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def oneline(error: BaseException) -> str:
    return re.sub(r"\s+", " ", str(error)).strip() or type(error).__name__
