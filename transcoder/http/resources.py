"""
The HTTP API's resources, and the L{Site} that streams bodies.

  - C{/jobs}: upload a video (C{POST}/C{PUT}), list jobs (C{GET});
  - C{/jobs/<id>}: status, with long-poll (C{GET}); cancel and delete (C{DELETE});
  - C{/jobs/<id>/result}: the output file; C{/jobs/<id>/log}: the encoder's output;
  - C{/profiles}, C{/health}, C{/metrics}.

With tokens configured, the root authenticates every request while the tree is
traversed, so an upload with a bad token is refused before its body is read
(see L{transcoder.http.request.TranscoderRequest}), and a token sees only its own jobs.
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

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import parse_qs
from twisted.web.resource import IResource, Resource
from zope.interface import implementer

from transcoder import __version__
from transcoder._twisted import HookedHTTPChannel, channel_protocol, disconnected, past_request_line
from transcoder.core.errors import DomainError
from transcoder.core.jobs import Job, JobState, is_job_id, new_job_id
from transcoder.core.profiles import Profile, profile_for
from transcoder.core.registry import JobRegistry
from transcoder.core.submit import Submission, submit
from transcoder.http.auth import TokenAuth
from transcoder.http.bodies import (
    IBodyReceiver,
    IRequestBody,
    RawBody,
    read_stock_body,
    uploads_in_flight,
)
from transcoder.http.download import FileResource, file_problem
from transcoder.http.errors import APIError, http_error, method_not_allowed, not_found
from transcoder.http.fields import query_arg as _arg
from transcoder.http.formdata import MultipartBody, multipart_boundary
from transcoder.http.names import sanitise_filename
from transcoder.http.request import TranscoderRequest
from transcoder.http.responses import (
    ErrorResource,
    JSONResource,
    capped_int,
    finish_error,
    raw_response,
    write_error,
    write_json,
)
from transcoder.http.spool import Opener, _open
from transcoder.http.views import job_view

log = Logger()

MAX_WAIT = 60.0
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_TAIL = 10_000
# The most of a log's end read to find its last lines.
MAX_TAIL_BYTES = 1 << 20
LOG_TYPE = "text/plain; charset=utf-8"
# Reachable without a token: load balancers and Prometheus carry none.
PUBLIC = frozenset({b"health", b"metrics"})

_CURSOR = re.compile(r"^v1:(\d{1,18})$")
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")

FreeDisk = Callable[[Path], int]


def _free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


def _disconnected(request: server.Request) -> bool:
    return bool(request.finished or disconnected(request))


def _finish_json(request: server.Request, status: int, obj: Any) -> None:
    """Answer an asynchronous request with JSON, unless the client has gone."""
    if _disconnected(request):
        return
    body = write_json(request, status, obj)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _bad_query(name: str, why: str) -> APIError:
    return APIError(400, "bad_query", f"query parameter {name!r} {why}")


def _number_arg(request: server.Request, name: str, low: float, high: float) -> float | None:
    raw = _arg(request.args or {}, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _bad_query(name, "must be a number") from None
    if not low <= value <= high:
        raise _bad_query(name, f"must be between {low:g} and {high:g}")
    return value


def _int_arg(request: server.Request, name: str, low: int, high: int) -> int | None:
    raw = _arg(request.args or {}, name)
    if raw is None:
        return None
    if not re.fullmatch(r"\d{1,9}", raw):
        raise _bad_query(name, "must be a whole number")
    value = int(raw)
    if not low <= value <= high:
        raise _bad_query(name, f"must be between {low} and {high}")
    return value


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
        raise _bad_query("cursor", "is not a cursor this server gave out")
    return int(m.group(1))


def tail_lines(path: Path, count: int, max_bytes: int = MAX_TAIL_BYTES) -> bytes:
    """
    The last C{count} lines of a file, read from its end, at most C{max_bytes}
    of it.  C{\\r} ends a line too: mencoder ends its progress lines with it.
    """
    block = 64 * 1024
    with path.open("rb") as f:
        pos = f.seek(0, os.SEEK_END)
        buf = b""
        while pos > 0 and len(buf) < max_bytes:
            step = min(block, pos, max_bytes - len(buf))
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            # One break more than lines wanted: the first line read whole.
            if len(_LINE_BREAK.findall(buf)) > count:
                break
    lines = _LINE_BREAK.split(buf)
    if lines and lines[-1] == b"":
        lines.pop()
    if pos > 0 and lines:
        # Began mid-line.
        lines.pop(0)
    picked = lines[-count:] if count else []
    return b"".join(line + b"\n" for line in picked)


class _NotReady(APIError):
    """409 for a result asked of an unfinished or failed job; says the state."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            409, "not_ready", f"the job is {job.state.value}; it has no result to download"
        )
        self.state = job.state.value

    def to_json(self) -> dict[str, dict[str, str]]:
        out = super().to_json()
        out["error"]["state"] = self.state
        return out


