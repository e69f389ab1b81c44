"""
Reading the bulk of a large body straight from its socket, on a thread.

Through the reactor, every chunk of a body is a fresh C{bytes} from C{recv},
then a trip through the HTTP channel, its transfer decoder and the request,
all holding the GIL: about 0.7 CPU s/GiB beside the kernel's copies and the
hash (measured; see docs/performance.md).  For a body whose length is known,
L{SocketPump} takes the socket's reading over for all but its last bytes:
a thread C{recv_into}s a few reusable buffers and lends each, full, to the
spool's thread, which writes and hashes it and gives it back.  Both threads
release the GIL for all of that, so an upload costs about what the kernel's
copies and SHA-256 cost, as in nginx plus a hash.

A raw body's pump hashes it itself, a quarter buffer at a time as it comes,
where it may give the socket a 32 MiB receive buffer (root may: see
L{_big_receive_buffer}).  SHA-256 of bytes this core has just received costs
about 0.55 CPU s/GiB; on the spool's thread, which reads them from another
core's cache or from memory, 0.85 to 1.0.  The big buffer lets the client
send on while the pump hashes; without it, hashing here was no cheaper and
slower (measured; docs/performance.md), so the spool's thread hashes.

The reactor keeps the connection: it stops reading while the pump runs,
still writes (C{100 Continue}), and reads the body's last bytes itself, so
the HTTP channel finishes the request the usual way.  A pump never reads past
the bytes it was given, so a pipelined request stays in the socket.

A chunked body (C{curl -T -}) has no length to stop at, so its pump reads
the chunks' framing itself (see L{transcoder.http.chunked}): each size line
is peeked at and taken, each chunk's bytes are received straight into a
buffer, which holds nothing but the body's data, and the pump stops at the
size line of the last chunk, which it leaves in the socket for the HTTP
channel's own decoder.
"""

from __future__ import annotations

import mmap
import queue
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads

from transcoder.http.chunked import AFTER_DATA, SCRATCH, Chunked, Framing, MalformedChunk, TooLarge

# Hands a full buffer (a view of it) to whoever writes it, with the function
# that gives the buffer back once it is written.  Called on the pump's thread.
Sink = Callable[[memoryview, Callable[[], None]], None]
# Where the file being written starts, as an offset in the body: buffers are
# cut so that they start at multiples of ALIGN in that file.  Asked on the
# pump's thread before each buffer, after the sink has seen the one before.
FileStart = Callable[[], int]
# The hash objects a pump feeds what it reads, given a "stop now?" check;
# None to leave the hashing to the sink.
Hashes = Callable[[Callable[[], bool]], "list[Any] | None"]

# Per buffer the threads hand over and wake each other a few times, which
# cost more than the copying itself: 512 KiB buffers took about 1.2 CPU s/GiB,
# 2 MiB buffers about 0.9 and 4 MiB 0.86 (measured; docs/performance.md).
BUFFER_SIZE = 2 << 20
# Buffers lent at once: the pump waits for one to come back (a slow disk
# slows the client) rather than allocate, so memory stays bounded.  Three
# keep a fast upload going (one filling, one hashed, one being written); the
# free ones are reused most recent first, so a slower upload touches fewer.
BUFFERS = 3
# How often a waiting pump looks at its stop flag and counts idle time.
_POLL = 0.25
# Reads of at least this many bytes set the low-water mark to their size.
_WAKE_AT = 16 * 1024
# The first buffer ends where the file's offset is a multiple of this, so that
# every full buffer after it can be written with O_DIRECT (see http/writer.py).
ALIGN = 4096


@dataclass(frozen=True)
class PumpEnd:
    """
    Why a pump stopped: C{complete} (all its bytes read; for a chunked body,
    the last chunk is next), C{eof} (the client closed first), C{idle}
    (nothing for the idle timeout), C{stopped} (L{SocketPump.stop}),
    C{error} (a socket error, in C{error}), C{failed} (the sink raised
    C{error}: a body it refuses), C{malformed} (chunked framing that breaks
    the rules, said in C{error}) or C{too_large} (a chunk past the limit).
    C{received} is every byte read from the socket, C{lent} the body's data
    among them (the same but for a chunked body's framing).
    """

    reason: str
    received: int
    error: BaseException | None = None
    lent: int = -1
    #: A chunked body's framing read but not understood: the start of the
    #: last chunk's size line, for the HTTP channel.
    leftover: bytes = b""


class _End(Exception):
    def __init__(self, why: str, error: BaseException | None = None) -> None:
        self.why = why
        self.error = error


