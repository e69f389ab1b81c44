"""
transcoder.client.api against a real server on loopback (C{transcoder serve} as
a subprocess, real encoders), plus a small in-process server that drops and
stalls downloads, and the streaming body on its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import multipart
import pytest
import pytest_twisted
from serverproc import ServerProcess, random_file, serve, start, transcoder
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock, Cooperator
from twisted.python.failure import Failure
from twisted.web import server as web_server
from twisted.web.client import RequestTransmissionFailed, ResponseFailed
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from transcoder._twisted import disconnected
from transcoder.client import (
    CannotConnect,
    Client,
    ConnectionLost,
    NetworkError,
    NoAnswer,
    RemoteJob,
    TranscoderError,
)
from transcoder.client.bodies import StreamingBody

MiB = 1 << 20


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("client-server")
    proc = serve(d / "data", d / "serve.log", "--workers", "2")
    yield proc
    proc.stop()


@pytest_twisted.async_yield_fixture
async def client(server: ServerProcess) -> AsyncIterator[Client]:
    c = Client(server.url)
    yield c
    await c.close()


# The streaming body, without a network.


class _Consumer:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data


def _drain(body: StreamingBody) -> tuple[bytes, Deferred[None]]:
    clock = Clock()
    body._cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f))
    consumer = _Consumer()
    d = body.startProducing(consumer)  # type: ignore[arg-type]
    for _ in range(10000):
        if d.called:
            break
        clock.advance(0)
    return bytes(consumer.data), d


def test_multipart_body_streams_files_that_parse_back(tmp_path: Path) -> None:
    """The multipart body has the announced length, parses back to the files, and hashes each."""
    video = random_file(tmp_path / 'my "video".flv', 700_000)
    audio = random_file(tmp_path / "a.mp3", 3)
    progress: list[tuple[int, int]] = []
    body, ctype, parts = StreamingBody.multipart(
        {"video": video, "audio": audio},
        Cooperator(),
        lambda sent, total: progress.append((sent, total)),
    )
    verifyObject(IBodyProducer, body)
    data, d = _drain(body)
    assert d.called
    assert len(data) == body.length
    assert progress[-1] == (body.length, body.length)
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)
    boundary = ctype.split(b"boundary=")[1].decode()
    found: dict[str, tuple[str, bytes]] = {}
    for segment in multipart.MultipartParser(io.BytesIO(data), boundary, content_length=len(data)):
        found[segment.name] = (segment.filename, segment.raw)
    assert found["video"] == ('my "video".flv', video.read_bytes())
    assert found["audio"] == ("a.mp3", audio.read_bytes())
    assert parts["video"].sha256 == sha256_of(video)
    assert parts["audio"].sha256 == sha256_of(audio)


def test_body_fails_if_the_file_shrinks(tmp_path: Path) -> None:
    """A file that gets shorter after the length was announced fails the upload."""
    path = random_file(tmp_path / "f.bin", 600_000)
    body, _ = StreamingBody.raw(path, Cooperator())
    path.write_bytes(b"short")
    _, d = _drain(body)
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(OSError)


# Against the real server.


@pytest_twisted.ensureDeferred
async def test_submit_raw_wait_download(client: Client, clips: Any, tmp_path: Path) -> None:
    """A raw upload becomes a job; wait follows it to success; download saves the checked result."""
    sent: list[tuple[int, int]] = []
    job = await client.submit(
        clips.av, "mp4-h264", {"preset": "ultrafast", "crf": 30}, lambda s, t: sent.append((s, t))
    )
    assert isinstance(job, RemoteJob)
    size = clips.av.stat().st_size
    assert sent[-1] == (size, size)
    assert job.params == {"preset": "ultrafast", "crf": 30, "abitrate": 128, "height": 4320}
    assert job.inputs[0]["sha256"] == sha256_of(clips.av)
    assert job.inputs[0]["filename"] == clips.av.name

    seen: list[RemoteJob] = []
    done = await client.wait(job.id, on_progress=seen.append)
    assert done.state == "succeeded" and done.finished
    assert seen[-1] == done
    assert len({(j.state, j.progress) for j in seen}) == len(seen)

    got: list[tuple[int, int]] = []
    out = await client.download(job.id, tmp_path / "out.mp4", lambda r, t: got.append((r, t)))
    assert out == tmp_path / "out.mp4"
    assert out.stat().st_size == done.output["size"]  # type: ignore[index]
    assert sha256_of(out) == done.output["sha256"]  # type: ignore[index]
    assert got[-1] == (out.stat().st_size, out.stat().st_size)
    assert not (tmp_path / "out.mp4.part").exists()
    assert (await client.get(job.id)) == done


@pytest_twisted.ensureDeferred
async def test_submit_multipart_inputs(client: Client, clips: Any) -> None:
    """A mapping of inputs goes as multipart; the server stores each under its name with its digest."""
    job = await client.submit({"video": clips.flv_video, "audio": clips.mp3_audio}, "mux-avi")
    by_name = {i["name"]: i for i in job.inputs}
    assert by_name["video"]["sha256"] == sha256_of(clips.flv_video)
    assert by_name["audio"]["sha256"] == sha256_of(clips.mp3_audio)
    assert by_name["audio"]["size"] == clips.mp3_audio.stat().st_size
    assert (await client.wait(job.id)).state == "succeeded"
    listed = await client.jobs(state="succeeded")
    assert job.id in [j.id for j in listed]
    assert {j.state for j in listed} == {"succeeded"}


@pytest_twisted.ensureDeferred
async def test_server_errors_raise_transcoder_error(client: Client, clips: Any) -> None:
    """Refusals and unknown ids raise TranscoderError with the server's status, code and message."""
    with pytest.raises(TranscoderError) as e:
        await client.submit(clips.av, "no-such-profile")
    assert (e.value.status, e.value.code) == (422, "unknown_profile")
    assert "no-such-profile" in e.value.message
    with pytest.raises(TranscoderError) as e:
        await client.submit(clips.av, "mp4-h264", {"crf": 99})
    assert e.value.status == 422
    with pytest.raises(TranscoderError) as e:
        await client.get("0" * 32)
    assert (e.value.status, e.value.code) == (404, "not_found")


