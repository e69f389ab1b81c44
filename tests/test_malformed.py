"""
Malformed and hostile requests, sent with raw sockets to a real server on a
loopback port: each gets a 4xx JSON error, or a closed connection where HTTP
leaves nothing else to do, and never a 500.  Around each one the tests check
that no file appeared outside the data dir (a snapshot of its parent), that no
upload was left half-written, and that the server holds no more file
descriptors than before.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from serverproc import ServerProcess, no_uploads_left, wait_for

JOB = "{job}"  # replaced by a real job's id
MISSING = "0123456789abcdef0123456789abcdef"
BOUNDARY = "XyZzy"


@dataclass
class Reply:
    """What the server sent back on one connection."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""

    def json(self) -> dict[str, object]:
        doc = json.loads(self.body)
        assert isinstance(doc, dict)
        return doc


def exchange(port: int, data: bytes, *, half_close: bool = False, timeout: float = 8.0) -> Reply:
    """
    Send C{data}, then read one response: up to the end of its body when it
    says how long that is, or else until the server closes the connection.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw = b""
    try:
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            raw += chunk
            head, sep, rest = raw.partition(b"\r\n\r\n")
            if sep and not head.startswith(b"HTTP/1.1 100"):
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
                bodiless = data.startswith(b"HEAD ") or head[9:12] in (b"204", b"304")
                if bodiless or (m and len(rest) >= int(m.group(1))):
                    break
    finally:
        s.close()
    return parse(raw)


def parse(raw: bytes) -> Reply:
    reply = Reply(raw=raw)
    if not raw:
        return reply
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    reply.status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        reply.headers[name.strip().lower()] = value.strip()
    reply.body = body
    return reply


def request(
    method: str,
    target: str,
    *headers: str,
    body: bytes = b"",
    length: bool = True,
) -> bytes:
    line = f"{method} {target}" if target else method
    lines = [f"{line} HTTP/1.1", "Host: x", *headers]
    if length and body and not any(h.lower().startswith("transfer-encoding") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body


def part(name: str, value: bytes, filename: bytes | None = None) -> bytes:
    disposition = b'form-data; name="' + name.encode() + b'"'
    if filename is not None:
        disposition += b'; filename="' + filename + b'"'
    return (
        b"--" + BOUNDARY.encode() + b"\r\nContent-Disposition: " + disposition + b"\r\n\r\n"
        b"" + value + b"\r\n"
    )


def multipart(*parts: bytes, end: bool = True) -> bytes:
    return b"".join(parts) + (b"--" + BOUNDARY.encode() + b"--\r\n" if end else b"")


MP = f"Content-Type: multipart/form-data; boundary={BOUNDARY}"
PUT_CLIP = "PUT /jobs?profile=avi-mpeg4"
CHUNKED = "Transfer-Encoding: chunked"


def filename_upload(filename: bytes) -> bytes:
    body = multipart(
        part("profile", b"avi-mpeg4"), part("file", os.urandom(3000), filename=filename)
    )
    return request("POST", "/jobs", MP, body=body)


# What a case expects: an exact status (with the error code when given),
# "closed" (the connection ends with no answer: the request never completed),
# or "stored" (a hostile name, sanitised: 201 and the file in its job's dir).
CASES: list[tuple[str, bytes, object]] = [
    # Request lines.
    ("no method or version", b"GARBAGE\r\n\r\n", (400, "bad_request")),
    ("no version", b"GET /health\r\n\r\n", (400, "bad_request")),
    ("unknown version", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", (400, "bad_request")),
    ("binary request line", b"\x00\x01\x02 / HTTP/1.1\r\n\r\n", (400, "bad_request")),
    ("non-ASCII path", b"GET /jobs/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", (400, "bad_request")),
    ("four words", b"GET / / HTTP/1.1\r\nHost: x\r\n\r\n", (400, "bad_request")),
    ("unknown method", request("BREW", "/jobs"), (405, "method_not_allowed")),
    ("lower-case method", request("get", "/health"), (405, "method_not_allowed")),
    ("TRACE", request("TRACE", "/"), (405, "method_not_allowed")),
    # Headers.
    ("header without colon", request("GET", "/health", "NoColon"), (400, "bad_request")),
    ("space before colon", request("GET", "/health", "X-A : b"), (400, "bad_request")),
    ("NUL in a header", request("GET", "/health", "X-A: a\x00b"), (400, "bad_request")),
    ("600 headers", request("GET", "/health", *[f"X-{i}: 1" for i in range(600)]), (400, None)),
    (
        "headers over 16 KiB in all",
        request("GET", "/health", *[f"X-{i}: {'a' * 1000}" for i in range(20)]),
        (400, None),
    ),
    # Content-Length.
    (
        "two equal Content-Lengths",
        request(PUT_CLIP, "", "Content-Length: 5", "Content-Length: 5", body=b"hello"),
        (400, "bad_request"),
    ),
    (
        "conflicting Content-Lengths",
        request(PUT_CLIP, "", "Content-Length: 5", "Content-Length: 6", body=b"hello!"),
        (400, "bad_request"),
    ),
    (
        "Content-Length list",
        request(PUT_CLIP, "", "Content-Length: 5, 6", body=b"hello!", length=False),
        (400, "bad_request"),
    ),
    (
        "negative Content-Length",
        request(PUT_CLIP, "", "Content-Length: -5", body=b"hello", length=False),
        (400, "bad_request"),
    ),
    (
        "Content-Length with a sign",
        request(PUT_CLIP, "", "Content-Length: +5", body=b"hello", length=False),
        (400, "bad_request"),
    ),
    (
        "hexadecimal Content-Length",
        request(PUT_CLIP, "", "Content-Length: 0x5", body=b"hello", length=False),
        (400, "bad_request"),
    ),
    (
        "Content-Length with chunked",
        request(PUT_CLIP, "", "Content-Length: 5", CHUNKED, body=b"5\r\nhello\r\n0\r\n\r\n"),
        (400, "bad_request"),
    ),
    (
        "body shorter than Content-Length",
        request(PUT_CLIP, "", "Content-Length: 100000", body=b"x" * 1000, length=False),
        "closed",
    ),
    # Transfer codings and chunks.
    (
        "unknown transfer coding",
        request(PUT_CLIP, "", "Transfer-Encoding: gzip, chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
        (400, "bad_request"),
    ),
    (
        "chunk size not hexadecimal",
        request(PUT_CLIP, "", CHUNKED, body=b"zz\r\nhello\r\n0\r\n\r\n"),
        (400, "bad_request"),
    ),
    (
        "negative chunk size",
        request(PUT_CLIP, "", CHUNKED, body=b"-5\r\nhello\r\n0\r\n\r\n"),
        (400, "bad_request"),
    ),
    (
        "chunk size with 0x",
        request(PUT_CLIP, "", CHUNKED, body=b"0x5\r\nhello\r\n0\r\n\r\n"),
        (400, "bad_request"),
    ),
    (
        "chunk without its CRLF",
        request(PUT_CLIP, "", CHUNKED, body=b"5\r\nhelloXX0\r\n\r\n"),
        (400, "bad_request"),
    ),
    (
        "chunk extension of 20 KB",
        request(PUT_CLIP, "", CHUNKED, body=b"5;" + b"e" * 20000 + b"\r\nhello\r\n0\r\n\r\n"),
        (400, "bad_request"),
    ),
    (
        "chunk size of 2**96, then the client stops",
        request(PUT_CLIP, "", CHUNKED, body=b"ffffffffffffffffffffffff\r\nhello"),
        "closed",
    ),
    (
        "chunk shorter than its size, then the client stops",
        request(PUT_CLIP, "", CHUNKED, body=b"10\r\nhello"),
        "closed",
    ),
    # Multipart.
    (
        "multipart without a boundary",
        request("POST", "/jobs", "Content-Type: multipart/form-data", body=b"hello"),
        (400, "bad_multipart"),
    ),
    (
        "multipart with an empty boundary",
        request("POST", "/jobs", "Content-Type: multipart/form-data; boundary=", body=b"hello"),
        (400, "bad_multipart"),
    ),
    (
        "multipart body that is no multipart",
        request("POST", "/jobs", MP, body=b"hello world"),
        (400, "bad_multipart"),
    ),
    (
        "multipart truncated inside a part's headers",
        request(
            "POST",
            "/jobs",
            MP,
            body=part("profile", b"avi-mpeg4")
            + b"--"
            + BOUNDARY.encode()
            + b'\r\nContent-Disposition: form-data; name="fi',
        ),
        (400, "bad_multipart"),
    ),
    (
        "multipart truncated inside a file part",
        request(
            "POST",
            "/jobs",
            MP,
            body=multipart(
                part("profile", b"avi-mpeg4"), part("file", b"x" * 5000, b"a.flv")[:-2], end=False
            ),
        ),
        (400, "bad_multipart"),
    ),
    (
        "multipart part without Content-Disposition",
        request(
            "POST",
            "/jobs",
            MP,
            body=b"--"
            + BOUNDARY.encode()
            + b"\r\nX-A: b\r\n\r\nvalue\r\n--"
            + BOUNDARY.encode()
            + b"--\r\n",
        ),
        (400, "bad_multipart"),
    ),
    (
        "multipart file field named like a path",
        request(
            "POST",
            "/jobs",
            MP,
            body=multipart(part("profile", b"avi-mpeg4"), part("../x", b"data", b"a.flv")),
        ),
        (422, "unknown_input"),
    ),
    (
        "multipart field of 100 KB",
        request(
            "POST", "/jobs", MP, body=multipart(part("profile", b"avi-mpeg4" + b"x" * 100_000))
        ),
        (400, "bad_multipart"),
    ),
    (
        "multipart with 200 fields",
        request("POST", "/jobs", MP, body=multipart(*[part(f"f{i}", b"1") for i in range(200)])),
        (400, "bad_multipart"),
    ),
    ("multipart non-UTF-8 filename", filename_upload(b"\xff\xfe\xfd.flv"), (400, "bad_multipart")),
    ("multipart filename with ../", filename_upload(b"../../../outside.flv"), "stored"),
    ("multipart filename with NUL", filename_upload(b"a\x00../../b.flv"), "stored"),
    (
        "multipart filename of 10,000 chars",
        filename_upload(b"n" * 10_000 + b".flv"),
        (400, "bad_multipart"),
    ),
    (
        "query filename of 10,000 chars",
        request(PUT_CLIP + "&filename=" + "n" * 10_000 + ".flv", "", body=b"x" * 3000),
        "stored",
    ),
    ("multipart filename only dots", filename_upload(b"..."), "stored"),
    (
        "query filename with ../ and NUL",
        request(PUT_CLIP + "&filename=..%2F..%2Fa%00b.flv", "", body=b"x" * 3000),
        "stored",
    ),
    (
        "query filename not UTF-8",
        request(PUT_CLIP + "&filename=%ff%fe.flv", "", body=b"x" * 3000),
        (400, "bad_query"),
    ),
    # Job ids that are not ids.
    ("job id with ../", request("GET", "/jobs/..%2F..%2Fetc%2Fpasswd"), (404, "not_found")),
    ("job id ..", request("GET", "/jobs/../../etc/passwd"), (404, "not_found")),
    ("job id not hex", request("GET", "/jobs/zzzz"), (404, "not_found")),
    ("job id upper case", request("GET", "/jobs/" + MISSING.upper()), (404, "not_found")),
    ("job id 33 digits", request("GET", "/jobs/" + MISSING + "0"), (404, "not_found")),
    ("job id with NUL", request("GET", "/jobs/" + MISSING[:-1] + "%00"), (404, "not_found")),
    ("unknown job's result", request("GET", f"/jobs/{MISSING}/result"), (404, "not_found")),
    ("unknown job's log", request("GET", f"/jobs/{MISSING}/log"), (404, "not_found")),
    ("DELETE of a non-id", request("DELETE", "/jobs/..%2Fjobs.sqlite3"), (404, "not_found")),
    ("below a job's log", request("GET", f"/jobs/{JOB}/log/x"), (404, "not_found")),
    ("unknown child of a job", request("GET", f"/jobs/{JOB}/nope"), (404, "not_found")),
    # Query parameters.
    ("wait not a number", request("GET", f"/jobs/{JOB}?wait=abc"), (400, "bad_query")),
    ("wait NaN", request("GET", f"/jobs/{JOB}?wait=nan"), (400, "bad_query")),
    ("wait negative", request("GET", f"/jobs/{JOB}?wait=-1"), (400, "bad_query")),
    ("wait too long", request("GET", f"/jobs/{JOB}?wait=1e9"), (400, "bad_query")),
    ("tail negative", request("GET", f"/jobs/{JOB}/log?tail=-1"), (400, "bad_query")),
    ("tail huge", request("GET", f"/jobs/{JOB}/log?tail=99999999999"), (400, "bad_query")),
    ("limit zero", request("GET", "/jobs?limit=0"), (400, "bad_query")),
    ("limit not a number", request("GET", "/jobs?limit=ten"), (400, "bad_query")),
    ("unknown state", request("GET", "/jobs?state=exploded"), (400, "bad_query")),
    ("forged cursor", request("GET", "/jobs?cursor=djE6LTE"), (400, "bad_query")),
    ("state not UTF-8", request("GET", "/jobs?state=%ff"), (400, "bad_query")),
    # Profile parameters.
    ("int below minimum", request(PUT_CLIP + "&vbitrate=99", "", body=b"x"), (422, None)),
    ("int above maximum", request(PUT_CLIP + "&vbitrate=20001", "", body=b"x"), (422, None)),
    ("int negative", request(PUT_CLIP + "&abitrate=-128", "", body=b"x"), (422, None)),
    ("int given as float", request(PUT_CLIP + "&vbitrate=1500.5", "", body=b"x"), (422, None)),
    ("int given as word", request(PUT_CLIP + "&vbitrate=lots", "", body=b"x"), (422, None)),
    ("int given as NaN", request(PUT_CLIP + "&vbitrate=nan", "", body=b"x"), (422, None)),
    ("int given empty", request(PUT_CLIP + "&vbitrate=", "", body=b"x"), (422, None)),
    (
        "int of 5000 digits",
        request(PUT_CLIP + "&vbitrate=" + "9" * 5000, "", body=b"x"),
        (422, None),
    ),
    (
        "choice not offered",
        request("PUT /jobs?profile=mp4-h264&preset=placebo", "", body=b"x"),
        (422, "invalid_parameter"),
    ),
    (
        "choice given as option",
        request("PUT /jobs?profile=mp4-h264&preset=-o%20/etc/passwd", "", body=b"x"),
        (422, "invalid_parameter"),
    ),
    (
        "unknown parameter",
        request(PUT_CLIP + "&threads=64", "", body=b"x"),
        (422, "unknown_parameter"),
    ),
    (
        "parameter out of range in a form",
        request(
            "POST",
            "/jobs",
            MP,
            body=multipart(
                part("profile", b"avi-mpeg4"),
                part("file", b"x" * 1000, b"a.flv"),
                part("abitrate", b"9999"),
            ),
        ),
        (422, "invalid_parameter"),
    ),
    ("bad sha256", request(PUT_CLIP + "&sha256=abc", "", body=b"x"), (400, "bad_digest")),
    (
        "bad callback_url",
        request(PUT_CLIP + "&callback_url=file:///etc/passwd", "", body=b"x"),
        (422, "invalid_callback_url"),
    ),
    ("unknown profile", request("PUT /jobs?profile=../../bin/sh", "", body=b"x"), (422, None)),
]


def _tree(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path under C{root} but C{skip}, with its size and mtime."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip:
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = here / name
            if p == skip:
                continue
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


_ALLOWED = re.compile(
    r"^(jobs\.sqlite3(-wal|-shm|-journal)?|uploads|jobs|jobs/[0-9a-f]{32}"
    r"|jobs/[0-9a-f]{32}/(input-[a-z][a-z0-9_-]*(\.[a-z0-9]{1,8})?|encoder\.log"
    r"|result(\.partial)?\.[a-z0-9]{1,8}))$"
)


def _unexpected_in_data(data: Path) -> list[str]:
    """Paths in the data dir that the server has no business creating, and any symlink."""
    bad = []
    for p in data.rglob("*"):
        rel = str(p.relative_to(data))
        if p.is_symlink() or not _ALLOWED.match(rel):
            bad.append(rel)
    return bad


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir's parent: it holds the data dir and a bystander file."""
    root = tmp_path_factory.mktemp("box")
    (root / "bystander.txt").write_text("nothing may touch me\n")
    return root


