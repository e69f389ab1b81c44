"""
Removing resumable uploads nobody will finish: those whose expiry
(C{--upload-expiry} after their last byte) has passed, and directories under
C{tus/} that no record owns (left by a crash between the two).
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
    ) -> None:
        self._clock = clock
        self._store = store
        self._locks = locks
        self._dir = Path(directory)
        self._on_expired = on_expired
        self._interval = interval
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True).addErrback(
            lambda f: log.failure("the upload sweeper stopped", f)
        )

    def stop(self) -> Deferred[None]:
        """Stop sweeping, then close the store (its writes asked for are waited for)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return self._store.close()

    def sweep(self) -> Deferred[None]:
        return ensureDeferred(self._sweep())

    async def _sweep(self) -> None:
        try:
            for upload in await self._store.expired(self._clock.seconds()):
                if self._locks.held(upload.id):
                    continue
                log.info("upload {id} expired: removed", id=upload.id)
                remove(self._dir / upload.id)
                await self._store.terminate(upload.id)
                self._on_expired(upload.id)
            if self._dir.is_dir():
                for entry in self._dir.iterdir():
                    if not is_upload_id(entry.name):
                        continue
                    if await self._store.get(entry.name) is None and not self._locks.held(
                        entry.name
                    ):
                        log.info("removing {path}: no upload owns it", path=str(entry))
                        remove(entry)
        except Exception:
            log.failure("sweeping expired uploads failed")
