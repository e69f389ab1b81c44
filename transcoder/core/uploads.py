"""
Resumable (tus) uploads: their records, where those are kept, and the lock
that lets one request at a time write to an upload.

An upload's bytes live in C{<data dir>/tus/<upload id>/}, beside C{uploads/}
(which every start empties) and on the same filesystem as C{jobs/}: once its
last byte is in, the directory (or, for an input of a multi-input job, its
file) is renamed into the job's place, exactly as a plain upload's is.

Two implementations of L{IUploadStore}: L{MemoryUploadStore} here, for unit
tests, L{transcoder.core.sqliteuploads.SQLiteUploadStore} beside the jobs
table, and L{transcoder.core.pguploads.PostgresUploadStore} for several nodes.
L{InProcessUploadLocks} is the one-node lock;
L{transcoder.core.pguploadlocks.PostgresUploadLocks} holds uploads across nodes.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

from transcoder.core.errors import Unavailable

# 160 random bits, as hex: the id is the capability (whoever has the URL may
# write to the upload, within its owner's token).
_UPLOAD_ID = re.compile(r"^[0-9a-f]{40}$")


def new_upload_id() -> str:
    return secrets.token_hex(20)


def is_upload_id(value: str) -> bool:
    return bool(_UPLOAD_ID.match(value))


@dataclass
class Upload:
    """
    One resumable upload.

    @ivar length: the declared size, or None while it is deferred.
    @ivar offset: how many bytes are durably in its file.
    @ivar metadata: its C{Upload-Metadata}, decoded (a key without value maps to "").
    @ivar expires_at: when the sweeper may remove it (POSIX time); the
        expiry counts from its last byte.
    @ivar job_id: the job it became; for an input uploaded without a
        profile, "" once complete (it waits for C{POST /jobs}), then that
        job's id once used.
    @ivar filename: the file's name inside its directory.
    """

    id: str
    owner: str | None
    length: int | None
    offset: int
    metadata: dict[str, str]
    created_at: float
    expires_at: float
    filename: str
    job_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.length is not None and self.offset == self.length


class UploadLocked(Unavailable):
    """Another request holds the upload and did not let go in time."""

    def __init__(self) -> None:
        super().__init__(
            "upload_locked", "another request is writing to this upload; try again", retry_after=5
        )


class IUploadStore(Interface):
    """
    Where upload records are kept.  Every method returns a Deferred and never
    blocks the reactor; writes for one upload land in call order.  What the
    store can do beyond this is declared by the interfaces it provides
    (L{IUploadLocks} for a lock shared by several nodes).
    """

    def create(upload: Upload) -> Deferred[None]:
        """Record a new upload."""

    def get(upload_id: str) -> Deferred[Upload | None]:
        """The upload's record, as now stored; None if there is none (or it was removed)."""

    def set_length(upload_id: str, length: int) -> Deferred[None]:
        """Fix a deferred length, once."""

    def update_offset(
        upload_id: str, expected: int, offset: int, expires_at: float
    ) -> Deferred[bool]:
        """
        Record the bytes now durably on disk and the new expiry, if the
        recorded offset is still C{expected} (what the writer last recorded
        or found): fires with whether it was written.  False means another
        request (on another node, after this one lost its lock) moved the
        upload on, or it is gone: the offset is never moved back.  Writing
        the same C{offset} and C{expires_at} again is harmless (a statement
        retried over a dropped connection).
        """

    def finish(upload_id: str, job_id: str) -> Deferred[str]:
        """
        Record the job the upload became, unless it has one already: fires
        with the job id recorded first, so that finishing twice is harmless.
        An upload kept for C{POST /jobs} is finished with "" first.
        """

    def terminate(upload_id: str) -> Deferred[None]:
        """Forget the upload (its files are the caller's to remove)."""

    def expired(now: float) -> Deferred[list[Upload]]:
        """Uploads whose C{expires_at} is past C{now}, finished ones included."""

    def close() -> Deferred[None]:
        """Wait for the writes asked for, then close."""


class IUploadLock(Interface):
    """One request's hold on one upload."""

    upload_id = Attribute("The upload held.")

    def release() -> None:
        """Let go: the next waiter (if any) gets the upload.  Harmless twice."""


class IUploadLocks(Interface):
    """
    One request at a time per upload.  A request that finds the upload held
    asks the holder to stop (the holder's C{stop}: a PATCH whose client may
    be gone drops its connection and records what it got) and waits for it,
    rather than being refused while a dead connection holds the upload.
    """

    def acquire(upload_id: str, stop: Callable[[], None]) -> Deferred[IUploadLock]:
        """
        Fires with the lock once the upload is free; C{stop} is what a later
        request calls to ask this holder to let go.  Fails with
        L{UploadLocked} when the holder does not let go within the timeout.
        """

    def held(upload_id: str) -> bool:
        """Whether a request holds the upload now (on this node)."""

    def try_acquire(upload_id: str) -> Deferred[IUploadLock | None]:
        """
        The lock if no request (on any node) holds the upload, else None at
        once: nobody is asked to stop.  For the sweeper.
        """

    def start() -> None:
        """Begin hearing other nodes' requests to stop (before the first acquire)."""

    def close() -> Deferred[None]:
        """Let go of everything held and stop listening."""


