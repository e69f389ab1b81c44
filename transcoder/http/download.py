"""
Serving a file from disk: conditional requests, single byte ranges, constant memory.

L{twisted.web.static.File} knows ranges and If-Modified-Since, but it has no
ETag, answers 416 and missing files with HTML, and serves multipart ranges;
this resource does what the API promises and answers every error in JSON.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO

from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

from transcoder.core.errors import DomainError
from transcoder.http.errors import APIError
from transcoder.http.names import content_disposition
from transcoder.http.responses import JSONResource, capped_int, write_error

log = Logger()

# Bytes read from disk per write.  The transport sends at most 128 KiB per
# system call whatever the write's size; a bigger read only saves reads.
CHUNK_SIZE = 1 << 20

_RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")


@implementer(IPullProducer)
class FileProducer:
    """Writes C{length} bytes of a file from C{offset} to a request, a chunk per resume."""

    def __init__(
        self,
        request: server.Request,
        file: BinaryIO,
        offset: int,
        length: int,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self._request: server.Request | None = request
        self._file = file
        self._left = length
        self._chunk = chunk_size
        self._transport: Any = None
        file.seek(offset)

    def start(self) -> None:
        assert self._request is not None
        channel = getattr(self._request, "channel", None)
        transport = getattr(channel, "transport", None)
        if transport is not None and getattr(transport, "SEND_LIMIT", self._chunk) < self._chunk:
            # A TCP transport sends at most SEND_LIMIT (128 KiB) per event-loop
            # turn; a chunk per turn took a 1 GiB download from about 0.65 to
            # about 0.9 of nginx's speed on loopback.
            transport.SEND_LIMIT = self._chunk
            self._transport = transport
        self._request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        request = self._request
        if request is None:
            return
        data = self._file.read(min(self._chunk, self._left)) if self._left > 0 else b""
        if data:
            self._left -= len(data)
            # May re-enter resumeProducing once the transport drains.
            request.write(data)
        if self._request is not None and (self._left <= 0 or not data):
            self._request = None
            request.unregisterProducer()
            if self._left > 0:
                # The file shrank under us: the client must not take a short
                # body for a whole one, so the connection goes down.
                log.warn("{name} ended {left} bytes early", name=self._file.name, left=self._left)
                request.loseConnection()
            else:
                request.finish()
            self.stopProducing()

    def stopProducing(self) -> None:
        self._request = None
        self._file.close()
        transport, self._transport = self._transport, None
        if transport is not None and "SEND_LIMIT" in vars(transport):
            # Back to the class's limit for whatever else the connection carries.
            del transport.SEND_LIMIT


def file_problem(path: Path, size: int) -> str | None:
    """
    What is wrong with the C{size}-byte regular file that should be at
    C{path} (C{"is gone"}, C{"is not a regular file"}, C{"holds 10 of its 20
    bytes"}), or None when it is there, whole as far as a stat can tell.
    """
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "is gone"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return _stat_problem(st, size)


def _stat_problem(st: os.stat_result, size: int) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_size != size:
        return f"holds {st.st_size} bytes, not its {size}"
    return None


def _open_regular(path: Path) -> BinaryIO:
    # O_NONBLOCK: a FIFO put in the file's place would otherwise block the
    # reactor in open() until some writer came; it changes nothing for a file.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _gone(problem: str) -> APIError:
    return APIError(404, "not_found", f"the file {problem}")


def _http_date(value: bytes) -> float | None:
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _etag_list(value: bytes) -> list[bytes]:
    return [tag.strip() for tag in value.split(b",") if tag.strip()]


def _weak_match(etag: bytes, header: bytes) -> bool:
    """RFC 9110 weak comparison, for If-None-Match."""
    tags = _etag_list(header)
    if b"*" in tags:
        return True
    strip = etag.removeprefix(b"W/")
    return any(tag.removeprefix(b"W/") == strip for tag in tags)


def parse_range(header: str, size: int) -> tuple[int, int] | APIError | None:
    """
    The single byte range C{header} asks of a C{size}-byte representation, as
    C{(offset, length)}; None when the header is to be ignored (malformed, or
    several ranges, which a server may answer with the whole file); an
    L{APIError} 416 when it cannot be satisfied.
    """
    m = _RANGE.match(header.strip().replace(" ", ""))
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        suffix = capped_int(last)
        if suffix == 0 or size == 0:
            return _unsatisfiable(size)
        length = min(suffix, size)
        return size - length, length
    start = capped_int(first)
    end = capped_int(last) if last else size - 1
    if last and end < start:
        # Syntactically invalid (RFC 9110 14.1.1): ignored.
        return None
    if start >= size:
        return _unsatisfiable(size)
    end = min(end, size - 1)
    return start, end - start + 1


def _unsatisfiable(size: int) -> APIError:
    return APIError(
        416,
        "range_not_satisfiable",
        f"the range lies outside the {size} bytes of the file",
        {"Content-Range": f"bytes */{size}"},
    )


class FileResource(JSONResource):
    """
    C{GET} and C{HEAD} of one file, with C{ETag}, C{Last-Modified}, 304 for
    C{If-None-Match}/C{If-Modified-Since}, 206 for a single byte range
    (honouring C{If-Range}), and 416 for an unsatisfiable one.
    """

    def __init__(
        self,
        path: Path,
        media_type: str,
        *,
        etag: str | None = None,
        filename: str | None = None,
        chunk_size: int = CHUNK_SIZE,
        size: int | None = None,
        gone: Callable[[str], APIError] = _gone,
    ) -> None:
        """
        @param etag: a strong entity tag, without quotes; none when not given.
        @param filename: offered to the client with C{Content-Disposition: attachment}.
        @param size: the size the file must have: the ETag names those bytes,
            and a file cut short behind the server's back must not be served
            under it.
        @param gone: the error to answer, given what is wrong (see
            L{file_problem}), when the file is missing, not a regular file,
            or not C{size} bytes long.
        """
        super().__init__()
        self._path = path
        self._media_type = media_type
        self._etag = f'"{etag}"'.encode("ascii") if etag is not None else None
        self._filename = filename
        self._chunk = chunk_size
        self._size = size
        self._gone = gone

    def getChild(self, path: bytes, request: server.Request) -> Resource:  # type: ignore[override]
        if path == b"" and not request.postpath:
            return self
        return super().getChild(path, request)

    def render_GET(self, request: server.Request) -> bytes | int:
        try:
            f = _open_regular(self._path)
        except (FileNotFoundError, NotADirectoryError):
            return self._refuse(request, "is gone")
        except IsADirectoryError:
            return self._refuse(request, "is not a regular file")
        except OSError as e:
            return self._refuse(request, f"cannot be read ({e.strerror})")
        try:
            # Checked on what was opened, not on the path, which may change meanwhile.
            st = os.fstat(f.fileno())
            problem = _stat_problem(st, st.st_size if self._size is None else self._size)
            if problem is not None:
                f.close()
                return self._refuse(request, problem)
            return self._render(request, f, st)
        except BaseException:
            f.close()
            raise

    render_HEAD = render_GET

    def _refuse(self, request: server.Request, problem: str) -> bytes:
        log.warn("not serving {path}: it {problem}", path=str(self._path), problem=problem)
        return write_error(request, self._gone(problem))

    def _render(self, request: server.Request, f: BinaryIO, st: os.stat_result) -> bytes | int:
        size, mtime = st.st_size, int(st.st_mtime)
        last_modified = http.datetimeToString(mtime)
        request.setHeader(b"Accept-Ranges", b"bytes")
        request.setHeader(b"Last-Modified", last_modified)
        if self._etag is not None:
            request.setHeader(b"ETag", self._etag)
        request.setHeader(b"Cache-Control", b"private, no-cache")

        if self._not_modified(request, mtime):
            f.close()
            request.setResponseCode(http.NOT_MODIFIED)
            # Finished here: render()'s "Content-Length: 0" would misstate a 304.
            request.write(b"")
            request.finish()
            return server.NOT_DONE_YET

        offset, length = 0, size
        status = http.OK
        wanted = self._range(request, last_modified)
        if wanted is not None:
            found = parse_range(wanted, size)
            if isinstance(found, DomainError):
                f.close()
                return write_error(request, found)
            if found is not None:
                offset, length = found
                status = http.PARTIAL_CONTENT
                request.setHeader(
                    b"Content-Range", b"bytes %d-%d/%d" % (offset, offset + length - 1, size)
                )
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", self._media_type.encode("ascii"))
        if self._filename is not None:
            request.setHeader(
                b"Content-Disposition", content_disposition(self._filename).encode("ascii")
            )
        request.setHeader(b"Content-Length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            f.close()
            request.write(b"")
            request.finish()
            return server.NOT_DONE_YET
        FileProducer(request, f, offset, length, self._chunk).start()
        return server.NOT_DONE_YET

    def _not_modified(self, request: server.Request, mtime: int) -> bool:
        inm = request.getHeader(b"if-none-match")
        if inm is not None:
            # If-Modified-Since is ignored when If-None-Match is present (RFC 9110 13.2.2).
            return self._etag is not None and _weak_match(self._etag, inm)
        ims = request.getHeader(b"if-modified-since")
        if ims is not None:
            when = _http_date(ims)
            return when is not None and mtime <= when
        return False

    def _range(self, request: server.Request, last_modified: bytes) -> str | None:
        """The Range header to honour: only on GET, and only if If-Range still holds."""
        if request.method != b"GET":
            return None
        header = request.getHeader(b"range")
        if header is None:
            return None
        if_range = request.getHeader(b"if-range")
        if if_range is not None:
            if_range = if_range.strip()
            if if_range.startswith((b'"', b"W/")):
                # Strong comparison: a weak tag never matches.
                if self._etag is None or if_range != self._etag:
                    return None
            elif if_range != last_modified:
                return None
        return header.decode("latin-1")