class SocketPump:
    """
    Reads C{nbytes} from a connected socket on a thread of its own and lends
    them, a buffer at a time, to a L{Sink}.

    The caller must stop the reactor reading that socket before L{start} and
    may resume only once the L{Deferred} from L{start} has fired, on the
    reactor thread, with a L{PumpEnd}.
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        sock: socket.socket,
        nbytes: int,
        sink: Sink,
        idle_timeout: float | None,
        offset: int = 0,
        buffer_size: int = BUFFER_SIZE,
        buffers: int = BUFFERS,
        file_start: FileStart | None = None,
        chunked: Chunked | None = None,
        hashes: Hashes | None = None,
    ) -> None:
        self._reactor = reactor
        # A duplicate of the descriptor: if the reactor closes the connection
        # while the thread is in recv, the thread never reads a reused number.
        self._sock = sock.dup()
        self._left = nbytes
        self._sink = sink
        self._idle = idle_timeout
        self._offset = offset
        self._file_start = file_start
        self._chunked = chunked
        self._hashes = hashes
        self._buffer_size = buffer_size
        #: Whether the pump hashes what it lends (see _pump).
        self.hashing = False
        self._lent = 0
        self._idle_for = 0.0
        # Anonymous maps: page-aligned, as O_DIRECT wants them.
        self._free: queue.LifoQueue[mmap.mmap] = queue.LifoQueue()
        for _ in range(buffers):
            self._free.put(mmap.mmap(-1, buffer_size))
        self._stop = False
        self._lowat = 1
        #: Bytes read so far; read by the reactor thread to judge the rate.
        self.received = 0
        #: Set while the pump waited for a buffer (the server's own slowness,
        #: not the client's); the reactor thread clears it when it looks.
        self.stalled = False
        self._done: Deferred[PumpEnd] = Deferred()
        self._thread = threading.Thread(target=self._run, name="transcoder-pump", daemon=True)

    def start(self) -> Deferred[PumpEnd]:
        self._thread.start()
        return self._done

    def stop(self, disconnect: bool = False) -> None:
        """
        Stop soon (within a fraction of a second).  With C{disconnect}, also
        shut the connection down, for when the reactor has already dropped it:
        the duplicate descriptor would otherwise keep it open.
        """
        self._stop = True
        if disconnect:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # The pump's thread.

    def _buffer(self) -> mmap.mmap | None:
        while not self._stop:
            try:
                return self._free.get(timeout=_POLL)
            except queue.Empty:
                self.stalled = True
        return None

    def _waited_for_server(self) -> bool:
        """A wait on the spool timed out: the server's slowness, not the client's.  Stop now?"""
        self.stalled = True
        return self._stop

    def _run(self) -> None:
        sock = self._sock
        end = PumpEnd("error", 0)
        try:
            # Blocking reads with MSG_WAITALL fill a buffer in one call, where
            # polling took a dozen; a receive timeout keeps the stop flag and
            # the idle clock looked at.  The blocking flag belongs to the
            # connection, which the reactor shares: it is set back below,
            # before the reactor reads again.
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(_POLL))
            self._lowat = 1
            end = self._pump() if self._chunked is None else self._pump_chunked(self._chunked)
        except OSError as e:
            end = PumpEnd("error", self.received, e)
        except Exception as e:
            end = PumpEnd("failed", self.received, e)
        finally:
            if end.lent < 0:
                end = PumpEnd(end.reason, end.received, end.error, self._lent, end.leftover)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(0))
                # The reactor's poll would not see fewer bytes than this.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                sock.setblocking(False)
            except OSError:
                pass
            sock.close()
            self._reactor.callFromThread(self._done.callback, end)

    def _pump(self) -> PumpEnd:
        hashers: list[Any] = []
        if self._hashes is not None and _big_receive_buffer(self._sock):
            hashers = self._hashes(self._waited_for_server) or []
            if self._stop:
                return PumpEnd("stopped", self.received)
        self.hashing = bool(hashers)
        # Hashed a quarter buffer at a time, as it comes, while it is in this
        # core's cache; the low-water mark wakes the thread once a quarter.
        piece = max(ALIGN, self._buffer_size // 4) if hashers else self._buffer_size
        while self._left > 0:
            buf = self._buffer()
            if buf is None:
                return PumpEnd("stopped", self.received)
            view = memoryview(buf)
            start = self._file_start() if self._file_start is not None else 0
            want = min(len(buf) - (self._offset - start) % ALIGN, self._left)
            filled = 0
            why: str | None = None
            error: BaseException | None = None
            while filled < want:
                end = min(want, filled + piece)
                # Wake this thread when a good part of the buffer has come,
                # not for every segment: the wake-ups cost more than the
                # copying.  No more than is asked for, which surely comes.
                self._set_lowat(max(1, min(end - filled, len(buf) // 4)))
                try:
                    n = self._read_into([view[filled:end]])
                except _End as e:
                    why, error = e.why, e.error
                    break
                for h in hashers:
                    h.update(view[filled : filled + n])
                filled += n
                if filled < end:
                    # The receive timeout ended a short read: a slow client's
                    # bytes go on to the disk now rather than wait in memory.
                    break
            if filled:
                self._left -= filled
            self._lend(buf, view, filled)
            if why is not None:
                return PumpEnd(why, self.received, error)
        return PumpEnd("complete", self.received)

    def _lend(self, buf: mmap.mmap, view: memoryview, filled: int) -> None:
        if filled:
            self._offset += filled
            self._lent += filled
            self._sink(view[:filled], partial(self._free.put, buf))
        else:
            self._free.put(buf)

    def _pump_chunked(self, state: Chunked) -> PumpEnd:
        # One scattering receive a chunk, in the steady state: its data
        # straight into the buffer, and the framing around it (see
        # Framing.plan) into a small one.  Reads are never for more than a
        # valid body surely holds, so the low-water mark can be the whole
        # read: the thread wakes once a chunk, not once a segment.
        framing = Framing(state)
        scratch = memoryview(bytearray(SCRATCH))
        lf, tail = scratch[:1], scratch[1 : 1 + AFTER_DATA]
        while True:
            buf = self._buffer()
            if buf is None:
                return PumpEnd("stopped", self.received)
            view = memoryview(buf)
            # Only data goes into the buffer, so its offsets are the file's.
            want = len(buf) - self._offset % ALIGN
            filled = 0
            end: PumpEnd | None = None
            try:
                while filled < want and not framing.last:
                    room = want - filled
                    size = framing.line_ends()
                    if size and room >= size + AFTER_DATA:
                        # The steady state: the size line's LF, the whole
                        # chunk into place, and the 7 bytes after it.
                        self._set_lowat(size if size >= _WAKE_AT else 1)
                        data = view[filled : filled + size]
                        got = self._read_into([lf, data, tail])
                        if got == size + 1 + AFTER_DATA and lf[0] == 10:
                            framing.chunk(size)
                            filled += size
                            out = bytearray()
                            framing.after(tail, out)
                            if out:
                                view[filled : filled + len(out)] = out
                                filled += len(out)
                            continue
                        # Short, or not what a valid body holds: the general way.
                        out = bytearray()
                        framing.parse(lf[: min(got, 1)], out)
                        k = min(max(got - 1, 0), size)
                        if k:
                            # parse() did not fail on the LF, so data follows.
                            filled += k
                            framing.received(k)
                        if got > size + 1:
                            framing.parse(tail[: got - size - 1], out)
                            view[filled : filled + len(out)] = out
                            filled += len(out)
                        break
                    parts: list[memoryview] = []
                    at = 0
                    for kind, n in framing.plan():
                        if kind == "data":
                            k = min(n, room)
                            parts.append(view[filled : filled + k])
                            room -= k
                            if k < n:
                                break
                        elif room < n:
                            # Data may come among framing bytes, and is
                            # copied into the buffer: it goes in the next.
                            break
                        else:
                            parts.append(scratch[at : at + n])
                            at += n
                    if not parts:
                        break
                    asked = sum(len(v) for v in parts)
                    # Wake when a whole chunk has come (a valid body brings
                    # every byte asked for), not for each segment of it; but
                    # a few bytes of framing come at once, or after a pause.
                    self._set_lowat(asked if asked >= _WAKE_AT else 1)
                    got = self._read_into(parts)
                    out = bytearray()
                    left = got
                    for part in parts:
                        k = min(left, len(part))
                        left -= k
                        if part.obj is buf:
                            filled += k
                            framing.received(k)
                        else:
                            framing.parse(part[:k], out)
                            if out:
                                view[filled : filled + len(out)] = out
                                filled += len(out)
                                out.clear()
                        if not left:
                            break
                    if got < asked:
                        # The receive timeout ended a short read: what came
                        # goes on to the disk now.
                        break
            except _End as e:
                end = PumpEnd(e.why, self.received, e.error)
            except MalformedChunk as e:
                end = PumpEnd("malformed", self.received, e)
            except TooLarge:
                end = PumpEnd("too_large", self.received)
            self._lend(buf, view, filled)
            if end is not None:
                return end
            if framing.last:
                return PumpEnd("complete", self.received, leftover=bytes(framing.pending))

    def _set_lowat(self, lowat: int) -> None:
        """Wake this thread's receives once C{lowat} bytes are there (set only when it changes)."""
        if lowat != self._lowat:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            self._lowat = lowat

    def _read_into(self, parts: list[memoryview]) -> int:
        """
        Receive into C{parts}, all of them unless the receive timeout cut
        it short; raises L{_End} for a stop, an idle client, the end of the
        stream or a socket error.
        """
        while True:
            if self._stop:
                raise _End("stopped")
            try:
                n = self._sock.recvmsg_into(parts, 0, socket.MSG_WAITALL)[0]
            except BlockingIOError:
                self._idle_for += _POLL
                if self._idle and self._idle_for >= self._idle:
                    raise _End("idle") from None
                continue
            except OSError as e:
                raise _End("error", e) from None
            if n == 0:
                raise _End("eof")
            self._idle_for = 0.0
            self.received += n
            return n


# setsockopt's SO_RCVBUFFORCE (Linux): past rmem_max, for a privileged process.
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
BIG_RECEIVE_BUFFER = 32 << 20


def _big_receive_buffer(sock: socket.socket) -> bool:
    """
    Give the socket a receive buffer big enough that the client never waits
    while the pump hashes; False where that is not allowed.  The kernel then
    holds up to twice that for this one connection (one pump at a time)
    when the server falls behind, before TCP makes the client wait.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, BIG_RECEIVE_BUFFER)
    except OSError:
        return False
    return True


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))
