"""
Writing a request body's files on threads beside the reactor.

The reactor thread only parses HTTP and hands chunks over (or a
L{transcoder.http.pump.SocketPump} lends whole buffers, from its own thread);
hashing (SHA-256 alone costs about 0.55 CPU s/GiB here) happens on the spool's
thread (or on a pump's, see L{Spool.hashes}), and writing on two writer
threads (see L{_ParallelWriter}), all of which release the GIL, so an upload
can use both cores.  The backlog between the reactor and the spool is
bounded: above C{highWater} bytes the reactor is told to stop reading from
the socket, and told to resume once the thread has caught up, so a slow disk
slows the client instead of growing memory.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import io
import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads

Opener = Callable[[Path], IO[bytes]]


def _open(path: Path) -> IO[bytes]:
    # Unbuffered: chunks are already large, and a buffer would copy them again.
    return open(path, "xb", buffering=0)


@dataclass
class SpooledFile:
    path: Path
    size: int
    sha256: str
    md5: str | None


# fallocate(2) itself, not posix_fallocate: where a filesystem cannot
# allocate, glibc's posix_fallocate writes a zero into every block instead.
try:
    _libc: Any = ctypes.CDLL(None, use_errno=True)
    _fallocate: Any = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
except (OSError, AttributeError):
    _fallocate = None


def _allocate(fd: int, offset: int, length: int) -> bool:
    """
    Allocate C{length} bytes of the file from C{offset}, extending it; False
    where the filesystem cannot (then the bytes are simply written).

    @raise OSError: ENOSPC or EDQUOT.
    """
    if _fallocate is None:
        return False
    if _fallocate(fd, 0, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSPC, errno.EDQUOT):
        raise OSError(err, os.strerror(err))
    return False


# A file of known size is allocated this far ahead of its bytes, never all at
# once: a client that declares 60 MB and sends 70 KB now and then must not
# hold 60 MB of a small disk that other uploads need (issue 14).  The direct
# writes inside an allocated range are still not extending ones (what the
# allocation saves, see Spool.open), for one fallocate call per step.
ALLOCATION_STEP = 8 << 20


def _write_all(f: IO[bytes], data: bytes | bytearray | memoryview) -> None:
    # A raw file's write() may write less than asked (a full disk, a signal).
    view = memoryview(data)
    while view:
        written = f.write(view)
        if written is None or written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


class _Open:
    __slots__ = ("md5", "path", "size")

    def __init__(self, path: Path, md5: bool, size: int | None) -> None:
        self.path = path
        self.md5 = md5
        self.size = size


class _Lent:
    """
    A buffer lent by a L{transcoder.http.pump.SocketPump}: hashed by the spool,
    written by a L{_ParallelWriter}, and given back once both are done.
    """

    __slots__ = ("_holds", "_lock", "giveBack", "hashed", "view")

    def __init__(
        self, view: memoryview, giveBack: Callable[[], None], hashed: bool = False
    ) -> None:
        self.view = view
        self.giveBack = giveBack
        #: Hashed already, by the lender (see Spool.hashes).
        self.hashed = hashed
        self._holds = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            self._holds += 1

    def release(self) -> None:
        with self._lock:
            self._holds -= 1
            last = self._holds == 0
        if last:
            self.giveBack()


# O_DIRECT writes need their offset and length (and the buffer's address: the
# pump's buffers are page-aligned) to be multiples of the device's block size.
ALIGN = 4096
WRITERS = 2
# Bytes that do not come in lent, aligned buffers (from the reactor: chunked
# and multipart bodies, a raw body's first and last bytes) are copied into
# staging buffers of this size, which are written whole.  A copy costs a
# tenth of what writing into fresh page-cache pages costs here.  Smaller
# buffers mean more hand-overs between threads: a 1 GiB multipart upload
# took 1.63 s with 256 KiB ones and 1.23 s with 1 MiB (measured).
STAGING_SIZE = 1 << 20
STAGING_BUFFERS = 4
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
PWrite = Callable[[int, memoryview, int], int]


class _ParallelWriter:
    """
    Writes lent buffers at their offsets, on C{writers} threads at once, with
    C{O_DIRECT} where a buffer is aligned, and through the page cache where it
    is not (or where the filesystem refuses C{O_DIRECT}, as tmpfs does).

    Why not plain writes: on these virtual machines a write into page-cache
    pages the guest has not used lately costs up to 2.4 CPU s/GiB (the host
    backs each page as it is first touched), more than all the rest of an
    upload; a direct write costs about 0.1 s/GiB, and two in flight reach
    about 2 GB/s (measured; docs/performance.md).  An upload is written once
    and read back later by an encoder, so the page cache gains nothing from it.
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        onError: Callable[[OSError], None],
        writers: int = WRITERS,
        pwrite: PWrite = os.pwrite,
    ) -> None:
        self._fd = fd
        self._pwrite = pwrite
        self._onError = onError
        self._direct: int | None = None
        if _O_DIRECT:
            try:
                self._direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
            except OSError:
                pass
        self._jobs: queue.SimpleQueue[tuple[_Lent, int] | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self.error: OSError | None = None
        self._threads = [
            threading.Thread(target=self._run, name="transcoder-writer", daemon=True)
            for _ in range(writers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, item: _Lent, offset: int) -> None:
        """Write C{item} at C{offset} soon; it is held until written."""
        with self._idle:
            self._outstanding += 1
        item.hold()
        self._jobs.put((item, offset))

    def drain(self) -> OSError | None:
        """Wait until every submitted buffer is written; the first error, if any."""
        with self._idle:
            while self._outstanding:
                self._idle.wait()
        return self.error

    def close(self) -> None:
        """Drain, stop the threads and close the C{O_DIRECT} descriptor."""
        self.drain()
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            item, offset = job
            try:
                if self.error is None:
                    self._write(item.view, offset)
            except OSError as e:
                first = False
                with self._idle:
                    if self.error is None:
                        self.error = e
                        first = True
                if first:
                    self._onError(e)
            finally:
                item.release()
                with self._idle:
                    self._outstanding -= 1
                    if not self._outstanding:
                        self._idle.notify_all()

    def _write(self, view: memoryview, offset: int) -> None:
        direct = self._direct
        if direct is not None and not (offset % ALIGN or len(view) % ALIGN):
            try:
                n = self._pwrite(direct, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # This buffer (its address) or the filesystem does not suit
                # O_DIRECT: this one goes through the page cache.
                n = 0
            view, offset = view[n:], offset + n
        self._pwriteAll(self._fd, view, offset)

    def _pwriteAll(self, fd: int, view: memoryview, offset: int) -> None:
        while view:
            n = self._pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            view, offset = view[n:], offset + n


class _File:
    """
    One file being written: its size and hashes, and the way its bytes reach
    the disk.  Used on the spool's thread only.
    """

    def __init__(
        self,
        path: Path,
        f: IO[bytes],
        md5: bool,
        onError: Callable[[OSError], None],
        pwrite: PWrite,
        stagingBuffers: int = STAGING_BUFFERS,
        declared: int | None = None,
    ) -> None:
        self.path = path
        self._f = f
        # Allocated so far, of a file whose size is known (see ALLOCATION_STEP).
        self._declared = declared if isinstance(f, io.FileIO) else None
        self._allocated = 0
        self._stagingBuffers = stagingBuffers
        self.size = 0
        self.sha = hashlib.sha256()
        self.md5 = hashlib.md5() if md5 else None
        # A file object that is not a real file (a test's stand-in) is
        # written in order, through its own write().
        self._writer = (
            _ParallelWriter(path, f.fileno(), onError, pwrite=pwrite)
            if isinstance(f, io.FileIO)
            else None
        )
        self._staging: mmap.mmap | None = None
        self._staged = 0
        self._stagedAt = 0
        self._made = 0
        self._free: queue.LifoQueue[mmap.mmap] = queue.LifoQueue()

    @property
    def failed(self) -> bool:
        """True once a writer thread failed (it has reported the error)."""
        return self._writer is not None and self._writer.error is not None

    def write(self, data: bytes | bytearray | memoryview, lent: _Lent | None) -> None:
        n = len(data)
        if self._declared is not None and self.size + n > self._allocated:
            self._claim(self.size + n)
        writer = self._writer
        if writer is None:
            _write_all(self._f, data)
            self.size += n
        elif lent is not None and not (self.size % ALIGN or n % ALIGN):
            # Aligned already: written from the lender's buffer, no copy.
            self._flushStaging()
            writer.submit(lent, self.size)
            self.size += n
        else:
            self._stage(memoryview(data))
        if lent is not None and lent.hashed:
            return
        self.sha.update(data)
        if self.md5 is not None:
            self.md5.update(data)

    def _claim(self, end: int) -> None:
        # Before the bytes are handed to a writer thread, so that no write
        # lands beyond the allocation; never past the declared size, so
        # that the file ends with exactly the bytes written.
        assert self._declared is not None
        target = min(self._declared, max(end, self._allocated + ALLOCATION_STEP))
        if target <= self._allocated:
            return
        if _allocate(self._f.fileno(), self._allocated, target - self._allocated):
            self._allocated = target
        else:
            self._declared = None

    def _stage(self, view: memoryview) -> None:
        while view:
            if self._staging is None:
                self._staging = self._buffer()
                self._staged = 0
                self._stagedAt = self.size
            k = min(STAGING_SIZE - self._staged, len(view))
            self._staging[self._staged : self._staged + k] = view[:k]
            self._staged += k
            self.size += k
            view = view[k:]
            if self._staged == STAGING_SIZE:
                self._flushStaging()

    def _buffer(self) -> mmap.mmap:
        # Most recently used first, so that a slow upload touches one buffer.
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._stagingBuffers:
            self._made += 1
            return mmap.mmap(-1, STAGING_SIZE)
        return self._free.get()

    def _flushStaging(self) -> None:
        buf, self._staging = self._staging, None
        if buf is None or self._writer is None:
            return
        item = _Lent(memoryview(buf)[: self._staged], partial(self._free.put, buf))
        self._writer.submit(item, self._stagedAt)
        item.release()

    def close(self) -> OSError | None:
        """Write what is staged, wait for the writers, close; the first write error."""
        error = None
        if self._writer is not None:
            self._flushStaging()
            error = self._writer.drain()
            self._writer.close()
        self._f.close()
        return error

    def abandon(self) -> None:
        if self._writer is not None:
            self._writer.close()
        try:
            self._f.close()
        except OSError:
            pass


_CLOSE = object()
_FINISH = object()
_ABORT = object()


class _Hashes:
    __slots__ = ("event", "objects")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.objects: list[Any] | None = None


class Spool:
    """
    Writes one or more files, one after another, from chunks handed over by the
    reactor thread.

    Call L{open}, L{write} any number of times, L{closeFile}; repeat for more
    files; then L{finish}, or L{abort} at any time.  A write error (ENOSPC, EIO)
    is reported once through C{onError} on the reactor thread, and every file
    written so far is removed.
    """

    def __init__(
        self,
        reactor: IReactorThreads,
        onPressure: Callable[[bool], None],
        onError: Callable[[OSError], None],
        opener: Opener = _open,
        highWater: int = 4 << 20,
        pwrite: PWrite = os.pwrite,
        stagingBuffers: int = STAGING_BUFFERS,
    ) -> None:
        self._reactor = reactor
        self._stagingBuffers = stagingBuffers
        self._pwrite = pwrite
        self._errorReported = False
        self._onPressure = onPressure
        self._onError = onError
        self._opener = opener
        self._high = highWater
        self._low = highWater // 2
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        # Signalled as the backlog drains, for writers on other threads that wait.
        self._room = threading.Condition(self._lock)
        self._pending = 0
        self._paused = False
        self._done: Deferred[list[SpooledFile]] | None = None
        self._ended = False
        self._cleanup: Callable[[], None] | None = None
        # Files this spool created (only those are removed on abort).
        self._created: list[Path] = []
        self._thread = threading.Thread(target=self._run, name="transcoder-spool", daemon=True)
        self._thread.start()

    # Reactor-thread side.

    def open(self, path: Path, md5: bool = False, size: int | None = None) -> None:
        """
        Start a new file.  Given its C{size}, the space is allocated ahead of
        the bytes, L{ALLOCATION_STEP} at a time (never all of it at once: the
        size is only what the client declares): a full disk fails before the
        bytes of that step are sent to it, and the direct writes are not
        extending ones, which cost half the CPU (0.03 against 0.06 s/GiB).
        """
        self._queue.put(_Open(path, md5, size))

    def write(self, data: bytes, wait: bool = False) -> None:
        """
        Write C{data} to the open file.  On the reactor thread, a backlog above
        C{highWater} calls C{onPressure(True)}; another thread (a pump's)
        passes C{wait} and is held here while the backlog is above it.
        """
        n = len(data)
        with self._lock:
            if wait:
                while self._pending > self._high and not self._ended:
                    self._room.wait(0.25)
                self._pending += n
                self._queue.put(data)
                return
            self._pending += n
            pause = self._pending > self._high and not self._paused
            if pause:
                self._paused = True
        self._queue.put(data)
        if pause:
            self._onPressure(True)

    def lend(self, view: memoryview, giveBack: Callable[[], None], hashed: bool = False) -> None:
        """
        Write a buffer that stays its owner's: C{giveBack} is called once it
        is hashed and written (or dropped, after a failure), on the spool's
        thread or a writer's, whichever finishes with it last.  With
        C{hashed}, the lender has hashed it already (see L{hashes}).
        Callable from any thread; the owner bounds how much it lends, so
        this does not count towards the pressure that pauses the reactor.
        """
        self._queue.put(_Lent(view, giveBack, hashed))

    def hashes(self, stop: Callable[[], bool]) -> list[Any] | None:
        """
        The open file's hash objects, once every byte written or lent before
        has gone into them, for a lender on another thread to feed the bytes
        it lends from then on (passing C{hashed}), until it stops lending.
        Blocks until the spool's thread gets there; None if there is no open
        file, or C{stop()} turns true meanwhile.
        """
        ready = _Hashes()
        self._queue.put(ready)
        while not ready.event.wait(0.25):
            if stop() or self._ended:
                return None
        return ready.objects

    def closeFile(self) -> None:
        self._queue.put(_CLOSE)

    def finish(self) -> Deferred[list[SpooledFile]]:
        """Fires with every file once all of it is on disk; errbacks with the write error."""
        self._done = Deferred()
        self._queue.put(_FINISH)
        return self._done

    @property
    def ended(self) -> bool:
        """True once L{finish} fired or L{abort} was called."""
        return self._ended

    def abort(self, cleanup: Callable[[], None] | None = None) -> None:
        """
        Stop writing and remove every file, then run C{cleanup} on the spool's
        thread (once nothing holds the files any more).  Safe to call more
        than once.  Once L{finish} has fired the files belong to the caller:
        this only runs C{cleanup}, at once.
        """
        if self._ended:
            if cleanup is not None:
                cleanup()
            return
        self._ended = True
        self._cleanup = cleanup
        self._queue.put(_ABORT)

    # Spool-thread side.

    def _run(self) -> None:
        current: _File | None = None
        files: list[SpooledFile] = []
        failed = False

        def report(e: OSError) -> None:
            self._reactor.callFromThread(self._failed, e)

        while True:
            item = self._queue.get()
            if item is _ABORT:
                break
            if isinstance(item, _Lent | bytes | bytearray | memoryview):
                lent = item if isinstance(item, _Lent) else None
                data = item.view if isinstance(item, _Lent) else item
                if current is not None and current.failed:
                    failed = True
                if not failed and current is not None:
                    try:
                        current.write(data, lent)
                    except OSError as e:
                        failed = True
                        report(e)
                if lent is not None:
                    lent.release()
                else:
                    self._drained(len(data))
            elif isinstance(item, _Open):
                try:
                    f = self._opener(item.path)
                    self._created.append(item.path)
                    current = _File(
                        item.path,
                        f,
                        item.md5,
                        report,
                        self._pwrite,
                        self._stagingBuffers,
                        declared=item.size or None,
                    )
                except OSError as e:
                    failed = True
                    report(e)
            elif isinstance(item, _Hashes):
                if current is not None and not failed:
                    item.objects = [current.sha] + ([current.md5] if current.md5 else [])
                item.event.set()
            elif item is _CLOSE:
                if current is not None:
                    done, current = current, None
                    try:
                        if done.close() is not None:
                            failed = True  # the writer reported it
                    except OSError as e:
                        if not failed:
                            failed = True
                            report(e)
                    files.append(
                        SpooledFile(
                            done.path,
                            done.size,
                            done.sha.hexdigest(),
                            done.md5.hexdigest() if done.md5 is not None else None,
                        )
                    )
            elif item is _FINISH:
                if not failed:
                    # Done: the files are kept, and nothing more comes.
                    self._reactor.callFromThread(self._finished, files)
                    return
                # A failed spool waits for abort() to clean up.
        if current is not None:
            current.abandon()
        for p in self._created:
            try:
                os.unlink(p)
            except OSError:
                pass
        if self._cleanup is not None:
            self._cleanup()

    def _drained(self, n: int) -> None:
        with self._lock:
            self._pending -= n
            resume = self._paused and self._pending <= self._low
            if resume:
                self._paused = False
            if self._pending <= self._high:
                self._room.notify_all()
        if resume:
            self._reactor.callFromThread(self._onPressure, False)

    # Back on the reactor thread.

    def _finished(self, files: list[SpooledFile]) -> None:
        self._ended = True
        if self._done is not None:
            self._done.callback(files)

    def _failed(self, error: OSError) -> None:
        if self._errorReported:
            return
        self._errorReported = True
        self._onError(error)
        if self._done is not None and not self._done.called:
            self._done.errback(error)
