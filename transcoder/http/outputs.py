"""
A job's outputs: C{/jobs/<id>/outputs/<name>}, and the zip of them all that
C{/jobs/<id>/result} is for a profile with several outputs.

Each output is served as the one-output result is (L{FileResource}: ranges,
ETag, 410 when it is gone or changed).  A name may have levels
(C{360p/index.m3u8}): an HLS player pointed at C{…/outputs/master.m3u8}
follows the playlists' relative URLs to the renditions and their segments.
Only the names the job recorded are served, so no name reaches another file.

The zip is made while it is sent (zipstream-ng): files stored, not
compressed (video does not compress), so its size is known before its first
byte and memory stays at one chunk whatever the outputs' total.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.web import server
from twisted.web.resource import Resource
from zipstream import ZipStream
from zope.interface import implementer

from transcoder.core.jobs import Job, OutputFile
from transcoder.core.outputs import is_output_name
from transcoder.http.download import FileResource, file_problem
from transcoder.http.errors import APIError
from transcoder.http.names import content_disposition, sanitise_filename
from transcoder.http.responses import EndResource, ErrorResource, write_error

log = Logger()

ZIP_TYPE = "application/zip"


def _result_missing(problem: str) -> APIError:
    return APIError(
        410,
        "result_missing",
        f"the job's result {problem}: it was removed or changed on the server; run the job again",
    )


def _no_output(name: str) -> APIError:
    return APIError(404, "not_found", f"the job has no output {name[:200]!r}")


def mark_missing(view: dict[str, Any], job: Job, job_dir: Path) -> None:
    """Mark C{"missing": true} each output of a job's view no longer on disk as the job made it."""
    files = {o.name: o for o in job.result_files()}
    for entry in view.get("outputs") or []:
        o = files.get(entry["name"])
        if o is not None and file_problem(job_dir / o.path, o.size) is not None:
            entry["missing"] = True


def output_resource(job: Job, job_dir: Path, request: server.Request) -> Resource:
    """
    The resource for C{/jobs/<id>/outputs/<the rest of the path>}: the
    output of that name, consuming the rest of the path.
    """
    rest = request.postpath or []
    name = "/".join(seg.decode("utf-8", "replace") for seg in rest)
    # Nothing is left to traverse: the name is the whole rest of the path.
    if request.prepath is not None:
        request.prepath.extend(rest)
    request.postpath = []
    files = {o.name: o for o in job.result_files()}
    found = files.get(name) if is_output_name(name) else None
    if found is None:
        return ErrorResource(_no_output(name))
    return FileResource(
        job_dir / found.path,
        found.media_type,
        etag=found.sha256,
        filename=sanitise_filename(PurePosixPath(found.name).name, default="output"),
        size=found.size,
        gone=_result_missing,
    )


@implementer(IPullProducer)
class _ChunkProducer:
    """Writes the chunks of an iterator to a request, one per resume."""

    def __init__(self, request: server.Request, chunks: Iterator[bytes]) -> None:
        self._request: server.Request | None = request
        self._chunks = chunks

    def resumeProducing(self) -> None:
        request = self._request
        if request is None:
            return
        try:
            chunk = next(self._chunks, None)
        except OSError as e:
            # An output went away mid-zip: a short body must not pass for a whole one.
            log.warn("zip of outputs broken off: {error}", error=e)
            self.stopProducing()
            request.unregisterProducer()
            request.loseConnection()
            return
        if chunk is None:
            self._request = None
            request.unregisterProducer()
            request.finish()
            return
        request.write(chunk)

    def stopProducing(self) -> None:
        self._request = None


class ZipResource(EndResource):
    """C{GET}/C{HEAD} of every output of C{job}, as one stored zip with a Content-Length."""

    def __init__(self, job: Job, job_dir: Path, filename: str) -> None:
        super().__init__()
        self._files: list[OutputFile] = job.result_files()
        self._job_dir = job_dir
        self._filename = filename
        digest = hashlib.sha256()
        for o in self._files:
            digest.update(f"{o.name}\0{o.sha256}\n".encode())
        self._etag = f'"zip-{digest.hexdigest()}"'.encode("ascii")

    def render_GET(self, request: server.Request) -> bytes | int:
        zs = ZipStream(sized=True)
        for o in self._files:
            path = self._job_dir / o.path
            problem = file_problem(path, o.size)
            if problem is not None:
                log.warn("not zipping {path}: it {problem}", path=str(path), problem=problem)
                return write_error(request, _result_missing(f"{o.name} {problem}"))
            zs.add_path(str(path), arcname=o.name)
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", ZIP_TYPE.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % len(zs))
        request.setHeader(b"ETag", self._etag)
        request.setHeader(b"Cache-Control", b"private, no-cache")
        request.setHeader(
            b"Content-Disposition", content_disposition(self._filename).encode("ascii")
        )
        if request.method == b"HEAD":
            request.write(b"")
            request.finish()
            return server.NOT_DONE_YET
        request.registerProducer(_ChunkProducer(request, iter(zs)), False)
        return server.NOT_DONE_YET

    render_HEAD = render_GET
