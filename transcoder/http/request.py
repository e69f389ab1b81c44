"""
Request bodies written straight to their files as they arrive.

Stock twisted.web spools every body to a temporary file, reaches the resource
only once all of it is in, and then parses form bodies into memory.  Here
L{TranscoderRequest} decides in C{gotLength}, after the headers and before any
body byte or C{100 Continue}, what the body is for:

  - the addressed resource provides L{IBodyReceiver}: it checks the request
    (profile, size, capacity) and returns an L{IRequestBody}, which gets every
    chunk as the transfer decoder produces it;
  - the resource refuses: the error goes out at once, without C{100 Continue};
  - any other resource: small bodies only, kept by the stock machinery.

L{RawBody} and L{MultipartBody} write through a L{Spool} into a staging
directory, C{uploads/<job id>/}.  Only a complete, checked upload becomes a
job, by renaming that directory (see L{transcoder.core.submit}).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

import multipart
from twisted.internet import tcp
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import _ChunkedTransferDecoder, parse_qs
from twisted.web.resource import IResource
from zope.interface import Interface, implementer

from transcoder.core.errors import DomainError
from transcoder.core.jobs import InputFile
from transcoder.core.profiles import RESERVED_FIELDS, Profile, profile_for
from transcoder.core.submit import Submission
from transcoder.http.chunked import Chunked
from transcoder.http.errors import APIError, http_error, method_not_allowed
from transcoder.http.names import extension, sanitise_filename
from transcoder.http.pump import PumpEnd, SocketPump
from transcoder.http.responses import ErrorResource, allowed_methods, raw_response
from transcoder.http.search import find
from transcoder.http.spool import Opener, Spool, SpooledFile, _open
from transcoder.http.webhooks import callback_url_problem
from transcoder.http.writer import STAGING_BUFFERS

log = Logger()

# Endpoints that do not stream take small bodies or none.
SMALL_BODY = 64 * 1024
# How long a refused request's body is read and thrown away before closing, so
# that the client sees the answer rather than a reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 << 20
# Reading 1 MiB per recv instead of 64 KiB cut the upload path's CPU by a
# quarter (measured; see docs/performance.md).
UPLOAD_READ_SIZE = 1 << 20
# A body must bring at least this much per idle-timeout window (64 KiB a
# minute with the default timeout: about 1 KiB/s).
MIN_BYTES_PER_WINDOW = 64 * 1024
# Raw bodies of a known length above this are read by a SocketPump, all but
# their last PUMP_TAIL bytes, which come through the HTTP channel as usual.
PUMP_MIN = 4 << 20
PUMP_TAIL = 64 * 1024
# A chunked body is taken over by a pump once this much of it has come
# through the reactor: sooner, fewer of the spool's staging buffers are ever
# touched (peak RSS +14 MiB at 4 MiB).
CHUNKED_PUMP_AT = 1 << 20
# Pumps at once, each with its buffers (6 MiB).  A pump is for an upload that
# has the server to itself: beside other uploads it went no faster in all,
# and the load test's status polls waited longer (p99 149 ms with no pump,
# 176 with one, 283 with four; measured), so an upload that arrives while
# another is in flight is read by the reactor, which also bounds memory
# however many arrive together.
MAX_PUMPS = 1

_MAX_FIELD = 8 * 1024
_FILENAME_STAR = re.compile(r";\s*filename\*\s*=", re.IGNORECASE)
_MAX_FIELDS = 64
_MAX_FILE_PARTS = 8
_ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


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

    def receiveBody(request: server.Request, length: int | None) -> IRequestBody:
        """
        Accept the body of C{request}, whose C{method}, C{uri}, C{path},
        C{args} and headers are set, or raise L{APIError} to refuse it before
        it is read.  C{length} is the declared length, or None when chunked.
        """


def _arg(args: Mapping[bytes, list[bytes]], name: str) -> str | None:
    values = args.get(name.encode("utf-8"))
    if not values:
        return None
    if any(v != values[0] for v in values):
        raise APIError(
            400, "conflicting_fields", f"query parameter {name[:64]!r} is given different values"
        )
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "bad_query", f"query parameter {name[:64]!r} is not UTF-8") from None


def query_fields(args: Mapping[bytes, list[bytes]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in args:
        try:
            name = key.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, "bad_query", "query parameter names must be UTF-8") from None
        value = _arg(args, name)
        if value is not None:
            out[name] = value
    return out


def _split_fields(fields: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Control fields (profile, filename, ...) and the rest, which are profile parameters."""
    control = {k: v for k, v in fields.items() if k in RESERVED_FIELDS or k.startswith("sha256.")}
    params = {k: v for k, v in fields.items() if k not in control}
    return control, params


