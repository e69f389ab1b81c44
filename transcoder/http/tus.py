"""
C{/uploads}: tus 1.0 resumable uploads (creation, creation-with-upload,
creation-defer-length, termination, expiration, checksum).

C{POST /uploads} creates an upload (its metadata checked as a plain
upload's fields are, before any byte); C{HEAD /uploads/<id>} says how far
it is; C{PATCH} appends; C{DELETE} terminates.  Once complete it becomes a
job, whose address every later answer gives in C{Job-Location}.  The shared
machinery is in L{transcoder.http.tusupload}, the PATCH body in
L{transcoder.http.tusbody}, the headers in L{transcoder.http.tusproto}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from transcoder.core.errors import DomainError
from transcoder.core.uploads import Upload, new_upload_id
from transcoder.http.bodies import IBodyReceiver, IRequestBody, crowd_of
from transcoder.http.errors import APIError, http_error
from transcoder.http.publicurl import request_base_url
from transcoder.http.responses import JSONResource, disconnected, finish_error
from transcoder.http.tusbody import TusPatchBody
from transcoder.http.tusproto import (
    EXTENSIONS,
    JOB_LOCATION,
    VERSION,
    check_content_type,
    check_resumable,
    encode_metadata,
    header,
    http_date,
    method_of,
    number,
    parse_checksum,
    parse_metadata,
    set_tus_headers,
    tus_error,
    with_tus,
)
from transcoder.http.tusupload import TusUploads

log = Logger()


def _owner(request: server.Request) -> str | None:
    return getattr(request, "owner", None)


def _job_location(upload: Upload) -> str | None:
    return f"/jobs/{upload.job_id}" if upload.job_id else None


def _answer(request: server.Request, status: int, **headers: str | int | None) -> None:
    if disconnected(request):
        return
    request.setResponseCode(status)
    set_tus_headers(request, **headers)
    request.setHeader(b"Content-Length", b"0")
    request.finish()


def _fail(request: server.Request, f: Failure) -> None:
    if isinstance(f.value, APIError):
        error = with_tus(f.value) if "Tus-Resumable" not in f.value.headers else f.value
    elif isinstance(f.value, DomainError):
        error = with_tus(http_error(f.value))
    else:
        log.failure("tus request failed", failure=f)
        error = tus_error(500, "internal", "internal server error")
    finish_error(request, error)


class _TusResource(JSONResource):
    def __init__(self, uploads: TusUploads) -> None:
        super().__init__()
        self.uploads = uploads

    def render_OPTIONS(self, request: server.Request) -> bytes:
        # A CORS preflight was answered by the root already (see RootResource).
        request.setResponseCode(204)
        set_tus_headers(
            request,
            Tus_Version=VERSION,
            Tus_Extension=EXTENSIONS,
            Tus_Max_Size=self.uploads.max_size,
            Tus_Checksum_Algorithm="sha1,sha256,md5",
        )
        return b""

    def _refuse(self, request: server.Request, error: APIError) -> bytes:
        from transcoder.http.responses import write_error

        return write_error(request, error)


@implementer(IRequestBody)
class _Created:
    """The body of a creation without data: nothing comes, the record is written."""

    def __init__(self, upload: Upload, created: Deferred[None]) -> None:
        self.upload = upload
        self._created = created

    def dataReceived(self, data: bytes) -> None:
        raise tus_error(400, "unexpected_body", "a creation without data takes no body")

    def finish(self) -> Deferred[Upload]:
        return self._created.addCallback(lambda _: self.upload)

    def abort(self) -> None:
        pass


@implementer(IRequestBody)
class _NoBody:
    def dataReceived(self, data: bytes) -> None:
        raise tus_error(400, "unexpected_body", "this request takes no body")

    def finish(self) -> Deferred[None]:
        return succeed(None)

    def abort(self) -> None:
        pass


@implementer(IBodyReceiver)
class UploadsResource(_TusResource):
    """C{/uploads}: C{POST} creates, C{OPTIONS} says what this server offers."""

    def getChild(self, path: bytes, request: server.Request) -> Resource:  # type: ignore[override]
        if path == b"" and not request.postpath:
            return self
        return UploadResource(self.uploads, path.decode("ascii", "replace"))

    def receive_body(self, request: server.Request, length: int | None) -> IRequestBody:
        check_resumable(request)
        if method_of(request) != b"POST":
            raise tus_error(405, "method_not_allowed", "only POST creates an upload")
        upload_length = number(request, "Upload-Length")
        defer = header(request, "Upload-Defer-Length")
        if defer is not None and defer != "1":
            raise tus_error(400, "bad_header", "Upload-Defer-Length must be 1")
        if (upload_length is None) == (defer is None):
            raise tus_error(
                400, "bad_header", "give either Upload-Length or Upload-Defer-Length: 1"
            )
        max_size = self.uploads.max_size
        if upload_length is not None and upload_length > max_size:
            raise tus_error(
                413, "too_large", f"Upload-Length exceeds the maximum of {max_size} bytes"
            )
        if upload_length == 0:
            raise tus_error(400, "empty_body", "the upload is empty")
        metadata = parse_metadata(header(request, "Upload-Metadata"))
        checked = self.uploads.check_metadata(metadata)
        if checked.get("callback_url"):
            # The webhook's absolute URLs start here unless --public-url says otherwise.
            checked["base_url"] = request_base_url(request)
        checksum = None
        if length is None:
            raise tus_error(411, "length_required", "creation-with-upload needs Content-Length")
        if length:
            check_content_type(request)
            checksum = parse_checksum(request)
            if length > (upload_length if upload_length is not None else max_size):
                raise tus_error(413, "too_large", "the body goes past Upload-Length")
        self.uploads.admit(upload_length)
        uploads = self.uploads
        upload_id = new_upload_id()
        filename = uploads.new_file(upload_id, checked["role"], checked["display"])
        now = uploads.now()
        upload = Upload(
            id=upload_id,
            owner=_owner(request),
            length=upload_length,
            offset=0,
            metadata=metadata,
            created_at=now,
            expires_at=now + uploads.expiry,
            filename=filename,
            extra=checked,
        )
        created = uploads.store.create(upload)
        uploads.event("created", 0)
        request.tus_upload = upload  # type: ignore[attr-defined]
        if not length:
            return _Created(upload, created)
        prepared = uploads.prepare(upload_id, upload.owner, 0, length, None, checksum)
        return TusPatchBody(uploads, prepared, length, crowd_of(request))

    def render_POST(self, request: server.Request) -> bytes | int:
        body: Any = getattr(request, "body", None)
        upload: Upload | None = getattr(request, "tus_upload", None)
        if body is None or upload is None:
            # A stock request (no early routing): this endpoint needs ours.
            return self._refuse(
                request, tus_error(500, "internal", "tus needs the transcoder request")
            )
        created = upload

        def done(result: Upload | None) -> None:
            final = result if result is not None else created
            _answer(
                request,
                201,
                Location=f"/uploads/{created.id}",
                Upload_Offset=final.offset if isinstance(body, TusPatchBody) else None,
                Upload_Expires=http_date(final.expires_at),
                **{JOB_LOCATION.replace("-", "_"): _job_location(final)},
            )

        body.finish().addCallback(done).addErrback(lambda f: _fail(request, f))
        return server.NOT_DONE_YET


@implementer(IBodyReceiver)
class UploadResource(_TusResource):
    """C{/uploads/<id>}: C{HEAD}, C{PATCH}, C{DELETE}."""

    isLeaf = True

    def __init__(self, uploads: TusUploads, upload_id: str) -> None:
        super().__init__(uploads)
        self.upload_id = upload_id

    def receive_body(self, request: server.Request, length: int | None) -> IRequestBody:
        check_resumable(request)
        if request.postpath:
            raise tus_error(404, "not_found", "no such upload")
        if method_of(request) != b"PATCH":
            if length == 0:
                # POST with X-HTTP-Method-Override: DELETE or HEAD: answered by render_POST.
                return _NoBody()
            raise tus_error(400, "unexpected_body", "only PATCH takes a body here")
        check_content_type(request)
        offset = number(request, "Upload-Offset")
        if offset is None:
            raise tus_error(400, "bad_header", "Upload-Offset is required")
        if length is None:
            raise tus_error(411, "length_required", "a PATCH needs Content-Length")
        checksum = parse_checksum(request)
        prepared = self.uploads.prepare(
            self.upload_id,
            _owner(request),
            offset,
            length,
            number(request, "Upload-Length"),
            checksum,
        )
        return TusPatchBody(self.uploads, prepared, length, crowd_of(request))

    def render_POST(self, request: server.Request) -> bytes | int:
        method = method_of(request)
        if method == b"POST":
            return self._refuse(
                request,
                tus_error(
                    405,
                    "method_not_allowed",
                    "POST is not allowed here",
                    Allow="HEAD, PATCH, DELETE, OPTIONS",
                ),
            )
        handler = getattr(self, "render_" + method.decode("ascii", "replace"), None)
        if handler is None:
            return self._refuse(request, tus_error(405, "method_not_allowed", "no such method"))
        result: bytes | int = handler(request)
        return result

    def render_PATCH(self, request: server.Request) -> bytes | int:
        body: Any = getattr(request, "body", None)
        d: Deferred[Upload]
        if isinstance(body, TusPatchBody):
            d = body.finish()
        else:
            try:
                check_resumable(request)
                if request.postpath:
                    raise tus_error(404, "not_found", "no such upload")
                check_content_type(request)
                offset = number(request, "Upload-Offset")
                if offset is None:
                    raise tus_error(400, "bad_header", "Upload-Offset is required")
            except APIError as e:
                return self._refuse(request, e)
            uploads = self.uploads
            d = uploads.prepare(
                self.upload_id, _owner(request), offset, 0, number(request, "Upload-Length"), None
            ).addCallback(lambda prep: uploads.patched(prep, prep.offset, True, True))

        def done(upload: Upload) -> None:
            _answer(
                request,
                204,
                Upload_Offset=upload.offset,
                Upload_Expires=http_date(upload.expires_at),
                **{JOB_LOCATION.replace("-", "_"): _job_location(upload)},
            )

        d.addCallback(done).addErrback(lambda f: _fail(request, f))
        return server.NOT_DONE_YET

    def _with_lock(self, request: server.Request) -> Deferred[tuple[Upload, Any]]:
        """The upload, held: a PATCH in flight is asked to stop first."""
        uploads = self.uploads
        check_resumable(request)
        if request.postpath:
            raise tus_error(404, "not_found", "no such upload")

        def held(lock: Any) -> Deferred[tuple[Upload, Any]]:
            def release(f: Failure) -> Failure:
                lock.release()
                return f

            return (
                uploads.lookup(self.upload_id, _owner(request))
                .addCallback(lambda u: (u, lock))
                .addErrback(release)
            )

        from transcoder.core.uploads import is_upload_id

        if not is_upload_id(self.upload_id):
            raise tus_error(404, "not_found", "no such upload")
        return (
            uploads.locks.acquire(self.upload_id, lambda: None)
            .addErrback(uploads._locked)
            .addCallback(held)
        )

    def render_HEAD(self, request: server.Request) -> bytes | int:
        try:
            d = self._with_lock(request)
        except APIError as e:
            return self._refuse(request, e)

        def finish(held: tuple[Upload, Any]) -> Deferred[Upload]:
            upload, lock = held
            d: Deferred[Any] = succeed(None)
            if upload.complete and upload.job_id is None:
                # Complete, but its job was refused (or a crash came between):
                # this HEAD makes it, or answers why not (503, 507).
                d = ensureDeferred(self.uploads.retry_complete(upload))
            return d.addBoth(lambda r: (lock.release(), r)[1]).addCallback(lambda _: upload)

        def answer(upload: Upload) -> None:
            request.setHeader(b"Cache-Control", b"no-store")
            metadata = encode_metadata(upload.metadata) or None
            _answer(
                request,
                200,
                Upload_Offset=upload.offset,
                Upload_Length=upload.length,
                Upload_Defer_Length="1" if upload.length is None else None,
                Upload_Metadata=metadata,
                Upload_Expires=http_date(upload.expires_at),
                **{JOB_LOCATION.replace("-", "_"): _job_location(upload)},
            )

        def failed(f: Failure) -> None:
            request.setHeader(b"Cache-Control", b"no-store")
            _fail(request, f)

        d.addCallback(finish).addCallback(answer).addErrback(failed)
        return server.NOT_DONE_YET

    def render_DELETE(self, request: server.Request) -> bytes | int:
        try:
            d = self._with_lock(request)
        except APIError as e:
            return self._refuse(request, e)
        uploads = self.uploads

        def terminate(held: tuple[Upload, Any]) -> Deferred[None]:
            upload, lock = held
            uploads.event("terminated", 0)
            return uploads.terminate_now(upload).addBoth(lambda r: (lock.release(), r)[1])

        d.addCallback(terminate).addCallback(lambda _: _answer(request, 204)).addErrback(
            lambda f: _fail(request, f)
        )
        return server.NOT_DONE_YET
