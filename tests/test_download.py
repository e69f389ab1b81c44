"""
Tests for L{transcoder.http.download}: one file served with validators,
conditional requests, single byte ranges, JSON errors and a pull producer.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from rawhttp import connect_raw, split_response
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from transcoder.http.download import FileProducer, FileResource, parse_range
from transcoder.http.errors import APIError

CONTENT = bytes(range(256)) * 40  # 10240 bytes
ETAG = hashlib.sha256(CONTENT).hexdigest()
MTIME = 1_750_000_000


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-9", 100, (0, 10)),
        ("bytes=90-", 100, (90, 10)),
        ("bytes=-5", 100, (95, 5)),
        ("bytes=-500", 100, (0, 100)),
        ("bytes=50-5000", 100, (50, 50)),
        ("bytes=99-99", 100, (99, 1)),
        ("bytes = 0 - 9", 100, (0, 10)),
        # Positions longer than Python converts (4300 digits) are past any file.
        ("bytes=0-" + "9" * 5000, 100, (0, 100)),
        ("bytes=-" + "9" * 5000, 100, (0, 100)),
        ("bytes=" + "0" * 5000 + "5-9", 100, (5, 5)),
        # Ignored: malformed, several ranges, other units, end before start.
        ("bytes=0-1,5-6", 100, None),
        ("items=0-9", 100, None),
        ("bytes=-", 100, None),
        ("bytes=9-0", 100, None),
        ("bytes=abc", 100, None),
        # Digits of other scripts, which int() would take.
        ("bytes=\u0661-\u0669", 100, None),
    ],
)
def test_parse_range(header: str, size: int, expected: tuple[int, int] | None) -> None:
    """Single ranges become (offset, length), clipped to the file; anything else is ignored."""
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-", 100),
        ("bytes=100-200", 100),
        ("bytes=-0", 100),
        ("bytes=0-", 0),
        ("bytes=-1", 0),
        ("bytes=" + "1" * 5000 + "-", 100),
    ],
)
def test_parse_range_unsatisfiable(header: str, size: int) -> None:
    """A range that starts past the end, or an empty suffix, is a 416 naming the size."""
    found = parse_range(header, size)
    assert isinstance(found, APIError)
    assert found.status == 416
    assert found.headers["Content-Range"] == f"bytes */{size}"


@pytest.fixture
def served_file(tmp_path: Path) -> Path:
    path = tmp_path / "result.mp4"
    path.write_bytes(CONTENT)
    os.utime(path, (MTIME, MTIME))
    return path


def stub_for(path: Path, **kw: Any) -> StubTreq:
    kw.setdefault("etag", ETAG)
    kw.setdefault("filename", "My Clip.mp4")
    return StubTreq(FileResource(path, "video/mp4", **kw))


async def fetch(
    stub: StubTreq, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    response = await flushed(
        stub, stub.request(method, "http://example.test/", headers=headers or {})
    )
    body: bytes = await flushed(stub, stub.content(response))
    flat = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
    if isinstance(response.length, int) and method != "HEAD" and response.code != 304:
        # Twisted's client keeps Content-Length out of the headers, in .length
        # (0 for HEAD and 304, whatever was sent: see raw_exchange for those).
        flat["content-length"] = str(response.length)
    return response.code, flat, body


async def flushed(stub: StubTreq, d: Deferred[Any]) -> Any:
    """Pump StubTreq's in-memory connection until C{d} fires (asynchronous responses need it)."""
    done: list[object] = []
    d.addBoth(lambda r: done.append(r) or r)
    for _ in range(1000):
        stub.flush()
        if done:
            break
        wait: Deferred[None] = Deferred()
        reactor.callLater(0, wait.callback, None)
        await wait
    return await d


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


@pytest_twisted.ensureDeferred
async def test_whole_file_with_validators(served_file: Path) -> None:
    """GET answers the whole file with its type, length, ETag, Last-Modified and attachment name."""
    code, headers, body = await fetch(stub_for(served_file))
    assert code == 200
    assert body == CONTENT
    assert headers["content-type"] == "video/mp4"
    assert headers["content-length"] == str(len(CONTENT))
    assert headers["etag"] == f'"{ETAG}"'
    assert headers["last-modified"] == http_date(MTIME)
    assert headers["accept-ranges"] == "bytes"
    assert headers["content-disposition"] == 'attachment; filename="My Clip.mp4"'


