"""
A socket pump reading a chunked body (C{curl -T -}): the chunks' data goes
into its buffers, the framing is checked as twisted.web's decoder checks it,
and it never reads a byte past the body, so the HTTP channel goes on from
the last chunk's size line.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serverproc import no_uploads_left
from test_pump import (  # noqa: F401
    Collector,
    FailingExecutor,
    exchanged,
    pumps,
    served,
)
from test_spool import settle

from transcoder.http import bodies
from transcoder.http.chunked import MAX_SIZE_LINE, Chunked
from transcoder.http.pump import PumpEnd, SocketPump

KiB = 1024
MiB = 1 << 20
AFTER = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"


class InlineReactor:
    """What a pump needs of a reactor, run on the pump's own thread: the test waits for the thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


def encode(
    chunks: list[bytes], line: Callable[[int], bytes] = lambda n: b"%x" % n, last: bytes = b"0"
) -> bytes:
    """Chunks as a chunked body's framing has them, without the last chunk and trailers."""
    return b"".join(line(len(c)) + b"\r\n" + c + b"\r\n" for c in chunks)


def run(
    pieces: list[bytes],
    state: Chunked,
    idle: float | None = 5.0,
    pause: float = 0.0,
    close: bool = False,
    buffer_size: int = 64 * KiB,
) -> tuple[PumpEnd, Collector, bytes]:
    """
    Send C{pieces} (pausing between them) to a pump that starts in C{state};
    return how it ended, what it lent, and what it left in the socket.
    """
    a, b = socket.socketpair()
    a.setblocking(False)
    sink = Collector()
    ends: list[PumpEnd] = []
    pump = SocketPump(
        InlineReactor(),  # type: ignore[arg-type]
        a,
        0,
        sink,
        idle,
        buffer_size=buffer_size,
        buffers=2,
        chunked=state,
    )
    pump.start().addCallback(ends.append)

    def send() -> None:
        for piece in pieces:
            b.sendall(piece)
            if pause:
                time.sleep(pause)
        if close:
            b.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    pump._thread.join(30)
    sender.join(30)
    assert ends, "the pump did not end"
    rest = b""
    try:
        while chunk := a.recv(65536):
            rest += chunk
    except BlockingIOError:
        pass
    a.close()
    b.close()
    return ends[0], sink, rest


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points})
    return [data[x:y] for x, y in zip([0, *marks], [*marks, len(data)], strict=True) if y > x]


LINES = st.sampled_from(
    [
        lambda n: b"%x" % n,
        lambda n: b"%X" % n,
        lambda n: b"00%x" % n,
        lambda n: b"%x;name=value" % n,
        lambda n: b'%x;a="q r";b' % n,
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=6),
    LINES,
    st.sampled_from(["CHUNK_LENGTH", "CRLF", "BODY"]),
    st.sampled_from([b"0\r\n\r\n", b"0;x=y\r\n\r\n", b"000\r\nDigest: 1\r\nX: y\r\n\r\n"]),
    st.lists(st.integers(min_value=0), max_size=12),
    st.integers(min_value=0, max_value=2**32),
)
def test_any_chunking_lends_exactly_the_data_and_stops_at_the_last_chunk(
    sizes: list[int],
    line: Callable[[int], bytes],
    start: str,
    end: bytes,
    points: list[int],
    seed: int,
) -> None:
    """Whatever the chunk sizes, size-line spellings (case, leading zeros, extensions) and the way the bytes arrive, the pump lends the chunks' data in order and stops at the last chunk: what it read of that line (and its trailers) plus what it left in the socket is exactly what follows the data, and the next request is all still in the socket."""
    rng = random.Random(seed)
    chunks = [rng.randbytes(n) for n in sizes]
    data = b"".join(chunks)
    if start == "BODY":
        # Taken over in the middle of the first chunk: 10 of its bytes already read.
        first = chunks[0]
        stream = first[10:] + b"\r\n" + encode(chunks[1:], line)
        state = Chunked(left=len(first) - 10, crlf=True, limit=1 << 40)
        data = data[10:]
        if len(first) <= 10:
            stream = encode(chunks[1:], line)
            state = Chunked(left=0, crlf=False, limit=1 << 40)
            data = b"".join(chunks[1:])
    elif start == "CRLF":
        stream = b"\r\n" + encode(chunks, line)
        state = Chunked(left=0, crlf=True, limit=1 << 40)
    else:
        stream = encode(chunks, line)
        state = Chunked(left=0, crlf=False, limit=1 << 40)
    ended, sink, rest = run(cut(stream + end + AFTER, points), state, pause=0.0005)
    assert ended.reason == "complete", ended
    assert sink.data == data
    assert ended.lent == len(data)
    assert ended.leftover + rest == end + AFTER
    assert ended.leftover.startswith(b"0") or not ended.leftover
    assert rest.endswith(AFTER)