@implementer(IUploadLock)
class _Held:
    def __init__(self, owner: InProcessUploadLocks, upload_id: str, stop: Callable[[], None]):
        self.upload_id = upload_id
        self.stop = stop
        self._owner = owner
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._owner._release(self)


@implementer(IUploadLocks)
class InProcessUploadLocks:
    """L{IUploadLocks} for one node: a holder and a queue of waiters per upload."""

    def __init__(self, clock: IReactorTime, timeout: float = 5.0) -> None:
        self._clock = clock
        self._timeout = timeout
        self._holders: dict[str, _Held] = {}
        self._waiters: dict[str, list[tuple[Deferred[IUploadLock], Callable[[], None]]]] = {}

    def held(self, upload_id: str) -> bool:
        return upload_id in self._holders

    def try_acquire(self, upload_id: str) -> Deferred[IUploadLock | None]:
        if upload_id in self._holders:
            return succeed(None)
        lock = _Held(self, upload_id, lambda: None)
        self._holders[upload_id] = lock
        return succeed(lock)

    def ask_to_stop(self, upload_id: str) -> None:
        """Ask the request holding the upload (if any) to let go, as a later request would."""
        holder = self._holders.get(upload_id)
        if holder is not None:
            try:
                holder.stop()
            except Exception:
                pass

    def start(self) -> None:
        pass

    def close(self) -> Deferred[None]:
        return succeed(None)

    def acquire(self, upload_id: str, stop: Callable[[], None]) -> Deferred[IUploadLock]:
        holder = self._holders.get(upload_id)
        if holder is None:
            lock = _Held(self, upload_id, stop)
            self._holders[upload_id] = lock
            return succeed(lock)
        d: Deferred[IUploadLock] = Deferred()
        waiters = self._waiters.setdefault(upload_id, [])
        # Only the newest request gets the upload: older waiters are clients
        # that have since come back again.
        for old, _ in waiters:
            old.errback(UploadLocked())
        waiters[:] = [(d, stop)]

        def too_late() -> None:
            if not d.called:
                self._waiters.get(upload_id, []).clear()
                d.errback(UploadLocked())

        call = self._clock.callLater(self._timeout, too_late)

        def settled(result: object) -> object:
            if call.active():
                call.cancel()
            return result

        d.addBoth(settled)
        try:
            holder.stop()
        except Exception:
            pass
        return d

    def _release(self, lock: _Held) -> None:
        if self._holders.get(lock.upload_id) is not lock:
            return
        del self._holders[lock.upload_id]
        waiters = self._waiters.pop(lock.upload_id, [])
        for d, stop in waiters:
            if not d.called:
                nxt = _Held(self, lock.upload_id, stop)
                self._holders[lock.upload_id] = nxt
                d.callback(nxt)
                return


@implementer(IUploadStore)
class MemoryUploadStore:
    """L{IUploadStore} in a dict, for tests: every Deferred has fired on return."""

    def __init__(self) -> None:
        self.uploads: dict[str, Upload] = {}
        self.closed = False

    def create(self, upload: Upload) -> Deferred[None]:
        if upload.id in self.uploads:
            return fail(ValueError(f"upload {upload.id} exists"))
        self.uploads[upload.id] = replace(upload, metadata=dict(upload.metadata))
        return succeed(None)

    def get(self, upload_id: str) -> Deferred[Upload | None]:
        u = self.uploads.get(upload_id)
        return succeed(replace(u, metadata=dict(u.metadata)) if u is not None else None)

    def set_length(self, upload_id: str, length: int) -> Deferred[None]:
        u = self.uploads.get(upload_id)
        if u is not None and u.length is None:
            u.length = length
        return succeed(None)

    def update_offset(
        self, upload_id: str, expected: int, offset: int, expires_at: float
    ) -> Deferred[bool]:
        u = self.uploads.get(upload_id)
        if u is None or u.offset != expected:
            return succeed(u is not None and (u.offset, u.expires_at) == (offset, expires_at))
        u.offset, u.expires_at = offset, expires_at
        return succeed(True)

    def finish(self, upload_id: str, job_id: str) -> Deferred[str]:
        u = self.uploads.get(upload_id)
        if u is None:
            return succeed(job_id)
        if not u.job_id:
            u.job_id = job_id
        return succeed(u.job_id)

    def terminate(self, upload_id: str) -> Deferred[None]:
        self.uploads.pop(upload_id, None)
        return succeed(None)

    def expired(self, now: float) -> Deferred[list[Upload]]:
        return succeed([replace(u) for u in self.uploads.values() if u.expires_at <= now])

    def close(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)
