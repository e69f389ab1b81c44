"""
The Python client's newer calls: profiles(), log(), health(), jobs()
following the cursor, submit's filename=, callback_url= (delivered to a receiver
on loopback) and sha256=, and
C{async with}: against a real server where the behaviour is end to end,
against treq's StubTreq (in memory) for the client's own logic.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import pytest_twisted
from serverproc import ServerProcess, serve
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from transcoder.client import Client, ConnectionLost, NetworkError, RemoteJob, TranscoderError
from transcoder.client.names import disposition_filename, safe_filename


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("client-api-server")
    proc = serve(d / "data", d / "serve.log")
    yield proc
    proc.stop()


@pytest_twisted.async_yield_fixture
async def client(server: ServerProcess) -> AsyncIterator[Client]:
    async with Client(server.url) as c:
        yield c


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Against the real server.


@pytest_twisted.ensureDeferred
async def test_profiles_log_and_health(client: Client, clips: Any, tmp_path: Path) -> None:
    """
    profiles() lists the server's profiles with their parameters; health()
    gives its status; log() the encoder's log of a job, all of it or its
    last lines, the same text the server serves.
    """
    profiles = {p["name"]: p for p in await client.profiles()}
    assert {"mux-avi", "mp4-h264", "avi-mpeg4"} <= profiles.keys()
    assert profiles["mp4-h264"]["parameters"]["crf"]["type"] == "int"
    health = await client.health()
    assert health["status"] == "ok" and "version" in health
    job = await client.submit(clips.av, "mp4-h264", {"preset": "ultrafast"})
    job = await client.wait(job.id)
    assert job.state == "succeeded"
    log = await client.log(job.id)
    assert log.strip(), "an encoder writes something"
    tail = await client.log(job.id, tail=2)
    assert tail.splitlines() == log.replace("\r", "\n").splitlines()[-2:]


@pytest_twisted.ensureDeferred
async def test_submit_filename_and_sha256(client: Client, clips: Any, tmp_path: Path) -> None:
    """
    submit(filename=) names the input (and so the result); sha256= is checked
    by the server: the right digest is stored, a wrong one is refused with
    400 digest_mismatch and no job.
    """
    job = await client.submit(
        clips.av, "mp4-h264", {"preset": "ultrafast"}, filename="renamed.mp4",
        sha256=_sha256(clips.av),
    )  # fmt: skip
    assert job.inputs[0]["filename"] == "renamed.mp4"
    assert job.inputs[0]["sha256"] == _sha256(clips.av)
    job = await client.wait(job.id)
    assert await client.suggested_name(job.id) == "renamed.mp4"
    before = {j.id async for j in client.jobs()}
    with pytest.raises(TranscoderError) as e:
        await client.submit(clips.av, "mp4-h264", sha256="0" * 64)
    assert (e.value.status, e.value.code) == (400, "digest_mismatch")
    assert {j.id async for j in client.jobs()} == before
    with pytest.raises(ValueError, match="filename= goes with one Path"):
        await client.submit({"video": clips.flv_video}, "mux-avi", filename="x")


@pytest_twisted.ensureDeferred
async def test_jobs_follows_the_cursor(client: Client, clips: Any) -> None:
    """
    jobs() goes through every page, however small: an async iterator, or
    awaited, a list, newest first; page() gives one page and its cursor.
    """
    made = [await client.submit(clips.av, "mp4-h264", {"preset": "ultrafast"}) for _ in range(3)]
    ids = [j.id async for j in client.jobs(page_size=1)]
    assert [j.id for j in reversed(made)] == ids[:3]
    listed = await client.jobs(page_size=2)
    assert all(isinstance(j, RemoteJob) for j in listed)
    assert [j.id for j in listed] == ids
    first, cursor = await client.page(limit=1)
    assert [j.id for j in first] == ids[:1] and cursor is not None
    for job in made:
        await client.wait(job.id)


@pytest_twisted.ensureDeferred
async def test_async_with_closes_the_client(server: ServerProcess) -> None:
    """`async with Client(...)` closes it at the end of the block, also when the block raises."""
    closed: list[bool] = []

    class Counting(Client):
        def close(self) -> Deferred[None]:
            closed.append(True)
            return super().close()

    async with Counting(server.url) as c:
        assert (await c.health())["status"] == "ok"
    assert closed == [True]
    with pytest.raises(TranscoderError):
        async with Counting(server.url) as c:
            await c.get("nope")
    assert closed == [True, True]


# The client's logic, in memory.


class _Recorder(Resource):
    """Answers every request with C{answer} (status, JSON), recording the URIs asked."""

    isLeaf = True

    def __init__(self, answer: tuple[int, Any], headers: dict[bytes, bytes] | None = None):
        super().__init__()
        self.answer = answer
        self.headers = headers or {}
        self.uris: list[str] = []

    def render(self, request: Request) -> bytes:
        self.uris.append(request.uri.decode())
        request.setResponseCode(self.answer[0])
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if request.method == b"HEAD":
            return b""
        return json.dumps(self.answer[1]).encode()


class _Hooks(BaseHTTPRequestHandler):
    """Keeps each POST's path, headers and JSON body (C{server.posts}), answers 204."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.posts.append((self.path, dict(self.headers), body))  # type: ignore[attr-defined]
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_submit_callback_url_is_delivered(
    client: Client, server: ServerProcess, clips: Any
) -> None:
    """
    submit(callback_url=) end to end: when the job ends, the real server POSTs
    it to that URL (a receiver on loopback, its query's `&` kept) once, as a
    job.finished event whose body is the finished job with absolute URLs, here
    the server's own address as the client's Host header gave it.
    """
    hooks = ThreadingHTTPServer(("127.0.0.1", 0), _Hooks)
    hooks.posts = []  # type: ignore[attr-defined]
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    try:
        hook = f"http://127.0.0.1:{hooks.server_address[1]}/done?x=1&y=2"
        job = await client.submit(clips.av, "audio-mp3", {"abitrate": 64}, callback_url=hook)
        job = await client.wait(job.id)
        assert job.state == "succeeded"
        deadline = time.monotonic() + 30
        while not hooks.posts:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "no delivery"
            await deferLater(reactor, 0.05, lambda: None)
    finally:
        hooks.shutdown()
        hooks.server_close()
    [(path, headers, body)] = hooks.posts  # type: ignore[attr-defined]
    assert path == "/done?x=1&y=2"
    assert headers["X-Transcoder-Event"] == "job.finished"
    assert (body["id"], body["state"]) == (job.id, "succeeded")
    assert body["url"] == f"{server.url}/jobs/{job.id}"
    assert body["output"]["result_url"] == f"{server.url}/jobs/{job.id}/result"


