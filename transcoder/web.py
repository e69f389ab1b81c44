"""
The HTTP API's resources: C{/jobs} (upload, list), C{/jobs/<id>} (status,
cancel), C{/profiles}, C{/health}; and the L{Site} that streams bodies.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from transcoder import __version__
from transcoder._http import ErrorResource, JSONResource, finish_error, write_json
from transcoder._spool import Opener, _open
from transcoder.errors import APIError, not_found
from transcoder.jobs import Job, is_job_id, new_job_id
from transcoder.profiles import Profile
from transcoder.registry import JobRegistry
from transcoder.upload import (
    IBodyReceiver,
    IRequestBody,
    MultipartBody,
    RawBody,
    Submission,
    TranscoderRequest,
    _arg,
    _profile_for,
    multipart_boundary,
    read_stock_body,
)

log = Logger()


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
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._registry = registry
        self._profiles = profiles
        self._max = max_upload_size
        self._opener = opener

    def getChild(self, path: bytes, request: server.Request) -> Resource:  # type: ignore[override]
        if path == b"":
            return self
        job_id = path.decode("ascii", "replace")
        job = self._registry.get(job_id) if is_job_id(job_id) else None
        if job is None:
            return ErrorResource(not_found("job"))
        return JobResource(self._registry, job)

    # Uploads.

    def receiveBody(self, request: server.Request, length: int | None) -> IRequestBody:
        if request.method not in (b"POST", b"PUT"):
            raise APIError(400, "unexpected_body", f"{request.method.decode()} takes no body")
        self._registry.check_capacity()
        if length is not None and length > self._max:
            raise APIError(
                413, "too_large", f"the upload ({length} bytes) exceeds the maximum of {self._max}"
            )
        if length == 0:
            raise APIError(400, "empty_body", "the upload is empty")
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
            )
        else:
            profile = _profile_for(self._profiles, _arg(request.args or {}, "profile"))
            body = RawBody(
                self._reactor, request, staging, job_id, profile, self._max, self._opener
            )
        return body

    def render_POST(self, request: server.Request) -> bytes | int:
        body: IRequestBody | None = getattr(request, "body", None)
        if body is None:
            # A stock Request (twistd web, StubTreq) has spooled the body already.
            try:
                assert request.content is not None
                request.content.seek(0, os.SEEK_END)
                length = request.content.tell()
                body = self.receiveBody(request, length)
                read_stock_body(request, body)
            except APIError as e:
                if body is not None:
                    body.abort()
                return write_json(request, e.status, e.to_json())
        d: Deferred[Any] = body.finish()
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
        job_dir = self._registry.job_dir(submission.job_id)
        job_dir.parent.mkdir(parents=True, exist_ok=True)
        os.rename(submission.staging, job_dir)
        job = Job(
            id=submission.job_id,
            profile=submission.profile.name,
            params=submission.params,
            inputs=submission.inputs,
            owner=getattr(request, "owner", None),
            callback_url=submission.callback_url,
        )

        def created(job: Job) -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            payload = write_json(request, 201, job.to_json())
            request.setHeader(b"Location", f"/jobs/{job.id}".encode())
            request.setHeader(b"Content-Length", b"%d" % len(payload))
            request.write(payload)
            request.finish()

        def not_added(f: Failure) -> Failure:
            shutil.rmtree(job_dir, ignore_errors=True)
            return f

        return self._registry.add(job).addCallbacks(created, not_added)

    def _failed(self, f: Failure, request: server.Request, body: IRequestBody) -> None:
        body.abort()
        error: APIError
        if isinstance(f.value, APIError):
            error = f.value
        else:
            log.failure("upload failed", failure=f)
            error = APIError(500, "internal", "internal server error")
        finish_error(request, error)

    # Listing.

    def render_GET(self, request: server.Request) -> bytes:
        state = _arg(request.args or {}, "state")
        jobs = self._registry.jobs()
        if state:
            jobs = [j for j in jobs if j.state.value == state]
        return write_json(request, 200, {"jobs": [j.to_json() for j in jobs[:50]]})


class JobResource(JSONResource):
    """C{/jobs/<id>}: the job's status; C{DELETE} cancels and removes it."""

    def __init__(self, registry: JobRegistry, job: Job) -> None:
        super().__init__()
        self._registry = registry
        self._job = job

    def render_GET(self, request: server.Request) -> bytes:
        return write_json(request, 200, self._job.to_json())

    def render_DELETE(self, request: server.Request) -> int:
        def done(_: object) -> None:
            if not request.finished and not getattr(request, "_disconnected", False):
                request.setResponseCode(204)
                request.finish()

        def failed(f: Failure) -> None:
            log.failure("delete failed", failure=f)
            finish_error(request, APIError(500, "internal", "internal server error"))

        self._registry.delete(self._job.id).addCallbacks(done, failed)
        return server.NOT_DONE_YET


class ProfilesResource(JSONResource):
    isLeaf = True

    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        super().__init__()
        self._profiles = profiles

    def render_GET(self, request: server.Request) -> bytes:
        return write_json(
            request, 200, {"profiles": [p.to_json() for p in self._profiles.values()]}
        )


class HealthResource(JSONResource):
    isLeaf = True

    def __init__(self, registry: JobRegistry, data_dir: Path) -> None:
        super().__init__()
        self._registry = registry
        self._data_dir = data_dir

    def render_GET(self, request: server.Request) -> bytes:
        return write_json(
            request,
            200,
            {
                "status": "ok",
                "version": __version__,
                "queued": self._registry.queued_count,
                "running": self._registry.running_count,
                "free_disk": shutil.disk_usage(self._data_dir).free,
            },
        )


class RootResource(JSONResource):
    def render_GET(self, request: server.Request) -> bytes:
        return write_json(
            request,
            200,
            {
                "service": "transcoder",
                "version": __version__,
                "links": {"jobs": "/jobs", "profiles": "/profiles", "health": "/health"},
            },
        )


def build_root(
    reactor: IReactorThreads,
    registry: JobRegistry,
    profiles: Mapping[str, Profile],
    data_dir: Path,
    max_upload_size: int,
    opener: Opener = _open,
) -> Resource:
    root = RootResource()
    root.putChild(b"jobs", JobsResource(reactor, registry, profiles, max_upload_size, opener))
    root.putChild(b"profiles", ProfilesResource(profiles))
    root.putChild(b"health", HealthResource(registry, data_dir))
    return root


class TranscoderSite(server.Site):
    """A Site whose requests stream their bodies (L{TranscoderRequest})."""

    def __init__(
        self, resource: Resource, reactor: IReactorTime, idle_timeout: float | None
    ) -> None:
        super().__init__(
            resource,
            requestFactory=TranscoderRequest,
            reactor=reactor,
            timeout=idle_timeout,
            parsePOSTFormSubmission=False,
        )
        self.displayTracebacks = False
