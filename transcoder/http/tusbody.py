"""
The body of a tus PATCH (or of a creation-with-upload POST): appended to the
upload's file at its offset through a L{Spool}, in constant memory, with
the upload's SHA-256 continued on the way.

The request decides in C{gotLength} whether to take the body; the upload's
lock and its SHA-256 state may not be at hand yet (another request holds
the upload and is asked to stop; after a restart the bytes on disk are
hashed again).  Then the body waits, the socket paused: what the first read
brought is kept in memory (at most one read), and the rest stays in the
kernel until the upload is ready.

A long PATCH is checkpointed: every L{CHECKPOINT_SECONDS}, or every
L{CHECKPOINT_BYTES}, whichever comes first, the spool syncs the file and its
offset is recorded, so that a crash (kill -9, a dead host) loses at most
that much of it.  Not a PATCH with C{Upload-Checksum}: its chunk is kept
whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from transcoder.core.errors import DomainError
from transcoder.core.uploads import Upload
from transcoder.http.bodies import IRequestBody, _storage_error, spool_limits
from transcoder.http.errors import APIError
from transcoder.http.spool import Checkpoints, Spool, SpooledFile
from transcoder.http.tusproto import tus_error

if TYPE_CHECKING:
    from transcoder.http.tusupload import Prepared, TusUploads

log = Logger()

# A crash loses at most a second of a client's sending (what it sends again
# on resuming), and at most this many bytes of a fast one.  Each costs a
# drain of the writers, an fdatasync and one store write (docs/performance.md).
CHECKPOINT_SECONDS = 1.0
CHECKPOINT_BYTES = 64 << 20


def _reopen(path: Any) -> Any:
    # The upload's file exists: written at its offset, never truncated here.
    return open(path, "r+b", buffering=0)


@implementer(IRequestBody)
class TusPatchBody:
    """L{IRequestBody} for the bytes of one PATCH; see the module docstring."""

    def __init__(
        self,
        uploads: TusUploads,
        prepared: Deferred[Prepared],
        nbytes: int,
        crowd: int = 1,
    ) -> None:
        self.reactor = uploads.reactor
        self._uploads = uploads
        self._nbytes = nbytes
        self._crowd = crowd
        self._received = 0
        self._waiting: list[bytes] = []
        self._ready: list[Deferred[None]] = []
        self._prep: Prepared | None = None
        self._error: DomainError | None = None
        self._spool: Spool | None = None
        self._spool_error: OSError | None = None
        self._finishing = False
        self._ended = False
        self._pump_hashes = False
        # The checkpoint being recorded: the PATCH's own record waits for it.
        self._recording: Deferred[None] | None = None
        self.onFatal: Callable[[DomainError], None] = lambda e: None
        self.onPressure: Callable[[bool], None] = lambda paused: None
        self._paused_here = False
        prepared.addCallbacks(self._prepared, self._not_prepared)
        if self._error is not None:
            # Refused at once: before 100 Continue and before any byte.
            raise self._error
        if self._prep is None:
            # Not ready: stop reading once what this read brought is parsed.
            self.reactor.callLater(0, self._pause_until_ready)  # type: ignore[attr-defined]

    @property
    def ready(self) -> bool:
        """Whether the bytes go to the file as they come (a pump may read them)."""
        return self._spool is not None

    @property
    def upload(self) -> Upload | None:
        return self._prep.upload if self._prep is not None else None

    def _pause_until_ready(self) -> None:
        if self._spool is None and not self._ended and self._error is None:
            self._paused_here = True
            self.onPressure(True)

    def _prepared(self, prep: Prepared) -> None:
        self._prep = prep
        if self._ended and not self._finishing:
            # The client went away while it waited: nothing was written, so
            # the hash is still the file's (and the PATCH is no longer in flight).
            self._uploads.release(prep, prep.sha if prep.upload.job_id is None else None)
            return
        prep.stop_request = self.stop
        if not self._nbytes:
            # Nothing to write (an empty PATCH: its offset is checked, its
            # expiry renewed): no spool, no file opened.
            self._fire_ready()
            return
        highWater, stagingBuffers = spool_limits(self._crowd)
        self._spool = Spool(
            self.reactor,
            on_pressure=lambda paused: self.onPressure(paused),
            on_error=self._spool_failed,
            opener=_reopen,
            high_water=highWater,
            staging_buffers=stagingBuffers,
        )
        self._spool.open(
            prep.path,
            size=prep.offset + self._nbytes,
            start=prep.offset,
            sha=prep.sha,
            extra=(prep.checksum_hash,) if prep.checksum_hash is not None else (),
            keep=True,
            checkpoints=(
                Checkpoints(CHECKPOINT_SECONDS, CHECKPOINT_BYTES, self._synced)
                if prep.checksum is None
                else None
            ),
        )
        for data in self._waiting:
            self._spool.write(data)
        self._waiting = []
        self._fire_ready()

    def _fire_ready(self) -> None:
        if self._paused_here:
            self._paused_here = False
            self.onPressure(False)
        for d in self._ready:
            d.callback(None)
        self._ready = []

    def _synced(self, size: int) -> None:
        prep = self._prep
        if prep is None or self._ended or self._recording is not None or size <= prep.recorded:
            # The PATCH's own record (or the next checkpoint) covers it.
            return

        def recorded(result: object) -> None:
            self._recording = None
            if isinstance(result, Failure):
                error = result.value
                if not isinstance(error, DomainError):
                    log.failure("upload {id}: recording a checkpoint failed", result,
                                id=prep.upload.id)  # fmt: skip
                    return
                # Another request moved the upload on: this one stops now
                # (its own record will find the same and answer 409).
                if not self._ended:
                    self.onFatal(error)

        self._recording = self._uploads.checkpoint(prep, size)
        self._recording.addBoth(recorded)

    def _not_prepared(self, f: Failure) -> None:
        error = f.value if isinstance(f.value, DomainError) else None
        if error is None:
            log.failure("preparing a PATCH failed", failure=f)
            error = tus_error(500, "internal", "internal server error")
        self._error = error
        self._waiting = []
        for d in self._ready:
            d.errback(error)
        self._ready = []
        if not self._ended:
            self.onFatal(error)

    def stop(self) -> None:
        """Another request wants the upload: end this one, keeping what it wrote."""
        if self._ended:
            # Its body is in (or cut off): it is recording its offset and lets go
            # once that is done.  Failing it now would answer its client twice.
            return
        self.onFatal(tus_error(409, "superseded", "another request took over this upload"))

    # What the request calls.

    def dataReceived(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._nbytes:
            raise self.too_large()
        if self._spool is not None:
            self._spool.write(data)
        else:
            self._waiting.append(data)

    def too_large(self) -> APIError:
        return tus_error(413, "too_large", "the body goes past the upload's length")

    def room(self) -> int:
        return self._nbytes - self._received

    def file_start(self) -> int:
        """Where the file starts in the body (before it: the offset), for a pump's alignment."""
        return -(self._prep.offset if self._prep is not None else 0)

    def lend(self, view: memoryview, giveBack: Callable[[], None]) -> None:
        assert self._spool is not None
        self._spool.lend(view, giveBack, hashed=self._pump_hashes)

    def hashes(self, stop: Callable[[], bool]) -> list[Any] | None:
        assert self._spool is not None
        objects = self._spool.hashes(stop)
        self._pump_hashes = objects is not None
        return objects

    def lent(self, nbytes: int) -> None:
        self._received += nbytes

    def _when_ready(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._error is not None:
            d.errback(self._error)
        elif self._spool is not None or (self._prep is not None and not self._nbytes):
            d.callback(None)
        else:
            self._ready.append(d)
        return d

    def finish(self) -> Deferred[Upload]:
        """Every byte came: fires with the upload once they are durably on disk."""
        self._finishing = True
        self._ended = True
        return self._when_ready().addCallback(lambda _: self._close(complete=True))

    def abort(self) -> None:
        """Cut off (the client went, a timeout, another request took over): keep what came."""
        if self._ended:
            return
        self._ended = True
        if self._prep is None:
            return
        if self._spool is None:
            if not self._nbytes:
                self._uploads.release(self._prep, None)
            return
        if self._spool_error is not None:
            self._discard()
            return
        self._close(complete=False).addErrback(lambda f: None)

    def _close(self, complete: bool) -> Deferred[Upload]:
        spool, prep = self._spool, self._prep
        assert prep is not None
        if spool is None:
            d = self._uploads.patched(prep, prep.offset, complete, True)
            self._uploads.ending(d)
            return d
        spool.close_file()

        async def done(files: list[SpooledFile]) -> Upload:
            (f,) = files
            if self._recording is not None:
                # Its offset is the one this record is compared with.
                await self._recording
            # A pump that hashed may have hashed bytes it had no time to
            # lend: then the SHA-256 object is not the file's.
            trusted = complete or not self._pump_hashes
            return await self._uploads.patched(prep, f.size, complete, trusted)

        def failed(f: Failure) -> Failure:
            self._discard()
            if not f.check(DomainError):
                return Failure(_storage_error(f.value or Exception()))
            return f

        from twisted.internet.defer import ensureDeferred

        d = spool.finish().addCallbacks(lambda files: ensureDeferred(done(files)), failed)
        # The service's stop waits for it (a SIGTERM just after the client went).
        self._uploads.ending(d)
        return d

    def _spool_failed(self, error: OSError) -> None:
        log.warn("tus PATCH: write failed: {error}", error=error)
        self._spool_error = error
        if not self._finishing:
            self.onFatal(_storage_error(error))

    def _discard(self) -> None:
        """A write failed: the chunk is dropped, the offset stays where it was."""
        spool, prep = self._spool, self._prep
        assert spool is not None and prep is not None
        spool.abort(
            cleanup=lambda: self.reactor.callFromThread(  # type: ignore[attr-defined]
                self._uploads.discard, prep
            )
        )
