"""
C{/jobs}: uploads (C{POST}/C{PUT}) that become jobs, and the listing (C{GET}),
a page at a time with opaque cursors.  Each job's own resources are in
L{transcoder.http.job}.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import parse_qs
from twisted.web.resource import Resource
from zope.interface import implementer

from transcoder.core.errors import DomainError
from transcoder.core.jobs import Job, JobState, is_job_id, new_job_id
from transcoder.core.profiles import Profile, profile_for
from transcoder.core.registry import JobRegistry
from transcoder.core.submit import UPLOADS_KEY, Submission, submit
from transcoder.core.tombstones import Tombstones
from transcoder.http.bodies import (
    IBodyReceiver,
    IRequestBody,
    RawBody,
    read_stock_body,
    uploads_in_flight,
)
from transcoder.http.errors import APIError, http_error, not_found
from transcoder.http.expired import find_expired
from transcoder.http.fields import query_arg
from transcoder.http.formdata import MultipartBody, multipart_boundary
from transcoder.http.job import JobResource, job_json
from transcoder.http.publicurl import request_base_url
from transcoder.http.query import bad_query, int_arg
from transcoder.http.request import TranscoderRequest
from transcoder.http.responses import (
    ErrorResource,
    JSONResource,
    disconnected,
    finish_error,
    finish_json,
    write_error,
    write_json,
)
from transcoder.http.spool import Opener, _open
from transcoder.http.views import job_view

log = Logger()

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

_CURSOR = re.compile(r"^v1:(\d{1,18})$")

FreeDisk = Callable[[Path], int]


def free_space(path: Path) -> int:
    """The free bytes of the filesystem that holds C{path}."""
    return shutil.disk_usage(path).free


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence number a cursor continues below; L{APIError} 400 if it is not one of ours."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        text = ""
    m = _CURSOR.match(text)
    if m is None:
        raise bad_query("cursor", "is not a cursor this server gave out")
    return int(m.group(1))


UploadReport = Callable[[str, int], None]


class _UploadOutcome:
    """
    Reports how one upload ended, once: C{created}, C{rejected} (a 4xx),
    C{failed} (a 5xx) or C{aborted} (the client went away first).
    """

    def __init__(self, report: UploadReport, request: server.Request, length: int | None) -> None:
        self._report = report
        self._length = length or 0
        self._done = False
        request.notifyFinish().addErrback(self._lost, request)

    def __call__(self, outcome: str, nbytes: int | None = None) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._report(outcome, self._length if nbytes is None else nbytes)
        except Exception:
            log.failure("could not report an upload's outcome")

    def error(self, error: DomainError, read: bool = True) -> None:
        """An error answer, after the body was read (C{read}) or before any of it."""
        self("rejected" if http_error(error).status < 500 else "failed", None if read else 0)

    def _lost(self, f: Failure, request: server.Request) -> None:
        # A request refused mid-body (TranscoderRequest._refuse) also ends in a
        # lost connection; that one was no client's doing, and is not counted.
        if not getattr(request, "_refused", False):
            self("aborted", 0)


@implementer(IBodyReceiver)
class JobsResource(JSONResource):
    """C{/jobs}: C{POST}/C{PUT} a video to create a job; C{GET} lists jobs."""

    def __init__(
        self,
        reactor: IReactorThreads,
        registry: JobRegistry,
        profiles: Mapping[str, Profile],
        max_upload_size: int,
        opener: Opener = _open,
        *,
        clock: IReactorTime | None = None,
        private: bool = False,
        min_free_disk: int = 0,
        free_disk: FreeDisk = free_space,
        upload_finished: UploadReport | None = None,
        tombstones: Tombstones | None = None,
        from_uploads: Callable[[server.Request], IRequestBody | None] | None = None,
    ) -> None:
        """
        @param upload_finished: called with each upload's outcome and size in bytes.
        @param from_uploads: gives the body of a request that names finished
            tus uploads instead of bringing its inputs (see L{transcoder.http.tusjobs}).
        @param clock: times long-polls; the reactor when not given.
        @param private: each token sees only its own jobs (tokens are configured).
        @param min_free_disk: uploads are refused (507) while the data
            directory has less free space than this.
        @param tombstones: the jobs retention removed, answered 410 C{expired}.
        """
        super().__init__()
        self._reactor = reactor
        self._clock = clock if clock is not None else IReactorTime(reactor)
        self._registry = registry
        self._profiles = profiles
        self._max = max_upload_size
        self._opener = opener
        self._private = private
        self._min_free = min_free_disk
        self.free_space = free_disk
        self._upload_finished = upload_finished
        self._tombstones = tombstones
        self._from_uploads = from_uploads

    def getChild(self, path: bytes, request: server.Request) -> Resource:  # type: ignore[override]
        if path == b"":
            return self
        job_id = path.decode("ascii", "replace")
        job = self._visible_job(job_id, request)
        owner = getattr(request, "owner", None)

        def expired() -> APIError | None:
            return find_expired(self._tombstones, job_id, owner, private=self._private)

        if job is None:
            return ErrorResource(expired() or not_found("job"))
        return JobResource(self._clock, self._registry, job, expired)

    def _visible_job(self, job_id: str, request: server.Request) -> Job | None:
        job = self._registry.get(job_id) if is_job_id(job_id) else None
        if job is None or (self._private and job.owner != getattr(request, "owner", None)):
            # Another token's job is indistinguishable from no job.
            return None
        return job

    # Uploads.

    def receive_body(self, request: server.Request, length: int | None) -> IRequestBody:
        outcome = None
        if self._upload_finished is not None:
            outcome = _UploadOutcome(self._upload_finished, request, length)
            request.upload_outcome = outcome  # type: ignore[attr-defined]
        try:
            return self._receive_body(request, length)
        except DomainError as e:
            if outcome is not None:
                outcome.error(e, read=False)
            raise

    def _receive_body(self, request: server.Request, length: int | None) -> IRequestBody:
        if request.method not in (b"POST", b"PUT"):
            raise APIError(400, "unexpected_body", f"{request.method.decode()} takes no body")
        if self._from_uploads is not None and request.method == b"POST":
            named = self._from_uploads(request)
            if named is not None:
                return named
        # The client's own errors first: a body over the maximum will never fit.
        if length is not None and length > self._max:
            raise APIError(
                413, "too_large", f"the upload ({length} bytes) exceeds the maximum of {self._max}"
            )
        if length == 0 and not request.requestHeaders.hasHeader(b"content-length"):
            # Neither a length nor chunked: HTTP reads that as no body at all.
            raise APIError(
                411,
                "length_required",
                "an upload needs Content-Length or Transfer-Encoding: chunked",
            )
        if length == 0:
            raise APIError(400, "empty_body", "the upload is empty")

        def admit() -> None:
            # The server's own limits come after the request's checks: a
            # client told to retry later should not then learn that its
            # request could never succeed.
            self._registry.check_capacity(arriving=uploads_in_flight(request))
            self._check_disk(length)

        boundary = multipart_boundary(request)
        job_id = new_job_id()
        staging = self._registry.uploads_dir / job_id
        body: IRequestBody
        if boundary is not None:
            body = MultipartBody(
                self._reactor,
                request,
                staging,
                job_id,
                self._profiles,
                boundary,
                length,
                self._max,
                self._opener,
                admit=admit,
            )
        else:
            profile = profile_for(self._profiles, query_arg(request.args or {}, "profile"))
            body = RawBody(
                self._reactor,
                request,
                staging,
                job_id,
                profile,
                self._max,
                self._opener,
                length=length,
                admit=admit,
            )
        return body

    def _check_disk(self, length: int | None) -> None:
        if not self._min_free:
            return
        self._registry.uploads_dir.mkdir(parents=True, exist_ok=True)
        free = self.free_space(self._registry.uploads_dir)
        if free - (length or 0) < self._min_free:
            raise APIError(
                507,
                "insufficient_storage",
                "the server is short of disk space; try again later",
            )

    def render_POST(self, request: server.Request) -> bytes | int:
        body: IRequestBody | None = getattr(request, "body", None)
        read: Deferred[None] | None = None
        if body is None:
            # A stock Request (twistd web, StubTreq) has spooled the body already.
            try:
                assert request.content is not None
                # The stock Request merged a parsed form into args: only the query counts here.
                query = request.uri.partition(b"?")[2]
                request.args = parse_qs(query, 1) if query else {}
                request.content.seek(0, os.SEEK_END)
                length = request.content.tell()
                body = self.receive_body(request, length)
                read = read_stock_body(request, body)
            except DomainError as e:
                if body is not None:
                    body.abort()
                return write_error(request, e)
            spooled = body

            def lost(_: Failure) -> None:
                spooled.abort()

            request.notifyFinish().addErrback(lost)
        finishing = body
        d: Deferred[Any] = (
            read.addCallback(lambda _: finishing.finish()) if read is not None else body.finish()
        )
        d.addCallback(self._create, request, body)
        d.addErrback(self._failed, request, body)
        return server.NOT_DONE_YET

    render_PUT = render_POST

    def _create(
        self, submission: Submission, request: server.Request, body: IRequestBody
    ) -> Deferred[None]:
        if isinstance(request, TranscoderRequest):
            # The files are no longer the request's to remove if it goes away.
            request.body = None

        def created(job: Job) -> None:
            outcome = getattr(request, "upload_outcome", None)
            if outcome is not None:
                # A job of resumable uploads: their PATCHes counted the bytes.
                tus = bool(submission.extra.get(UPLOADS_KEY))
                outcome("created", 0 if tus else sum(i.size for i in job.inputs))
            if disconnected(request):
                return
            request.setHeader(b"Location", f"/jobs/{job.id}".encode())
            finish_json(request, 201, job_view(job))

        owner = getattr(request, "owner", None)
        if submission.callback_url:
            submission.base_url = request_base_url(request)
        return submit(self._registry, submission, owner).addCallback(created)

    def _failed(self, f: Failure, request: server.Request, body: IRequestBody) -> None:
        body.abort()
        error: DomainError
        if isinstance(f.value, DomainError):
            error = f.value
        else:
            log.failure("upload failed", failure=f)
            error = APIError(500, "internal", "internal server error")
        outcome = getattr(request, "upload_outcome", None)
        if outcome is not None:
            outcome.error(error)
        finish_error(request, error)

    # Listing.

    def render_GET(self, request: server.Request) -> bytes:
        try:
            state = self._state_arg(request)
            limit = int_arg(request, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT
            cursor = query_arg(request.args or {}, "cursor")
            below = decode_cursor(cursor) if cursor else None
        except DomainError as e:
            return write_error(request, e)
        owner = getattr(request, "owner", None) if self._private else None
        jobs = self._registry.jobs(state)
        if self._private:
            # registry.jobs(owner=None) means every owner; here it must mean none.
            jobs = [j for j in jobs if j.owner == owner]
        if below is not None:
            jobs = [j for j in jobs if j.seq < below]
        page = jobs[:limit]
        more = len(jobs) > limit
        return write_json(
            request,
            200,
            {
                "jobs": [job_json(self._registry, j) for j in page],
                "next": encode_cursor(page[-1].seq) if more else None,
            },
        )

    @staticmethod
    def _state_arg(request: server.Request) -> JobState | None:
        raw = query_arg(request.args or {}, "state")
        if raw is None or raw == "":
            return None
        try:
            return JobState(raw)
        except ValueError:
            raise bad_query(
                "state", f"must be one of {', '.join(s.value for s in JobState)}"
            ) from None