@pytest_twisted.ensureDeferred
async def test_head_has_headers_only(served_file: Path) -> None:
    """HEAD answers GET's headers, the full length among them, and no body; it ignores Range."""
    code, headers, body = await raw_exchange(
        FileResource(served_file, "video/mp4", etag=ETAG),
        b"HEAD / HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n",
    )
    assert code == 200
    assert body == b""
    assert headers["content-length"] == str(len(CONTENT))
    assert headers["etag"] == f'"{ETAG}"'
    assert "content-range" not in headers


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=0-9", 0, 9), ("bytes=10000-", 10000, 10239), ("bytes=-16", 10224, 10239)],
)
@pytest_twisted.ensureDeferred
async def test_single_range(served_file: Path, header: str, start: int, end: int) -> None:
    """A single satisfiable range is a 206 with exactly those bytes and a Content-Range."""
    code, headers, body = await fetch(stub_for(served_file), headers={"Range": header})
    assert code == 206
    assert body == CONTENT[start : end + 1]
    assert headers["content-range"] == f"bytes {start}-{end}/{len(CONTENT)}"
    assert headers["content-length"] == str(end - start + 1)


@pytest_twisted.ensureDeferred
async def test_range_with_a_5000_digit_end(served_file: Path) -> None:
    """An end past what Python's int() converts is past the file: the rest of it, not a 500."""
    code, headers, body = await fetch(
        stub_for(served_file), headers={"Range": "bytes=5-" + "9" * 5000}
    )
    assert code == 206
    assert body == CONTENT[5:]
    assert headers["content-range"] == f"bytes 5-{len(CONTENT) - 1}/{len(CONTENT)}"


@pytest_twisted.ensureDeferred
async def test_unsatisfiable_range_is_json_416(served_file: Path) -> None:
    """
    A range past the end is a JSON 416 with Content-Range: bytes */size, not
    an HTML page, and not labelled as the file's attachment.
    """
    code, headers, body = await fetch(stub_for(served_file), headers={"Range": "bytes=20000-"})
    assert code == 416
    assert headers["content-range"] == f"bytes */{len(CONTENT)}"
    assert headers["content-type"] == "application/json"
    assert "content-disposition" not in headers
    assert json.loads(body)["error"]["code"] == "range_not_satisfiable"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=junk", "lines=1-2"])
@pytest_twisted.ensureDeferred
async def test_ignored_ranges_get_the_whole_file(served_file: Path, header: str) -> None:
    """Several ranges or a malformed Range header are answered with the whole file."""
    code, headers, body = await fetch(stub_for(served_file), headers={"Range": header})
    assert code == 200
    assert body == CONTENT
    assert "content-range" not in headers