def test_size_lines_that_trickle_in_a_byte_at_a_time() -> None:
    """Size lines and CRLFs that arrive one byte at a time, with pauses, are read as they come (the pump waits for the rest of a line, without spinning and without failing)."""
    chunks = [os.urandom(n) for n in (5, 70_000, 1, 4096)]
    stream = encode(chunks) + b"0\r\n\r\n" + AFTER
    pieces: list[bytes] = []
    at = 0
    for c in chunks:
        framing = len(b"%x\r\n" % len(c))
        pieces += [stream[i : i + 1] for i in range(at, at + framing)]
        at += framing
        pieces.append(stream[at : at + len(c) + 2])
        at += len(c) + 2
    pieces.append(stream[at:])
    ended, sink, rest = run(pieces, Chunked(0, False, 1 << 40), pause=0.02)
    assert ended.reason == "complete"
    assert sink.data == b"".join(chunks)
    assert ended.leftover + rest == b"0\r\n\r\n" + AFTER


def test_buffers_hold_only_data_and_end_on_aligned_offsets() -> None:
    """With curl's chunks (0xfff4 bytes), each lent buffer holds data only, and all but the last end at a multiple of 4096 in the file."""
    chunks = [os.urandom(0xFFF4) for _ in range(20)]
    ended, sink, _ = run(
        [encode(chunks) + b"0\r\n\r\n"], Chunked(0, False, 1 << 40), buffer_size=256 * KiB
    )
    assert ended.reason == "complete"
    assert sink.data == b"".join(chunks)
    total = 0
    for c in sink.chunks[:-1]:
        total += len(c)
        assert total % 4096 == 0
    assert len(sink.chunks) >= 5


PAD = b"!" * 64


@pytest.mark.parametrize(
    ("stream", "why"),
    [
        (b"zz\r\n", "hexadecimal"),
        (b"-1\r\n", "hexadecimal"),
        (b"0x10\r\n", "hexadecimal"),
        (b" 10\r\n", "hexadecimal"),
        (b"1_0\r\n", "hexadecimal"),
        (b"10\r\r\n", "hexadecimal"),
        (b"f\r\n" + b"x" * 15 + b"XX", "CRLF"),
        (b"f\r\n" + b"x" * 15 + b"\r\n" + b"f\r\n" + b"y" * 15 + b"\n\r", "CRLF"),
        (b"10;\x01\r\n", "extension"),
        (b"10;a\\b\r\n", "extension"),
        (b"1" * (MAX_SIZE_LINE + 10), "longer"),
    ],
)
def test_broken_framing_ends_the_pump_as_malformed(stream: bytes, why: str) -> None:
    """Framing that twisted.web's decoder refuses (not hexadecimal, a sign, 0x, spaces, a CR inside the line, data not ended by CRLF, a bad extension, an endless size line) ends the pump as malformed, saying what was wrong."""
    ended, _, _ = run([stream + PAD], Chunked(0, False, 1 << 40))
    assert ended.reason == "malformed"
    assert why in str(ended.error)


def test_a_chunk_past_the_limit_ends_the_pump_before_its_data() -> None:
    """A chunk whose size would take the body past its limit ends the pump as too large, before any of that chunk's data is read."""
    ended, sink, _ = run(
        [encode([b"a" * 100]) + b"200\r\n" + b"b" * 0x200 + b"\r\n0\r\n\r\n"],
        Chunked(0, False, limit=300),
    )
    assert ended.reason == "too_large"
    assert sink.data == b"a" * 100