_JOB = {"id": "a" * 32, "profile": "mp4-h264", "state": "queued", "progress": 0, "inputs": []}


@pytest_twisted.ensureDeferred
async def test_submit_puts_its_controls_in_the_query(tmp_path: Path) -> None:
    """filename=, callback_url= and sha256= (one digest, or one per input) go in the query."""
    file = tmp_path / "in.mp4"
    file.write_bytes(b"x" * 10)
    other = tmp_path / "a.mp3"
    other.write_bytes(b"y")
    recorder = _Recorder((201, _JOB))
    # A socket, not StubTreq: the body is a streaming producer.
    port = reactor.listenTCP(0, Site(recorder), interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        async with Client(f"http://127.0.0.1:{port.getHost().port}") as client:
            await client.submit(
                file, "mp4-h264", {"crf": 20}, filename="clip.mov",
                callback_url="http://hooks.example/done?x=1", sha256="ab" * 32,
            )  # fmt: skip
            await client.submit(
                {"video": file, "audio": other},
                "mux-avi",
                sha256={"video": "cd" * 32, "audio": "ef" * 32},
            )
    finally:
        await port.stopListening()
    raw, multipart = (parse_qs(urlsplit(u).query) for u in recorder.uris)
    assert raw == {
        "profile": ["mp4-h264"], "crf": ["20"], "filename": ["clip.mov"],
        "callback_url": ["http://hooks.example/done?x=1"], "sha256": ["ab" * 32],
    }  # fmt: skip
    assert multipart == {
        "profile": ["mux-avi"],
        "sha256.video": ["cd" * 32],
        "sha256.audio": ["ef" * 32],
    }


@pytest_twisted.ensureDeferred
async def test_health_returns_a_failing_store() -> None:
    """
    health() returns the server's answer for a 503 store_failing too (it is
    the status asked for, not an error); a 503 without a status is an error.
    """
    failing = {"status": "store_failing", "store_error": "disk full"}
    client = Client("http://h", http=StubTreq(_Recorder((503, failing))))
    assert await client.health() == failing
    refusal = {"error": {"code": "x", "message": "y"}}
    client = Client("http://h", http=StubTreq(_Recorder((503, refusal))))
    with pytest.raises(TranscoderError) as e:
        await client.health()
    assert (e.value.status, e.value.code, e.value.message) == (503, "x", "y")


class _Pages(Resource):
    """C{GET /jobs} of C{count} jobs, at most two a page whatever the limit asked."""

    isLeaf = True

    def __init__(self, count: int) -> None:
        super().__init__()
        self.jobs = [dict(_JOB, id=f"{n:032d}") for n in range(count)]
        self.asked: list[dict[str, list[str]]] = []

    def render_GET(self, request: Request) -> bytes:
        query = parse_qs(urlsplit(request.uri.decode()).query)
        self.asked.append(query)
        start = int(query.get("cursor", ["0"])[0])
        page = self.jobs[start : start + 2]
        following = str(start + 2) if start + 2 < len(self.jobs) else None
        return json.dumps({"jobs": page, "next": following}).encode()


@pytest_twisted.ensureDeferred
async def test_jobs_iterates_every_page() -> None:
    """jobs() asks page after page with the cursor until `next` is null: all 5 jobs, not 2."""
    pages = _Pages(5)
    client = Client("http://h", http=StubTreq(pages))
    ids = [job.id async for job in client.jobs(state="queued")]
    assert ids == [j["id"] for j in pages.jobs]
    assert [q.get("cursor") for q in pages.asked] == [None, ["2"], ["4"]]
    assert all(q["state"] == ["queued"] for q in pages.asked)
    with pytest.raises(ValueError):
        client.jobs(page_size=501)


@pytest_twisted.ensureDeferred
async def test_suggested_name_reads_content_disposition() -> None:
    """suggested_name() sends HEAD and reads filename*= (RFC 8187) before filename=."""
    header = b"attachment; filename=\"caf_.mp4\"; filename*=UTF-8''caf%C3%A9.mp4"
    recorder = _Recorder((200, {}), {b"Content-Disposition": header})
    client = Client("http://h", http=StubTreq(recorder))
    assert await client.suggested_name("a" * 32) == "café.mp4"


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ('attachment; filename="clip.mp4"', "clip.mp4"),
        ("attachment; filename=clip.mp4", "clip.mp4"),
        ('attachment; filename="a \\"b\\".mp4"', 'a "b".mp4'),
        ("attachment; filename*=UTF-8''%E2%82%AC.mp4; filename=\"_.mp4\"", "€.mp4"),
        ("attachment", None),
    ],
)
def test_disposition_filename(value: str, name: str | None) -> None:
    """The filename of a Content-Disposition value, quoted, bare or RFC 8187 encoded."""
    assert disposition_filename(value) == name