def job_json(registry: JobRegistry, job: Job) -> dict[str, Any]:
    """
    The job's public JSON, its C{output} marked C{"missing": true} when the
    result on disk is no longer what the job made (removed, replaced, cut
    short behind the server's back): a stat per succeeded job.
    """
    out = job_view(job)
    if out["output"] is not None and job.output is not None:
        path = registry.job_dir(job.id) / job.output.path
        if file_problem(path, job.output.size) is not None:
            out["output"]["missing"] = True
    return out


def _result_missing(problem: str) -> APIError:
    return APIError(
        410,
        "result_missing",
        f"the job's result {problem}: it was removed or changed on the server; run the job again",
    )


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
        free_disk: FreeDisk = _free_disk,
        upload_finished: UploadReport | None = None,
    ) -> None:
        """
        @param upload_finished: called with each upload's outcome and size in bytes.
        @param clock: times long-polls; the reactor when not given.
        @param private: each token sees only its own jobs (tokens are configured).
        @param min_free_disk: uploads are refused (507) while the data
            directory has less free space than this.
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
        self._free_disk = free_disk
        self._upload_finished = upload_finished

    def getChild(self, path: bytes, request: server.Request) -> Resource:  # type: ignore[override]
        if path == b"":
            return self
        job = self._visible_job(path.decode("ascii", "replace"), request)
        if job is None:
            return ErrorResource(not_found("job"))
        return JobResource(self._clock, self._registry, job)

    def _visible_job(self, job_id: str, request: server.Request) -> Job | None:
        job = self._registry.get(job_id) if is_job_id(job_id) else None
        if job is None or (self._private and job.owner != getattr(request, "owner", None)):
            # Another token's job is indistinguishable from no job.
            return None
        return job

    # Uploads.

    def receiveBody(self, request: server.Request, length: int | None) -> IRequestBody:
        outcome = None
        if self._upload_finished is not None:
            outcome = _UploadOutcome(self._upload_finished, request, length)
            request.upload_outcome = outcome  # type: ignore[attr-defined]
        try:
            return self._receiveBody(request, length)
        except DomainError as e:
            if outcome is not None:
                outcome.error(e, read=False)
            raise

    def _receiveBody(self, request: server.Request, length: int | None) -> IRequestBody:
        if request.method not in (b"POST", b"PUT"):
            raise APIError(400, "unexpected_body", f"{request.method.decode()} takes no body")
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
            profile = profile_for(self._profiles, _arg(request.args or {}, "profile"))
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
        free = self._free_disk(self._registry.uploads_dir)
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
                body = self.receiveBody(request, length)
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
                outcome("created", sum(i.size for i in job.inputs))
            if _disconnected(request):
                return
            request.setHeader(b"Location", f"/jobs/{job.id}".encode())
            _finish_json(request, 201, job_view(job))

        owner = getattr(request, "owner", None)
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
            limit = _int_arg(request, "limit", 1, MAX_LIMIT) or DEFAULT_LIMIT
            cursor = _arg(request.args or {}, "cursor")
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
        raw = _arg(request.args or {}, "state")
        if raw is None or raw == "":
            return None
        try:
            return JobState(raw)
        except ValueError:
            raise _bad_query(
                "state", f"must be one of {', '.join(s.value for s in JobState)}"
            ) from None


class JobResource(JSONResource):
    """C{/jobs/<id>}: the job's status, with long-poll; C{DELETE} cancels and removes it."""

    def __init__(self, clock: IReactorTime, registry: JobRegistry, job: Job) -> None:
        super().__init__()
        self._clock = clock
        self._registry = registry
        self._job = job

    def getChild(self, path: bytes, request: server.Request) -> Resource:  # type: ignore[override]
        job = self._job
        if path == b"":
            return self
        if path == b"log":
            return LogResource(self._registry.job_dir(job.id) / job.log_path)
        if path == b"result":
            method = request.method.decode("ascii", "replace")
            if method not in ("GET", "HEAD"):
                # Whatever the job's state: no other method will ever work here.
                return ErrorResource(method_not_allowed(method, ["GET", "HEAD"]))
            if job.state is not JobState.SUCCEEDED or job.output is None:
                return ErrorResource(_NotReady(job))
            return FileResource(
                self._registry.job_dir(job.id) / job.output.path,
                job.output.media_type,
                etag=job.output.sha256,
                filename=result_filename(job),
                size=job.output.size,
                gone=_result_missing,
            )
        return super().getChild(path, request)

    def render_GET(self, request: server.Request) -> bytes | int:
        try:
            wait = _number_arg(request, "wait", 0, MAX_WAIT)
        except DomainError as e:
            return write_error(request, e)
        job = self._job
        if not wait or job.state.finished:
            return write_json(request, 200, job_json(self._registry, job))
        _LongPoll(self._clock, self._registry, job, request, wait)
        return server.NOT_DONE_YET

    def render_DELETE(self, request: server.Request) -> int:
        def done(deleted: bool) -> None:
            if _disconnected(request):
                return
            if not deleted:
                # Another DELETE removed it while this one waited for the encoder.
                finish_error(request, not_found("job"))
                return
            request.setResponseCode(204)
            request.finish()

        def failed(f: Failure) -> None:
            log.failure("delete failed", failure=f)
            finish_error(request, APIError(500, "internal", "internal server error"))

        self._registry.delete(self._job.id).addCallbacks(done, failed)
        return server.NOT_DONE_YET