def test_a_client_that_closes_mid_chunk_ends_the_pump_with_eof() -> None:
    """A client that closes in the middle of a chunk: the pump ends with eof and lends what came."""
    ended, sink, _ = run([b"1000\r\n" + b"z" * 100], Chunked(0, False, 1 << 40), close=True)
    assert ended.reason == "eof"
    assert sink.data == b"z" * 100


def test_a_client_that_stops_sending_ends_the_pump_as_idle() -> None:
    """A client that stops in the middle of a size line sends nothing more: the pump ends as idle after the idle timeout."""
    started = time.monotonic()
    ended, _, _ = run([encode([b"q" * 10]) + b"10"], Chunked(0, False, 1 << 40), idle=0.5)
    assert ended.reason == "idle"
    assert time.monotonic() - started < 5


# Through a server.


def chunked_request(chunks: list[bytes], tail: bytes = b"0\r\n\r\n") -> bytes:
    return (
        b"PUT /jobs?profile=avi-mpeg4 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + encode(chunks)
        + tail
    )


@pytest_twisted.ensureDeferred
async def test_chunked_upload_read_by_a_pump_then_a_pipelined_request(
    served: tuple[int, Path],  # noqa: F811
    pumps: list[SocketPump],  # noqa: F811
) -> None:
    """A 16 MiB chunked PUT in chunks of many sizes is read through the reactor for its first MiBs, then by a pump; it is stored with the right SHA-256, and the request pipelined behind it on the same connection is answered too."""
    port, _ = served
    rng = random.Random(7)
    chunks: list[bytes] = []
    while sum(map(len, chunks)) < 16 * MiB:
        chunks.append(rng.randbytes(rng.choice([1, 7, 100, 0xFFF4, 65536, 300_000])))
    data = b"".join(chunks)
    request = chunked_request(chunks) + (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answer = await exchanged(port, request)
    first, _, second = answer.partition(b"HTTP/1.1 200")
    assert first.startswith(b"HTTP/1.1 201"), first[:300]
    assert hashlib.sha256(data).hexdigest().encode() in first
    assert b'"size": %d' % len(data) in first or b'"size":%d' % len(data) in first
    assert b'"status"' in second
    assert len(pumps) == 1
    assert pumps[0].received > 8 * MiB


async def answer_to_8_mib_then(port: int, tail: bytes) -> bytes:
    """The answer to a chunked PUT of 8 MiB of curl-sized chunks followed by C{tail}."""
    chunks = [os.urandom(0xFFF4) for _ in range(8 * MiB // 0xFFF4 + 1)]
    return await exchanged(port, chunked_request(chunks, tail))


@pytest_twisted.ensureDeferred
async def test_broken_chunk_mid_body_gets_a_json_400_and_leaves_nothing(
    served: tuple[int, Path],  # noqa: F811
    pumps: list[SocketPump],  # noqa: F811
) -> None:
    """A chunked body whose framing breaks after 8 MiB, while a pump reads it, is answered 400 with a JSON error, and its partial file is removed."""
    port, data_dir = served
    answer = await answer_to_8_mib_then(port, b"12zz\r\n" + b"!" * 100)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b'"bad_request"' in answer and b"malformed chunked body" in answer
    assert len(pumps) == 1
    await settle(lambda: no_uploads_left(data_dir), timeout=10)


@pytest_twisted.ensureDeferred
async def test_chunked_body_past_the_maximum_while_pumped_gets_413(
    served: tuple[int, Path],  # noqa: F811
    pumps: list[SocketPump],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chunked body read by a pump that announces a chunk past the maximum upload size is answered 413 at once, and its partial file is removed."""
    port, data_dir = served
    resource_max: list[int] = []
    original = bodies.RawBody.room

    def room(self: bodies.RawBody) -> int:
        # The served site allows 1 GiB: pretend this body may bring 12 MiB in all.
        left = original(self) - ((1 << 30) - 12 * MiB)
        resource_max.append(left)
        return left

    monkeypatch.setattr(bodies.RawBody, "room", room)
    answer = await answer_to_8_mib_then(port, b"800000\r\n" + b"x" * 1000)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b'"too_large"' in answer
    assert len(pumps) == 1 and resource_max
    await settle(lambda: no_uploads_left(data_dir), timeout=10)