@pytest_twisted.ensureDeferred
async def test_failed_job_and_download_before_ready(
    client: Client, clips: Any, tmp_path: Path
) -> None:
    """A job on garbage input ends failed with a reason; its result cannot be downloaded."""
    job = await client.submit(clips.noise, "avi-mpeg4")
    done = await client.wait(job.id)
    assert done.state == "failed"
    assert done.error and done.error["message"]
    with pytest.raises(TranscoderError) as e:
        await client.download(job.id, tmp_path / "x.avi")
    assert e.value.status in (404, 409)
    assert not (tmp_path / "x.avi").exists()


@pytest_twisted.ensureDeferred
async def test_cancel_removes_the_job(client: Client, clips: Any) -> None:
    """cancel() stops and removes a job: afterwards the server knows no such job."""
    job = await client.submit(clips.av_long, "mp4-h264", {"preset": "veryslow"})
    await client.cancel(job.id)
    with pytest.raises(TranscoderError) as e:
        await client.get(job.id)
    assert e.value.status == 404


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_a_connect_error() -> None:
    """
    With nothing listening, requests fail with CannotConnect: a NetworkError
    (so a TranscoderError, status 0) that names the URL and the reason, and
    also Twisted's ConnectError, with Twisted's own failure as its cause.
    """
    c = Client("http://127.0.0.1:9")
    try:
        with pytest.raises(ConnectError) as e:
            await c.jobs()
        assert isinstance(e.value, CannotConnect)
        assert isinstance(e.value, NetworkError) and isinstance(e.value, TranscoderError)
        assert e.value.status == 0 and e.value.code == "cannot_connect"
        assert e.value.url.startswith("http://127.0.0.1:9/jobs") and e.value.method == "GET"
        assert "refused" in e.value.reason
        assert str(e.value).startswith("cannot connect to http://127.0.0.1:9/jobs")
        assert isinstance(e.value.__cause__, ConnectError)
        assert not isinstance(e.value.__cause__, TranscoderError)
    finally:
        await c.close()