def _check_callback(url: str | None) -> str | None:
    if url is None or url == "":
        return None
    problem = callback_url_problem(url)
    if problem is not None:
        raise APIError(422, "invalid_callback_url", f"callback_url {problem}")
    return url


def _input_digests(control: Mapping[str, str], profile: Profile) -> dict[str, str]:
    """
    The SHA-256 digests the client gave for the profile's inputs, by role:
    C{sha256.<role>}, or plain C{sha256} where there is one input.  A digest
    for an input the profile does not have is refused rather than ignored: the
    client meant something to be checked.
    """
    out: dict[str, str] = {}
    for name, value in control.items():
        if name == "sha256":
            if len(profile.inputs) != 1:
                raise APIError(
                    400,
                    "bad_digest",
                    f"profile {profile.name} takes several inputs: name each digest "
                    f"sha256.<input> ({', '.join(profile.inputs)})",
                )
            role = profile.inputs[0]
        elif name.startswith("sha256."):
            role = name[len("sha256.") :]
            if role not in profile.inputs:
                raise APIError(
                    400,
                    "bad_digest",
                    f"{name[:64]!r} names no input of profile {profile.name} "
                    f"({', '.join(profile.inputs)})",
                )
        else:
            continue
        if not _HEX64.match(value):
            raise APIError(400, "bad_digest", f"{name[:64]} must be 64 hexadecimal digits")
        if out.get(role, value.lower()) != value.lower():
            raise APIError(400, "conflicting_fields", f"two different digests for input {role!r}")
        out[role] = value.lower()
    return out


def _base64_digest(encoded: bytes, size: int, malformed: str) -> str:
    """The hex of a base64 digest of C{size} bytes; else 400 bad_digest saying C{malformed}."""
    try:
        digest = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != size:
        raise APIError(400, "bad_digest", malformed)
    return digest.hex()


def _body_sha256(request: server.Request) -> str | None:
    """The SHA-256 of the whole body that C{Repr-Digest} or C{Content-Digest} gives, if any."""
    found: str | None = None
    for header in (b"repr-digest", b"content-digest"):
        for value in request.requestHeaders.getRawHeaders(header, []):
            m = re.search(rb"sha-256=:([A-Za-z0-9+/=]+):", value)
            if m is None:
                continue
            digest = _base64_digest(m.group(1), 32, f"{header.decode()} sha-256 is malformed")
            if found is not None and found != digest:
                raise APIError(400, "conflicting_fields", "Repr-Digest and Content-Digest differ")
            found = digest
    return found


def _content_md5(request: server.Request) -> str | None:
    value = request.requestHeaders.getRawHeaders(b"content-md5", [None])[0]
    if value is None:
        return None
    return _base64_digest(value.strip(), 16, "Content-MD5 must be the base64 of 16 bytes")


def _reason(error: Exception) -> str:
    """
    The parser's own words, without the exception it may carry beside them
    (a UnicodeDecodeError's repr would show the client a Python object).
    """
    first = error.args[0] if error.args else None
    return first if isinstance(first, str) else type(error).__name__


def _stalled(timeout: float | None) -> APIError:
    return APIError(408, "too_slow", f"no byte of the body came in {timeout or 0:g} s")


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


def _crowd(request: server.Request) -> int:
    """Uploads in flight on the request's site, this one included."""
    return uploads_in_flight(request) + 1


