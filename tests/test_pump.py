"""
The socket pump reads a body's bulk on a thread into a few reusable buffers,
and the parallel writer puts lent buffers on disk at their offsets.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from serverproc import no_uploads_left
from test_spool import settle
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint

from transcoder.core.jobs import JobState
from transcoder.core.profiles import load_profiles
from transcoder.core.registry import JobRegistry
from transcoder.core.sqlite import SQLiteJobStore
from transcoder.http import pump as _pump
from transcoder.http import request as upload
from transcoder.http.pump import ALIGN, PumpEnd, SocketPump
from transcoder.http.resources import build_root
from transcoder.http.site import TranscoderSite
from transcoder.http.writer import Lent, ParallelWriter
from transcoder.testing import FakeExecutor, FakeOutcome

KiB = 1024
MiB = 1 << 20


class Collector:
    """A sink that keeps a copy of every lent buffer, and gives it back unless told to hold it."""

    def __init__(self, hold: bool = False) -> None:
        self.chunks: list[bytes] = []
        self.hold = hold
        self.held: list[Callable[[], None]] = []

    def __call__(self, view: memoryview, give_back: Callable[[], None]) -> None:
        self.chunks.append(bytes(view))
        if self.hold:
            self.held.append(give_back)
        else:
            give_back()

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def pump_for(
    sock: socket.socket, nbytes: int, sink: Any, idle: float | None = 5.0, **kw: Any
) -> tuple[SocketPump, list[PumpEnd]]:
    ends: list[PumpEnd] = []
    pump = SocketPump(reactor, sock, nbytes, sink, idle, **kw)  # type: ignore[arg-type]
    pump.start().addCallback(ends.append)
    return pump, ends


@pytest.fixture
def pair() -> Any:
    a, b = socket.socketpair()
    # As the reactor keeps its sockets: non-blocking.
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


@pytest_twisted.ensureDeferred
async def test_reads_exactly_its_bytes_and_leaves_the_rest_in_the_socket(pair: Any) -> None:
    """A pump lends exactly nbytes, in order, and never reads past them: the next request's bytes stay in the socket, which is non-blocking again afterwards."""
    a, b = pair
    body = os.urandom(3 * MiB + 12345)
    sink = Collector()
    _, ends = pump_for(a, len(body), sink, buffer_size=256 * KiB, buffers=2)
    threading.Thread(target=b.sendall, args=(body + b"GET / HTTP/1.1\r\n",)).start()
    await settle(lambda: ends, timeout=10)
    assert ends == [PumpEnd("complete", len(body), lent=len(body))]
    assert sink.data == body
    assert fcntl.fcntl(a.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    assert a.recv(100) == b"GET / HTTP/1.1\r\n"


@pytest_twisted.ensureDeferred
async def test_first_buffer_ends_on_an_aligned_offset(pair: Any) -> None:
    """Started at file offset 100, the first lent buffer ends at a multiple of ALIGN, so every full buffer after it can be written with O_DIRECT."""
    a, b = pair
    body = os.urandom(MiB)
    sink = Collector()
    _, ends = pump_for(a, len(body), sink, offset=100, buffer_size=64 * KiB, buffers=2)
    b.sendall(body)
    await settle(lambda: ends, timeout=10)
    assert (100 + len(sink.chunks[0])) % ALIGN == 0
    assert all(len(c) == 64 * KiB for c in sink.chunks[1:-1])
    assert sink.data == body


@pytest_twisted.ensureDeferred
async def test_buffers_are_cut_where_the_sink_says_its_file_starts(pair: Any) -> None:
    """With file_start (a multipart file part that began at body offset 5000), buffers are cut at that file's aligned offsets, not the body's: after the first one, each starts at a multiple of ALIGN in the file."""
    a, b = pair
    body = os.urandom(MiB)
    sink = Collector()
    _, ends = pump_for(
        a,
        len(body),
        sink,
        offset=100,
        buffer_size=64 * KiB,
        buffers=2,
        file_start=lambda: 5000,
    )
    b.sendall(body)
    await settle(lambda: ends, timeout=10)
    ends_at = 100
    for chunk in sink.chunks[:-1]:
        ends_at += len(chunk)
        assert (ends_at - 5000) % ALIGN == 0
    assert sink.data == body


@pytest_twisted.ensureDeferred
async def test_client_closing_early_ends_with_eof(pair: Any) -> None:
    """A client that closes before nbytes: the pump ends with eof and lends what came."""
    a, b = pair
    sink = Collector()
    _, ends = pump_for(a, 10 * MiB, sink)
    b.sendall(b"x" * 5000)
    b.close()
    await settle(lambda: ends, timeout=10)
    assert ends[0].reason == "eof"
    assert ends[0].received == 5000
    assert sink.data == b"x" * 5000


@pytest_twisted.ensureDeferred
async def test_idle_client_ends_with_idle(pair: Any) -> None:
    """Nothing for the idle timeout: the pump ends with idle."""
    a, b = pair
    sink = Collector()
    _, ends = pump_for(a, 10 * MiB, sink, idle=0.5)
    b.sendall(b"y" * 100)
    await settle(lambda: ends, timeout=10)
    assert ends == [PumpEnd("idle", 100, lent=100)]
    assert sink.data == b"y" * 100


@pytest_twisted.ensureDeferred
async def test_stop_ends_the_pump_promptly(pair: Any) -> None:
    """stop() ends a pump that waits for data, within a fraction of a second."""
    a, _ = pair
    pump, ends = pump_for(a, 10 * MiB, Collector(), idle=None)
    pump.stop()
    await settle(lambda: ends, timeout=3)
    assert ends[0].reason == "stopped"


@pytest_twisted.ensureDeferred
async def test_buffers_not_given_back_stall_the_pump(pair: Any) -> None:
    """With its buffers all lent and none given back, the pump reads no more and says it stalled: memory stays at its buffers."""
    a, b = pair
    sink = Collector(hold=True)
    pump, ends = pump_for(a, 8 * MiB, sink, buffer_size=64 * KiB, buffers=2)
    sender = threading.Thread(target=lambda: _send_quietly(b, os.urandom(8 * MiB)))
    sender.start()
    await settle(lambda: pump.stalled, timeout=5)
    assert len(sink.chunks) == 2
    assert pump.received <= 2 * 64 * KiB
    for give in sink.held:
        give()
    sink.hold = False
    await settle(lambda: ends, timeout=20)
    assert ends[0] == PumpEnd("complete", 8 * MiB, lent=8 * MiB)
    sender.join()


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def can_force_receive_buffer() -> bool:
    """Whether this process may give a socket a receive buffer past rmem_max (root may)."""
    with socket.socket() as s:
        return _pump._big_receive_buffer(s)


@pytest_twisted.ensureDeferred
async def test_pump_hashes_what_it_reads_where_its_receive_buffer_can_be_big(pair: Any) -> None:
    """Given the file's hash objects, a pump whose socket may have a 32 MiB receive buffer (root) feeds them every byte it lends, in order, as it reads; where that is not allowed it does not even ask for them (the spool hashes)."""
    a, b = pair
    body = os.urandom(3 * MiB + 5)
    h = hashlib.sha256()
    asked: list[bool] = []

    def hashes(stop: Callable[[], bool]) -> list[Any]:
        asked.append(True)
        return [h]

    sink = Collector()
    pump, ends = pump_for(a, len(body), sink, buffer_size=256 * KiB, buffers=2, hashes=hashes)
    b.sendall(body)
    await settle(lambda: ends, timeout=10)
    assert sink.data == body
    if can_force_receive_buffer():
        assert pump.hashing and asked == [True]
        assert h.hexdigest() == hashlib.sha256(body).hexdigest()
    else:
        assert not pump.hashing and asked == []


# The parallel writer.


def lent(data: bytes, given: list[bytes]) -> Lent:
    return Lent(memoryview(data), lambda: given.append(data))


def test_writer_puts_each_buffer_at_its_offset(tmp_path: Path) -> None:
    """Aligned and unaligned buffers, written by two threads, land at their offsets; each is given back once written."""
    path = tmp_path / "out"
    chunks = [os.urandom(n) for n in (100, ALIGN - 100, 4 * ALIGN, 4 * ALIGN, 777)]
    given: list[bytes] = []
    errors: list[OSError] = []
    with open(path, "xb", buffering=0) as f:
        writer = ParallelWriter(path, f.fileno(), errors.append)
        offset = 0
        for c in chunks:
            item = lent(c, given)
            writer.submit(item, offset)
            item.release()  # the spool's own hold
            offset += len(c)
        assert writer.drain() is None
        writer.close()
    assert path.read_bytes() == b"".join(chunks)
    assert sorted(given) == sorted(chunks)
    assert errors == []


def test_writer_reports_the_first_error_once(tmp_path: Path) -> None:
    """ENOSPC from a write is reported once, drain returns it, and every buffer is still given back."""
    path = tmp_path / "out"
    calls = [0]

    def pwrite(fd: int, view: memoryview, offset: int) -> int:
        calls[0] += 1
        if offset >= 2 * ALIGN:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, view, offset)

    given: list[bytes] = []
    errors: list[OSError] = []
    with open(path, "xb", buffering=0) as f:
        writer = ParallelWriter(path, f.fileno(), errors.append, pwrite=pwrite)
        for i in range(6):
            item = lent(bytes([i]) * ALIGN, given)
            writer.submit(item, i * ALIGN)
            item.release()
        error = writer.drain()
        writer.close()
    assert error is not None and error.errno == errno.ENOSPC
    assert len(errors) == 1 and errors[0].errno == errno.ENOSPC
    assert len(given) == 6


