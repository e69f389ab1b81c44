"""
C{multipart/form-data} upload bodies, parsed as they stream in: each file
part goes into its own input file through a L{Spool}, the other parts are
small fields (the profile, its parameters).  A L{SocketPump}'s buffers inside
a file part are lent to the spool as they are, not parsed.
"""

from __future__ import annotations

import hashlib
import mmap
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import multipart
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorThreads
from twisted.web import server
from zope.interface import implementer

from transcoder.core.errors import DomainError
from transcoder.core.jobs import InputFile
from transcoder.core.profiles import Profile, profile_for
from transcoder.core.submit import Submission
from transcoder.http.bodies import BaseBody, IRequestBody, crowd_of
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
from transcoder.http.spool import Opener, SpooledFile, _open

_MAX_FIELD = 8 * 1024
_FILENAME_STAR = re.compile(r";\s*filename\*\s*=", re.IGNORECASE)
_MAX_FIELDS = 64
_MAX_FILE_PARTS = 8
_ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def _reason(error: Exception) -> str:
    """
    The parser's own words, without the exception it may carry beside them
    (a UnicodeDecodeError's repr would show the client a Python object).
    """
    first = error.args[0] if error.args else None
    return first if isinstance(first, str) else type(error).__name__


@implementer(IRequestBody)
class MultipartBody(BaseBody):
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
        sha = body_sha256(request)
        if sha is not None:
            self._bodyDigests.append((hashlib.sha256(), sha, "Repr-Digest"))
        md5 = content_md5(request)
        if md5 is not None:
            self._bodyDigests.append((hashlib.md5(), md5, "Content-MD5"))
        super().__init__(reactor, staging, job_id, max_size, opener, crowd_of(request), admit)
        self.files: dict[str, tuple[str, Path]] = {}
        self._segment: Any = None
        self._isFile = False
        self._fieldValue = bytearray()
        self._delimiter = b"\r\n--" + self.parser.boundary
        # Body bytes seen, and the current file's bytes: where that file
        # starts in the body, for the pump to cut its buffers by.
        self._bodyAt = 0
        self._fileBytes = 0

    def _start_segment(self, segment: Any) -> None:
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

    def _end_segment(self) -> None:
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
                    self._start_segment(event)
                elif event is None:
                    self._end_segment()
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

    def _in_file_body(self) -> bool:
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
        L{file_start}) and only what follows a delimiter goes through the
        parser, which keeps bytes and so needs a copy.  Parsing every buffer
        cost a third more CPU than a raw upload (two copies of every byte).

        C{view} is a prefix of the pump's buffer (an C{mmap}), as the pump
        lends them, so the delimiter is searched in the buffer itself.
        """
        n = len(view)
        self._bodyAt += n
        for h, _, _ in self._bodyDigests:
            h.update(view)
        if not self._in_file_body():
            try:
                data = bytes(view)
            finally:
                giveBack()
            self._feed(data, wait=True)
            return
        delimiter = self._delimiter
        at = _find(view, delimiter)
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

    def file_start(self) -> int:
        """
        Where the file being written starts in the body (0 between files), so
        that a pump cuts its buffers at that file's aligned offsets.  On the
        pump's thread, between buffers.
        """
        if not self._in_file_body():
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
            control, raw_params = split_fields(self.fields)
            params = profile.validate_params(raw_params)
            callback = check_callback(control.get("callback_url"))
            expected = input_digests(control, profile)
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


def _find(view: memoryview, needle: bytes) -> int:
    """The first C{needle} in C{view}, a prefix of its buffer, or -1: searched in place."""
    buffer = view.obj
    if isinstance(buffer, mmap.mmap):
        return buffer.find(needle, 0, len(view))
    return bytes(view).find(needle)