class _LongPoll:
    """
    One C{GET /jobs/<id>?wait=N}: answers at the job's next change, or after
    C{N} seconds; a client that goes away takes its timer and waiter with it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        registry: JobRegistry,
        job: Job,
        request: server.Request,
        wait: float,
    ) -> None:
        self._registry = registry
        self._job = job
        self._request = request
        self._gone = False
        self._changed = registry.changed(job.id)
        self._timer = clock.callLater(wait, self._changed.cancel)
        self._changed.addCallbacks(self._answer, self._timedOut)
        request.notifyFinish().addErrback(self._lost)

    def _answer(self, _: object) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self._gone:
            return
        if self._registry.get(self._job.id) is not self._job:
            finish_error(self._request, not_found("job"))
        else:
            _finish_json(self._request, 200, job_json(self._registry, self._job))

    def _timedOut(self, f: Failure) -> None:
        f.trap(CancelledError)
        self._answer(None)

    def _lost(self, f: Failure) -> None:
        self._gone = True
        if self._timer.active():
            self._timer.cancel()
        # Removes the registry's waiter.
        self._changed.cancel()


def result_filename(job: Job) -> str:
    """C{<first input's name without its extension>.<output extension>}: what C{curl -OJ} saves."""
    assert job.output is not None
    ext = Path(job.output.path).suffix
    stem = job.inputs[0].filename if job.inputs else "result"
    base, dot, _ = stem.rpartition(".")
    if dot and base:
        stem = base
    return sanitise_filename(stem + ext, default="result" + ext)


class EndResource(JSONResource):
    """A resource with no children: C{/x/} is C{/x}, and C{/x/y} a JSON 404."""

    def getChild(self, path: bytes, request: server.Request) -> Resource:  # type: ignore[override]
        if path == b"" and not request.postpath:
            return self
        return super().getChild(path, request)


class LogResource(EndResource):
    """C{/jobs/<id>/log}: the encoder's output; C{?tail=N} for its last lines."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    def render_GET(self, request: server.Request) -> bytes | int:
        try:
            tail = _int_arg(request, "tail", 0, MAX_TAIL)
        except DomainError as e:
            return write_error(request, e)
        if tail is None:
            if self._path.is_file():
                return FileResource(self._path, LOG_TYPE).render(request)
            body = b""
        else:
            try:
                body = tail_lines(self._path, tail)
            except FileNotFoundError:
                body = b""
        # No encoder has run yet: an empty log.
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", LOG_TYPE.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return body


class ProfilesResource(EndResource):
    def __init__(self, profiles: Mapping[str, Profile]) -> None:
        super().__init__()
        self._profiles = profiles

    def render_GET(self, request: server.Request) -> bytes:
        return write_json(
            request, 200, {"profiles": [p.to_json() for p in self._profiles.values()]}
        )


class HealthResource(EndResource):
    def __init__(
        self,
        registry: JobRegistry,
        data_dir: Path,
        min_free_disk: int = 0,
        free_disk: FreeDisk = _free_disk,
    ) -> None:
        super().__init__()
        self._registry = registry
        self._data_dir = data_dir
        self._min_free = min_free_disk
        self._free_disk = free_disk

    def render_GET(self, request: server.Request) -> bytes:
        free = self._free_disk(self._data_dir)
        store_error = self._registry.store_error
        body: dict[str, object] = {
            # Still up with too little disk: downloads and status work, uploads get 507.
            "status": "ok" if free >= self._min_free else "low_disk",
            "version": __version__,
            "queued": self._registry.queued_count,
            "running": self._registry.running_count,
            "free_disk": free,
            "min_free_disk": self._min_free,
        }
        if store_error is not None:
            # 503, so that a balancer sends uploads elsewhere: none is taken here.
            body["status"] = "store_failing"
            body["store_error"] = store_error
            return write_json(request, 503, body)
        return write_json(request, 200, body)


class GuardedResource(JSONResource):
    """
    Another library's leaf resource (C{/metrics}) behind JSON errors: methods
    other than C{GET}/C{HEAD} get a JSON 405 and sub-paths a JSON 404, rather
    than whatever the wrapped resource would do.
    """

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: server.Request) -> bytes | int:  # type: ignore[override]
        if request.postpath and request.postpath != [b""]:
            return write_error(request, not_found())
        return super().render(request)

    # Named, so that the Allow of a 405 (here, or before an upload's body) lists them.
    def render_GET(self, request: server.Request) -> bytes | int:
        result: bytes | int = self._inner.render(request)
        return result

    render_HEAD = render_GET


class RootResource(JSONResource):
    """
    C{/}: a pointer to the rest.  With tokens, every child but L{PUBLIC} ones
    is reached only with a valid token, whose name goes on C{request.owner}.
    """

    def __init__(self, auth: TokenAuth | None = None) -> None:
        super().__init__()
        self._auth = auth

    def getChildWithDefault(self, path: bytes, request: server.Request) -> IResource:  # type: ignore[override]
        if self._auth is not None and path not in PUBLIC:
            try:
                request.owner = self._auth.authenticate(request)  # type: ignore[attr-defined]
            except DomainError as e:
                return ErrorResource(e)
        if path == b"":
            return self
        child: IResource = super().getChildWithDefault(path, request)
        return child

    def render_GET(self, request: server.Request) -> bytes:
        return write_json(
            request,
            200,
            {
                "service": "transcoder",
                "version": __version__,
                "links": {
                    "jobs": "/jobs",
                    "profiles": "/profiles",
                    "health": "/health",
                    "metrics": "/metrics",
                },
            },
        )


def _metrics(registry: JobRegistry, data_dir: Path) -> tuple[IResource, UploadReport] | None:
    try:
        from transcoder.http.metrics import Metrics
    except ImportError:
        log.warn("transcoder.http.metrics is not available: /metrics answers 404")
        return None
    metrics = Metrics(registry, data_dir)
    # Follows the registry from now on, to time the jobs that end.
    metrics.start()
    return metrics.resource(), metrics.upload_finished


def build_root(
    reactor: IReactorThreads,
    registry: JobRegistry,
    profiles: Mapping[str, Profile],
    data_dir: Path,
    max_upload_size: int,
    opener: Opener = _open,
    *,
    clock: IReactorTime | None = None,
    auth: TokenAuth | None = None,
    min_free_disk: int = 0,
    free_disk: FreeDisk = _free_disk,
    metrics: Any = None,
) -> Resource:
    """
    The whole resource tree.

    @param reactor: runs the upload spool's threads; also times long-polls
        unless C{clock} is given.
    @param auth: the tokens; without them the API is open to anyone who can reach it.
    @param min_free_disk: uploads are refused (507) below this much free space.
    @param metrics: a L{transcoder.http.metrics.Metrics} (started and stopped by
        the caller), or just a C{/metrics} resource; by default a new Metrics,
        started here, which then also counts uploads.
    """
    upload_finished: UploadReport | None = None
    if metrics is None:
        made = _metrics(registry, data_dir)
        if made is not None:
            metrics, upload_finished = made
    elif hasattr(metrics, "upload_finished"):
        metrics, upload_finished = metrics.resource(), metrics.upload_finished
    if auth is None:
        log.warn("no --tokens: the API is open to anyone who can reach it")
    else:
        log.info("API tokens: {count} names", count=len(auth.names))
    root = RootResource(auth)
    root.putChild(
        b"jobs",
        JobsResource(
            reactor,
            registry,
            profiles,
            max_upload_size,
            opener,
            clock=clock,
            private=auth is not None,
            min_free_disk=min_free_disk,
            free_disk=free_disk,
            upload_finished=upload_finished,
        ),
    )
    root.putChild(b"profiles", ProfilesResource(profiles))
    root.putChild(b"health", HealthResource(registry, data_dir, min_free_disk, free_disk))
    if metrics is not None:
        root.putChild(b"metrics", GuardedResource(metrics))
    return root


class _Channel(HookedHTTPChannel):
    """
    An HTTP channel whose every answer is JSON, down to a malformed request's,
    and that gives a request's head one idle timeout to arrive in full:
    HTTPChannel resets its idle timer on every byte, so without that a client
    sending its headers a byte at a time would hold the connection forever.
    """

    _headDeadline: Any = None

    def dataReceived(self, data: bytes) -> None:
        if self._headDeadline is None and self.line_mode and self.timeOut:
            self._headDeadline = self.callLater(self.timeOut, self._headTooSlow)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancelHeadDeadline()
        super().allHeadersReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancelHeadDeadline()
        super().connectionLost(reason)

    def _cancelHeadDeadline(self) -> None:
        if self._headDeadline is not None and self._headDeadline.active():
            self._headDeadline.cancel()
        self._headDeadline = None

    def _headTooSlow(self) -> None:
        self._headDeadline = None
        self._answerAndClose(APIError(408, "request_timeout", "the request head came too slowly"))

    def timeoutConnection(self) -> None:
        request = self.requests[-1] if self.requests else None
        if isinstance(request, TranscoderRequest) and request.body_timed_out():
            return
        super().timeoutConnection()

    def _answerAndClose(self, error: DomainError) -> None:
        transport: Any = self.transport
        transport.write(raw_response(error))
        self.loseConnection()

    def framing_header(self, header: bytes, data: bytes) -> bytes:
        # HTTPChannel int()s the length, and Python refuses more than 4300
        # digits: an unhandled error and no answer.  A length that long is past
        # any limit, so it is read as the largest (the request refuses it).
        if header == b"Content-Length" and data.isdigit():
            data = b"%d" % capped_int(data.decode("ascii"))
        return data

    def bad_request(self) -> None:
        self._answerAndClose(APIError(400, "bad_request", "malformed HTTP request"))

    def lineLengthExceeded(self, line: bytes) -> None:
        # Past the request line (its parts are kept until the body is in), a header is too long.
        if past_request_line(self):
            error = APIError(431, "header_too_large", "a request header line is too long")
        else:
            error = APIError(414, "uri_too_long", "the request line is too long")
        self._answerAndClose(error)


def _channel_factory(factory: Any) -> Any:
    # As http._genericHTTPChannelProtocolFactory, with the channel above.
    return channel_protocol(_Channel())


class TranscoderSite(server.Site):
    """
    A Site whose requests stream their bodies (L{TranscoderRequest}) and whose
    every answer, down to a malformed request's, is JSON.
    """

    protocol = _channel_factory  # type: ignore[assignment]

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
        # Requests whose upload body was accepted and that have not answered yet.
        self.uploads: set[server.Request] = set()
        # Set on shutdown: new uploads get 503 while the accepted ones finish.
        self.stopping = False

    def drain(self, grace: float) -> Deferred[int]:
        """
        Stop taking uploads, wait up to C{grace} seconds for those under way to
        finish, then cut off the rest (their partial files are removed as for
        any client that goes away).  Fires with the number cut off.
        """
        self.stopping = True
        clock: Any = self.reactor
        done: Deferred[int] = Deferred()
        deadline = clock.seconds() + grace

        def check() -> None:
            if not self.uploads:
                done.callback(0)
            elif clock.seconds() >= deadline:
                left = list(self.uploads)
                log.warn("shutting down: cutting off {n} unfinished uploads", n=len(left))
                for request in left:
                    transport: Any = request.channel.transport if request.channel else None
                    if transport is not None:
                        transport.abortConnection()
                done.callback(len(left))
            else:
                clock.callLater(min(0.1, max(0.0, deadline - clock.seconds())), check)

        if self.uploads:
            log.info(
                "shutting down: waiting up to {grace}s for {n} uploads",
                grace=grace,
                n=len(self.uploads),
            )
        check()
        return done