def test_writer_falls_back_when_o_direct_is_refused(tmp_path: Path) -> None:
    """A direct write refused with EINVAL (a filesystem or buffer that does not suit) is written through the page cache instead."""
    path = tmp_path / "out"
    refused = [0]

    def pwrite(fd: int, view: memoryview, offset: int) -> int:
        if fd == writer._direct:
            refused[0] += 1
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.pwrite(fd, view, offset)

    data = os.urandom(8 * ALIGN)
    with open(path, "xb", buffering=0) as f:
        writer = ParallelWriter(path, f.fileno(), lambda e: None, writers=1, pwrite=pwrite)
        if writer._direct is None:
            # This filesystem refused O_DIRECT at open (tmpfs does): stand in
            # a descriptor that the fake pwrite refuses the same way.
            writer._direct = os.open(path, os.O_WRONLY)
        item = Lent(memoryview(data), lambda: None)
        writer.submit(item, 0)
        item.release()
        assert writer.drain() is None
        writer.close()
    assert refused[0] == 1
    assert path.read_bytes() == data


# Through a server.


class FailingExecutor(FakeExecutor):
    """Jobs end at once: these tests are about uploads."""

    def __call__(self, reactor, /, **kwargs):  # type: ignore[no-untyped-def]
        execution = super().__call__(reactor, **kwargs)
        execution.deferred.callback(FakeOutcome(JobState.FAILED, error="not encoded in this test"))
        return execution


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    store = SQLiteJobStore(tmp_path / "jobs.sqlite3", reactor)
    registry = JobRegistry(
        reactor, store, tmp_path, load_profiles(), workers=1, executor=FailingExecutor()
    )
    registry.start()
    root = build_root(reactor, registry, load_profiles(), tmp_path, 1 << 30)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        TranscoderSite(root, reactor=reactor, idle_timeout=10)
    )
    yield port.getHost().port, tmp_path
    await port.stopListening()
    await registry.stop()


