"""
How a spooled file's bytes reach the disk: its space claimed a step ahead of
them (L{ALLOCATION_STEP}), bytes that do not come in aligned buffers copied
into staging buffers, and every buffer written at its offset by writer
threads, with C{O_DIRECT} where it is aligned (see L{ParallelWriter}).
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
from functools import partial
from pathlib import Path
from typing import IO, Any

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


class Lent:
    """
    A buffer lent by a L{transcoder.http.pump.SocketPump}: hashed by the spool,
    written by a L{ParallelWriter}, and given back once both are done.
    """

    __slots__ = ("_holds", "_lock", "give_back", "hashed", "view")

    def __init__(
        self, view: memoryview, give_back: Callable[[], None], hashed: bool = False
    ) -> None:
        self.view = view
        self.give_back = give_back
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
            self.give_back()


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


class ParallelWriter:
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
        on_error: Callable[[OSError], None],
        writers: int = WRITERS,
        pwrite: PWrite = os.pwrite,
    ) -> None:
        self._fd = fd
        self._pwrite = pwrite
        self._on_error = on_error
        self._direct: int | None = None
        if _O_DIRECT:
            try:
                self._direct = os.open(path, os.O_WRONLY | os.O_CLOEXEC | _O_DIRECT)
            except OSError:
                pass
        self._jobs: queue.SimpleQueue[tuple[Lent, int] | None] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self.error: OSError | None = None
        self._threads = [
            threading.Thread(target=self._run, name="transcoder-writer", daemon=True)
            for _ in range(writers)
        ]
        for t in self._threads:
            t.start()

    def submit(self, item: Lent, offset: int) -> None:
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
                    self._on_error(e)
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
        self._pwrite_all(self._fd, view, offset)

    def _pwrite_all(self, fd: int, view: memoryview, offset: int) -> None:
        while view:
            n = self._pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "write made no progress")
            view, offset = view[n:], offset + n


class FileWriter:
    """
    One file being written: its size and hashes, and the way its bytes reach
    the disk.  Used on the spool's thread only.
    """

    def __init__(
        self,
        path: Path,
        f: IO[bytes],
        md5: bool,
        on_error: Callable[[OSError], None],
        pwrite: PWrite,
        staging_buffers: int = STAGING_BUFFERS,
        declared: int | None = None,
        start: int = 0,
        sha: Any = None,
        extra: tuple[Any, ...] = (),
    ) -> None:
        """
        @param start: where the bytes go in the file (a resumable upload's
            offset); C{size} counts from there, and ends as the file's end.
        @param sha: a SHA-256 object to continue (the bytes before C{start}).
        @param extra: more hash objects fed every byte (a chunk's checksum).
        """
        self.path = path
        self._f = f
        # Allocated so far, of a file whose size is known (see ALLOCATION_STEP).
        self._declared = declared if isinstance(f, io.FileIO) else None
        self._allocated = start
        self._staging_buffers = staging_buffers
        self.size = start
        self.sha = sha if sha is not None else hashlib.sha256()
        self.md5 = hashlib.md5() if md5 else None
        self.extra = list(extra)
        # A file object that is not a real file (a test's stand-in) is
        # written in order, through its own write().
        self._writer = (
            ParallelWriter(path, f.fileno(), on_error, pwrite=pwrite)
            if isinstance(f, io.FileIO)
            else None
        )
        self._staging: mmap.mmap | None = None
        self._staged = 0
        self._staged_at = 0
        self._made = 0
        self._free: queue.LifoQueue[mmap.mmap] = queue.LifoQueue()

    @property
    def failed(self) -> bool:
        """True once a writer thread failed (it has reported the error)."""
        return self._writer is not None and self._writer.error is not None

    def write(self, data: bytes | bytearray | memoryview, lent: Lent | None) -> None:
        n = len(data)
        if self._declared is not None and self.size + n > self._allocated:
            self._claim(self.size + n)
        writer = self._writer
        if writer is None:
            _write_all(self._f, data)
            self.size += n
        elif lent is not None and not (self.size % ALIGN or n % ALIGN):
            # Aligned already: written from the lender's buffer, no copy.
            self._flush_staging()
            writer.submit(lent, self.size)
            self.size += n
        else:
            self._stage(memoryview(data))
        if lent is not None and lent.hashed:
            return
        self.sha.update(data)
        if self.md5 is not None:
            self.md5.update(data)
        for h in self.extra:
            h.update(data)

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
                self._staged_at = self.size
            k = min(STAGING_SIZE - self._staged, len(view))
            self._staging[self._staged : self._staged + k] = view[:k]
            self._staged += k
            self.size += k
            view = view[k:]
            if self._staged == STAGING_SIZE:
                self._flush_staging()

    def _buffer(self) -> mmap.mmap:
        # Most recently used first, so that a slow upload touches one buffer.
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        if self._made < self._staging_buffers:
            self._made += 1
            return mmap.mmap(-1, STAGING_SIZE)
        return self._free.get()

    def _flush_staging(self) -> None:
        buf, self._staging = self._staging, None
        if buf is None or self._writer is None:
            return
        item = Lent(memoryview(buf)[: self._staged], partial(self._free.put, buf))
        self._writer.submit(item, self._staged_at)
        item.release()

    def sync(self) -> int | None:
        """
        Make every byte so far durable: wait for the writers, write what is
        staged (its buffer stays, to be written whole once full, so that the
        writes after it stay aligned), C{fdatasync}.  The bytes now durable,
        or None after a write error (the writer reported it).

        @raise OSError: the staged bytes or the sync failed.
        """
        writer = self._writer
        if writer is not None:
            if writer.drain() is not None:
                return None
            if self._staging is not None and self._staged:
                staged = memoryview(self._staging)[: self._staged]
                writer._pwrite_all(self._f.fileno(), staged, self._staged_at)
        os.fdatasync(self._f.fileno())
        return self.size

    def close(self) -> OSError | None:
        """Write what is staged, wait for the writers, close; the first write error."""
        error = None
        if self._writer is not None:
            self._flush_staging()
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