_UPLOADER = """
import json, sys
from pathlib import Path
from twisted.internet.task import react
from twisted.internet.defer import ensureDeferred
from transcoder.client import Client

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

async def main(reactor):
    client = Client(sys.argv[1], reactor=reactor)
    await client.jobs()  # every import and the connection, before the baseline
    before = hwm()
    calls = [0]
    def progress(sent, total):
        calls[0] += 1
    job = await client.submit(Path(sys.argv[2]), "avi-mpeg4", on_progress=progress)
    print(json.dumps({"before": before, "after": hwm(), "job": job.data, "calls": calls[0]}))
    await client.close()

react(lambda r: ensureDeferred(main(r)))
"""


def test_200_mib_upload_in_constant_memory(server: ServerProcess, tmp_path: Path) -> None:
    """
    A 200 MiB upload: the client process's peak RSS grows by less than 40 MiB,
    and so does the server's; the server stores exactly the file's bytes.
    (Random bytes: the job fails later at probing, which is beside the point.)
    """
    file = random_file(tmp_path / "big.bin", 200 * MiB)
    assert server.reset_peak()
    server_before = server.peak_rss()
    result = subprocess.run(
        [sys.executable, "-c", _UPLOADER, server.url, str(file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    server_growth = (server.peak_rss() - server_before) / (1 << 20)
    client_growth = (report["after"] - report["before"]) / 1024
    print(f"\n200 MiB upload: client +{client_growth:.1f} MiB, server +{server_growth:.1f} MiB")
    assert client_growth < 40
    assert server_growth < 40
    assert report["calls"] > 100
    (stored,) = report["job"]["inputs"]
    assert stored["size"] == 200 * MiB
    assert stored["sha256"] == sha256_of(file)


# Downloads that break, against a small in-process server.


class _FlakyResult(Resource):
    """
    Serves C{payload} honouring C{Range}/C{If-Range}; the first C{drops}
    answers stop after C{cut} bytes, by closing the connection or (C{stall})
    by going silent.
    """

    isLeaf = True

    def __init__(self, payload: bytes, cut: int, drops: int = 1, stall: bool = False) -> None:
        super().__init__()
        self.payload = payload
        self.cut = cut
        self.drops = drops
        self.stall = stall
        self.requests: list[tuple[bytes | None, bytes | None]] = []
        self.stalled: list[Any] = []

    def render_GET(self, request: web_server.Request) -> bytes | int:
        rng = request.getHeader(b"range")
        self.requests.append((rng, request.getHeader(b"if-range")))
        start = int(rng.split(b"=")[1].split(b"-")[0]) if rng else 0
        body = self.payload[start:]
        request.setHeader(b"ETag", b'"v1"')
        request.setHeader(b"Content-Length", b"%d" % len(body))
        if rng:
            request.setResponseCode(206)
            request.setHeader(
                b"Content-Range",
                b"bytes %d-%d/%d" % (start, len(self.payload) - 1, len(self.payload)),
            )
        if self.drops > 0:
            self.drops -= 1
            request.write(body[: self.cut])
            if self.stall:
                self.stalled.append(request)
            else:
                # loseConnection would wait for the channel, a registered
                # producer; abort once the cut bytes have had time to go.
                transport = request.channel.transport  # type: ignore[union-attr]
                reactor.callLater(0.2, transport.abortConnection)  # type: ignore[attr-defined]
            return web_server.NOT_DONE_YET
        return body


class _FakeJob(Resource):
    isLeaf = True

    def __init__(self, job: dict[str, Any], result: _FlakyResult) -> None:
        super().__init__()
        self.job = job
        self.result = result

    def render_GET(self, request: web_server.Request) -> bytes | int:
        if request.postpath and request.postpath[-1] == b"result":
            return self.result.render_GET(request)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.job).encode()


async def _fake_server(result: _FlakyResult, sha256: str) -> tuple[Any, str]:
    job = {
        "id": "a" * 32,
        "profile": "mux-avi",
        "state": "succeeded",
        "progress": 100.0,
        "output": {"size": len(result.payload), "sha256": sha256},
    }
    root = Resource()
    jobs = Resource()
    root.putChild(b"jobs", jobs)
    jobs.putChild(b"a" * 32, _FakeJob(job, result))
    port = reactor.listenTCP(0, web_server.Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
    return port, f"http://127.0.0.1:{port.getHost().port}"


@pytest_twisted.ensureDeferred
async def test_download_resumes_after_a_dropped_connection(tmp_path: Path) -> None:
    """A connection closed mid-body is resumed with Range from the saved bytes and If-Range."""
    payload = os.urandom(3 * MiB + 17)
    result = _FlakyResult(payload, cut=MiB + 5, drops=2)
    port, url = await _fake_server(result, hashlib.sha256(payload).hexdigest())
    c = Client(url)
    try:
        out = await c.download("a" * 32, tmp_path / "r.bin")
    finally:
        await c.close()
        await port.stopListening()
    assert out.read_bytes() == payload
    assert len(result.requests) == 3
    assert result.requests[0] == (None, None)
    starts = []
    for rng, if_range in result.requests[1:]:
        assert rng is not None and if_range == b'"v1"'
        starts.append(int(rng[len(b"bytes=") : -1]))
    # Each retry starts where the saved bytes end: after at most one more cut.
    assert 0 < starts[0] <= MiB + 5
    assert starts[0] < starts[1] <= starts[0] + MiB + 5
    assert len(result.requests) == 3


@pytest_twisted.ensureDeferred
async def test_download_resumes_a_stalled_connection(tmp_path: Path) -> None:
    """A body that goes silent longer than the idle timeout is dropped and resumed."""
    payload = os.urandom(MiB)
    result = _FlakyResult(payload, cut=1000, drops=1, stall=True)
    port, url = await _fake_server(result, hashlib.sha256(payload).hexdigest())
    c = Client(url, idle_timeout=0.5)
    try:
        out = await c.download("a" * 32, tmp_path / "r.bin")
    finally:
        await c.close()
        for request in result.stalled:
            if not request.finished and not disconnected(request):
                request.finish()
        await port.stopListening()
    assert out.read_bytes() == payload
    assert [r[0] for r in result.requests] == [None, b"bytes=1000-"]


@pytest_twisted.ensureDeferred
async def test_download_continues_a_part_file_and_checks_the_digest(tmp_path: Path) -> None:
    """
    A .part left by an earlier run is continued; one of another file (the
    digest does not match once it is continued) is dropped and the result
    fetched again from the start, once; a result whose digest is wrong
    from the start is not kept.
    """
    payload = os.urandom(MiB)
    (tmp_path / "r.bin.part").write_bytes(payload[:4000])
    result = _FlakyResult(payload, cut=0, drops=0)
    port, url = await _fake_server(result, hashlib.sha256(payload).hexdigest())
    wrong_port, wrong_url = await _fake_server(_FlakyResult(payload, cut=0, drops=0), "0" * 64)
    c = Client(url)
    w = Client(wrong_url)
    try:
        out = await c.download("a" * 32, tmp_path / "r.bin")
        assert out.read_bytes() == payload
        assert result.requests == [(b"bytes=4000-", None)]

        (tmp_path / "other.bin.part").write_bytes(b"x" * 4000)
        out = await c.download("a" * 32, tmp_path / "other.bin")
        assert out.read_bytes() == payload
        assert result.requests[1:] == [(b"bytes=4000-", None), (None, None)]
        assert not (tmp_path / "other.bin.part").exists()

        (tmp_path / "bad.bin.part").write_bytes(payload[:4000])
        with pytest.raises(TranscoderError) as e:
            await w.download("a" * 32, tmp_path / "bad.bin")
        assert e.value.code == "digest_mismatch"
        assert not (tmp_path / "bad.bin").exists()
        assert not (tmp_path / "bad.bin.part").exists()
    finally:
        await c.close()
        await w.close()
        await port.stopListening()
        await wrong_port.stopListening()


# Connections that break or go silent while a body is sent.


class _Swallow(Protocol):
    """Reads a request, and aborts the connection after C{cut} bytes (never, if None)."""

    def __init__(self, cut: int | None) -> None:
        self.cut = cut
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.cut is not None and self.received >= self.cut:
            self.transport.abortConnection()  # type: ignore[union-attr]


async def _swallowing_server(cut: int | None) -> tuple[Any, str, list[_Swallow]]:
    """A TCP server that takes what comes and never answers; returns port, URL, connections."""
    made: list[_Swallow] = []

    def build() -> _Swallow:
        made.append(_Swallow(cut))
        return made[-1]

    port = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Factory.forProtocol(build), interface="127.0.0.1"
    )
    return port, f"http://127.0.0.1:{port.getHost().port}", made


@pytest_twisted.ensureDeferred
async def test_connection_lost_while_uploading_is_a_response_failed(tmp_path: Path) -> None:
    """
    A server that drops the connection while the body is being sent makes
    submit fail with ResponseFailed, the documented exception for a broken
    connection, not with Twisted's RequestTransmissionFailed.
    """
    file = random_file(tmp_path / "big.bin", 16 * MiB)
    port, url, made = await _swallowing_server(cut=MiB)
    c = Client(url)
    try:
        with pytest.raises(ResponseFailed) as e:
            await c.submit(file, "mp4-h264")
        assert isinstance(e.value, ConnectionLost) and isinstance(e.value, TranscoderError)
        assert e.value.url.startswith(url + "/jobs?profile=mp4-h264") and e.value.method == "PUT"
        assert isinstance(e.value.__cause__, RequestTransmissionFailed)
        assert made and made[0].received >= MiB
    finally:
        await c.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_file_that_shrinks_while_uploading_is_an_os_error(tmp_path: Path) -> None:
    """A file cut short after submit began fails with the OSError saying so, not a wrapper."""
    file = random_file(tmp_path / "f.bin", 2 * MiB)
    port, url, _ = await _swallowing_server(cut=None)
    c = Client(url)
    try:
        d = c.submit(file, "mp4-h264")
        file.write_bytes(b"short")
        with pytest.raises(OSError, match="shrank"):
            await d
    finally:
        await c.close()
        await port.stopListening()


class _Mute(Protocol):
    """
    A server connection that never answers.  C{read=False}: it reads nothing
    either, as a stopped server; C{headers}: once a request's headers are in,
    it sends these and then nothing more; C{burst}: it reads 1 MiB every
    C{burst} seconds (a slow but moving upload), and answers C{answer} once
    C{expect} bytes have come.
    """

    def __init__(
        self,
        read: bool = True,
        headers: bytes | None = None,
        burst: float | None = None,
        expect: int = 0,
        answer: bytes = b"",
    ) -> None:
        self.read, self.headers, self.burst = read, headers, burst
        self.expect, self.answer = expect, answer
        self.received = b""
        self.count = 0
        self._in_burst = 0
        self._timer: Any = None

    def connectionMade(self) -> None:
        if not self.read:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def _resume(self) -> None:
        self._in_burst = 0
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)
        self._in_burst += len(data)
        if self.burst is not None and self._in_burst >= MiB:
            self.transport.pauseProducing()  # type: ignore[union-attr]
            self._timer = reactor.callLater(self.burst, self._resume)  # type: ignore[attr-defined]
        if self.headers is not None and b"\r\n\r\n" not in self.received:
            self.received += data
            if b"\r\n\r\n" in self.received:
                self.transport.write(self.headers)  # type: ignore[union-attr]
        if self.expect and self.count >= self.expect and self.answer:
            self.transport.write(self.answer)  # type: ignore[union-attr]
            self.answer = b""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


async def _mute_server(**kw: Any) -> tuple[Any, str, list[_Mute]]:
    made: list[_Mute] = []

    def build() -> _Mute:
        made.append(_Mute(**kw))
        return made[-1]

    port = reactor.listenTCP(  # type: ignore[attr-defined]
        0, Factory.forProtocol(build), interface="127.0.0.1"
    )
    return port, f"http://127.0.0.1:{port.getHost().port}", made


async def _closed(port: Any, made: list[_Mute]) -> None:
    for conn in made:
        if conn.transport is not None:
            conn.transport.abortConnection()  # type: ignore[attr-defined]
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_upload_to_a_server_that_stopped_reading_times_out(tmp_path: Path) -> None:
    """
    An upload to a server that accepted the connection but reads nothing (a
    stopped process) fails with TimeoutError once nothing has been sent for
    idle_timeout, instead of hanging.
    """
    file = random_file(tmp_path / "big.bin", 48 * MiB)
    port, url, made = await _mute_server(read=False)
    c = Client(url, idle_timeout=0.5, request_timeout=30)
    sent: list[int] = []
    started = reactor.seconds()  # type: ignore[attr-defined]
    try:
        with pytest.raises(TimeoutError, match=r"no progress for 0\.5 s"):
            await c.submit(file, "mp4-h264", on_progress=lambda s, t: sent.append(s))
    finally:
        await c.close()
        await _closed(port, made)
    assert 0 < sent[-1] < file.stat().st_size
    assert reactor.seconds() - started < 10  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_no_answer_after_the_upload_times_out(tmp_path: Path) -> None:
    """A server that takes the whole body and never answers: TimeoutError after request_timeout."""
    file = random_file(tmp_path / "f.bin", MiB)
    port, url, made = await _mute_server()
    c = Client(url, idle_timeout=30, request_timeout=0.5)
    try:
        with pytest.raises(TimeoutError, match=r"no answer 0\.5 s after the upload") as e:
            await c.submit(file, "mp4-h264")
        assert isinstance(e.value, NoAnswer) and isinstance(e.value, TranscoderError)
        assert e.value.url.startswith(url + "/jobs")
    finally:
        await c.close()
        await _closed(port, made)
    assert made[0].count > MiB


@pytest_twisted.ensureDeferred
async def test_polls_time_out_without_an_answer() -> None:
    """
    get and wait give up with TimeoutError after request_timeout (plus the
    long-poll's wait) on a server that never answers, or that sends the
    headers of an answer and never its body.
    """
    silent = await _mute_server()
    half = await _mute_server(
        headers=b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    try:
        for _, url, made in (silent, half):
            c = Client(url, request_timeout=0.3)
            try:
                with pytest.raises(TimeoutError):
                    await c.get("a" * 32)
                with pytest.raises(TimeoutError):
                    await c.wait("a" * 32, poll=0.2)
            finally:
                await c.close()
            assert made
    finally:
        for port, _, made in (silent, half):
            await _closed(port, made)


async def _submit_to_a_bursty_server(
    tmp_path: Path, job_id: str, **timeouts: float
) -> tuple[RemoteJob, float]:
    """
    Submit 6 MiB to a server that reads 1 MiB every 0.35 s and then answers
    job C{job_id}, with a Client given C{timeouts}; the job and the seconds it took.
    """
    file = random_file(tmp_path / "f.bin", 6 * MiB)
    job = json.dumps({"id": job_id, "profile": "mp4-h264", "state": "queued", "progress": 0})
    answer = (
        b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    )
    port, url, made = await _mute_server(
        burst=0.35, expect=file.stat().st_size, answer=answer % (len(job), job.encode())
    )
    c = Client(url, **timeouts)
    started = reactor.seconds()  # type: ignore[attr-defined]
    try:
        got = await c.submit(file, "mp4-h264")
    finally:
        await c.close()
        await _closed(port, made)
    return got, reactor.seconds() - started  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_a_slow_upload_that_keeps_moving_is_not_cut_short(tmp_path: Path) -> None:
    """
    The upload's timeouts bound silence, not duration: a server that reads in
    bursts takes the whole body over several times idle_timeout, and its
    answer is taken.
    """
    got, took = await _submit_to_a_bursty_server(
        tmp_path, "c" * 32, idle_timeout=0.5, request_timeout=10
    )
    assert got.id == "c" * 32
    assert took > 3 * 0.5, took


@pytest_twisted.ensureDeferred
async def test_the_answer_limit_starts_once_the_body_has_left_the_socket(tmp_path: Path) -> None:
    """
    On a slow link the last megabytes are written long before they arrive:
    request_timeout (0.5 s here) for the answer runs from when the socket's
    send queue is empty, not from the last write, so a server that reads
    1 MiB every 0.35 s is answered for a 6 MiB body.
    """
    got, _ = await _submit_to_a_bursty_server(
        tmp_path, "d" * 32, idle_timeout=0.5, request_timeout=0.5
    )
    assert got.id == "d" * 32


_RAW_VIDEO = """
[raw-video]
description = "The video as raw frames in NUT: a big result, made fast."
executable = "ffmpeg"
argv = [
    "-nostdin", "-y", "-nostats", "-progress", "pipe:1", "-i", "{file}",
    "-map", "0:v", "-c:v", "rawvideo", "-f", "nut", "{output}",
]
output_extension = "nut"
media_type = "video/x-nut"
progress = "ffmpeg"
"""


@pytest_twisted.ensureDeferred
async def test_download_survives_a_server_restart(tmp_path: Path, clips: Any) -> None:
    """
    The server is killed while a result streams in and started again on the
    same port and data dir a second later: download retries the refused
    connections, then resumes from what it has (progress never goes back),
    and the file is complete and checked.
    """
    profiles = tmp_path / "raw.toml"
    profiles.write_text(_RAW_VIDEO)
    data = tmp_path / "data"
    first = serve(data, tmp_path / "first.log", "--profiles", str(profiles))
    servers = [first]
    restarted: list[Deferred[ServerProcess]] = []
    c = Client(first.url, retry_for=30)
    try:
        job = await c.wait((await c.submit(clips.av_long, "raw-video")).id)
        assert job.state == "succeeded" and job.output is not None
        # Far more than the socket buffers hold, so the kill cuts the body.
        assert job.output["size"] > 30 * MiB
        seen: list[int] = []

        def restart() -> ServerProcess:
            time.sleep(1)
            listen = f"tcp:{first.port}:interface=127.0.0.1"
            argv = [transcoder(), "serve", "--listen", listen, "--data-dir", str(data)]
            return start([*argv, "--profiles", str(profiles)], data, tmp_path / "second.log")

        def progress(received: int, total: int) -> None:
            seen.append(received)
            if not restarted:
                first.kill()
                restarted.append(threads.deferToThread(restart))

        out = await c.download(job.id, tmp_path / "out.nut", progress)
    finally:
        await c.close()
        # Stopped whether the download worked or not: a failed one must not
        # leave the restarted server running.
        if restarted:
            servers.append(await restarted[0])
        for server in servers:
            server.stop()
    assert sha256_of(out) == job.output["sha256"]
    assert seen == sorted(seen)
    assert seen[-1] == job.output["size"]
    assert not (tmp_path / "out.nut.part").exists()


@pytest_twisted.ensureDeferred
async def test_download_outputs_saves_every_output(
    client: Client, clips: Any, tmp_path: Path
) -> None:
    """download_outputs saves each output of an hls job under its name (levels made), each checked against its SHA-256; a one-output job's result is saved as result.<ext>."""
    job = await client.submit(clips.av, "hls", {"rungs": "240p", "segment_seconds": 2})
    job = await client.wait(job.id)
    assert job.state == "succeeded", job.error
    saved = await client.download_outputs(job.id, tmp_path / "hls")
    listed = {o["name"]: o["sha256"] for o in job.data["outputs"]}
    assert sorted(str(p.relative_to(tmp_path / "hls")) for p in saved) == sorted(listed)
    for p in saved:
        name = str(p.relative_to(tmp_path / "hls"))
        assert hashlib.sha256(p.read_bytes()).hexdigest() == listed[name]
    assert (tmp_path / "hls" / "master.m3u8").read_bytes().startswith(b"#EXTM3U")
    one = await client.wait((await client.submit(clips.av, "audio-aac", {})).id)
    [path] = await client.download_outputs(one.id, tmp_path / "one")
    assert path == tmp_path / "one" / "result.m4a"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == (one.output or {})["sha256"]


def test_output_names_from_a_server_are_checked() -> None:
    """A name that would leave the directory (.., absolute, hidden, empty level) is refused before any file is written."""
    from transcoder.client.outputs import safe_name

    assert safe_name("360p/index.m3u8") == "360p/index.m3u8"
    for bad in ("../x", "/etc/x", "a/../../b", ".bashrc", "a//b", "", None, "a/.."):
        with pytest.raises(TranscoderError):
            safe_name(bad)