@pytest.fixture(scope="module")
def server(box: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        box / "data",
        *("--idle-timeout", "2s", "--workers", "1"),
        *("--max-upload-size", "10M", "--min-free-disk", "1M"),
    )
    yield srv
    srv.stop()
    assert "Traceback" not in srv.output, srv.output


@pytest.fixture(scope="module")
def job_id(server: ServerProcess) -> str:
    reply = exchange(server.port, request(PUT_CLIP, "", body=os.urandom(2000)))
    assert reply.status == 201, reply.raw
    job = reply.json()
    assert isinstance(job["id"], str)
    return job["id"]


def _children(pid: int) -> list[str]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += (task / "children").read_text().split()
    return out


def _jobs_on_disk(server: ServerProcess) -> set[str]:
    jobs = server.data_dir / "jobs"
    return {p.name for p in jobs.iterdir()} if jobs.exists() else set()


def _uploads_empty(server: ServerProcess) -> bool:
    return no_uploads_left(server.data_dir)


def _check_stored(server: ServerProcess, reply: Reply) -> None:
    assert reply.status == 201, reply.raw[:500]
    job = reply.json()
    inputs = job["inputs"]
    assert isinstance(inputs, list)
    name = inputs[0]["filename"]
    assert 0 < len(name) <= 120
    assert not name.startswith(".")
    assert not set(name) & set("/\\\0")
    (stored,) = (server.data_dir / "jobs" / str(job["id"])).glob("input-file*")
    assert stored.parent.parent == server.data_dir / "jobs"


