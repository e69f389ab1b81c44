"""
Where an upload's body goes: the interfaces between a request and the
resource that takes its body (L{IBodyReceiver}, L{IRequestBody}), and the
raw body, written through a L{Spool} into the upload's staging directory,
C{uploads/<job id>/}.  The multipart body is in L{transcoder.http.formdata}.

L{TranscoderRequest} feeds a body chunk by chunk as it arrives;
L{read_stock_body} feeds one that stock twisted.web has already spooled.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import Interface, implementer

from transcoder.core.errors import DomainError
from transcoder.core.jobs import InputFile
from transcoder.core.profiles import Profile
from transcoder.core.submit import Submission
from transcoder.http.errors import APIError
from transcoder.http.fields import (
    body_sha256,
    check_callback,
    content_md5,
    input_digests,
    query_fields,
    split_fields,
)
from transcoder.http.names import extension, sanitise_filename
from transcoder.http.spool import Opener, Spool, SpooledFile, _open
from transcoder.http.writer import STAGING_BUFFERS

log = Logger()


class IRequestBody(Interface):
    """Where the chunks of one request's body go."""

    def dataReceived(data: bytes) -> None:
        """A chunk of the body.  Raise L{APIError} to refuse the rest."""

    def finish() -> Deferred[Any]:
        """The body is complete: fire once it is on disk and checked; errback with L{APIError}."""

    def abort() -> None:
        """Throw away everything written.  Safe to call more than once, or after L{finish}."""


class IBodyReceiver(Interface):
    """A resource that takes streamed bodies."""

    def receive_body(request: server.Request, length: int | None) -> IRequestBody:
        """
        Accept the body of C{request}, whose C{method}, C{uri}, C{path},
        C{args} and headers are set, or raise L{APIError} to refuse it before
        it is read.  C{length} is the declared length, or None when chunked.
        """


def _storage_error(error: BaseException) -> APIError:
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return APIError(507, "insufficient_storage", "the server ran out of disk space")
    return APIError(500, "storage_error", "the server could not store the upload")


def spool_limits(crowd: int) -> tuple[int, int]:
    """
    The backlog (bytes) and staging buffers an upload's spool may hold when
    C{crowd} uploads are in flight.  Each upload the reactor reads holds up
    to both: with many at once, less each, so that the server's memory stays
    about the same however many come (the load test's 16 at once peaked at
    110-136 MiB with 4 MiB and four buffers each, 109-110 MiB with these).
    """
    if crowd <= 1:
        return 4 << 20, STAGING_BUFFERS
    return (2 << 20) if crowd < 4 else (1 << 20), 2


def uploads_in_flight(request: server.Request) -> int:
    """Uploads being received on the request's site (a L{TranscoderSite}), not counting it."""
    site = getattr(getattr(request, "channel", None), "site", None)
    uploads = getattr(site, "uploads", None)
    return len(uploads) if uploads else 0


def crowd_of(request: server.Request) -> int:
    """Uploads in flight on the request's site, this one included."""
    return uploads_in_flight(request) + 1


