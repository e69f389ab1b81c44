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

The reactor keeps the connection: it stops reading while the pump runs,
still writes (C{100 Continue}), and reads the body's last bytes itself, so
the HTTP channel finishes the request the usual way.  A pump never reads past
the bytes it was given, so a pipelined request stays in the socket.
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

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads

# Hands a full buffer (a view of it) to whoever writes it, with the function
# that gives the buffer back once it is written.  Called on the pump's thread.
Sink = Callable[[memoryview, Callable[[], None]], None]
# Where the file being written starts, as an offset in the body: buffers are
# cut so that they start at multiples of ALIGN in that file.  Asked on the
# pump's thread before each buffer, after the sink has seen the one before.
FileStart = Callable[[], int]

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
# The first buffer ends where the file's offset is a multiple of this, so that
# every full buffer after it can be written with O_DIRECT (see _spool).
ALIGN = 4096


@dataclass(frozen=True)
class PumpEnd:
    """
    Why a pump stopped: C{complete} (all its bytes read), C{eof} (the client
    closed first), C{idle} (nothing for the idle timeout), C{stopped}
    (L{SocketPump.stop}), C{error} (a socket error, in C{error}) or
    C{failed} (the sink raised C{error}: a body it refuses).
    C{received} is every byte read from the socket.
    """

    reason: str
    received: int
    error: BaseException | None = None


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
        idleTimeout: float | None,
        offset: int = 0,
        bufferSize: int = BUFFER_SIZE,
        buffers: int = BUFFERS,
        fileStart: FileStart | None = None,
    ) -> None:
        self._reactor = reactor
        # A duplicate of the descriptor: if the reactor closes the connection
        # while the thread is in recv, the thread never reads a reused number.
        self._sock = sock.dup()
        self._left = nbytes
        self._sink = sink
        self._idle = idleTimeout
        self._offset = offset
        self._fileStart = fileStart
        # Anonymous maps: page-aligned, as O_DIRECT wants them.
        self._free: queue.LifoQueue[mmap.mmap] = queue.LifoQueue()
        for _ in range(buffers):
            self._free.put(mmap.mmap(-1, bufferSize))
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
            end = self._pump()
        except OSError as e:
            end = PumpEnd("error", self.received, e)
        except Exception as e:
            end = PumpEnd("failed", self.received, e)
        finally:
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
        sock = self._sock
        idle = 0.0
        while self._left > 0:
            buf = self._buffer()
            if buf is None:
                return PumpEnd("stopped", self.received)
            view = memoryview(buf)
            start = self._fileStart() if self._fileStart is not None else 0
            want = min(len(buf) - (self._offset - start) % ALIGN, self._left)
            # Wake this thread when a good part of the buffer has come, not
            # for every segment: the wake-ups cost more than the copying.
            lowat = max(1, min(want, len(buf)) // 4)
            if lowat != self._lowat:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                self._lowat = lowat
            filled = 0
            why: str | None = None
            error: BaseException | None = None
            while filled < want:
                if self._stop:
                    why = "stopped"
                    break
                try:
                    n = sock.recv_into(view[filled:want], 0, socket.MSG_WAITALL)
                except BlockingIOError:
                    idle += _POLL
                    if self._idle and idle >= self._idle:
                        why = "idle"
                        break
                    continue
                except OSError as e:
                    why, error = "error", e
                    break
                if n == 0:
                    why = "eof"
                    break
                idle = 0.0
                filled += n
                self.received += n
                if filled < want:
                    # The receive timeout ended a short read: a slow client's
                    # bytes go on to the disk now rather than wait in memory.
                    break
            if filled:
                self._left -= filled
                self._offset += filled
                self._sink(view[:filled], partial(self._free.put, buf))
            else:
                self._free.put(buf)
            if why is not None:
                return PumpEnd(why, self.received, error)
        return PumpEnd("complete", self.received)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1e6))
