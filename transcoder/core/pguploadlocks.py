"""
One request at a time per upload across the nodes of a cluster: a session
advisory lock per upload, on a connection this node keeps for them.

Within the node, requests queue as on one node (L{InProcessUploadLocks}: a
later request asks the holder to stop and waits); the node takes the
upload's advisory lock when its first request gets the upload and lets go of
it when its last one is done.  A request that finds the lock taken by another
node NOTIFYs C{transcoder_uploads} with the upload's id (again every second),
and tries again every 0.2 s until the timeout (then 423).  Every node
LISTENs there, on a thread and a connection of their own, and asks its own
holder of that upload to stop: a PATCH whose client went away ends, records
what it wrote, and lets go.

A node that dies holds nothing: its session ends and the database frees its
locks (at once for a killed process; for a host that vanished, within the
TCP keepalive set on the lock connection).  If this node's lock connection
is lost, its locks went with it: the requests holding uploads are asked to
stop, and the locks are taken again by the next requests.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from transcoder.core.pglisten import Listener
from transcoder.core.pguploads import Connection
from transcoder.core.uploads import InProcessUploadLocks, IUploadLock, IUploadLocks, UploadLocked

log = Logger()

CHANNEL = "transcoder_uploads"
# How often a waiting request tries the lock again, and asks the holder again.
POLL = 0.2
RENOTIFY = 1.0
# How often a node holding uploads checks that its lock connection (and so its locks) lives.
CHECK = 5.0
# The server notices a vanished client host within about idle + interval * count seconds.
_KEEPALIVE = (
    "SET tcp_keepalives_idle = 5",
    "SET tcp_keepalives_interval = 2",
    "SET tcp_keepalives_count = 3",
)


def lock_key(upload_id: str) -> int:
    """The advisory lock's bigint key: the id's first 64 random bits, signed."""
    n = int(upload_id[:16], 16)
    return n - (1 << 64) if n >= 1 << 63 else n


@implementer(IUploadLock)
class _ClusterHeld:
    def __init__(self, owner: PostgresUploadLocks, local: IUploadLock) -> None:
        self.upload_id: str = local.upload_id
        self._owner = owner
        self._local = local
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self._local)


@implementer(IUploadLocks)
class PostgresUploadLocks:
    """L{IUploadLocks} for several nodes on one PostgreSQL database; see the module docstring."""

    def __init__(
        self, url: str, reactor: Any, *, timeout: float = 5.0, connect_timeout: float = 10
    ) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._local = InProcessUploadLocks(reactor, timeout)
        # Uploads whose advisory lock this node's session holds (reactor thread only).
        self._taken: set[str] = set()
        # Tells this node's notifications from others'.
        self._me = secrets.token_hex(8)
        self._db = Connection(
            url,
            reactor,
            "upload locks",
            connect_timeout=connect_timeout,
            # A statement that met a lost session must not run again on a new one
            # as if nothing happened: the locks it assumed are gone.
            retry=False,
            setup=_KEEPALIVE,
            on_new=lambda: reactor.callFromThread(self._lost),
        )
        self._listener = Listener(
            url,
            connect_timeout,
            reactor,
            CHANNEL,
            self._heard,
            name="upload locks LISTEN",
            log=log,
            lost="lost the upload-lock feed ({error}); reconnecting",
            regained="listening for other nodes' upload requests again",
        )
        self._check: LoopingCall | None = None

    # IUploadLocks

    def held(self, upload_id: str) -> bool:
        return self._local.held(upload_id)

    def acquire(self, upload_id: str, stop: Callable[[], None]) -> Deferred[IUploadLock]:
        return ensureDeferred(self._acquire(upload_id, stop))

    def try_acquire(self, upload_id: str) -> Deferred[IUploadLock | None]:
        return ensureDeferred(self._try_acquire(upload_id))

    def start(self) -> None:
        self._listener.start()
        self._check = LoopingCall(self._check_session)
        self._check.clock = self._reactor
        self._check.start(CHECK, now=False).addErrback(
            lambda f: log.failure("checking the upload locks' connection stopped", f)
        )

    def close(self) -> Deferred[None]:
        if self._check is not None and self._check.running:
            self._check.stop()
        self._check = None
        self._taken.clear()
        d = self._listener.stop()
        return d.addCallback(
            lambda _: self._db.close(lambda conn: conn.execute("SELECT pg_advisory_unlock_all()"))
        )

    # The lock.

    async def _acquire(self, upload_id: str, stop: Callable[[], None]) -> IUploadLock:
        deadline = self._reactor.seconds() + self._timeout
        local = await self._local.acquire(upload_id, stop)
        try:
            if upload_id not in self._taken:
                await self._take(upload_id, deadline)
        except BaseException:
            self._release(local)
            raise
        return _ClusterHeld(self, local)

    async def _try_acquire(self, upload_id: str) -> IUploadLock | None:
        local = await self._local.try_acquire(upload_id)
        if local is None:
            return None
        try:
            if upload_id not in self._taken and not await self._try(upload_id):
                self._release(local)
                return None
        except BaseException:
            self._release(local)
            raise
        return _ClusterHeld(self, local)

    async def _take(self, upload_id: str, deadline: float) -> None:
        asked: float | None = None
        while not await self._try(upload_id):
            now = self._reactor.seconds()
            if now >= deadline:
                raise UploadLocked()
            if asked is None or now - asked >= RENOTIFY:
                asked = now
                await self._db.call(self._notify(upload_id))
            await deferLater(self._reactor, POLL, lambda: None)

    def _notify(self, upload_id: str) -> Callable[[Any], None]:
        payload = json.dumps({"id": upload_id, "from": self._me})

        def notify(conn: Any) -> None:
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))

        return notify

    async def _try(self, upload_id: str) -> bool:
        key = lock_key(upload_id)
        got = await self._db.call(
            lambda c: bool(c.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0])
        )
        if got:
            self._taken.add(upload_id)
        return got

    def _release(self, local: IUploadLock) -> None:
        upload_id = local.upload_id
        local.release()
        # A request of this node that was waiting has it now, and keeps the advisory lock.
        if self._local.held(upload_id) or upload_id not in self._taken:
            return
        self._taken.discard(upload_id)
        key = lock_key(upload_id)

        def unlock(conn: Any) -> None:
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))

        def failed(f: Failure) -> None:
            # The session is gone, and its locks with it.
            log.warn("upload {id}: unlocking failed: {error}", id=upload_id, error=f.value)

        self._db.call(unlock).addErrback(failed)

    # Other nodes and the session.

    def _heard(self, payload: str) -> None:
        """A notification on C{CHANNEL}: another node's request, or this node's own echo."""
        try:
            body = json.loads(payload)
            upload_id, sender = str(body["id"]), body.get("from")
        except (ValueError, KeyError, TypeError):
            return
        if sender != self._me:
            self._asked(upload_id)

    def _asked(self, upload_id: str) -> None:
        """Another node wants the upload: this node's holder is asked to stop."""
        if upload_id in self._taken:
            self._local.ask_to_stop(upload_id)

    def _lost(self) -> None:
        """The lock connection was made again: the old session's locks are gone."""
        lost, self._taken = self._taken, set()
        for upload_id in lost:
            log.warn("upload {id}: its lock was lost with the database connection", id=upload_id)
            self._local.ask_to_stop(upload_id)

    def _check_session(self) -> Deferred[None] | None:
        if not self._taken:
            return None

        def ping(conn: Any) -> None:
            conn.execute("SELECT 1")

        # A failure here was a lost connection: the next call makes a new one and
        # calls _lost; make it now rather than at the next request.
        d = self._db.call(ping).addErrback(lambda f: self._db.call(lambda conn: None))
        return d.addErrback(lambda f: None)