class BaseBody:
    """What raw and multipart bodies share: the staging directory, the spool, the size cap."""

    def __init__(
        self,
        reactor: IReactorThreads,
        staging: Path,
        job_id: str,
        max_size: int,
        opener: Opener,
        crowd: int = 1,
        admit: Callable[[], None] | None = None,
    ) -> None:
        """
        @param admit: raises the server's own refusals (queue full, disk
            short), called once the request's own checks have passed and
            before anything is created on disk.
        """
        if admit is not None:
            admit()
        self.job_id = job_id
        self.reactor = reactor
        self.staging = staging
        self._max = max_size
        self._received = 0
        self._finishing = False
        self._aborted = False
        # Set by TranscoderRequest: stop the upload mid-body with an error.
        self.onFatal: Callable[[APIError], None] = lambda e: None
        self.onPressure: Callable[[bool], None] = lambda paused: None
        staging.mkdir(parents=True)
        highWater, stagingBuffers = spool_limits(crowd)
        self.spool = Spool(
            reactor,
            on_pressure=lambda paused: self.onPressure(paused),
            on_error=self._spool_failed,
            opener=opener,
            high_water=highWater,
            staging_buffers=stagingBuffers,
        )

    def _count(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._max:
            raise self.too_large()

    def too_large(self) -> APIError:
        return APIError(413, "too_large", f"the upload exceeds the maximum of {self._max} bytes")

    def room(self) -> int:
        """How many more bytes the body may bring."""
        return self._max - self._received

    def _spool_failed(self, error: OSError) -> None:
        log.warn("upload {job}: write failed: {error}", job=self.job_id, error=error)
        if not self._finishing:
            self.onFatal(_storage_error(error))

    def _finished_files(self, d: Deferred[list[SpooledFile]]) -> Deferred[list[SpooledFile]]:
        def failed(f: Failure) -> Failure:
            if not f.check(DomainError):
                return Failure(_storage_error(f.value or Exception()))
            return f

        return d.addErrback(failed)

    def abort(self) -> None:
        if self._aborted:
            return
        self._aborted = True
        staging = self.staging
        self.spool.abort(cleanup=lambda: shutil.rmtree(staging, ignore_errors=True))


@implementer(IRequestBody)
class RawBody(BaseBody):
    """The whole body is one input: C{curl -T}, C{--data-binary}, chunked."""

    def __init__(
        self,
        reactor: IReactorThreads,
        request: server.Request,
        staging: Path,
        job_id: str,
        profile: Profile,
        max_size: int,
        opener: Opener = _open,
        length: int | None = None,
        admit: Callable[[], None] | None = None,
    ) -> None:
        fields = query_fields(request.args or {})
        control, raw_params = split_fields(fields)
        if len(profile.inputs) != 1:
            raise APIError(
                422,
                "needs_multipart",
                f"profile {profile.name} takes several inputs ({', '.join(profile.inputs)}): "
                "send them as multipart/form-data fields of those names",
            )
        self.profile = profile
        self.params = profile.validate_params(raw_params)
        self.callback_url = check_callback(control.get("callback_url"))
        self.role = profile.inputs[0]
        self.filename = sanitise_filename(control.get("filename"), default="input")
        self.expected = input_digests(control, profile)
        whole = body_sha256(request)
        if whole is not None:
            if self.expected.get(self.role, whole) != whole:
                raise APIError(
                    400, "conflicting_fields", "the body's SHA-256 is given two different values"
                )
            self.expected[self.role] = whole
        self.md5 = content_md5(request)
        super().__init__(reactor, staging, job_id, max_size, opener, crowd_of(request), admit)
        self.path = staging / f"input-{self.role}{extension(self.filename)}"
        self.spool.open(self.path, md5=self.md5 is not None, size=length)
        self._pump_hashes = False

    def dataReceived(self, data: bytes) -> None:
        self._count(data)
        self.spool.write(data)

    def lend(self, view: memoryview, giveBack: Callable[[], None]) -> None:
        """A L{SocketPump}'s buffer, on the pump's thread, written after what came before."""
        self.spool.lend(view, giveBack, hashed=self._pump_hashes)

    def hashes(self, stop: Callable[[], bool]) -> list[Any] | None:
        """For a L{SocketPump} that hashes what it lends: see L{Spool.hashes}."""
        objects = self.spool.hashes(stop)
        self._pump_hashes = objects is not None
        return objects

    def lent(self, nbytes: int) -> None:
        """Count what a pump lent, once it has stopped (its length was checked up front)."""
        self._received += nbytes

    def finish(self) -> Deferred[Submission]:
        self._finishing = True
        if self._received == 0:
            return fail(APIError(400, "empty_body", "the upload is empty"))
        self.spool.close_file()
        return self._finished_files(self.spool.finish()).addCallback(self._checked)

    def _checked(self, files: list[SpooledFile]) -> Submission:
        (f,) = files
        want = self.expected.get(self.role)
        if want is not None and want != f.sha256:
            raise APIError(400, "digest_mismatch", "the body's SHA-256 does not match")
        if self.md5 is not None and self.md5 != f.md5:
            raise APIError(400, "digest_mismatch", "the body's MD5 does not match Content-MD5")
        return Submission(
            job_id=self.job_id,
            staging=self.staging,
            profile=self.profile,
            params=self.params,
            inputs=[
                InputFile(self.role, self.filename, f.size, f.sha256, f.path.name),
            ],
            callback_url=self.callback_url,
        )


def read_stock_body(
    request: server.Request, body: IRequestBody, chunk: int = 1 << 20
) -> Deferred[None]:
    """
    Feed a body that stock twisted.web already spooled (under C{twistd web},
    or with treq's StubTreq) to an L{IRequestBody}: one extra copy, but the
    same checks and the same files.  Reading waits while the spool is behind,
    so memory stays bounded as on the streaming path.
    """
    content = request.content
    waiting: list[Deferred[None]] = []
    paused = [False]

    def pressure(on: bool) -> None:
        paused[0] = on
        if not on and waiting:
            waiting.pop().callback(None)

    body_any: Any = body
    body_any.onPressure = pressure

    async def pump() -> None:
        if content is None:
            return
        content.seek(0)
        while data := content.read(chunk):
            body.dataReceived(data)
            if paused[0]:
                resumed: Deferred[None] = Deferred()
                waiting.append(resumed)
                await resumed

    return ensureDeferred(pump())