class _BaseBody:
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
            on_error=self._spoolFailed,
            opener=opener,
            high_water=highWater,
            staging_buffers=stagingBuffers,
        )

    def _count(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self._max:
            raise self.tooLarge()

    def tooLarge(self) -> APIError:
        return APIError(413, "too_large", f"the upload exceeds the maximum of {self._max} bytes")

    def room(self) -> int:
        """How many more bytes the body may bring."""
        return self._max - self._received

    def _spoolFailed(self, error: OSError) -> None:
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
class RawBody(_BaseBody):
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
        control, raw_params = _split_fields(fields)
        if len(profile.inputs) != 1:
            raise APIError(
                422,
                "needs_multipart",
                f"profile {profile.name} takes several inputs ({', '.join(profile.inputs)}): "
                "send them as multipart/form-data fields of those names",
            )
        self.profile = profile
        self.params = profile.validate_params(raw_params)
        self.callback_url = _check_callback(control.get("callback_url"))
        self.role = profile.inputs[0]
        self.filename = sanitise_filename(control.get("filename"), default="input")
        self.expected = _input_digests(control, profile)
        whole = _body_sha256(request)
        if whole is not None:
            if self.expected.get(self.role, whole) != whole:
                raise APIError(
                    400, "conflicting_fields", "the body's SHA-256 is given two different values"
                )
            self.expected[self.role] = whole
        self.md5 = _content_md5(request)
        super().__init__(reactor, staging, job_id, max_size, opener, _crowd(request), admit)
        self.path = staging / f"input-{self.role}{extension(self.filename)}"
        self.spool.open(self.path, md5=self.md5 is not None, size=length)
        self._pumpHashes = False

    def dataReceived(self, data: bytes) -> None:
        self._count(data)
        self.spool.write(data)

    def lend(self, view: memoryview, giveBack: Callable[[], None]) -> None:
        """A L{SocketPump}'s buffer, on the pump's thread, written after what came before."""
        self.spool.lend(view, giveBack, hashed=self._pumpHashes)

    def hashes(self, stop: Callable[[], bool]) -> list[Any] | None:
        """For a L{SocketPump} that hashes what it lends: see L{Spool.hashes}."""
        objects = self.spool.hashes(stop)
        self._pumpHashes = objects is not None
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


@implementer(IRequestBody)
class MultipartBody(_BaseBody):
    """
    C{multipart/form-data}: each file part streams into its own input file as
    it arrives; the other parts are small fields (the profile, parameters).
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        request: server.Request,
        staging: Path,
        job_id: str,
        profiles: Mapping[str, Profile],
        boundary: str,
        length: int | None,
        max_size: int,
        opener: Opener = _open,
        admit: Callable[[], None] | None = None,
    ) -> None:
        self.profiles = profiles
        self.fields = query_fields(request.args or {})
        self.profile: Profile | None = None
        if self.fields.get("profile"):
            self.profile = profile_for(profiles, self.fields["profile"])
        try:
            self.parser = multipart.PushMultipartParser(
                boundary,
                content_length=length if length is not None else -1,
                max_header_size=4096,
                max_header_count=8,
                max_segment_count=_MAX_FIELDS + _MAX_FILE_PARTS,
            )
        except multipart.MultipartError as e:
            raise APIError(400, "bad_multipart", f"bad multipart boundary: {e}") from None
        # Digests of the whole body (every part and delimiter), as the
        # headers mean them; hashed only when given.
        self._bodyDigests: list[tuple[Any, str, str]] = []
        sha = _body_sha256(request)
        if sha is not None:
            self._bodyDigests.append((hashlib.sha256(), sha, "Repr-Digest"))
        md5 = _content_md5(request)
        if md5 is not None:
            self._bodyDigests.append((hashlib.md5(), md5, "Content-MD5"))
        super().__init__(reactor, staging, job_id, max_size, opener, _crowd(request), admit)
        self.files: dict[str, tuple[str, Path]] = {}
        self._segment: Any = None
        self._isFile = False
        self._fieldValue = bytearray()
        self._delimiter = b"\r\n--" + self.parser.boundary
        # Body bytes seen, and the current file's bytes: where that file
        # starts in the body, for the pump to cut its buffers by.
        self._bodyAt = 0
        self._fileBytes = 0

    def _startSegment(self, segment: Any) -> None:
        name = segment.name
        if segment.filename is None and _FILENAME_STAR.search(
            segment.header("content-disposition") or ""
        ):
            # Otherwise a form field, whose bytes would soon be "too long".
            raise APIError(
                400,
                "bad_multipart",
                f"part {(name or '')[:64]!r} names its file only with filename*, which "
                "multipart/form-data does not use (RFC 7578 4.2): send filename=",
            )
        if segment.filename is None:
            if len(self.fields) >= _MAX_FIELDS:
                raise APIError(400, "bad_multipart", "too many form fields")
            self._isFile = False
            self._fieldValue = bytearray()
            return
        if not _ROLE.match(name or ""):
            raise APIError(422, "unknown_input", f"file field {name[:64]!r} is not an input name")
        if self.profile is not None and name not in self.profile.inputs:
            raise APIError(
                422,
                "unknown_input",
                f"profile {self.profile.name} takes inputs {', '.join(self.profile.inputs)}, "
                f"not {name!r}",
            )
        if name in self.files:
            raise APIError(422, "duplicate_input", f"input {name!r} sent twice")
        if len(self.files) >= _MAX_FILE_PARTS:
            raise APIError(400, "bad_multipart", "too many file parts")
        filename = sanitise_filename(segment.filename, default=name)
        path = self.staging / f"input-{name}{extension(filename)}"
        self.files[name] = (filename, path)
        self._isFile = True
        self._fileBytes = 0
        self.spool.open(path)

    def _endSegment(self) -> None:
        if self._isFile:
            self.spool.close_file()
        else:
            name = self._segment.name
            try:
                value = self._fieldValue.decode("utf-8")
            except UnicodeDecodeError:
                raise APIError(400, "bad_multipart", f"field {name[:64]!r} is not UTF-8") from None
            if self.fields.get(name, value) != value:
                raise APIError(
                    400, "conflicting_fields", f"field {name[:64]!r} is given different values"
                )
            self.fields[name] = value
            if name == "profile" and self.profile is None:
                self.profile = profile_for(self.profiles, value)
                for role in self.files:
                    if role not in self.profile.inputs:
                        raise APIError(
                            422, "unknown_input", f"profile {value} has no input {role!r}"
                        )
        self._segment = None

    def _feed(self, data: bytes, wait: bool = False) -> None:
        try:
            for event in self.parser.parse(data):
                if isinstance(event, multipart.MultipartSegment):
                    self._segment = event
                    self._startSegment(event)
                elif event is None:
                    self._endSegment()
                elif self._isFile:
                    self._fileBytes += len(event)
                    self.spool.write(event, wait=wait)
                else:
                    self._fieldValue += event
                    if len(self._fieldValue) > _MAX_FIELD:
                        raise APIError(400, "bad_multipart", "a form field is too long")
        except multipart.ParserLimitReached as e:
            raise APIError(400, "bad_multipart", f"multipart limit reached: {_reason(e)}") from None
        except multipart.MultipartError as e:
            raise APIError(
                400, "bad_multipart", f"malformed multipart body: {_reason(e)}"
            ) from None

    def dataReceived(self, data: bytes) -> None:
        if not data:
            # No data, not the end: to the parser an empty chunk means end of input.
            return
        self._count(data)
        self._bodyAt += len(data)
        for h, _, _ in self._bodyDigests:
            h.update(data)
        self._feed(data)

    def _inFileBody(self) -> bool:
        # The parser keeps back bytes that may start a delimiter; only when it
        # holds none can a buffer be searched on its own.  (An attribute of
        # the parser's, not its API: without it, every buffer is parsed.)
        return (
            self._isFile
            and self._segment is not None
            and getattr(self.parser, "_buffer", None) == b""
        )

    def lend(self, view: memoryview, giveBack: Callable[[], None]) -> None:
        """
        A L{SocketPump}'s buffer, on the pump's thread; an L{APIError} raised
        here ends the pump, and the request answers it.

        Inside a file part, the bytes before the next delimiter are the file's:
        they are lent on to the spool as they are, so that most of a big part
        is written from the pump's own buffers (with O_DIRECT, see
        L{fileStart}) and only what follows a delimiter goes through the
        parser, which keeps bytes and so needs a copy.  Parsing every buffer
        cost a third more CPU than a raw upload (two copies of every byte).
        """
        n = len(view)
        self._bodyAt += n
        for h, _, _ in self._bodyDigests:
            h.update(view)
        if not self._inFileBody():
            try:
                data = bytes(view)
            finally:
                giveBack()
            self._feed(data, wait=True)
            return
        delimiter = self._delimiter
        at = find(view, delimiter)
        if at == -1:
            # What may be the start of a delimiter cut by the buffer's end is
            # the parser's to judge, as it does (a boundary holds no CR).
            tail = max(0, n - (len(delimiter) - 1))
            cr = bytes(view[tail:]).rfind(b"\r")
            if cr != -1 and delimiter.startswith(bytes(view[tail + cr :])):
                at = tail + cr
        if at == -1:
            self._fileBytes += n
            self.spool.lend(view, giveBack)
            return
        rest = bytes(view[at:])
        if at:
            self._fileBytes += at
            self.spool.lend(view[:at], giveBack)
        else:
            giveBack()
        self._feed(rest, wait=True)

    def fileStart(self) -> int:
        """
        Where the file being written starts in the body (0 between files), so
        that a pump cuts its buffers at that file's aligned offsets.  On the
        pump's thread, between buffers.
        """
        if not self._inFileBody():
            return 0
        return self._bodyAt - self._fileBytes

    def lent(self, nbytes: int) -> None:
        """Count what a pump lent, once it has stopped (its length was checked up front)."""
        self._received += nbytes

    def finish(self) -> Deferred[Submission]:
        self._finishing = True
        try:
            self._feed(b"")
            if not self.parser.closed or self._segment is not None:
                raise APIError(400, "bad_multipart", "the multipart body ended early")
            profile = profile_for(self.profiles, self.fields.get("profile"))
            missing = [r for r in profile.inputs if r not in self.files]
            if missing:
                raise APIError(
                    422,
                    "missing_input",
                    f"profile {profile.name} needs file fields: {', '.join(missing)}",
                )
            control, raw_params = _split_fields(self.fields)
            params = profile.validate_params(raw_params)
            callback = _check_callback(control.get("callback_url"))
            expected = _input_digests(control, profile)
            for h, want, header in self._bodyDigests:
                if h.hexdigest() != want:
                    raise APIError(400, "digest_mismatch", f"the body does not match its {header}")
        except DomainError as e:
            return fail(e)

        def checked(files: list[SpooledFile]) -> Submission:
            by_path = {f.path: f for f in files}
            inputs = []
            for role in profile.inputs:
                filename, path = self.files[role]
                f = by_path[path]
                if f.size == 0:
                    raise APIError(400, "empty_body", f"input {role!r} is empty")
                if role in expected and expected[role] != f.sha256:
                    raise APIError(
                        400, "digest_mismatch", f"input {role!r}: SHA-256 does not match"
                    )
                inputs.append(InputFile(role, filename, f.size, f.sha256, path.name))
            return Submission(
                job_id=self.job_id,
                staging=self.staging,
                profile=profile,
                params=params,
                inputs=inputs,
                callback_url=callback,
                fields=control,
            )

        return self._finished_files(self.spool.finish()).addCallback(checked)


# RFC 2046's bchars, 1 to 70 of them, not ending in a space.
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
# The boundary parameter itself (not one whose name ends in "boundary"),
# quoted or not: unquoted, RFC 2045 allows only token characters, but clients
# send "boundary=ab:cd" too, and reading it whole costs nothing.
_BOUNDARY_PARAM = re.compile(r';\s*boundary\s*=\s*("([^"]*)"|[^;]*)', re.I)


def multipart_boundary(request: server.Request) -> str | None:
    """
    The boundary if the request is C{multipart/form-data}; raise 400 if it
    has none, or one no body could use (checked before the body is sent).
    """
    ctype = request.requestHeaders.getRawHeaders(b"content-type", [b""])[0].decode("latin-1")
    media = ctype.partition(";")[0].strip().lower()
    if media != "multipart/form-data":
        if media.startswith("multipart/"):
            # Any other body, whatever its label, is the video itself; a
            # multipart one is not, and no other kind of multipart is parsed.
            raise APIError(
                415,
                "unsupported_media_type",
                "multipart uploads must be multipart/form-data",
            )
        return None
    m = _BOUNDARY_PARAM.search(ctype)
    if m is None:
        raise APIError(400, "bad_multipart", "multipart/form-data without a boundary")
    boundary = m.group(2) if m.group(2) is not None else m.group(1).strip()
    if not _BOUNDARY.match(boundary):
        raise APIError(
            400,
            "bad_multipart",
            "the boundary must be 1 to 70 letters, digits or '()+_,-./:=? (RFC 2046)",
        )
    return boundary


# Requests whose body a SocketPump reads (or is about to); reactor thread only.
_pumping: set[TranscoderRequest] = set()


class TranscoderRequest(server.Request):
    """
    A request whose body goes where its resource says, decided before the
    body is read.  See the module docstring.
    """

    body: IRequestBody | None = None
    _refused = False
    _received = 0
    _receivedAtCheck = 0
    _paused = False
    _pausedInWindow = False
    _rateCall: Any = None
    _linger: Any = None
    _lingerLeft = 0
    # Set from gotLength until a SocketPump has handed the socket back.
    _pumping = False
    _pump: SocketPump | None = None
    _timeOut: float | None = None
    # For a chunked raw body: how much data to take through the reactor
    # before a pump may take over, or None for no pump.
    _chunkedPumpAt: int | None = None

    def gotLength(self, length: int | None) -> None:
        channel: Any = self.channel
        method: bytes = channel._command
        if length == 0 and method not in (b"POST", b"PUT"):
            super().gotLength(length)
            return
        site: Any = channel.site
        try:
            if getattr(site, "stopping", False) and method in (b"POST", b"PUT"):
                raise APIError(
                    503, "shutting_down", "the server is shutting down", {"Retry-After": "30"}
                )
            resource = self._route(method, channel._path, channel._version)
            if isinstance(resource, ErrorResource):
                raise resource.error
            # A method the resource does not take is refused before anything
            # about its body: that is the first thing wrong with the request.
            allowed = allowed_methods(resource)
            name = method.decode("ascii", "replace")
            if allowed and name not in allowed:
                raise method_not_allowed(name, allowed)
            receiver = IBodyReceiver(resource, None)
            if receiver is None:
                if length is None or length > SMALL_BODY:
                    raise APIError(413, "too_large", "this endpoint takes no large body")
                super().gotLength(length)
                return
            body = receiver.receiveBody(self, length)
        except DomainError as e:
            self.content = io.BytesIO()
            self._refuse(e, bodyStarted=False)
            return
        except Exception:
            log.failure("refusing a request: routing it failed")
            self.content = io.BytesIO()
            self._refuse(APIError(500, "internal", "internal server error"), bodyStarted=False)
            return
        self.content = io.BytesIO()
        self.body = body
        uploads = getattr(site, "uploads", None)
        alone = not uploads
        if uploads is not None:
            # The site waits for these on shutdown.
            uploads.add(self)
            self.notifyFinish().addBoth(lambda _: uploads.discard(self))
        body_any: Any = body
        body_any.onFatal = self._failMidBody
        body_any.onPressure = self._pressure
        transport: Any = self.transport
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = UPLOAD_READ_SIZE
        if (
            isinstance(body, RawBody | MultipartBody)
            and length is not None
            and length - PUMP_TAIL >= PUMP_MIN
            and isinstance(transport, tcp.Connection)
            and len(_pumping) < MAX_PUMPS
            and alone
        ):
            # Reading stops now; the rest of the bytes already read still
            # reach handleContentChunk before the pump starts.
            self._pumping = True
            _pumping.add(self)
            transport.stopReading()
            channel.callLater(0, self._startPump, body, length)
        elif (
            isinstance(body, RawBody)
            and length is None
            and isinstance(transport, tcp.Connection)
            and alone
        ):
            # Chunked: its size is unknown, so a pump only takes a body that
            # has shown itself big (see handleContentChunk).
            self._chunkedPumpAt = CHUNKED_PUMP_AT
        self._watchRate(channel)

    def _startPump(self, body: RawBody | MultipartBody, length: int) -> None:
        left = length - self._received - PUMP_TAIL
        if self.body is not body or self.channel is None or self._disconnected or left < PUMP_MIN:
            # Refused already, gone, or the first reads brought most of the
            # body: the reactor reads the rest (or lingers), as without a pump.
            self._noPump()
            return
        self._runPump(
            body,
            left,
            file_start=body.fileStart if isinstance(body, MultipartBody) else None,
            hashes=body.hashes if isinstance(body, RawBody) else None,
        )

    def _runPump(self, body: RawBody | MultipartBody, length: int, **options: Any) -> None:
        """Start a L{SocketPump} reading C{length} bytes (0: a chunked body) into C{body}."""
        channel: Any = self.channel
        transport: Any = self.transport
        # The pump watches for an idle client itself; the channel's timer would
        # only see that the reactor stopped reading.
        self._timeOut = channel.setTimeout(None)
        self._pump = SocketPump(
            body.reactor,
            transport.socket,
            length,
            body.lend,
            self._timeOut,
            offset=self._received,
            **options,
        )
        self._pump.start().addCallback(self._pumpEnded)

    def _noPump(self) -> None:
        """A pump was readied but is not started: the reactor reads again."""
        self._pumping = False
        _pumping.discard(self)
        if self.channel is not None and not self._disconnected and not self._paused:
            transport: Any = self.transport
            transport.resumeProducing()

    def _maybePumpChunks(self) -> None:
        """
        From handleContentChunk, within the transfer decoder's parsing: once
        a chunked body has brought enough, stop reading, so that by the next
        reactor turn the decoder has parsed all it was given, and see then
        whether a pump can take over where it stands.
        """
        at = self._chunkedPumpAt
        if at is None or self._received < at or self._pumping or self._paused:
            return
        channel: Any = self.channel
        site: Any = getattr(channel, "site", None)
        # Asked once: from here on, a pump or the reactor reads the rest.
        self._chunkedPumpAt = None
        if len(_pumping) >= MAX_PUMPS or getattr(site, "uploads", None) != {self}:
            # Not alone (any more): the reactor reads, as for any upload beside others.
            return
        self._pumping = True
        _pumping.add(self)
        transport: Any = self.transport
        transport.stopReading()
        channel.callLater(0, self._startChunkedPump)

    def _startChunkedPump(self) -> None:
        channel: Any = self.channel
        body = self.body
        decoder = getattr(channel, "_transferDecoder", None)
        state = getattr(decoder, "state", None)
        if (
            not isinstance(body, RawBody)
            or channel is None
            or self._disconnected
            or not isinstance(decoder, _ChunkedTransferDecoder)
            # Taken over only between its reads, with nothing half-parsed:
            # otherwise a few more reads through the reactor, and again.
            # (Its buffer is the decoder's own attribute, not its API: a
            # Twisted without it gets no chunked pump.)
            or getattr(decoder, "_buffer", b"unknown")
            or state not in ("BODY", "CRLF", "CHUNK_LENGTH")
        ):
            if isinstance(body, RawBody) and isinstance(decoder, _ChunkedTransferDecoder):
                if state != "TRAILER" and state != "FINISHED":
                    self._chunkedPumpAt = self._received + UPLOAD_READ_SIZE
            self._noPump()
            return
        assert decoder is not None
        self._runPump(
            body,
            0,
            chunked=Chunked(
                left=decoder.length if state == "BODY" else 0,
                crlf=state in ("BODY", "CRLF"),
                limit=body.room(),
            ),
        )

    def _pumpEnded(self, end: PumpEnd) -> None:
        """On the reactor: count the pumped bytes where the channel counts them; read again."""
        self._pump = None
        self._pumping = False
        _pumping.discard(self)
        self._received += end.lent
        if isinstance(self.body, RawBody | MultipartBody):
            self.body.lent(end.lent)
        channel: Any = self.channel
        if channel is None or self._disconnected:
            return
        decoder = getattr(channel, "_transferDecoder", None)
        if isinstance(decoder, _ChunkedTransferDecoder):
            if end.reason == "complete":
                # The pump stopped at the last chunk's size line, of which it
                # may have read the start: that is where the decoder goes on,
                # as the channel gives it the bytes.
                decoder.state = "CHUNK_LENGTH"
                decoder._start = 0
                if end.leftover:
                    channel.dataReceived(end.leftover)
            else:
                # Refused (413, 400) or gone, somewhere inside the framing:
                # what still comes is taken as data, which the refused request
                # swallows while its answer lingers, instead of framing the
                # decoder would call malformed, answering and dropping the
                # connection under the client (which may then lose our answer).
                decoder.state = "BODY"
                decoder.length = 1 << 62
        elif decoder is not None and getattr(decoder, "contentLength", None):
            decoder.contentLength -= end.received
        channel.setTimeout(self._timeOut)
        if end.reason == "idle":
            self._failMidBody(_stalled(self._timeOut))
        elif end.reason == "malformed":
            # The code the channel gives framing it refuses itself (see web._Channel).
            self._failMidBody(APIError(400, "bad_request", f"malformed chunked body: {end.error}"))
        elif end.reason == "too_large" and isinstance(self.body, RawBody):
            self._failMidBody(self.body.tooLarge())
        if end.reason == "failed":
            error = end.error
            if not isinstance(error, DomainError):
                log.failure(
                    "reading an upload failed",
                    failure=Failure(error) if error is not None else None,
                )
                error = APIError(500, "internal", "internal server error")
            self._failMidBody(error)
        if not self._paused:
            transport: Any = self.transport
            transport.resumeProducing()

    def bodyTimedOut(self) -> bool:
        """
        For the channel's idle timeout: mid-body, answer 408 too_slow, as
        the body-rate check and a pump's idle end do, rather than let the
        channel close without a word (True); otherwise False.
        """
        if self.body is None or self._refused or self.channel is None:
            return False
        if self._paused:
            # The server stopped reading (its disk is behind), not the client
            # sending: wait another while.
            self.channel.setTimeout(self.channel.timeOut)
            return True
        self._failMidBody(_stalled(self.channel.timeOut))
        return True

    def _bodyBytes(self) -> int:
        pump = self._pump
        return self._received + (pump.received if pump is not None else 0)

    def _watchRate(self, channel: Any) -> None:
        """
        Cut off a body that trickles: the idle timeout only catches a client
        that sends nothing, so one byte a second would hold a connection and
        a staging file for days.  Each idle-timeout window must bring at
        least L{MIN_BYTES_PER_WINDOW}, unless the server itself paused reading.
        """
        window = channel.timeOut
        if not window:
            return

        def check() -> None:
            self._rateCall = None
            if self.body is None:
                return
            pump = self._pump
            if pump is not None and pump.stalled:
                pump.stalled = False
                self._pausedInWindow = True
            received = self._bodyBytes()
            if received - self._receivedAtCheck < MIN_BYTES_PER_WINDOW and not (
                self._pausedInWindow
            ):
                self._failMidBody(
                    APIError(
                        408,
                        "too_slow",
                        f"the body came slower than {MIN_BYTES_PER_WINDOW} bytes in {window:g} s",
                    )
                )
                return
            self._receivedAtCheck = received
            self._pausedInWindow = self._paused
            self._rateCall = channel.callLater(window, check)

        self._rateCall = channel.callLater(window, check)

    def _stopWatchingRate(self) -> None:
        if self._rateCall is not None and self._rateCall.active():
            self._rateCall.cancel()
        self._rateCall = None

    def _route(self, method: bytes, uri: bytes, version: bytes) -> IResource:
        """Find the resource early; L{process} finds it again the usual way later."""
        self.method, self.uri, self.clientproto = method, uri, version
        path, _, query = uri.partition(b"?")
        self.path = path
        self.args = parse_qs(query, 1) if query else {}
        self.prepath = []
        self.postpath = [unquote_to_bytes(p) for p in path[1:].split(b"/")]
        channel: Any = self.channel
        resource: IResource = channel.site.getResourceFor(self)
        return resource

    def handleContentChunk(self, data: bytes) -> None:
        body = self.body
        if body is not None:
            self._received += len(data)
            try:
                body.dataReceived(data)
            except DomainError as e:
                self._failMidBody(e)
                return
            if self._chunkedPumpAt is not None:
                self._maybePumpChunks()
            return
        if self._refused:
            self._lingerLeft -= len(data)
            if self._lingerLeft < 0:
                self._close()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._stopWatchingRate()
        if self._refused:
            self._close()
            return
        transport: Any = self.transport
        if self.body is not None and hasattr(transport, "bufferSize"):
            try:
                del transport.bufferSize
            except AttributeError:
                pass
        super().requestReceived(command, path, version)

    def _pressure(self, paused: bool) -> None:
        self._paused = paused
        if paused:
            self._pausedInWindow = True
        if self.channel is None or self._disconnected or self._pumping:
            # A pump reading the socket lends buffers and waits for them to come
            # back: it needs no pausing, and the reactor must not read meanwhile.
            return
        transport: Any = self.transport
        if paused:
            transport.pauseProducing()
        else:
            transport.resumeProducing()
            # The client gets a whole idle window from here, not what the
            # pause left of one.
            self.channel.resetTimeout()

    def _failMidBody(self, error: DomainError) -> None:
        self._stopWatchingRate()
        if self._pump is not None:
            # The answer goes out now; reading resumes (to linger) once the pump is off the socket.
            self._pump.stop()
        body, self.body = self.body, None
        if body is not None:
            body.abort()
        outcome = getattr(self, "upload_outcome", None)
        if outcome is not None:
            outcome.error(error)
        if not self._refused and self.channel is not None:
            self._pressure(False)
            self._refuse(error, bodyStarted=True)

    def _refuse(self, error: DomainError, bodyStarted: bool) -> None:
        """
        Answer now, with the body unread.  A client that asked for C{100
        Continue} has sent nothing yet, so the connection can close at once;
        others may be sending, and closing on unread data would reset the
        connection before they read the answer, so their bytes are read and
        dropped for a short while first.
        """
        self._refused = True
        channel: Any = self.channel
        uploads = getattr(channel.site, "uploads", None)
        if uploads is not None:
            # No job will come of it: it no longer counts against the queue,
            # and shutdown need not wait for its linger.
            uploads.discard(self)
        expect = self.requestHeaders.getRawHeaders(b"expect", [b""])[0].lower()
        # HTTPChannel sends 100 Continue after gotLength returns, if this is still there.
        self.requestHeaders.removeHeader(b"expect")
        channel.persistent = False
        channel.transport.write(raw_response(error))
        log.info(
            "refused {method} {uri}: {status} {code}",
            method=self.method,
            uri=self.uri,
            status=http_error(error).status,
            code=error.code,
        )
        if expect == b"100-continue" and not bodyStarted:
            self._close()
        else:
            self._lingerLeft = LINGER_BYTES
            self._linger = channel.callLater(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if self.channel is not None:
            self.channel.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._stopWatchingRate()
        if self._pump is not None:
            self._pump.stop(disconnect=True)
        body, self.body = self.body, None
        if body is not None:
            body.abort()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        super().connectionLost(reason)

    def processingFailed(self, reason: Failure) -> None:  # type: ignore[override]
        """Log the traceback; the client gets a JSON 500 and never the traceback."""
        log.failure("request {uri} failed", failure=reason, uri=self.uri)
        if self.finished or self._disconnected:
            return
        error = APIError(500, "internal", "internal server error")
        body = error.body()
        self.setResponseCode(500)
        self.responseHeaders.setRawHeaders(b"Content-Type", [b"application/json"])
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()


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