@pytest.mark.parametrize("inm", [f'"{ETAG}"', f'W/"{ETAG}"', f'"other", "{ETAG}"', "*"])
@pytest_twisted.ensureDeferred
async def test_if_none_match_hits(served_file: Path, inm: str) -> None:
    """If-None-Match naming the ETag (weakly, in a list, or *) is a 304 with no body."""
    code, headers, body = await raw_exchange(
        FileResource(served_file, "video/mp4", etag=ETAG),
        b"GET / HTTP/1.1\r\nHost: x\r\nIf-None-Match: "
        + inm.encode()
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert code == 304
    assert body == b""
    assert headers["etag"] == f'"{ETAG}"'
    # A 304's Content-Length, if any, must be the full representation's.
    assert headers.get("content-length", str(len(CONTENT))) == str(len(CONTENT))


@pytest_twisted.ensureDeferred
async def test_if_none_match_miss_wins_over_if_modified_since(served_file: Path) -> None:
    """With If-None-Match present and not matching, If-Modified-Since is ignored: 200."""
    code, _, body = await fetch(
        stub_for(served_file),
        headers={"If-None-Match": '"stale"', "If-Modified-Since": http_date(MTIME + 60)},
    )
    assert code == 200
    assert body == CONTENT


@pytest.mark.parametrize(("offset", "expected"), [(0, 304), (3600, 304), (-1, 200)])
@pytest_twisted.ensureDeferred
async def test_if_modified_since(served_file: Path, offset: int, expected: int) -> None:
    """If-Modified-Since at or after the file's mtime is a 304; before it, a 200."""
    code, _, _ = await fetch(
        stub_for(served_file), headers={"If-Modified-Since": http_date(MTIME + offset)}
    )
    assert code == expected


@pytest.mark.parametrize(
    ("if_range", "expected"),
    [
        (f'"{ETAG}"', 206),
        ('"other"', 200),
        (f'W/"{ETAG}"', 200),
        (http_date(MTIME), 206),
        (http_date(MTIME - 10), 200),
    ],
)
@pytest_twisted.ensureDeferred
async def test_if_range(served_file: Path, if_range: str, expected: int) -> None:
    """If-Range keeps the range only for the strong ETag or the exact Last-Modified."""
    code, _, body = await fetch(
        stub_for(served_file), headers={"Range": "bytes=0-3", "If-Range": if_range}
    )
    assert code == expected
    assert body == (CONTENT[:4] if expected == 206 else CONTENT)


@pytest_twisted.ensureDeferred
async def test_no_etag_no_disposition(served_file: Path) -> None:
    """Without an ETag or a filename neither header is sent, and If-None-Match never matches."""
    stub = StubTreq(FileResource(served_file, "text/plain"))
    code, headers, body = await fetch(stub, headers={"If-None-Match": "*"})
    assert code == 200
    assert "etag" not in headers
    assert "content-disposition" not in headers
    assert body == CONTENT


@pytest_twisted.ensureDeferred
async def test_missing_file_and_bad_method_are_json(tmp_path: Path) -> None:
    """A missing file is a JSON 404; a POST is a JSON 405 with Allow."""
    stub = stub_for(tmp_path / "gone.mp4")
    code, headers, body = await fetch(stub)
    assert code == 404
    assert json.loads(body)["error"]["code"] == "not_found"
    code, headers, body = await fetch(stub, "POST")
    assert code == 405
    assert headers["allow"] == "GET, HEAD"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"


def gone_410(problem: str) -> APIError:
    return APIError(410, "result_missing", f"the result {problem}")


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: p.unlink(), "is gone"),
        (lambda p: p.write_bytes(CONTENT[:100]), "holds 100 bytes, not its 10240"),
        (lambda p: (p.unlink(), p.mkdir()), "is not a regular file"),
        (lambda p: (p.unlink(), os.mkfifo(p)), "is not a regular file"),
    ],
    ids=["removed", "truncated", "directory", "fifo"],
)
@pytest_twisted.ensureDeferred
async def test_a_file_not_as_expected_is_the_given_error(
    served_file: Path, make: Callable[[Path], object], problem: str
) -> None:
    """With a size, a file that is gone, shorter, a directory or a FIFO (which must not block the open) is answered with the given JSON error naming what is wrong, for GET and HEAD, and no bytes of it."""
    make(served_file)
    stub = stub_for(served_file, size=len(CONTENT), gone=gone_410)
    for method in ("GET", "HEAD"):
        code, headers, body = await fetch(stub, method)
        assert code == 410
        assert "etag" not in headers
        if method == "GET":
            assert json.loads(body)["error"] == {
                "code": "result_missing",
                "message": f"the result {problem}",
            }


