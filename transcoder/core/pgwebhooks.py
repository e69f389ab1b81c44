"""
Webhook deliveries shared by every node of a cluster, in a C{webhooks} table
beside the jobs.

A row per finished job with a callback URL: its delivery id (the same on
every POST), the body, the attempts made by any node, when the next one is
due, and which node holds it until when.  A node claims due rows with
C{FOR UPDATE SKIP LOCKED}, counting the attempt as it claims (a node killed
during a POST has still made it), and records the outcome or the next due
time only while it still holds the claim.  A claim that is not settled (its
node died) lapses, and any node takes the row up again, with the same id.
The node that ran a job adds its row right after recording the end; a sweep
adds the rows of finished jobs that have none (their node died in between).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred

from transcoder.core.jobs import Job
from transcoder.core.pgside import SideDatabase
from transcoder.core.postgres import parse_record

# The advisory lock (transaction-scoped) under which the table is created.
_SCHEMA_LOCK = 0x7472616E_7765_6268  # "tran" "we" "bh"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS webhooks ("
    " job_id text PRIMARY KEY, delivery_id text NOT NULL, url text NOT NULL, body text NOT NULL,"
    " attempts integer NOT NULL DEFAULT 0, due_at timestamptz NOT NULL DEFAULT now(),"
    " claimed_by text, claimed_until timestamptz,"
    # NULL while pending; 'delivered' or 'given up'.
    " outcome text)",
    "CREATE INDEX IF NOT EXISTS webhooks_due ON webhooks (due_at) WHERE outcome IS NULL",
)
DELIVERED = "delivered"
GIVEN_UP = "given up"


@dataclass(frozen=True)
class Claimed:
    """A delivery this node holds now; C{attempts} counts the one it is about to make."""

    job_id: str
    url: str
    body: str
    delivery_id: str
    attempts: int


class PostgresWebhooks:
    """The C{webhooks} table, through a L{SideDatabase}."""

    def __init__(self, db: SideDatabase) -> None:
        self._db = db

    def create(self) -> Deferred[None]:
        def create(conn: Any) -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for sql in _SCHEMA:
                    conn.execute(sql)

        return self._db.call(create)

    def add(self, job_id: str, url: str, body: str, delivery_id: str) -> Deferred[bool]:
        """Add a job's delivery; false when it already has one (another node added it)."""

        def add(conn: Any) -> bool:
            cursor = conn.execute(
                "INSERT INTO webhooks (job_id, delivery_id, url, body) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (job_id) DO NOTHING",
                (job_id, delivery_id, url, body),
            )
            return bool(cursor.rowcount == 1)

        return self._db.call(add)

    def missing(self, limit: int) -> Deferred[list[Job]]:
        """
        Finished jobs with a callback URL and no delivery (their node died
        before adding it); rows of delivered jobs that were deleted go.
        """

        def missing(conn: Any) -> list[Job]:
            conn.execute(
                "DELETE FROM webhooks w WHERE outcome IS NOT NULL"
                " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = w.job_id)"
            )
            rows = conn.execute(
                "SELECT record::text FROM jobs j"
                " WHERE state IN ('succeeded', 'failed', 'cancelled')"
                " AND coalesce(record->>'callback_url', '') <> ''"
                " AND NOT EXISTS (SELECT 1 FROM webhooks w WHERE w.job_id = j.id)"
                " ORDER BY seq LIMIT %s",
                (limit,),
            ).fetchall()
            return [Job.from_record(parse_record(text)) for (text,) in rows]

        return self._db.call(missing)

    def claim(
        self, node: str, hold: float, limit: int, max_attempts: int
    ) -> Deferred[tuple[list[Claimed], list[Claimed]]]:
        """
        Claim up to C{limit} due deliveries for C{hold} seconds.

        @return: those to attempt now, and those whose last attempt was
            already made (a node died during it): these are given up.
        """

        def claim(conn: Any) -> tuple[list[Claimed], list[Claimed]]:
            with conn.transaction():
                rows = conn.execute(
                    "SELECT job_id, url, body, delivery_id, attempts FROM webhooks"
                    " WHERE outcome IS NULL AND due_at <= now()"
                    " AND (claimed_until IS NULL OR claimed_until < now())"
                    " ORDER BY due_at FOR UPDATE SKIP LOCKED LIMIT %s",
                    (limit,),
                ).fetchall()
                now, spent = [], []
                for job_id, url, body, delivery_id, attempts in rows:
                    if attempts >= max_attempts:
                        conn.execute(
                            "UPDATE webhooks SET outcome = %s, claimed_by = NULL,"
                            " claimed_until = NULL WHERE job_id = %s",
                            (GIVEN_UP, job_id),
                        )
                        spent.append(Claimed(job_id, url, body, delivery_id, attempts))
                        continue
                    conn.execute(
                        "UPDATE webhooks SET attempts = attempts + 1, claimed_by = %s,"
                        " claimed_until = now() + make_interval(secs => %s) WHERE job_id = %s",
                        (node, hold, job_id),
                    )
                    now.append(Claimed(job_id, url, body, delivery_id, attempts + 1))
            return now, spent

        return self._db.call(claim)

    def settle(self, job_id: str, node: str, attempts: int, outcome: str) -> Deferred[bool]:
        """Record a delivery's outcome; false when this node's claim had lapsed."""
        return self._fenced(
            "UPDATE webhooks SET outcome = %s, claimed_by = NULL, claimed_until = NULL"
            " WHERE job_id = %s AND claimed_by = %s AND attempts = %s",
            (outcome, job_id, node, attempts),
        )

    def retry(self, job_id: str, node: str, attempts: int, delay: float) -> Deferred[bool]:
        """Give a failed delivery back, due in C{delay} seconds, for any node to attempt."""
        return self._fenced(
            "UPDATE webhooks SET due_at = now() + make_interval(secs => %s), claimed_by = NULL,"
            " claimed_until = NULL WHERE job_id = %s AND claimed_by = %s AND attempts = %s",
            (delay, job_id, node, attempts),
        )

    def _fenced(self, sql: str, params: tuple[Any, ...]) -> Deferred[bool]:
        return self._db.call(lambda conn: bool(conn.execute(sql, params).rowcount == 1))