@pytest.mark.parametrize(
    ("data", "expect"),
    [pytest.param(data, expect, id=name) for name, data, expect in CASES],
)
def test_malformed_request_gets_a_json_4xx_and_leaves_nothing(
    server: ServerProcess, box: Path, job_id: str, data: bytes, expect: object
) -> None:
    """Each malformed request: its 4xx JSON error (or a closed connection), no 500, no file outside the data dir, no partial upload, no leaked fd."""
    outside = _tree(box, skip=server.data_dir)
    jobs_before = _jobs_on_disk(server)
    tracebacks = server.output.count("Traceback")
    # An encoder or probe still running holds pipes that are not this request's.
    assert wait_for(lambda: not _children(server.pid), timeout=30)
    fds = server.open_fds()

    reply = exchange(
        server.port, data.replace(JOB.encode(), job_id.encode()), half_close=expect == "closed"
    )

    if expect == "closed":
        assert reply.raw == b"" or (reply.status is not None and 400 <= reply.status < 500), (
            reply.raw[:300]
        )
        assert _jobs_on_disk(server) == jobs_before
    elif expect == "stored":
        _check_stored(server, reply)
    else:
        status, code = expect  # type: ignore[misc]
        assert reply.status == status, reply.raw[:300]
        assert reply.headers.get("content-type") == "application/json"
        error = reply.json()["error"]
        assert isinstance(error, dict) and error["message"]
        if code is not None:
            assert error["code"] == code
        assert b"100 Continue" not in reply.raw
        assert _jobs_on_disk(server) == jobs_before
    assert wait_for(lambda: _uploads_empty(server))
    assert _tree(box, skip=server.data_dir) == outside
    assert _unexpected_in_data(server.data_dir) == []
    assert wait_for(lambda: server.open_fds() <= fds), (fds, os.listdir(f"/proc/{server.pid}/fd"))
    assert server.output.count("Traceback") == tracebacks, server.output[-3000:]


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(request("GET", "/" + "a" * 20_000), 414, id="request target of 20 KB"),
        pytest.param(
            request("GET", "/health", "X-Big: " + "a" * 20_000), 431, id="header of 20 KB"
        ),
    ],
)
def test_overlong_line_is_answered_not_dropped(
    server: ServerProcess, data: bytes, status: int
) -> None:
    """A request line or header line longer than the server takes gets a JSON 414 or 431 (RFC 9112 3, RFC 6585 5), not a silent close."""
    fds = server.open_fds()
    reply = exchange(server.port, data)
    assert wait_for(lambda: server.open_fds() <= fds)
    assert reply.status == status, reply.raw[:300]
    assert reply.json()["error"]["code"] in ("uri_too_long", "header_too_large")


def test_declared_length_over_the_maximum_is_413_even_when_it_would_not_fit(
    server: ServerProcess,
) -> None:
    """A Content-Length above --max-upload-size, and above the free disk too, is the client's error: 413, not 507."""
    reply = exchange(
        server.port,
        request(PUT_CLIP, "", f"Content-Length: {10**26}", "Expect: 100-continue"),
    )
    assert reply.status == 413, reply.raw[:300]
    assert reply.json()["error"]["code"] == "too_large"
