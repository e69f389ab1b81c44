"""
Removing resumable uploads nobody will finish: those whose expiry
(C{--upload-expiry} after their last byte) has passed, and directories under
C{tus/} that no record owns (left by a crash between the two).

Each upload is taken with the lock's C{try_acquire} (one held by a request,
on any node, is left alone) and its record read again under it, so several
nodes may sweep one shared database and data dir at once: whichever takes
an upload first removes it, the others find no record (or a renewed expiry)
and leave it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from transcoder.core.files import remove
from transcoder.core.uploads import IUploadLocks, IUploadStore, is_upload_id

log = Logger()


class UploadSweeper:
    """
    Every C{interval} seconds, remove the expired uploads that no request
    holds: their files, their records; C{on_expired(id)} is told of each.
    It runs as long as the uploads are served, so it also closes their store.
    """

    def __init__(
        self,
        clock: IReactorTime,
        store: IUploadStore,
        locks: IUploadLocks,
        directory: Path,
        on_expired: Callable[[str], None] = lambda upload_id: None,
        interval: float = 60.0,
        orphan_grace: float = 0.0,
    ) -> None:
        """
        @param orphan_grace: how old (seconds, by its mtime) a directory
            without a record must be to go: with a store shared by several
            nodes, another node may have made the directory and not yet
            the record.
        """
        self._clock = clock
        self._store = store
        self._locks = locks
        self._dir = Path(directory)
        self._on_expired = on_expired
        self._interval = interval
        self._orphan_grace = orphan_grace
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        self._locks.start()
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("the upload sweeper stopped", f)
        )

    def stop(self) -> Deferred[None]:
        """Stop sweeping, then close the locks, then the store (its writes are waited for)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        d = self._locks.close()
        d.addErrback(lambda f: log.failure("closing the upload locks failed", f))
        return d.addCallback(lambda _: self._store.close())

    def sweep(self) -> Deferred[None]:
        return ensureDeferred(self._sweep())

    async def _sweep(self) -> None:
        try:
            now = self._clock.seconds()
            for upload in await self._store.expired(now):
                lock = await self._locks.try_acquire(upload.id)
                if lock is None:
                    continue
                try:
                    # Another node may have removed it, or a PATCH renewed it, since.
                    current = await self._store.get(upload.id)
                    if current is None or current.expires_at > now:
                        continue
                    log.info("upload {id} expired: removed", id=upload.id)
                    remove(self._dir / upload.id)
                    await self._store.terminate(upload.id)
                finally:
                    lock.release()
                self._on_expired(upload.id)
            if self._dir.is_dir():
                for entry in self._dir.iterdir():
                    if is_upload_id(entry.name):
                        await self._orphan(entry, now)
        except Exception:
            log.failure("sweeping expired uploads failed")

    async def _orphan(self, entry: Path, now: float) -> None:
        if self._orphan_grace:
            try:
                if entry.stat().st_mtime > now - self._orphan_grace:
                    return
            except OSError:
                return
        if await self._store.get(entry.name) is not None:
            return
        lock = await self._locks.try_acquire(entry.name)
        if lock is None:
            return
        try:
            if await self._store.get(entry.name) is None:
                log.info("removing {path}: no upload owns it", path=str(entry))
                remove(entry)
        finally:
            lock.release()