@pytest.mark.parametrize(
    ("suggested", "safe"),
    [
        ("clip.mp4", "clip.mp4"),
        ("../../.bashrc", "bashrc"),
        ("/etc/passwd", "passwd"),
        ("..\\..\\x.exe", "x.exe"),
        ("-rf.mp4", "rf.mp4"),
        ("a\x1b[31mb.mp4", "a_[31mb.mp4"),
        ("..", None),
        # Cut to 250 bytes at the start, room left for ".part", nothing bared hidden.
        pytest.param("\u52d5" * 116 + ".mp4", "\u52d5" * 82 + ".mp4", id="long-cjk"),
        pytest.param("a" * 10 + "." + "b" * 249, "b" * 249, id="cut-bares-a-dot"),
        ("dir/", None),
        ("", None),
        (None, None),
    ],
)
def test_safe_filename(suggested: str | None, safe: str | None) -> None:
    """A server's suggested name is cut to a plain name in the current directory, or refused."""
    assert safe_filename(suggested) == safe


class _CutBody(Protocol):
    """Answers each request with a 200 that promises 100 bytes, sends 10, and hangs up."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if b"\r\n\r\n" in self.received:
            self.transport.write(  # type: ignore[union-attr]
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"id": "ab'
            )
            self.transport.loseConnection()  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_body_cut_short_is_a_network_error() -> None:
    """
    An answer whose connection breaks before the end of its body raises
    ConnectionLost (a NetworkError, so a TranscoderError) naming the
    request's method and URL, whichever call it was: get, profiles, log,
    health, cancel.
    """
    port = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Factory.forProtocol(_CutBody), interface="127.0.0.1"
    )
    url = f"http://127.0.0.1:{port.getHost().port}"
    job = "a" * 32
    c = Client(url)
    try:
        for call, method, path in [
            (lambda: c.get(job), "GET", f"/jobs/{job}"),
            (c.profiles, "GET", "/profiles"),
            (lambda: c.log(job, 5), "GET", f"/jobs/{job}/log?tail=5"),
            (c.health, "GET", "/health"),
            (lambda: c.cancel(job), "DELETE", f"/jobs/{job}"),
        ]:
            with pytest.raises(ConnectionLost) as e:
                await call()
            assert isinstance(e.value, NetworkError) and isinstance(e.value, TranscoderError)
            assert (e.value.method, e.value.url) == (method, url + path)
    finally:
        await c.close()
        await port.stopListening()