@pytest_twisted.ensureDeferred
async def test_a_directory_without_a_size_is_json_not_500(tmp_path: Path) -> None:
    """Without a size too, a directory in the file's place is a JSON 404, not a 500."""
    (tmp_path / "dir.mp4").mkdir()
    code, _, body = await fetch(stub_for(tmp_path / "dir.mp4"))
    assert code == 404
    assert json.loads(body)["error"]["code"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_empty_file(tmp_path: Path) -> None:
    """An empty file is a 200 with length 0; any range of it is unsatisfiable."""
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    stub = stub_for(empty)
    code, headers, body = await fetch(stub)
    assert (code, headers["content-length"], body) == (200, "0", b"")
    code, headers, _ = await fetch(stub, headers={"Range": "bytes=0-"})
    assert code == 416
    assert headers["content-range"] == "bytes */0"


class FakeRequest:
    """Just enough of a request for a pull producer: records writes and how it ended."""

    def __init__(self) -> None:
        self.producer: Any = None
        self.writes: list[bytes] = []
        self.finished = False
        self.lost = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert not streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def finish(self) -> None:
        self.finished = True

    def loseConnection(self) -> None:
        self.lost = True


def drive(request: FakeRequest, limit: int = 10_000) -> None:
    """Resume the producer as a transport would, until it unregisters."""
    for _ in range(limit):
        if request.producer is None:
            return
        request.producer.resumeProducing()
    raise AssertionError("the producer never finished")


def test_producer_reads_a_chunk_per_resume(served_file: Path) -> None:
    """The producer writes the asked-for slice in chunks no bigger than its chunk size, then finishes and closes the file."""
    request = FakeRequest()
    f = served_file.open("rb")
    producer = FileProducer(request, f, 100, 5000, chunk_size=1024)  # type: ignore[arg-type]
    verifyObject(IPullProducer, producer)
    producer.start()
    drive(request)
    assert b"".join(request.writes) == CONTENT[100:5100]
    assert max(len(w) for w in request.writes) == 1024
    assert request.finished and not request.lost
    assert f.closed


def test_producer_drops_the_connection_when_the_file_shrinks(served_file: Path) -> None:
    """If the file ends before the promised length, the connection is dropped rather than finished."""
    request = FakeRequest()
    f = served_file.open("rb")
    producer = FileProducer(request, f, 0, len(CONTENT), chunk_size=4096)  # type: ignore[arg-type]
    producer.start()
    request.producer.resumeProducing()
    os.truncate(served_file, 5000)
    drive(request)
    assert len(b"".join(request.writes)) == 5000
    assert request.lost and not request.finished
    assert f.closed


def test_stop_producing_closes_the_file(served_file: Path) -> None:
    """stopProducing (the client went away) closes the file; later resumes write nothing."""
    request = FakeRequest()
    f = served_file.open("rb")
    producer = FileProducer(request, f, 0, len(CONTENT), chunk_size=1024)  # type: ignore[arg-type]
    producer.start()
    request.producer.resumeProducing()
    producer.stopProducing()
    assert f.closed
    writes = len(request.writes)
    producer.resumeProducing()
    assert len(request.writes) == writes


async def raw_exchange(resource: Any, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request over a real socket, read byte for byte: what a client like curl sees."""
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(resource))
    try:
        proto = await connect_raw(port.getHost().port, request)
        data = await proto.closed
    finally:
        await port.stopListening()
    return split_response(data)


class Reader(Protocol):
    """Reads a few bytes of a response, then hangs up."""

    def __init__(self, stop_after: int) -> None:
        self.stop_after = stop_after
        self.received = 0
        self.done: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= self.stop_after:
            assert self.transport is not None
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(None)


def open_fds_to(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            pass
    return count


@pytest_twisted.ensureDeferred
async def test_client_hanging_up_mid_download_closes_the_file(tmp_path: Path) -> None:
    """A client that disconnects part-way leaves no open file behind on the server."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(32 << 20))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        Site(FileResource(big, "application/octet-stream", chunk_size=64 << 10))
    )
    try:
        reader = Reader(stop_after=256 << 10)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), reader)
        await reader.done
        assert reader.received < (32 << 20)
        deadline = time.monotonic() + 5
        while open_fds_to(big) and time.monotonic() < deadline:
            d: Deferred[None] = Deferred()
            reactor.callLater(0.01, d.callback, None)
            await d
        assert open_fds_to(big) == 0
    finally:
        await port.stopListening()


class FakeTransport:
    SEND_LIMIT = 128 * 1024


class FakeChannel:
    def __init__(self) -> None:
        self.transport = FakeTransport()


def test_producer_raises_the_send_limit_for_its_response_only(served_file: Path) -> None:
    """While a file streams, the TCP transport sends a chunk per turn; afterwards its own limit is back."""
    request = FakeRequest()
    request.channel = FakeChannel()  # type: ignore[attr-defined]
    transport = request.channel.transport  # type: ignore[attr-defined]
    producer = FileProducer(request, served_file.open("rb"), 0, len(CONTENT), chunk_size=1 << 20)  # type: ignore[arg-type]
    producer.start()
    assert transport.SEND_LIMIT == 1 << 20
    drive(request)
    assert request.finished
    assert transport.SEND_LIMIT == 128 * 1024
    assert "SEND_LIMIT" not in vars(transport)
