"""
C{/jobs/<id>} and below: a job's status (with long-poll) and its removal,
its result file and its encoder's log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from transcoder.core.errors import DomainError
from transcoder.core.jobs import Job, JobState
from transcoder.core.registry import JobRegistry
from transcoder.http.download import FileResource, file_problem
from transcoder.http.errors import APIError, method_not_allowed, not_found
from transcoder.http.names import sanitise_filename
from transcoder.http.outputs import ZipResource, mark_missing, output_resource
from transcoder.http.query import int_arg, number_arg
from transcoder.http.responses import (
    EndResource,
    ErrorResource,
    JSONResource,
    disconnected,
    finish_error,
    finish_json,
    write_error,
    write_json,
)
from transcoder.http.views import job_view

log = Logger()

MAX_WAIT = 60.0
MAX_TAIL = 10_000
# The most of a log's end read to find its last lines.
MAX_TAIL_BYTES = 1 << 20
LOG_TYPE = "text/plain; charset=utf-8"

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")


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
    mark_missing(out, job, registry.job_dir(job.id))
    return out


def _result_missing(problem: str) -> APIError:
    return APIError(
        410,
        "result_missing",
        f"the job's result {problem}: it was removed or changed on the server; run the job again",
    )


class JobResource(JSONResource):
    """C{/jobs/<id>}: the job's status, with long-poll; C{DELETE} cancels and removes it."""

    def __init__(
        self,
        clock: IReactorTime,
        registry: JobRegistry,
        job: Job,
        expired: Callable[[], APIError | None] = lambda: None,
    ) -> None:
        """
        @param expired: the 410 for this job once retention has removed it (None
            before, or when it was deleted): what a long-poll answers if the job
            goes while it waits (another node's sweep).
        """
        super().__init__()
        self._clock = clock
        self._registry = registry
        self._job = job
        self._expired = expired

    def getChild(self, path: bytes, request: server.Request) -> Resource:  # type: ignore[override]
        job = self._job
        if path == b"":
            return self
        if path == b"log":
            return LogResource(self._registry.job_dir(job.id) / job.log_path)
        if path in (b"result", b"outputs"):
            method = request.method.decode("ascii", "replace")
            if method not in ("GET", "HEAD"):
                # Whatever the job's state: no other method will ever work here.
                return ErrorResource(method_not_allowed(method, ["GET", "HEAD"]))
            if job.state is not JobState.SUCCEEDED or not job.result_files():
                return ErrorResource(_NotReady(job))
            job_dir = self._registry.job_dir(job.id)
            if path == b"outputs":
                return output_resource(job, job_dir, request)
            if job.output is None:
                # Several outputs: one zip of them all.
                return ZipResource(job, job_dir, _stem(job) + ".zip")
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
            wait = number_arg(request, "wait", 0, MAX_WAIT)
        except DomainError as e:
            return write_error(request, e)
        job = self._job
        if not wait or job.state.finished:
            return write_json(request, 200, job_json(self._registry, job))
        _LongPoll(self._clock, self._registry, job, request, wait, self._expired)
        return server.NOT_DONE_YET

    def render_DELETE(self, request: server.Request) -> int:
        def done(deleted: bool) -> None:
            if disconnected(request):
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
        expired: Callable[[], APIError | None],
    ) -> None:
        self._registry = registry
        self._job = job
        self._expired = expired
        self._request = request
        self._gone = False
        self._changed = registry.changed(job.id)
        self._timer = clock.callLater(wait, self._changed.cancel)
        self._changed.addCallbacks(self._answer, self._timed_out)
        request.notifyFinish().addErrback(self._lost)

    def _answer(self, _: object) -> None:
        if self._timer.active():
            self._timer.cancel()
        if self._gone:
            return
        if self._registry.get(self._job.id) is not self._job:
            finish_error(self._request, self._expired() or not_found("job"))
        else:
            finish_json(self._request, 200, job_json(self._registry, self._job))

    def _timed_out(self, f: Failure) -> None:
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
    return sanitise_filename(_stem(job) + ext, default="result" + ext)


def _stem(job: Job) -> str:
    stem = job.inputs[0].filename if job.inputs else "result"
    base, dot, _ = stem.rpartition(".")
    return base if dot and base else stem


class LogResource(EndResource):
    """C{/jobs/<id>/log}: the encoder's output; C{?tail=N} for its last lines."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = path

    def render_GET(self, request: server.Request) -> bytes | int:
        try:
            tail = int_arg(request, "tail", 0, MAX_TAIL)
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