async def exchanged(port: int, request: bytes) -> bytes:
    """All the server answers to C{request}, sent on a connection of its own, until it closes."""
    answer: list[bytes] = []

    def client() -> None:
        data = b""
        with socket.create_connection(("127.0.0.1", port)) as s:
            try:
                s.sendall(request)
                while chunk := s.recv(65536):
                    data += chunk
            except OSError:
                pass
        answer.append(data)

    t = threading.Thread(target=client)
    t.start()
    await settle(lambda: answer, timeout=30)
    t.join()
    return answer[0]


@pytest.fixture
def pumps(monkeypatch: pytest.MonkeyPatch) -> list[SocketPump]:
    """Every SocketPump the upload path makes, in order."""
    made: list[SocketPump] = []

    class Recorded(SocketPump):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(upload, "SocketPump", Recorded)
    return made


@pytest_twisted.ensureDeferred
async def test_pumped_body_then_a_pipelined_request_on_the_same_connection(
    served: tuple[int, Path], pumps: list[SocketPump]
) -> None:
    """A 16 MiB PUT is read by a pump (all but its tail), stored with the right SHA-256, and the request pipelined behind it on the same connection is answered too."""
    port, _ = served
    body = os.urandom(16 * MiB + 333)
    head = b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(
        body
    )
    answer = await exchanged(
        port, head + body + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    first, _, second = answer.partition(b"HTTP/1.1 200")
    assert first.startswith(b"HTTP/1.1 201")
    assert hashlib.sha256(body).hexdigest().encode() in first
    assert b'"status"' in second
    assert len(pumps) == 1
    assert pumps[0].received >= len(body) - upload.PUMP_TAIL - 64 * KiB


@pytest.mark.parametrize("big_buffer", [True, False])
@pytest_twisted.ensureDeferred
async def test_pumped_raw_body_is_hashed_right_either_way(
    served: tuple[int, Path],
    pumps: list[SocketPump],
    monkeypatch: pytest.MonkeyPatch,
    big_buffer: bool,
) -> None:
    """A 12 MiB PUT read by a pump gets the right SHA-256 whether the pump hashes it as it reads (where the socket may have a big receive buffer) or leaves that to the spool's thread (where it may not)."""
    if not big_buffer:
        monkeypatch.setattr(_pump, "_big_receive_buffer", lambda sock: False)
    port, _ = served
    body = os.urandom(12 * MiB + 777)
    head = b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
    answer = await exchanged(port, head % len(body) + b"Connection: close\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
    assert hashlib.sha256(body).hexdigest().encode() in answer
    # Only root may force a socket's receive buffer past rmem_max.
    assert len(pumps) == 1 and pumps[0].hashing is (big_buffer and can_force_receive_buffer())


# The spool, fed as an upload feeds it: the reactor's first bytes, lent buffers, the reactor's tail.


@pytest_twisted.ensureDeferred
async def test_spool_mixes_copied_and_lent_bytes_in_order(tmp_path: Path) -> None:
    """Bytes written by the reactor and buffers lent by a pump (the first one ending on an aligned offset, the last one short) make one file with the right bytes and SHA-256, whichever way each piece reached the disk; every lent buffer is given back."""
    from test_spool import make_spool

    spool, _, errors = make_spool()
    path = tmp_path / "input"
    spool.open(path)
    head = os.urandom(60_001)
    spool.write(head)
    pieces = [head]
    given: list[int] = []
    sizes = [ALIGN - 60_001 % ALIGN + 512 * KiB, 512 * KiB, 512 * KiB, 3 * ALIGN, 1234]
    for i, size in enumerate(sizes):
        piece = os.urandom(size)
        pieces.append(piece)
        buf = bytearray(piece)
        spool.lend(memoryview(buf), partial(given.append, i))
    tail = os.urandom(70_000)
    spool.write(tail)
    pieces.append(tail)
    spool.close_file()
    (f,) = await spool.finish()
    data = b"".join(pieces)
    assert path.read_bytes() == data
    assert f.size == len(data)
    assert f.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(given) == list(range(len(sizes)))
    assert errors == []


@pytest_twisted.ensureDeferred
async def test_an_upload_beside_another_is_read_by_the_reactor(
    served: tuple[int, Path], pumps: list[SocketPump], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload that arrives while another is in flight is read by the reactor, not by a second pump, and both store the right bytes: memory and the reactor's latency stay bounded however many arrive."""
    port, _ = served
    monkeypatch.setattr(upload, "MAX_PUMPS", 2)
    first, second = os.urandom(12 * MiB), os.urandom(12 * MiB)
    answers: dict[str, bytes] = {}
    go_on = threading.Event()

    def client(name: str, body: bytes, pause: bool) -> None:
        head = b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head % len(body) + body[: 6 * MiB])
            if pause:
                go_on.wait(20)
            s.sendall(body[6 * MiB :])
            data = b""
            while chunk := s.recv(65536):
                data += chunk
                if b"}" in data:
                    break
            answers[name] = data

    a = threading.Thread(target=client, args=("first", first, True))
    a.start()
    await settle(lambda: len(pumps) == 1, timeout=10)
    b = threading.Thread(target=client, args=("second", second, False))
    b.start()
    await settle(lambda: "second" in answers, timeout=30)
    go_on.set()
    await settle(lambda: "first" in answers, timeout=30)
    a.join()
    b.join()
    assert len(pumps) == 1
    for name, body in (("first", first), ("second", second)):
        assert answers[name].startswith(b"HTTP/1.1 201"), answers[name][:200]
        assert hashlib.sha256(body).hexdigest().encode() in answers[name]


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    out = b""
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += f"--XyZ\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + b"--XyZ--\r\n"


def _post_multipart(port: int, body: bytes, answers: list[bytes]) -> None:
    head = (
        b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
        b"Content-Type: multipart/form-data; boundary=XyZ\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port)) as s:
        try:
            s.sendall(head % len(body) + body)
        except OSError:
            pass  # refused mid-body: the answer is what counts
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
        answers.append(data)


async def _post_multipart_beside(port: int, body: bytes) -> bytes:
    """POST a multipart body from a thread while the test's reactor serves it; the answer."""
    answers: list[bytes] = []
    t = threading.Thread(target=_post_multipart, args=(port, body, answers))
    t.start()
    await settle(lambda: answers, timeout=30)
    t.join()
    return answers[0]


@pytest_twisted.ensureDeferred
async def test_pumped_multipart_with_two_inputs(
    served: tuple[int, Path], pumps: list[SocketPump]
) -> None:
    """A multipart body with a length is parsed on the pump's thread: both file parts of a mux-avi job land in their own files with the right SHA-256."""
    port, _ = served
    video, audio = os.urandom(7 * MiB + 5), os.urandom(5 * MiB + 3)
    body = _multipart(
        [("profile", None, b"mux-avi"), ("video", "v.flv", video), ("audio", "a.mp3", audio)]
    )
    answers = [await _post_multipart_beside(port, body)]
    assert answers[0].startswith(b"HTTP/1.1 201"), answers[0][:300]
    for data in (video, audio):
        assert hashlib.sha256(data).hexdigest().encode() in answers[0]
    assert len(pumps) == 1 and pumps[0].received > 8 * MiB


@pytest_twisted.ensureDeferred
async def test_multipart_refused_on_the_pumps_thread_answers_and_leaves_nothing(
    served: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file part the profile does not take, found by the pump's thread after 6 MiB of a good part: 422 unknown_input as JSON, and no staged file left behind."""
    port, data_dir = served
    ends: list[PumpEnd] = []

    class Recorded(SocketPump):
        def start(self) -> Any:
            return super().start().addCallback(lambda end: ends.append(end) or end)

    monkeypatch.setattr(upload, "SocketPump", Recorded)
    body = _multipart(
        [
            ("profile", None, b"avi-mpeg4"),
            ("file", "a.flv", os.urandom(6 * MiB)),
            ("bogus", "b.bin", os.urandom(4 * MiB)),
        ]
    )
    answers = [await _post_multipart_beside(port, body)]
    assert answers[0].startswith(b"HTTP/1.1 422"), answers[0][:300]
    assert b'"unknown_input"' in answers[0]
    assert [end.reason for end in ends] == ["failed"]
    await settle(lambda: no_uploads_left(data_dir))
    assert no_uploads_left(data_dir)
